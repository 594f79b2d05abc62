"""Property test: any preference rows either train or fail with a clear UserError, and the loss
covers exactly the response tokens.

Random rows (any Unicode incl. control characters, emoji, lone surrogates, chat-template special
tokens, empty, whitespace-only and very long strings) go file -> `make_dataset` -> `SFTGym` /
`PreferenceGym` -> one `learn` step of `SFT` / `DPO` on a tiny random-weight model.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peft import LoraConfig

from alignkit import DPO, SFT, PreferenceGym, SFTGym
from alignkit.data import make_dataset
from alignkit.errors import UserError
from alignkit.gyms import IGNORE_INDEX, Encoded, render_prompt_response

LORA = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])

# Strings that stress the chat template and the prompt/response boundary.
SPECIAL = ["<|im_end|>", "<|im_start|>", "<|im_start|>assistant\n", "<|endoftext|>", "\r\n", "\u2028", "\x00",
           "\ufeff", "e\u0301", "👩\u200d👩\u200d👧"]

_COLUMNS = ("prompt", "chosen", "rejected")
_visible = st.text("abcxyz?!0", min_size=1, max_size=8)
_piece = st.one_of(
    st.text(max_size=12),                                               # any Unicode but surrogates
    st.text(st.characters(categories=["Cc", "Cf", "Zs"]), max_size=6),  # control, format, odd spaces
    st.text(st.characters(categories=["So"]), min_size=1, max_size=4),  # emoji and other symbols
    st.sampled_from(SPECIAL),
)
_mixed = st.builds("{}{}{}".format, st.lists(_piece, max_size=3).map("".join), _visible,
                   st.lists(_piece, max_size=3).map("".join))
_long = st.builds(lambda s, n: "x" + s * n, st.text(min_size=1, max_size=6), st.integers(100, 600))
_good_value = st.one_of(_mixed, _mixed, _mixed, _long)
_bad_value = st.one_of(
    st.sampled_from(["", " ", "\n\t ", "\u3000"]),                   # empty or whitespace-only
    st.builds("{}{}{}".format, _visible, st.characters(categories=["Cs"]), _visible),  # a lone surrogate
)
_good_row = st.fixed_dictionaries({c: _good_value for c in _COLUMNS})
_bad_row = st.builds(lambda row, column, bad: {**row, column: bad}, _good_row, st.sampled_from(_COLUMNS), _bad_value)
# one_of draws its branches about equally: good rows are listed thrice so that most examples
# train, while rows with a bad value (dropped with a counted warning) still show up in most.
# Unique, since hypothesis likes to repeat values and exact repeats are dropped (tests/test_data.py).
_rows = st.lists(st.one_of(_good_row, _good_row, _good_row, _bad_row), min_size=3, max_size=8,
                 unique_by=lambda row: tuple(row[c] for c in _COLUMNS))
# The template's system preamble alone is ~30 tokens: 2 exercises "every prompt too long".
_max_length = st.sampled_from([256, 512, 128, 64, 2])


_REPRESENTABLE: dict[str, bool] = {}


def _representable(tokenizer, text: str) -> bool:
    """Whether every character of ``text`` survives tokenization.

    Not all do: the embedded (GGUF-converted) vocabulary lacks the byte tokens of six ASCII
    control characters (0x04, 0x06, 0x13, 0x14, 0x16, 0x1d) and of the lead bytes of the
    unassigned planes U+40000..U+BFFFF, and its tokenizer silently drops such bytes.
    """
    for char in set(text):
        if char not in _REPRESENTABLE:
            ids = tokenizer(char, add_special_tokens=False)["input_ids"]
            _REPRESENTABLE[char] = tokenizer.decode(ids, clean_up_tokenization_spaces=False) == char
        if not _REPRESENTABLE[char]:
            return False
    return True


def _expected(tokenizer, prompt: str, response: str, max_length: int) -> Encoded | None:
    """The encoding a row should get, from the spec: the chat template renders the user turn and the
    assistant header as the prompt, and the response text plus the end-of-turn token as the target
    (cut to fit `max_length`; a prompt that alone does not fit drops the row)."""
    prompt_text, response_text = render_prompt_response(tokenizer, prompt, response)
    assert response_text == response + tokenizer.eos_token
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    # The target tokens are the response's and nothing else: they decode back to its exact text
    # (where the vocabulary can spell it; see _representable).
    if _representable(tokenizer, response_text):
        assert tokenizer.decode(response_ids, clean_up_tokenization_spaces=False) == response_text
    else:
        event("text the vocabulary cannot spell")
    if len(prompt_ids) >= max_length:
        return None
    return Encoded(prompt_ids, response_ids[: max_length - len(prompt_ids)])


def _check_examples(examples, dataset, columns, tokenizer, max_length) -> list[Encoded]:
    """A split's gym examples are the spec's encodings of the rows whose prompt fits, in order.

    Returns every sequence of them (one per row for SFT, chosen and rejected for preferences).
    """
    kept = []
    for row in dataset:
        encs = [_expected(tokenizer, row["prompt"], row[column], max_length) for column in columns]
        if None not in encs:
            kept.append(encs)
    assert [[ex] if isinstance(ex, Encoded) else [ex.chosen, ex.rejected] for ex in examples] == kept
    return [seq for encs in kept for seq in encs]


def _check_batch(batch, sequences: list[Encoded]) -> None:
    """Each row is one known sequence, right-padded; labels are -100 except on its response tokens."""
    by_ids = {tuple(s.input_ids): s for s in sequences}
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        seq = by_ids[tuple(ids[:n].tolist())]
        p = len(seq.prompt_ids)
        assert (labels[:p] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        assert labels[p:n].tolist() == seq.response_ids
        assert len(seq.response_ids) >= 1 and (labels != IGNORE_INDEX).sum() == n - p


def _train_one_step(algo: str, gym, tokenizer, make_model) -> None:
    # A fresh tiny model per example costs ~35 ms to build (measured): simpler and safer than
    # stripping the adapter and optimizer state off a shared one.
    model = make_model(layers=1)
    cls, extra = (SFT, {}) if algo == "sft" else (DPO, {"beta": 0.1, "nll_alpha": 1.0})
    agent = cls(model, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, batch_size=4,
                lr=1e-3, lora_config=copy.deepcopy(LORA), seed=0, **extra)
    metrics = agent.learn(gym.reset())
    assert math.isfinite(metrics["loss"]), metrics


@settings(max_examples=25, deadline=None, database=None, derandomize=True,
          # make_model is function-scoped but a stateless factory: sharing it across examples is safe
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                 HealthCheck.function_scoped_fixture])
@given(rows=_rows, max_length=_max_length)
def test_random_rows_train_or_fail_cleanly(tokenizer, make_model, rows, max_length):
    """Derandomized, so CI sees the same 25 examples each run; a failure prints the rows."""
    torch.manual_seed(0)
    event(f"max_length={max_length}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        # ensure_ascii (the default) writes a lone surrogate as the JSON escape "\ud800"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        try:
            train, test = make_dataset(path, test_size=1, seed=0)
        except UserError as err:
            assert "\n" not in str(err)
            event(f"dataset refused: {str(err)[-70:]}")
            return
    for algo, gym_cls, columns in (("sft", SFTGym, ("chosen",)), ("dpo", PreferenceGym, ("chosen", "rejected"))):
        try:
            gym = gym_cls(train, test, tokenizer, data_batch_size_per_gpu=4, max_context_length=max_length)
        except UserError as err:
            assert "\n" not in str(err) and "no training rows left" in str(err)
            event(f"{algo}: every prompt too long")
            continue
        sequences = _check_examples(gym.train_examples, train, columns, tokenizer, max_length)
        _check_batch(gym.reset(), sequences)
        for _ in range(gym.batches_per_epoch - 1):
            _check_batch(gym.step(), sequences)
        sequences = _check_examples(gym.test_examples, test, columns, tokenizer, max_length)
        for batch in gym.test_batches():
            _check_batch(batch, sequences)
        _train_one_step(algo, gym, tokenizer, make_model)
        event(f"{algo}: trained")
