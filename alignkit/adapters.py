"""Reading LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) onto a base.

Every way an adapter folder can be wrong (missing, broken or truncated files, pickled weights,
another base model) is a :class:`~alignkit.errors.UserError` with one line that says what to fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .models import quiet_peft


def adapter_base_model(load_path) -> str | None:
    """The base model an adapter folder was trained on (``base_model_name_or_path``), if recorded."""
    config_file = Path(load_path) / "adapter_config.json"
    if not config_file.exists():
        hint = " (did you mean its actor/ folder?)" if (Path(load_path) / "actor").is_dir() else ""
        raise UserError(f"{load_path} is not a LoRA adapter folder: no adapter_config.json{hint}")
    return json.loads(config_file.read_text()).get("base_model_name_or_path")


def load_adapter(base_model, load_path, adapter_name="default", is_trainable=True, model=None):
    """Attach the adapter at ``load_path`` to ``base_model`` (or add it to PEFT ``model``).

    A mismatch between the adapter and the base (other shapes or module names) is a UserError.
    """
    from peft import PeftModel

    try:
        with quiet_peft():
            if model is None:
                return PeftModel.from_pretrained(base_model, str(load_path), adapter_name=adapter_name,
                                                 is_trainable=is_trainable)
            model.load_adapter(str(load_path), adapter_name=adapter_name, is_trainable=is_trainable)
        return model
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the adapter at {load_path} does not fit this base model: {first}") from None
