"""Reading LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) onto a base.

Every way an adapter folder can be wrong (missing, broken or truncated files, pickled weights,
another base model) is a :class:`~alignkit.errors.UserError` with one line that says what to fix.
The folder is checked before PEFT reads it: PEFT takes a folder without its weights file for a
hub id and goes online, and lets a damaged file or config surface as a library traceback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ArgumentError, UserError, checked
from .models import SAFETENSORS_ONLY, pickled_weight_files, quiet_peft

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Written beside an adapter trained with ``--chat-template``, so generation renders turns the same way."""


def adapter_chat_template(load_path) -> str | None:
    """The chat template saved with the adapter at ``load_path``, or ``None`` (the base's own applies)."""
    path = Path(load_path) / CHAT_TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"could not read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def read_adapter_config(load_path) -> dict:
    """The parsed ``adapter_config.json`` of the adapter folder ``load_path``: a JSON object."""
    folder = Path(load_path)
    config_file = folder / ADAPTER_CONFIG
    if not folder.exists():
        raise UserError(f"{load_path}: no such adapter folder")
    if not folder.is_dir():
        inside = " that holds it" if folder.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) else ""
        raise UserError(f"{load_path} is a file: give the adapter folder{inside} ({folder.parent})" if inside else
                        f"{load_path} is a file, not a LoRA adapter folder")
    if not config_file.is_file():
        hint = " (did you mean its actor/ folder?)" if (folder / "actor").is_dir() else ""
        raise UserError(f"{load_path} is not a LoRA adapter folder: no {ADAPTER_CONFIG}{hint}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 JSON text"
        raise UserError(f"{config_file} is damaged: {reason}; re-save the adapter") from None
    except OSError as exc:
        raise UserError(f"could not read {config_file}: {exc.strerror or exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} is not a PEFT adapter config (not a JSON object); re-save the adapter")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise UserError(f"{config_file}: base_model_name_or_path must be text, got {base!r}")
    return config


def check_adapter_folder(load_path) -> dict:
    """The parsed ``adapter_config.json`` of ``load_path`` after checking the whole adapter folder.

    Beyond :func:`read_adapter_config`: the config names its PEFT type, and the weights file is
    there (not only pickled ``.bin`` weights) with a complete safetensors header. Cheap: the
    tensors themselves are not read.
    """
    from safetensors import SafetensorError, safe_open

    config = read_adapter_config(load_path)
    if "peft_type" not in config:
        raise UserError(f"{Path(load_path) / ADAPTER_CONFIG} is not a PEFT adapter config (no peft_type); "
                        "re-save the adapter")
    weights = Path(load_path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = pickled_weight_files(Path(load_path))
        if pickled:
            raise UserError(f"the adapter at {load_path} holds only pickled weights ({', '.join(pickled)}); "
                            f"{SAFETENSORS_ONLY}: re-save it with safetensors")
        raise UserError(f"the adapter at {load_path} has no weights: {ADAPTER_WEIGHTS} is missing")
    try:
        # Opening reads the header and checks it covers the whole file: a truncated or foreign
        # file fails here, in milliseconds, rather than deep inside PEFT after the base loaded.
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights} is damaged (truncated or not a safetensors file: {exc}); "
                        "re-save or re-copy the adapter") from None
    return config


def adapter_base_model(load_path) -> str | None:
    """The base model an adapter folder was trained on (``base_model_name_or_path``), if recorded.

    Reads only ``adapter_config.json`` (see :func:`read_adapter_config`); the weights are checked
    by :func:`load_adapter` (or call :func:`check_adapter_folder` to check them up front).
    """
    return read_adapter_config(load_path).get("base_model_name_or_path")


def load_adapter(base_model, load_path, adapter_name="default", is_trainable=True, model=None):
    """Attach the adapter at ``load_path`` to ``base_model`` (or add it to PEFT ``model``).

    The folder is checked first (see :func:`check_adapter_folder`); a mismatch between the
    adapter and the base (other shapes or module names) is a UserError.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    check_adapter_folder(load_path)
    try:
        with quiet_peft():
            if model is None:
                return PeftModel.from_pretrained(base_model, str(load_path), adapter_name=adapter_name,
                                                 is_trainable=is_trainable)
            model.load_adapter(str(load_path), adapter_name=adapter_name, is_trainable=is_trainable)
        return model
    except (RuntimeError, ValueError, KeyError, SafetensorError) as exc:
        raise UserError(f"the adapter at {load_path} does not fit this base model: {error_line(exc)}") from None


def error_line(exc: Exception) -> str:
    """The error's first line and, for a multi-line one such as torch's "Error(s) in loading state_dict
    for ...:" followed by one line per tensor, its first detail and how many more there are."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[1]}"
    return text + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")


def lora_config_from(value) -> LoraConfig | None:
    """``value`` as a ``peft.LoraConfig``: None (the default) and a ``LoraConfig`` as they are, a dict as
    ``LoraConfig(**value)``; another type, a dict LoraConfig refuses or a rank below 1 is an ArgumentError."""
    from peft import LoraConfig

    if isinstance(value, Mapping):
        try:   # a key LoraConfig does not take is a TypeError naming it
            value = LoraConfig(**value)
        except (TypeError, ValueError) as err:
            raise ArgumentError(f"lora_config is not a valid peft.LoraConfig: {error_line(err)}") from None
    if not isinstance(value, LoraConfig | None):
        raise ArgumentError(f"lora_config must be a peft.LoraConfig or a dict of its fields (got {type(value).__name__})")
    if value is not None:
        checked("lora_config r", value.r, 1, whole=True)
        checked("lora_config lora_alpha", value.lora_alpha, 0, above=True)
        if checked("lora_config lora_dropout", value.lora_dropout, 0, 1) == 1:   # every input dropped
            raise ArgumentError("lora_config lora_dropout must be below 1 (got 1)")
    return value
