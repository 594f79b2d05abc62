"""Checkpoints as safetensors + JSON, written atomically. No pickle anywhere.

A checkpoint holds:

- ``actor/``: a standard PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained(base, "actor")`` loads;
- ``training_state.json``: step, schedule, the loop's extra state (data position, epoch, the
  resolved options, ...);
- ``optimizer.safetensors``: the optimizer's tensors and the RNG states (torch CPU and CUDA).

A run keeps its resumable history in ``<run>/checkpoint-<step>/`` folders, each written whole
under a temporary name and renamed (a folder with that name is complete), the newest ``keep``
kept. The finished adapter also goes to ``<run>/actor/`` (with the state files beside it), each
piece atomic, the state file last, so a folder without ``training_state.json`` is never a
finished run.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapters import CHAT_TEMPLATE_FILE, error_line, read_adapter_config
from .errors import ArgumentError, UserError
from .io import atomic_folder, atomic_write, atomic_write_text, unwritable
from .models import adapter_parameters
from .processes import full_tensor, local_tensor, shard_like

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors (sharded ones gathered whole) and a JSON-able remainder."""
    state = optimizer.state_dict()
    tensors, meta = {}, {}
    for idx, entry in sorted(state["state"].items()):
        for name, value in sorted(entry.items()):
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = full_tensor(value).detach().cpu().contiguous()
            else:
                meta[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": meta}


# AdamW's per-weight tensors, which DeepSpeed ZeRO keeps in its flat partitions (its "step" is one count)
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _deepspeed_optimizer_tensors(agent) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`_optimizer_tensors` of a DeepSpeed ZeRO agent, in the same layout (so a checkpoint resumes under
    any launch): each trained parameter's moments gathered whole from the flat partitions the engine keeps
    (a collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = agent.optimizer.optimizer.optimizer   # accelerate's wrapper > ZeRO's optimizer > the torch AdamW
    flat = [state for state in inner.state.values() if state]
    tensors: dict[str, torch.Tensor] = {}
    for idx, param in enumerate(agent.params) if flat else ():
        for name in _MOMENTS:
            tensors[f"state.{idx}.{name}"] = safe_get_full_optimizer_state(param, name).detach().cpu().contiguous()
        tensors[f"state.{idx}.step"] = flat[0]["step"].detach().cpu().clone()
    group = {k: v for k, v in inner.param_groups[0].items() if k != "params"}
    return tensors, {"param_groups": [{**group, "params": list(range(len(agent.params)))}], "scalars": {}}


def _restore_deepspeed(agent, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Put the adapter's whole ``weights`` (by saved name; already in the model), the learning rate and the
    Adam moments back into a DeepSpeed ZeRO agent's partitions."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = agent.optimizer.optimizer
    inner = zero.optimizer
    saved = {k: v for k, v in meta["param_groups"][0].items() if k != "params"}   # the rate of the next step
    for group in inner.param_groups:
        group.update(saved)
    params = adapter_parameters(agent.unwrapped_model(), agent.adapter_name, saved_names=True)
    for name, param in params.items():   # the engine steps its own float32 copy of the weights
        if param.requires_grad:
            safe_set_full_fp32_param(param, weights[name].to(agent.device, torch.float32))
    if "state.0.step" not in tensors:   # saved before any step: no moments yet
        return
    # the flat float32 partitions AdamW steps (ZeRO-3 hands them to it one sub-group at a time)
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or [f for g in inner.param_groups for f in g["params"]]
    for flat in flats:   # AdamW makes its moments at its first step; the resumed run has them now
        inner.state[flat] = {"step": tensors["state.0.step"].clone(), "exp_avg": torch.zeros_like(flat),
                             "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):   # ZeRO-1/2 after that first step: each weight's
        zero._lazy_init_hp_params_optimizer_state()              # view of them (ZeRO-3 looks them up each time)
    for idx, param in enumerate(agent.params):
        for name in _MOMENTS:
            safe_set_full_optimizer_state(param, tensors[f"state.{idx}.{name}"].to(param.device), name)


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    inner = getattr(optimizer, "optimizer", optimizer)   # accelerate wraps it
    for group in inner.param_groups:
        for param in group["params"]:
            entry = inner.state.get(param, {})
            for name, value in entry.items():   # moments of a sharded parameter: sharded as it is
                if torch.is_tensor(value) and local_tensor(param) is not param and value.shape == param.shape:
                    entry[name] = shard_like(param, value)


CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def gather(agent) -> dict:
    """What a checkpoint of an ``agent`` whose state is split over processes (FSDP, DeepSpeed ZeRO) holds,
    gathered whole: the adapter's weights and the optimizer's tensors. A collective: every process calls
    it, then the main one passes it to :func:`save` / :func:`save_numbered` as ``gathered``."""
    params = adapter_parameters(agent.unwrapped_model(), agent.adapter_name)
    with _gathered_deepspeed(agent, params.values()):
        weights = {n: full_tensor(p).detach().cpu().clone() for n, p in params.items()}
    optimizer = _deepspeed_optimizer_tensors(agent) if agent.deepspeed else _optimizer_tensors(agent.optimizer)
    return {"weights": weights, "optimizer": optimizer}


def _gathered_deepspeed(agent, params, modifier_rank=None):
    """ZeRO-3's partitioned ``params`` whole inside the block (a collective; written back from process
    ``modifier_rank`` when given); nothing for other agents."""
    if not (getattr(agent, "deepspeed", False) and agent.sharded):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def _write_adapter(agent, folder: Path, base_model_name: str | None, weights: dict | None = None) -> None:
    model = agent.unwrapped_model()
    config = model.peft_config[agent.adapter_name]
    if base_model_name:
        config.base_model_name_or_path = base_model_name
    model.save_pretrained(folder, selected_adapters=[agent.adapter_name], save_embedding_layers=False,
                          **({"state_dict": weights} if weights is not None else {}))
    if agent.adapter_name != "default":  # PEFT writes non-default adapters into a subfolder
        sub = folder / agent.adapter_name
        for f in sub.iterdir():
            f.rename(folder / f.name)
        sub.rmdir()
    if getattr(agent, "chat_template", None):
        (folder / CHAT_TEMPLATE_FILE).write_text(agent.chat_template, encoding="utf-8")


def _json_scalar(value):
    """``json.dumps``' fallback for the state: numpy's numbers as Python's; anything else (a tensor, a set) is
    refused rather than changed."""
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"a {type(value).__name__} is not a JSON value")


def _state(agent, extra_state: dict | None, gathered: dict | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The optimizer's and RNGs' tensors, and the JSON part of the training state as its text: encoded before
    anything is written, so state that cannot be saved leaves an older checkpoint in place."""
    tensors, opt_meta = gathered["optimizer"] if gathered else _optimizer_tensors(agent.optimizer)
    tensors = dict(tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    state = {"algorithm": type(agent).__name__, "steps": agent.steps, "scheduler": agent.scheduler.state_dict(),
             "optimizer": opt_meta, "extra": extra_state or {}}
    try:
        return tensors, json.dumps(state, indent=1, ensure_ascii=False, default=_json_scalar) + "\n"
    except (TypeError, ValueError) as exc:   # (ValueError: a circular reference)
        raise ArgumentError(f"extra_state must hold JSON values (numbers, text, true/false, lists, dicts): {exc}; "
                            "nothing was written") from None


def check_folder(path) -> Path:
    """``path`` as a folder a checkpoint can be written to (it or its parents may be missing); a UserError
    naming it and the reason when it is a file, is under one, or cannot be written (no permission, ``/proc``)."""
    path = Path(path)
    why = unwritable(path, folder=True)
    if why:
        raise UserError(f"checkpoint path {path} cannot be written: {why}")
    return path


def save(agent, path, base_model_name: str | None = None, extra_state: dict | None = None,
         gathered: dict | None = None) -> Path:
    """Write ``agent``'s adapter and training state into folder ``path`` (replacing an older one there).

    Other files in ``path`` (metrics, figures) are left alone. ``gathered``: :func:`gather`'s result,
    for a sharded agent. A ``path`` that cannot be a folder written here is a UserError (:func:`check_folder`).
    """
    path = check_folder(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, state = _state(agent, extra_state, gathered)
    # Without the state file the folder is not a checkpoint; it comes back last, when all is written.
    (path / STATE_FILE).unlink(missing_ok=True)
    with atomic_folder(path / "actor", replace=True) as tmp:
        _write_adapter(agent, tmp, base_model_name, gathered and gathered["weights"])
    atomic_write(path / OPTIMIZER_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(path / STATE_FILE, state)
    return path


def save_numbered(agent, run_dir, base_model_name: str | None = None, extra_state: dict | None = None,
                  keep: int = 2, gathered: dict | None = None) -> Path:
    """Write ``run_dir/checkpoint-<step>/`` whole (it appears complete or not at all); keep the newest ``keep``.

    ``gathered``: :func:`gather`'s result, for a sharded agent."""
    run_dir = Path(run_dir)
    target = run_dir / f"{CHECKPOINT_PREFIX}{agent.steps}"
    tensors, state = _state(agent, extra_state, gathered)
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "actor").mkdir()
        _write_adapter(agent, tmp / "actor", base_model_name, gathered and gathered["weights"])
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(state)
    prune(run_dir, keep)
    return target


def prune(run_dir, keep: int) -> None:
    """Delete all but the newest ``keep`` complete ``checkpoint-<step>/`` folders of ``run_dir``."""
    for old in numbered(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def numbered(run_dir) -> list[Path]:
    """The complete ``checkpoint-<step>/`` folders of ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    found = []
    for child in run_dir.iterdir() if run_dir.is_dir() else []:
        match = _CHECKPOINT.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def remove_leftovers(run_dir) -> list[Path]:
    """Delete the hidden temporary files and folders a killed save left in ``run_dir``; returns them."""
    run_dir = Path(run_dir)
    removed = []
    for child in run_dir.iterdir() if run_dir.is_dir() else []:
        if child.name.startswith(".") and (child.name.endswith(".tmp") or child.name.endswith(".old")):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def read_state(path) -> dict:
    """The JSON training state of the checkpoint in ``path`` (step, schedule, extra)."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def _load_sharded(agent, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Put a saved adapter's whole weights into the shards of a sharded agent's parameters (a collective)."""
    params = adapter_parameters(agent.unwrapped_model(), agent.adapter_name, saved_names=True)
    if params.keys() != weights.keys():
        raise UserError(f"{path / 'actor'} does not hold the weights of this run's adapter "
                        f"({len(weights)} tensors saved, {len(params)} in the adapter)")
    if getattr(agent, "deepspeed", False):   # ZeRO-3: every process writes the whole weights, each keeps its part
        with _gathered_deepspeed(agent, params.values(), modifier_rank=0), torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name].to(param.device, param.dtype))
        return
    with torch.no_grad():
        for name, param in sorted(params.items()):
            local_tensor(param).copy_(local_tensor(shard_like(param, weights[name])))


def load(agent, path) -> dict:
    """Restore adapter weights, optimizer, scheduler, step and RNG states; returns the extra state. A
    checkpoint whose files cannot be read back is a UserError naming it."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise UserError(f"no checkpoint at {path} (missing {STATE_FILE})")
    from safetensors import SafetensorError

    try:
        return _load(agent, path)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        # a file cut short or overwritten after the checkpoint was written (json's errors are ValueErrors)
        raise UserError(f"the checkpoint {path} is damaged and cannot be resumed from ({error_line(exc)}); remove "
                        "that folder to resume from an earlier checkpoint of the run, if it has one") from None


def _check_same_algorithm(agent, state: dict, path: Path) -> None:
    """A UserError when the checkpoint was written by another algorithm's agent (an SFT checkpoint loaded into a
    DPO agent): its optimizer moments, schedule and step belong to that run. (Checkpoints written before the
    algorithm was recorded are not checked.)"""
    saved, here = state.get("algorithm"), type(agent).__name__
    if saved is not None and saved != here:
        raise UserError(f"the checkpoint {path} was written by {saved}, not {here}: load_checkpoint continues a run "
                        f"of the same algorithm; to start {here} from its adapter, load {path / 'actor'} with "
                        "alignkit.adapters.load_adapter (a warm start, as the README shows)")


def _check_same_adapter(agent, weights: dict[str, torch.Tensor], path: Path) -> None:
    """A UserError when the checkpoint's adapter is not the shape of ``agent``'s (other LoRA targets, rank or
    alpha): found before anything of the agent is changed."""
    params = adapter_parameters(agent.unwrapped_model(), agent.adapter_name, saved_names=True)
    saved = read_adapter_config(path / "actor")
    alpha = agent.unwrapped_model().peft_config[agent.adapter_name].lora_alpha
    differ = next((f"{n}: {tuple(weights[n].shape)} saved, {tuple(p.shape)} here" for n, p in params.items()
                   if n in weights and weights[n].shape != p.shape), None)
    if params.keys() != weights.keys():
        differ = f"{len(weights)} adapter tensors saved, {len(params)} in this agent's adapter"
    elif differ is None and saved.get("lora_alpha", alpha) != alpha:
        differ = f"lora_alpha {saved['lora_alpha']} saved, {alpha} here"
    if differ:
        raise UserError(f"the checkpoint {path} holds an adapter of another shape than this agent's ({differ}); "
                        f"build the agent with the LoRA settings of {path / 'actor' / 'adapter_config.json'}")


def follow_schedule(scheduler) -> None:
    """Give the next step the rate the scheduler's own schedule gives it now. After a load: the same number when
    the run resumes as it was, the new schedule's when ``--max-steps`` extended it (the saved rate was the old
    schedule's, one step later at odds with every step after it); after a new peak rate (a population's
    mutation), that rate's point on the schedule."""
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                                          strict=True)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates


def _load(agent, path: Path) -> dict:
    from peft import set_peft_model_state_dict

    weights = load_file(str(path / "actor" / "adapter_model.safetensors"))
    state = read_state(path)   # every file read before the agent is changed
    _check_same_algorithm(agent, state, path)
    tensors = load_file(str(path / OPTIMIZER_FILE))
    if getattr(agent, "sharded", False):
        _load_sharded(agent, weights, path)
    else:
        _check_same_adapter(agent, weights, path)
        set_peft_model_state_dict(agent.unwrapped_model(), weights, adapter_name=agent.adapter_name)
    torch.set_rng_state(tensors.pop("rng.torch"))
    cuda = [tensors.pop(k) for k in sorted((k for k in list(tensors) if k.startswith("rng.cuda.")),
                                           key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if getattr(agent, "deepspeed", False):
        _restore_deepspeed(agent, weights, tensors, state["optimizer"])
    else:
        _restore_optimizer(agent.optimizer, tensors, state["optimizer"])
    agent.scheduler.load_state_dict(state["scheduler"])
    follow_schedule(agent.scheduler)
    agent.steps = state["steps"]
    return state["extra"]
