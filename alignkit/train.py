"""The training loop: setup -> train -> save, with a progress bar, evaluation and a metrics log.

``run(cfg)`` is what ``alignkit sft`` / ``alignkit dpo`` call. Everything it writes lives in one
run folder:

- ``run.json``: the algorithm, the resolved options and the base model;
- ``metrics.jsonl``: one JSON object per logged step, ``{"step", "epoch", "split", "time", <metrics>}``
  with ``split`` = ``"train"`` or ``"eval"``;
- ``checkpoint-<step>/``: the whole state every ``--save-interval`` steps, on a stop signal and at
  the end (the newest ``--keep-checkpoints``), from which ``--resume`` continues exactly;
- ``actor/``, ``training_state.json``, ``optimizer.safetensors``: the finished run (see ``checkpoints``);
- training-curve PNGs (``alignkit.plots``) unless ``plot`` is off.

SIGINT and SIGTERM finish the current step, write a checkpoint and stop with exit code 130 / 143;
a second signal stops at once (every write is atomic, so nothing is left half-written).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoints
from .adapters import (
    adapter_base_model,
    adapter_chat_template,
    check_adapter_folder,
    load_adapter,
    read_adapter_config,
)
from .agents import DPO, SFT
from .config import SFTConfig, flag
from .data import make_dataset
from .errors import RunInterrupted, UserError
from .gyms import PreferenceGym, SFTGym
from .io import atomic_write_json
from .models import DEFAULT_MODEL, load_model, load_tokenizer, read_chat_template
from .processes import broadcast_from_main, gather_dicts, is_main_process, make_accelerator
from .reference import REFERENCE_ADAPTER, reference_store
from .runs import MetricsLog, check_save_path, claim_run_dir, release_run_dirs
from .runtime import reuse_freed_memory

logger = logging.getLogger(__name__)


def resolve_base_model(cfg: SFTConfig) -> str:
    """The base model of the run: ``--model``, else the ``--load-path`` adapter's base, else the default.

    A ``--model`` that differs from the base the adapter was trained on is an error.
    """
    adapter_base = adapter_base_model(cfg.load_path) if cfg.load_path else None
    if cfg.model and adapter_base and cfg.model != adapter_base:
        raise UserError(f"the adapter at {cfg.load_path} was trained on {adapter_base!r}, not {cfg.model!r}; "
                        "drop --model or pass the adapter's base model")
    if cfg.load_path:
        check_adapter_folder(cfg.load_path)  # damaged weights are refused before the base model loads
    return cfg.model or adapter_base or DEFAULT_MODEL


# LoRA options and the key each has in a PEFT adapter_config.json.
ADAPTER_SHAPE = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                 "lora_target_modules": "target_modules"}


def with_adapter_shape(cfg: SFTConfig) -> SFTConfig:
    """``cfg`` with the LoRA shape of its ``--load-path`` adapter, which a warm start keeps (the run
    record then tells the truth); an option set to something else than the adapter's is a UserError."""
    if not cfg.load_path:
        return cfg
    adapter, defaults, changes = read_adapter_config(cfg.load_path), type(cfg)(), {}
    for name, key in ADAPTER_SHAPE.items():
        theirs, mine = adapter.get(key), getattr(cfg, name)
        if theirs is None or isinstance(theirs, str):   # not recorded, or a pattern: nothing to compare
            continue
        if name == "lora_target_modules":
            theirs, same = sorted(theirs), sorted(mine) == sorted(theirs)
        else:
            same = float(mine) == float(theirs)
        if same:
            continue
        if mine != getattr(defaults, name):
            shown = " ".join(mine) if isinstance(mine, list) else mine
            raise UserError(f"--{flag(name)} {shown} contradicts the --load-path adapter ({key}={theirs}); a warm "
                            f"start keeps the adapter's shape: drop --{flag(name)}")
        changes[name] = theirs
    return dataclasses.replace(cfg, **changes) if changes else cfg


def run_chat_template(cfg: SFTConfig) -> str | None:
    """The chat template a run uses in place of its tokenizer's: ``--chat-template``'s file, else the
    one saved with the ``--load-path`` adapter, else ``None``."""
    if cfg.chat_template:
        return read_chat_template(cfg.chat_template)
    return adapter_chat_template(cfg.load_path) if cfg.load_path else None


def load_run_data(cfg: SFTConfig):
    """``(train, test)`` rows of the run's dataset, in the shape its algorithm reads."""
    return make_dataset(cfg.dataset, test_size=cfg.test_split, seed=cfg.seed, task=cfg.task, format=cfg.format,
                        column_map=cfg.column_map(), eval_dataset=cfg.eval_dataset, eval_format=cfg.eval_format,
                        eval_column_map=cfg.eval_column_map())


def _run_gym(cfg: SFTConfig, batch_size: int, accelerator=None):
    """The run's base model name, tokenizer, gym (``batch_size`` rows per process) and held-out rows."""
    base_model = resolve_base_model(cfg)
    tokenizer = load_tokenizer(base_model, trust_remote_code=cfg.trust_remote_code,
                               chat_template=run_chat_template(cfg))
    train_ds, test_ds = load_run_data(cfg)
    gym_cls = PreferenceGym if cfg.algo == "dpo" else SFTGym
    gym = gym_cls(train_ds, test_ds, tokenizer, data_batch_size_per_gpu=batch_size, accelerator=accelerator,
                  max_context_length=cfg.max_length, seed=cfg.seed)
    return base_model, tokenizer, gym, test_ds


def data_fingerprint(cfg: SFTConfig) -> tuple[str, int, int]:
    """The fingerprint of the data ``cfg`` reads now, as its run records it (``data_fingerprint`` of the
    gym: every tokenized example), with the train and test rows: what ``pipeline --reuse`` compares with a
    finished run's record. Reads the tokenizer and the data, not the model."""
    gym = _run_gym(cfg, cfg.batch_size)[2]
    return gym.data_fingerprint, len(gym.train_examples), len(gym.test_examples)


@dataclass
class Setup:
    """Everything a run needs, built in order by :func:`setup` (the folder is claimed by :func:`train`)."""

    cfg: SFTConfig
    base_model: str
    tokenizer: object
    gym: object
    agent: object
    total_steps: int
    run_dir: Path | None = None
    accelerator: object = None

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints (always, without an accelerator)."""
        return self.accelerator is None or self.accelerator.is_main_process


def _too_few_rows(cfg: SFTConfig, gym, test_ds) -> str:
    """Why the training rows do not fill one batch: which options took rows away, and what to change."""
    kept = len(gym.train_examples)
    why, fixes = [], [f"a --batch-size of at most {kept}"]
    if test_ds is not None and not cfg.eval_dataset:
        why.append(f"--test-size {cfg.test_size:g} held out {len(test_ds)}")
        fixes.append("a smaller --test-size")
    dropped = gym.encode_stats["train"].rows - kept
    if dropped:
        why.append(f"{dropped} did not fit --max-length {cfg.max_length}")
        fixes.append("a larger --max-length")
    because = f" ({'; '.join(why)})" if why else ""
    return (f"--batch-size {cfg.batch_size} is more than the {kept} training row{'s' if kept != 1 else ''}{because}; "
            f"give {' or '.join(fixes)}")


def setup(cfg: SFTConfig) -> Setup:
    """Load model, tokenizer and data, build the gym and the agent for ``cfg``."""
    cfg = with_adapter_shape(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.reuse_memory:
        reuse_freed_memory()
    accelerator = make_accelerator(cfg.device)
    processes = accelerator.num_processes if accelerator is not None else 1
    if cfg.batch_size % processes:
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly over {processes} processes; "
                        f"give a multiple of {processes}")
    per_process = cfg.batch_size // processes
    if cfg.micro_batch_size and per_process % cfg.micro_batch_size:
        raise UserError(f"each of the {processes} processes takes {per_process} rows of --batch-size "
                        f"{cfg.batch_size}: --micro-batch-size {cfg.micro_batch_size} must divide that")
    torch.manual_seed(cfg.seed)
    base_model, tokenizer, gym, test_ds = _run_gym(cfg, per_process, accelerator)
    more = "give a larger --eval-dataset" if cfg.eval_dataset else "raise --test-size"
    if cfg.eval_dataset and not gym.test_examples:   # evaluation was asked for by name: no silent skip
        raise UserError(f"--eval-dataset {cfg.eval_dataset}: none of its {len(test_ds)} rows has a prompt that fits "
                        f"--max-length ({cfg.max_length} tokens); raise --max-length")
    if not gym.batches_per_epoch:   # (an empty train split is refused when the data is read)
        raise UserError(f"{len(gym.train_examples)} training row(s) cannot be shared by {processes} processes; "
                        "give more data or fewer processes")
    if len(gym.train_examples) < cfg.batch_size:   # a step would take fewer rows than it says, or all at once
        raise UserError(_too_few_rows(cfg, gym, test_ds))
    if 0 < len(gym.test_examples) < processes:
        raise UserError(f"{len(gym.test_examples)} held-out rows cannot be shared by {processes} processes; {more}")
    # each process on the device accelerate gave it ("cpu:0" is plain "cpu" to the loader)
    device = cfg.device if accelerator is None else accelerator.device.type if accelerator.device.type == "cpu" \
        else str(accelerator.device)
    model = load_model(base_model, device=device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.load_path:
        model = load_adapter(model, cfg.load_path, adapter_name="default", is_trainable=True)
        if cfg.algo == "dpo" and cfg.loss_type != "simpo":
            # The warm-start adapter, loaded a second time and frozen, is the reference policy.
            load_adapter(None, cfg.load_path, adapter_name=REFERENCE_ADAPTER, is_trainable=False, model=model)
            model.set_adapter("default")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * gym.batches_per_epoch))
    store = None
    if cfg.algo == "dpo" and cfg.reuse_reference and cfg.loss_type != "simpo":
        store = reference_store(model, base_model, cfg.load_path, cfg.packing, cfg.share_prompts)
    agent = build_agent(cfg, model, tokenizer, total, accelerator=accelerator, reference_cache=store)
    return Setup(cfg, base_model, tokenizer, gym, agent, total, accelerator=accelerator)


def build_agent(cfg: SFTConfig, model, tokenizer, total_steps: int, accelerator=None, adapter_name: str = "default",
                seed: int | None = None, lora_config=None, reference_cache=None, shared_reference=None):
    """The ``SFT`` or ``DPO`` agent ``cfg`` describes, training adapter ``adapter_name`` of ``model``.

    A population adds several agents to one model this way: each its own adapter (``lora_config``,
    initialised from ``seed``) and optimizer; DPO members share one reference (``shared_reference``).
    """
    common = dict(pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, batch_size=cfg.batch_size,
                  lr=cfg.lr, update_epochs=cfg.update_epochs, lora_config=lora_config or cfg.lora_config(),
                  micro_batch_size=cfg.micro_batch_size or None, max_grad_norm=cfg.max_grad_norm,
                  weight_decay=cfg.weight_decay, warmup_steps=round(cfg.warmup_ratio * total_steps),
                  total_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed if seed is None else seed,
                  packed=cfg.packing, gradient_checkpointing=cfg.gradient_checkpointing, accelerator=accelerator,
                  adapter_name=adapter_name)
    if cfg.algo == "dpo":
        agent = DPO(model, beta=cfg.beta, nll_alpha=cfg.nll_alpha, loss_type=cfg.loss_type,
                    label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma, share_prompts=cfg.share_prompts,
                    reference_cache=reference_cache, shared_reference=shared_reference, **common)
    else:
        agent = SFT(model, **common)
    agent.chat_template = run_chat_template(cfg)
    return agent


def start_records(s: Setup, start: int, **extra) -> MetricsLog:
    """Write the run's ``run.json`` (plus ``extra`` keys) and open its metrics log, continuing after
    step ``start`` of a resumed run; only the main process writes."""
    options = dict(s.cfg.to_dict(), resume=None, overwrite=False)  # how a run was started is not an option of it
    info = {"algo": s.cfg.algo, "run_name": s.run_dir.name, "base_model": s.base_model, "config": options,
            "train_rows": len(s.gym.train_examples), "test_rows": len(s.gym.test_examples),
            "data_fingerprint": s.gym.data_fingerprint, "total_steps": s.total_steps, **extra}
    if s.main:
        atomic_write_json(s.run_dir / "run.json", info)
    return MetricsLog(s.run_dir, s.cfg.report_to, s.run_dir.name, options, resume_after=start or None,
                      enabled=s.main)


def _short(metrics: dict) -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "perplexity")
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step; a second one
    interrupts at once (as a KeyboardInterrupt). Only the main thread can take signals."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)   # the signals it takes over while it is entered

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if is_main_process():   # under a multi-process launch every process gets the signal: say it once
            print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop at once)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_same_data(s: Setup) -> None:
    """A UserError when the data a resumed run reads now is not the data it started with (a data file
    edited or replaced in between): resuming would mix two datasets in one run."""
    from .runs import read_run_info

    recorded = read_run_info(s.run_dir)
    before = recorded.get("data_fingerprint")
    if before is not None and before != s.gym.data_fingerprint:
        rows = f"{recorded.get('train_rows')} train / {recorded.get('test_rows')} test rows then, " \
               f"{len(s.gym.train_examples)} / {len(s.gym.test_examples)} now"
        raise UserError(f"--resume {s.run_dir}: its data changed since the run started ({rows}, as tokenized); "
                        "resuming would mix two datasets in one run: restore the data or start a new run")


def _resume_state(s: Setup) -> int:
    """Load the newest complete checkpoint of ``s.run_dir`` into the agent and gym; returns its step."""
    found = checkpoints.numbered(s.run_dir)
    if not found:
        raise UserError(f"--resume {s.run_dir}: no complete checkpoint-<step>/ folder to continue from (it stopped "
                        "before its first one); start it again: the same command without --resume, with --overwrite")
    extra = s.agent.load_checkpoint(found[-1])
    s.gym.load_state_dict(extra["gym"])
    if isinstance(s.agent, DPO) and s.agent.reference is not None:
        s.agent.reference.load_state_dict(extra.get("reference", {}))
    return s.agent.steps


def _save_checkpoint(s: Setup) -> Path:
    """Write ``checkpoint-<step>/`` with everything an exact resume needs; a failed write is one line."""
    agent = s.agent
    extra = {"gym": s.gym.state_dict(), "options": s.cfg.to_dict()}
    if isinstance(agent, DPO) and agent.reference is not None:
        # every process computed the reference of its own share: the checkpoint holds them all
        agent.reference.load_state_dict(gather_dicts(agent.reference.state_dict(), s.accelerator))
        extra["reference"] = agent.reference.state_dict()
        if s.main:
            agent.reference.save()
    gathered = checkpoints.gather(agent) if agent.partitioned else None   # every process takes part
    if not s.main:
        return s.run_dir / f"{checkpoints.CHECKPOINT_PREFIX}{agent.steps}"
    try:
        return checkpoints.save_numbered(agent, s.run_dir, s.base_model, extra, keep=s.cfg.keep_checkpoints,
                                         gathered=gathered)
    except OSError as exc:
        kept = checkpoints.numbered(s.run_dir)
        intact = f"{kept[-1]} is intact" if kept else "no earlier checkpoint exists"
        raise UserError(f"could not write {s.run_dir}/checkpoint-{agent.steps}: "
                        f"{exc.strerror or exc}; {intact}") from None


def _keep_held_out_logps(s: Setup) -> None:
    """File the final eval's log-probs of the held-out pairs under the finished adapter.

    They go to the on-disk store keyed by the base and the adapter's weights (the one a DPO run
    warm-started from this adapter uses for its reference), where a comparison scoring this run
    looks them up instead of running the held-out pairs again. Only when the final eval ran in this
    process (not one recorded before a resume) and the run caches reference log-probs.
    """
    agent = s.agent
    if not (isinstance(agent, DPO) and s.cfg.reuse_reference and agent.held_out_step == agent.steps):
        return
    entries = gather_dicts(agent.held_out_logps, s.accelerator)
    if not s.main or not entries:
        return
    store = reference_store(agent.unwrapped_model(), s.base_model, str(s.run_dir / "actor"), s.cfg.packing,
                            s.cfg.share_prompts)
    try:
        store.save(entries)
    except OSError as exc:
        logger.warning("could not cache the held-out log-probs in %s: %s", store.folder, exc.strerror or exc)


def train(s: Setup) -> dict:
    """Run the loop of ``s``; returns the final held-out metrics. The run folder it claims stays locked
    (``alignkit.runs.claim_run_dir``) until the run ends, however it ends."""
    try:
        return _train(s)
    finally:
        release_run_dirs()


def _train(s: Setup) -> dict:
    cfg, gym, agent = s.cfg, s.gym, s.agent
    say = print if s.main else (lambda *args, **kwargs: None)   # one process speaks for all
    s.run_dir = s.run_dir or broadcast_from_main(claim_run_dir(cfg) if s.main else None, s.accelerator)
    if cfg.resume:
        check_same_data(s)
    start = _resume_state(s) if cfg.resume else 0
    if start > s.total_steps:
        raise UserError(f"{s.run_dir} has already reached step {start}, past the {s.total_steps} step{'s' if s.total_steps != 1 else ''} now asked for; "
                        "give more steps (--max-steps / --epochs) to extend it, or none to keep its recorded length")
    if start >= s.total_steps and (s.run_dir / checkpoints.STATE_FILE).exists():
        say(f"{s.run_dir} has already finished step {start} of {s.total_steps}; pass a larger --max-steps"
            + (" to extend it" if cfg.max_steps > 0 else " or --epochs to extend it"))
        return {}
    if start and s.main:   # an extended run is unfinished until its new end: no longer marked finished
        (s.run_dir / checkpoints.STATE_FILE).unlink(missing_ok=True)
    log = start_records(s, start)
    steps = f"resuming at step {start} of {s.total_steps}" if start else str(s.total_steps)
    say(f"{cfg.algo.upper()}: {len(gym.train_examples)} train / {len(gym.test_examples)} test rows, "
          f"{steps} step{'s' if s.total_steps != 1 else ''} of {cfg.batch_size}, base {s.base_model} -> {s.run_dir}")

    def evaluate(step):
        if not gym.test_examples:
            return {}
        metrics = agent.test(gym)
        log.log(step, gym.progress, "eval", metrics)
        return metrics

    try:
        with StopSignals() as stop:
            if not start:
                evaluate(0)
                if stop.signum:   # before any step: nothing to save, so it starts again
                    raise RunInterrupted("stopped before the first step: nothing was trained or saved", 128 + stop.signum,
                                         "the same command with --overwrite (it starts again)")
            with tqdm(total=s.total_steps, initial=start, desc=cfg.algo.upper(), unit="step",
                      dynamic_ncols=True, disable=not s.main) as bar:
                batch = gym.step() if start else gym.reset()
                for step in range(start + 1, s.total_steps + 1):
                    t0 = time.perf_counter()
                    metrics = agent.learn(batch)
                    metrics["tokens_per_s"] = metrics["tokens"] / max(time.perf_counter() - t0, 1e-9)
                    epoch = gym.progress
                    log.log(step, epoch, "train", metrics)
                    bar.update(1)
                    bar.set_postfix_str(f"loss={metrics['loss']:.4f} tok/s={metrics['tokens_per_s']:.0f} "
                                        f"epoch={epoch:.2f}")
                    if not math.isfinite(metrics["loss"]):
                        kept = checkpoints.numbered(s.run_dir)
                        raise UserError(f"the loss became {metrics['loss']} at step {step}; lower --lr (stopped; "
                                        + (f"last good checkpoint: {kept[-1]})" if kept else "nothing was saved)"))
                    if cfg.eval_interval and step % cfg.eval_interval == 0 and step < s.total_steps:
                        bar.write(f"step {step} eval: {_short(evaluate(step))}")
                    if step < s.total_steps and (stop.signum or cfg.save_interval and step % cfg.save_interval == 0):
                        saved = _save_checkpoint(s)
                    if stop.signum and step < s.total_steps:
                        how = (f"alignkit {cfg.algo} --resume {s.run_dir}" if s.accelerator is None else
                               f"the same accelerate launch command with {cfg.algo} --resume {s.run_dir}")
                        raise RunInterrupted(f"stopped at step {step} of {s.total_steps}; checkpoint written to {saved}",
                                             128 + stop.signum, how)
                    if step < s.total_steps:
                        batch = gym.step()
            # (a run stopped between its last checkpoint and its finished adapter has its final eval)
            final = log.kept_evals.get(s.total_steps) or evaluate(s.total_steps)
            _save_checkpoint(s)
            # The finished adapter; a folder without its state file never passes for a finished run.
            try:
                agent.save_checkpoint(s.run_dir, s.base_model, extra_state={"gym": gym.state_dict()})
            except OSError as exc:
                raise UserError(f"could not write the finished adapter to {s.run_dir / 'actor'}: "
                                f"{exc.strerror or exc}; checkpoint-{agent.steps}/ holds it") from None
            _keep_held_out_logps(s)
    finally:
        log.close()
    if cfg.plot and s.main:
        from .plots import plot_run

        for path in plot_run(s.run_dir):
            logger.info("wrote %s", path)
    say(f"final eval: {_short(final)}" if final else "final eval: none (no held-out rows)")
    say(f"adapter saved to {s.run_dir / 'actor'}")
    if stop.signum:   # it came during the last step or the final eval: the run is whole, but what follows stops
        raise RunInterrupted(f"{signal.Signals(stop.signum).name} came during the last step; the run finished "
                             f"(adapter saved to {s.run_dir / 'actor'})", 128 + stop.signum)
    return final


def run(cfg: SFTConfig) -> Path:
    """Check where ``cfg``'s run writes, set it up and train it; returns its folder."""
    check_save_path(cfg)
    s = setup(cfg)
    train(s)
    return s.run_dir
