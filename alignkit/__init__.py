"""alignkit: fine-tune language models with SFT and DPO (+NLL) through LoRA adapters.

    from alignkit import SFT, DPO, SFTGym, PreferenceGym, make_dataset, load_model, load_tokenizer
"""

from peft import LoraConfig

from .agents import DPO, SFT
from .columns import ColumnMap
from .data import make_dataset
from .gyms import PreferenceGym, SFTGym
from .models import load_model, load_tokenizer
from .runtime import reuse_freed_memory

__all__ = ["SFT", "DPO", "SFTGym", "PreferenceGym", "make_dataset", "load_model", "load_tokenizer", "LoraConfig",
           "ColumnMap", "reuse_freed_memory"]
__version__ = "0.1.0"
