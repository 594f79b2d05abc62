"""alignkit: fine-tune language models with SFT and DPO (+NLL) through LoRA adapters.

    from alignkit import SFT, DPO, SFTGym, PreferenceGym, make_dataset, load_model, load_tokenizer

The names below load on first use (``import alignkit`` alone imports neither torch nor transformers), so
the command line starts its heavy imports where it can answer Ctrl-C with one line.
"""

import importlib
import os

__all__ = ["SFT", "DPO", "SFTGym", "PreferenceGym", "make_dataset", "load_model", "load_tokenizer", "LoraConfig",
           "ColumnMap", "reuse_freed_memory"]
__version__ = "0.1.0"

_HOMES = {"SFT": ".agents", "DPO": ".agents", "ColumnMap": ".columns", "make_dataset": ".data",
          "PreferenceGym": ".gyms", "SFTGym": ".gyms", "load_model": ".models", "load_tokenizer": ".models",
          "reuse_freed_memory": ".runtime", "LoraConfig": "peft"}

KERNEL_CACHE_CAPACITY = 64
"""How many built products oneDNN (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and torch's oneDNN bindings
(``LRU_CACHE_CAPACITY``) each keep, set at the package's import where the environment does not say otherwise. Both
default to 1,024, and each kept product holds its work buffers (~1-3.5 MB for a training batch's
products on the embedded model). A packed batch has a new row count nearly every micro-batch, so
their entries only added up: +0.33 GB peak resident over 16 SFT steps of the demo's recipe (2.90 against
2.57 GB capped), with no reuse.
64 holds every product of one micro-batch's forward and backward (~21 shapes a layer, repeated by
every layer) and bounds the rest. Both caches read their size at their first product in the process,
so this holds where alignkit is imported before oneDNN first runs."""

for _variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_variable, str(KERNEL_CACHE_CAPACITY))


def __getattr__(name: str):
    """The public names of :data:`__all__`, imported from their modules on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module 'alignkit' has no attribute {name!r}")
    home = _HOMES[name]
    value = getattr(importlib.import_module(home, __name__ if home.startswith(".") else None), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
