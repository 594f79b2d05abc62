"""Shared fixtures: the embedded tokenizer, tiny random-weight models and a few preference rows."""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignkit.models import DEFAULT_MODEL, load_tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` written to ``path`` as JSON lines (UTF-8); returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def by_answer(dataset, key: str = "chosen") -> dict:
    """The rows of ``dataset`` by their answer's text (the last message's, for conversations)."""
    return {row[key] if isinstance(row[key], str) else row[key][-1]["content"]: row for row in dataset}


def user(text: str) -> dict:
    """A user message."""
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    """An assistant message."""
    return {"role": "assistant", "content": text}


SHORT = ["--max-steps", "1", "--batch-size", "2", "--max-length", "96", "--test-size", "2", "--no-plot",
         "--eval-interval", "0"]
"""Flags of the shortest command-line run on the tiny model."""


ROWS = [
    {"prompt": "Do you like rainy days?", "chosen": "Oh, I love them! Cozy blankets and tea.",
     "rejected": "Weather preferences are not applicable to me."},
    {"prompt": "What's your favorite snack?", "chosen": "Popcorn, hands down. Salty and buttery!",
     "rejected": "I do not consume food and therefore have no preference."},
    {"prompt": "Any tips for sleeping better?", "chosen": "Try a screen-free hour before bed, it really helps.",
     "rejected": "It is advisable to maintain a consistent sleep schedule."},
    {"prompt": "Should I learn guitar or piano?", "chosen": "Guitar if you want to jam with friends soon!",
     "rejected": "Both instruments possess distinct advantages and disadvantages."},
    {"prompt": "How was your weekend?", "chosen": "Pretty chill! How about yours, do anything fun?",
     "rejected": "I do not experience weekends. Please state your query."},
    {"prompt": "Is coffee bad for you?", "chosen": "In moderation it's fine, a cup or two won't hurt.",
     "rejected": "Caffeine consumption should be evaluated with a medical professional."},
]


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """A cache of this test session's own ($ALIGNKIT_CACHE), so cached log-probs of earlier sessions
    never answer for this one's; converted models are the user's cache's, so they convert once."""
    from alignkit.models import cache_dir

    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    own = tmp_path_factory.mktemp("alignkit-cache")
    (own / "models").symlink_to(models, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALIGNKIT_CACHE", str(own))
        yield own


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (with its chat template)."""
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def plain_tokenizer(tokenizer):
    """The same vocabulary without a chat template (the prompt + response + EOS path)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


@pytest.fixture
def rows():
    return [dict(r) for r in ROWS]


def make_tiny_model(vocab_size: int, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A small Llama with random weights, built from a config (no download)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(len(tokenizer))


@pytest.fixture
def make_model(tokenizer):
    """Factory of tiny models with the embedded tokenizer's vocabulary: ``make_model(seed=0)``."""
    return lambda seed=0, layers=2: make_tiny_model(len(tokenizer), seed=seed, layers=layers)


# -- generation: prompts, lively weights, plain generate ---------------------------------------

PROMPTS = ["Hi", "Tell me a long story about a dragon who learned to bake bread in the mountains.", "Why?",
           [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "How are you today?"}]]


def lively(model, seed: int = 0, std: float = 0.3):
    """Random weights large enough that greedy answers vary from token to token (a freshly
    initialised tiny model repeats its last input token)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.normal_(0.0, std, generator=generator)
    return model.eval()


def with_lora(model, seed: int = 1):
    """``model`` with a fresh LoRA adapter whose ``lora_B`` is not zero, so it changes the answers."""
    from alignkit.models import add_lora

    peft_model = add_lora(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=generator)
    return peft_model.eval()


def slowed(product, seconds: float = 0.002):
    """``product`` made slower by ``seconds`` a call (far more than a small product takes), to check
    that a timed choice between two products picks the faster one."""
    def slow(*args):
        time.sleep(seconds)
        return product(*args)
    return slow


def check_timed_choice(monkeypatch, module, measure, default: str, candidate: str) -> None:
    """Check a timed choice between two products of ``module`` (the functions named ``default`` and
    ``candidate``): ``measure(64, 32, threads)``, uncached, says no where the candidate is made slower
    and yes where the default is."""
    original = {name: getattr(module, name) for name in (default, candidate)}
    monkeypatch.setattr(module, candidate, slowed(original[candidate]))
    assert measure(64, 32, torch.get_num_threads()) is False
    monkeypatch.setattr(module, candidate, original[candidate])
    monkeypatch.setattr(module, default, slowed(original[default]))
    assert measure(64, 32, torch.get_num_threads()) is True
    monkeypatch.setattr(module, default, original[default])


def plain_generate(model, ids: list[int], max_new_tokens: int, stop: int) -> list[int]:
    """``model.generate`` greedy on one unpadded prompt; the answer cut before its stop token."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=2, eos_token_id=stop)
    new = out[0, len(ids):].tolist()
    return new[:new.index(stop)] if stop in new else new


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random-weight model saved as a local model folder (config, safetensors, tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def rows_file(tmp_path_factory):
    """A small preference JSONL file (24 rows: the fixture rows with numbered prompts)."""
    import json

    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(4):
            for r in ROWS:
                f.write(json.dumps({**r, "prompt": f"{r['prompt']} ({i})"}) + "\n")
    return path


@pytest.fixture(scope="module")
def bench():
    """``benchmarking/bench_throughput.py`` loaded as a module (it is a script, not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarking" / "bench_throughput.py"
    spec = importlib.util.spec_from_file_location("bench_throughput", path)   # it imports its sibling itself
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def always_draft(monkeypatch):
    """Drafts checked at every step, whatever the stream's own timing says (``DraftPayoff``, tested on its
    own): for tests of what drafted steps compute, which must not depend on the machine's load."""
    from alignkit.lean_step import DraftPayoff

    monkeypatch.setattr(DraftPayoff, "wanted", lambda self: True)
