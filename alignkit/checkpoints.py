"""Checkpoints as safetensors + JSON, written atomically. No pickle anywhere.

A checkpoint folder holds:

- ``actor/``: a standard PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained(base, "actor")`` loads;
- ``training_state.json``: step, schedule, the loop's extra state (data position, epoch, ...);
- ``optimizer.safetensors``: the optimizer's tensors and the torch RNG state.

Each piece is written atomically (``alignkit.io``), the state file last, so an interrupted save
never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .io import atomic_folder, atomic_write, atomic_write_json

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors and a JSON-able remainder."""
    state = optimizer.state_dict()
    tensors, meta = {}, {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                meta[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": meta}


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


def save(agent, path, base_model_name: str | None = None, extra_state: dict | None = None) -> Path:
    """Write ``agent``'s adapter and training state into folder ``path`` (replacing an older checkpoint).

    Other files in ``path`` (metrics, figures) are left alone.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = agent.unwrapped_model()
    config = model.peft_config[agent.adapter_name]
    if base_model_name:
        config.base_model_name_or_path = base_model_name
    # Without the state file the folder is not a checkpoint; it comes back last, when all is written.
    (path / STATE_FILE).unlink(missing_ok=True)
    with atomic_folder(path / "actor", replace=True) as tmp:
        model.save_pretrained(tmp, selected_adapters=[agent.adapter_name], save_embedding_layers=False)
        if agent.adapter_name != "default":  # PEFT writes non-default adapters into a subfolder
            sub = tmp / agent.adapter_name
            for f in sub.iterdir():
                f.rename(tmp / f.name)
            sub.rmdir()
    tensors, opt_meta = _optimizer_tensors(agent.optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_write(path / OPTIMIZER_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(path / STATE_FILE, {"steps": agent.steps, "scheduler": agent.scheduler.state_dict(),
                                          "optimizer": opt_meta, "extra": extra_state or {}})
    return path


def load(agent, path) -> dict:
    """Restore adapter weights, optimizer, scheduler, step and RNG; returns the extra state."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise UserError(f"no checkpoint at {path} (missing {STATE_FILE})")
    weights = load_file(str(path / "actor" / "adapter_model.safetensors"))
    set_peft_model_state_dict(agent.unwrapped_model(), weights, adapter_name=agent.adapter_name)
    state = json.loads((path / STATE_FILE).read_text())
    tensors = load_file(str(path / OPTIMIZER_FILE))
    torch.set_rng_state(tensors.pop("rng.torch"))
    _restore_optimizer(agent.optimizer, tensors, state["optimizer"])
    agent.scheduler.load_state_dict(state["scheduler"])
    agent.steps = state["steps"]
    return state["extra"]
