"""The training loop: setup -> train -> save, with a progress bar, evaluation and a metrics log.

``run(cfg)`` is what ``alignkit sft`` / ``alignkit dpo`` call. Everything it writes lives in one
run folder:

- ``run.json``: the algorithm, the resolved options and the base model;
- ``metrics.jsonl``: one JSON object per logged step, ``{"step", "epoch", "split", "time", <metrics>}``
  with ``split`` = ``"train"`` or ``"eval"``;
- ``actor/``, ``training_state.json``, ``optimizer.safetensors``: the checkpoint (see ``checkpoints``);
- training-curve PNGs (``alignkit.plots``) unless ``plot`` is off.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import adapter_base_model, load_adapter
from .agents import DPO, SFT
from .config import SFTConfig
from .data import make_dataset
from .errors import UserError
from .gyms import PreferenceGym, SFTGym
from .io import append_jsonl, atomic_write_json
from .models import DEFAULT_MODEL, load_model, load_tokenizer
from .reference import REFERENCE_ADAPTER, reference_store
from .runtime import reuse_freed_memory

logger = logging.getLogger(__name__)


def run_dir_for(cfg: SFTConfig, now: datetime | None = None) -> Path:
    """``save_path`` itself with ``no_timestamp``, else ``save_path/<YYYYmmdd_HHMMSS>_<ALGO>``."""
    base = Path(cfg.save_path)
    if cfg.no_timestamp:
        return base
    return base / f"{(now or datetime.now()).strftime('%Y%m%d_%H%M%S')}_{cfg.algo.upper()}"


def resolve_base_model(cfg: SFTConfig) -> str:
    """The base model of the run: ``--model``, else the ``--load-path`` adapter's base, else the default.

    A ``--model`` that differs from the base the adapter was trained on is an error.
    """
    adapter_base = adapter_base_model(cfg.load_path) if cfg.load_path else None
    if cfg.model and adapter_base and cfg.model != adapter_base:
        raise UserError(f"the adapter at {cfg.load_path} was trained on {adapter_base!r}, not {cfg.model!r}; "
                        "drop --model or pass the adapter's base model")
    return cfg.model or adapter_base or DEFAULT_MODEL


class MetricsLog:
    """Appends one JSON line per record to ``metrics.jsonl`` and mirrors it to optional loggers."""

    def __init__(self, run_dir: Path, report_to: str = "none", run_name: str = "", config: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.path.write_text("")
        self.start = time.time()
        self.sinks = []
        self.closers = []
        targets = {t.strip() for t in report_to.split(",")} - {"none"}
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--report-to tensorboard needs the tensorboard package: "
                                "pip install tensorboard") from None
            writer = SummaryWriter(log_dir=str(run_dir))
            self.closers.append(writer.close)
            self.sinks.append(lambda rec, w=writer: [w.add_scalar(f"{rec['split']}/{k}", v, rec["step"])
                                                     for k, v in rec.items() if k not in ("step", "split", "epoch")]
                              and w.flush())
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                raise UserError("--report-to wandb needs the wandb package: pip install wandb") from None
            wb = wandb.init(mode="offline", dir=str(run_dir), name=run_name, config=config)
            self.closers.append(wb.finish)
            self.sinks.append(lambda rec, r=wb: r.log({f"{rec['split']}/{k}": v for k, v in rec.items()
                                                       if k not in ("step", "split")}, step=rec["step"]))

    def log(self, step: int, epoch: float, split: str, metrics: dict) -> dict:
        record = {"step": step, "epoch": round(epoch, 4), "split": split,
                  "time": round(time.time() - self.start, 3), **metrics}
        append_jsonl(self.path, record)
        for sink in self.sinks:
            sink(record)
        return record

    def close(self) -> None:
        """Flush and close the optional loggers (a finished wandb run, closed event files)."""
        for close in self.closers:
            close()
        self.closers = []


@dataclass
class Setup:
    """Everything a run needs, built in order by :func:`setup`."""

    cfg: SFTConfig
    run_dir: Path
    base_model: str
    tokenizer: object
    gym: object
    agent: object
    total_steps: int


def setup(cfg: SFTConfig, run_dir: Path | None = None) -> Setup:
    """Load model, tokenizer and data, build the gym and the agent for ``cfg``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.reuse_memory:
        reuse_freed_memory()
    torch.manual_seed(cfg.seed)
    base_model = resolve_base_model(cfg)
    tokenizer = load_tokenizer(base_model)
    train_ds, test_ds = make_dataset(cfg.dataset, test_size=cfg.test_split, seed=cfg.seed)
    gym_cls = PreferenceGym if cfg.algo == "dpo" else SFTGym
    gym = gym_cls(train_ds, test_ds, tokenizer, data_batch_size_per_gpu=cfg.batch_size,
                  max_context_length=cfg.max_length, seed=cfg.seed)
    model = load_model(base_model, device=cfg.device, dtype=cfg.dtype)
    if cfg.load_path:
        model = load_adapter(model, cfg.load_path, adapter_name="default", is_trainable=True)
        if cfg.algo == "dpo" and cfg.loss_type != "simpo":
            # The warm-start adapter, loaded a second time and frozen, is the reference policy.
            load_adapter(None, cfg.load_path, adapter_name=REFERENCE_ADAPTER, is_trainable=False, model=model)
            model.set_adapter("default")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * gym.batches_per_epoch))
    common = dict(pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, batch_size=cfg.batch_size,
                  lr=cfg.lr, update_epochs=cfg.update_epochs, lora_config=cfg.lora_config(),
                  micro_batch_size=cfg.micro_batch_size or None, max_grad_norm=cfg.max_grad_norm,
                  weight_decay=cfg.weight_decay, warmup_steps=round(cfg.warmup_ratio * total), total_steps=total,
                  min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed, packed=cfg.packing,
                  gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.algo == "dpo":
        store = None
        if cfg.reuse_reference and cfg.loss_type != "simpo":
            store = reference_store(model, base_model, cfg.load_path, cfg.packing, cfg.share_prompts)
        agent = DPO(model, beta=cfg.beta, nll_alpha=cfg.nll_alpha, loss_type=cfg.loss_type,
                    label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                    share_prompts=cfg.share_prompts, reference_cache=store, **common)
    else:
        agent = SFT(model, **common)
    return Setup(cfg, run_dir or run_dir_for(cfg), base_model, tokenizer, gym, agent, total)


def _short(metrics: dict) -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "perplexity")
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def train(s: Setup) -> dict:
    """Run the loop of ``s``; returns the final held-out metrics."""
    cfg, gym, agent = s.cfg, s.gym, s.agent
    s.run_dir.mkdir(parents=True, exist_ok=True)
    info = {"algo": cfg.algo, "run_name": s.run_dir.name, "base_model": s.base_model, "config": cfg.to_dict(),
            "train_rows": len(gym.train_examples), "test_rows": len(gym.test_examples), "total_steps": s.total_steps}
    atomic_write_json(s.run_dir / "run.json", info)
    log = MetricsLog(s.run_dir, cfg.report_to, s.run_dir.name, info["config"])
    print(f"{cfg.algo.upper()}: {len(gym.train_examples)} train / {len(gym.test_examples)} test rows, "
          f"{s.total_steps} steps of {cfg.batch_size}, base {s.base_model} -> {s.run_dir}")

    def evaluate(step):
        if not gym.test_examples:
            return {}
        metrics = agent.test(gym)
        log.log(step, gym.progress, "eval", metrics)
        return metrics

    try:
        evaluate(0)
        bar = tqdm(total=s.total_steps, desc=cfg.algo.upper(), unit="step", dynamic_ncols=True)
        batch = gym.reset()
        for step in range(1, s.total_steps + 1):
            t0 = time.perf_counter()
            metrics = agent.learn(batch)
            metrics["tokens_per_s"] = metrics["tokens"] / max(time.perf_counter() - t0, 1e-9)
            epoch = gym.progress
            log.log(step, epoch, "train", metrics)
            bar.update(1)
            bar.set_postfix_str(f"loss={metrics['loss']:.4f} tok/s={metrics['tokens_per_s']:.0f} epoch={epoch:.2f}")
            if not math.isfinite(metrics["loss"]):
                bar.close()
                raise UserError(f"the loss became {metrics['loss']} at step {step}; lower --lr "
                                "(stopped before writing the final adapter)")
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < s.total_steps:
                bar.write(f"step {step} eval: {_short(evaluate(step))}")
            if cfg.save_interval and step % cfg.save_interval == 0 and step < s.total_steps:
                agent.save_checkpoint(s.run_dir, s.base_model, extra_state={"gym": gym.state_dict()})
            if step < s.total_steps:
                batch = gym.step()
        bar.close()
        final = evaluate(s.total_steps)
    finally:
        log.close()
    if isinstance(agent, DPO) and agent.reference is not None:
        agent.reference.save()
    agent.save_checkpoint(s.run_dir, s.base_model, extra_state={"gym": gym.state_dict()})
    if cfg.plot:
        from .plots import plot_run

        for path in plot_run(s.run_dir):
            logger.info("wrote %s", path)
    print(f"final eval: {_short(final)}")
    print(f"adapter saved to {s.run_dir / 'actor'}")
    return final


def run(cfg: SFTConfig) -> Path:
    """Set up and train one run described by ``cfg``; returns its folder."""
    s = setup(cfg)
    train(s)
    return s.run_dir
