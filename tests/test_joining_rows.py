"""Prompts that join a decoding batch as its rows end (``decode(..., rows_at_once=N)``) and the cache
operations behind them: rows written at positions of their own, rows admitted into freed room."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, lively, plain_generate, with_lora

import alignkit.generation as generation
from alignkit.generation import LeanStep, Sampling, chat_prompt_ids, decode, generate_ids
from alignkit.kv_cache import admit_rows, cache_bytes_per_token, can_admit, new_cache, write_columns
from alignkit.lean_step import BASE

MORE = ["Name three colours.", "What is the capital of France, and why is it famous?", "Count to five.",
        "Write a haiku about rain falling on an old tin roof at night.", "Hello there!",
        "Explain, step by step and with an example, how a rainbow forms after a summer storm."]


@pytest.fixture
def model(make_model):
    """A model the lean step runs as it is (an unmerged adapter would need ``adapters`` names)."""
    return lively(make_model())


@pytest.fixture
def prompts(tokenizer):
    """Ten prompts of different lengths; the longest ones come last, as generate_ids orders them."""
    ids = [chat_prompt_ids(tokenizer, p) for p in PROMPTS + MORE]
    return sorted(ids, key=len)


def _rows_per_step(monkeypatch) -> list[tuple[int, int]]:
    """Record (rows, tokens per row) of every call of the lean step."""
    calls = []
    real = LeanStep.__call__

    def recording(self, tokens, *args, **kwargs):
        calls.append((tokens.shape[0], tokens.shape[1] if tokens.dim() == 2 else 1))
        return real(self, tokens, *args, **kwargs)

    monkeypatch.setattr(LeanStep, "__call__", recording)
    return calls


def test_prompts_join_as_rows_end_and_answer_as_plain_generate(model, tokenizer, prompts, monkeypatch):
    first = plain_generate(model, prompts[0], 16, stop=tokenizer.eos_token_id)
    stop = first[3]   # a token some answers produce early: their rows end at different steps
    expected = [plain_generate(model, p, 16, stop) for p in prompts]
    lengths = sorted(len(e) for e in expected)
    assert lengths[0] < 16 and lengths[-1] == 16   # some rows end early, some run to the limit
    calls = _rows_per_step(monkeypatch)
    got = decode(model, prompts, 16, [stop], 2, rows_at_once=3, draft_tokens=0)
    assert got == expected
    prefills = [rows for rows, n in calls if n > 1]
    steps = [rows for rows, n in calls if n == 1]
    assert max(rows for rows, _ in calls) <= 3
    assert len(prefills) > 2 and sum(prefills) == len(prompts)   # the first three, then the others as rows ended
    assert sum(steps) == sum(len(e) + (len(e) < 16) for e in expected) - len(prompts)   # one row-step per token
    one_batch_after_another = sum(max(len(e) for e in expected[i:i + 3]) for i in range(0, len(prompts), 3))
    assert len(steps) < one_batch_after_another - len(range(0, len(prompts), 3))


def test_joined_rows_keep_streaming_order_and_prompt_numbers(model, tokenizer, prompts):
    stop = plain_generate(model, prompts[0], 10, stop=tokenizer.eos_token_id)[2]
    heard: dict[int, list[int]] = {}
    got = decode(model, prompts, 10, [stop], 2, rows_at_once=2, draft_tokens=0,
                 on_token=lambda row, token: heard.setdefault(row, []).append(token))
    for row, answer in enumerate(got):
        assert heard[row] == answer + ([stop] if len(answer) < 10 else [])   # stop tokens are heard too


def test_rows_of_several_adapters_join_where_their_adapter_runs(make_model, tokenizer, prompts, monkeypatch):
    from peft import LoraConfig

    from alignkit.models import add_lora

    model = add_lora(lively(make_model()), adapter_name="one")
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
             adapter_name="two")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=generator)
    names = ["one", "two", BASE] * 4
    rows = (prompts * 2)[:len(names)]

    def alone(adapter, ids, stop):
        if adapter == BASE:
            with model.disable_adapter():
                return plain_generate(model, ids, 12, stop)
        model.set_adapter(adapter)
        return plain_generate(model, ids, 12, stop)

    stop = alone("one", rows[0], tokenizer.eos_token_id)[2]
    expected = [alone(a, p, stop) for a, p in zip(names, rows, strict=True)]
    assert len({len(e) for e in expected}) > 1   # rows end at different steps
    model.set_adapter("one")
    segments = []
    real = LeanStep.__call__
    monkeypatch.setattr(LeanStep, "__call__", lambda self, *a, **k: segments.append(a[4]) or real(self, *a, **k))
    got = decode(model, rows, 12, [stop], 2, adapters=names, rows_at_once=4)
    assert got == expected
    # rows that joined moved beside the rows of their adapter: one slice per adapter in every step
    assert all(len({group for group, _, _ in step}) == len(step) for step in segments)


def test_samples_and_the_repetition_penalty_do_not_depend_on_joining(make_model, tokenizer):
    """Each prompt draws from its own generator and penalises its own tokens, whichever rows it joins.
    (The four prompts and the model of the samples' batch test: sampled answers can also differ where
    other batch sizes round the logits differently and a draw falls on the boundary between two tokens.)"""
    prompts = sorted((chat_prompt_ids(tokenizer, p) for p in PROMPTS), key=len)
    sampled, repeating = lively(make_model(seed=3)), lively(make_model(seed=2), std=0.05)
    for model, sampling in ((sampled, Sampling(temperature=1.0, seed=11)), (repeating, Sampling(repetition_penalty=1.5))):
        def answers(rows_at_once, model=model, sampling=sampling):
            return decode(model, prompts, 12, [tokenizer.eos_token_id], 2, sampling,
                          sampling.generators(range(len(prompts))), rows_at_once=rows_at_once)

        alone = [decode(model, [p], 12, [tokenizer.eos_token_id], 2, sampling, sampling.generators([i]),
                        draft_tokens=0)[0] for i, p in enumerate(prompts)]
        assert answers(None) == alone
        assert answers(2) == alone
        assert decode(model, prompts, 12, [tokenizer.eos_token_id], 2, rows_at_once=2) != alone   # not greedy's


def test_the_last_joined_row_drafts_once_nothing_waits(base_repeating, tokenizer, monkeypatch, always_draft):
    model, prompts, expected = base_repeating
    calls = _rows_per_step(monkeypatch)
    got = decode(model, prompts, 40, [tokenizer.eos_token_id], 2, rows_at_once=3)
    assert got == expected
    assert calls[:2] == [(3, max(len(p) for p in prompts[:3])), (3, 1)]
    joined = calls.index((1, len(prompts[3])))   # the first three rows end together; the fourth joins alone
    after = calls[joined + 1:]
    assert all(rows == 1 for rows, _ in after) and sum(n > 1 for _, n in after) > len(after) / 2   # drafted
    assert len(after) < 30   # 39 tokens after the first: several a step


@pytest.fixture
def base_repeating(make_model, tokenizer):
    """A tiny model whose answers repeat themselves (drafts then hold), with prompts and their answers."""
    model = lively(make_model(seed=2), std=0.05)
    prompts = sorted((chat_prompt_ids(tokenizer, p) for p in PROMPTS), key=len)
    expected = [plain_generate(model, p, 40, tokenizer.eos_token_id) for p in prompts]
    assert [len(e) for e in expected] == [40] * 4
    return model, prompts, expected


def test_a_cache_budget_caps_the_rows_at_once(make_model, tokenizer, prompts, monkeypatch):
    model = with_lora(lively(make_model()))   # generate_ids merges the adapter: the lean step runs
    assert cache_bytes_per_token(model) == model.config.num_hidden_layers * 2 * 2 * 8 * 4   # tiny Llama, float32
    expected = generate_ids(model, prompts, 6, [tokenizer.eos_token_id], 2, batch_size=len(prompts))
    per_row = cache_bytes_per_token(model) * (max(len(p) for p in prompts) + 6)
    calls = _rows_per_step(monkeypatch)
    got = generate_ids(model, prompts, 6, [tokenizer.eos_token_id], 2, batch_size=len(prompts),
                       cache_budget=2 * per_row + per_row // 2)   # room for two rows, not three
    assert got == expected and max(rows for rows, _ in calls) == 2
    calls.clear()
    assert generate_ids(model, prompts, 6, [tokenizer.eos_token_id], 2, batch_size=len(prompts),
                        cache_budget=1) == expected
    assert max(rows for rows, _ in calls) == 1   # less than one row: one row at a time


def test_without_the_lean_step_prompts_decode_batch_after_batch(model, tokenizer, prompts, monkeypatch):
    expected = decode(model, prompts, 8, [tokenizer.eos_token_id], 2)
    monkeypatch.setattr(LeanStep, "for_model", classmethod(lambda cls, *args, **kwargs: None))
    sizes = []
    real = generation._decode
    monkeypatch.setattr(generation, "_decode", lambda model, batch, *a, **k: sizes.append(len(batch)) or real(model, batch, *a, **k))
    assert decode(model, prompts, 8, [tokenizer.eos_token_id], 2, rows_at_once=4) == expected
    assert sizes == [10, 4, 4, 2]   # as few batches as fit, of about equal sizes
    with pytest.raises(ValueError, match="rows_at_once"):
        decode(model, prompts, 8, [tokenizer.eos_token_id], 2, rows_at_once=0)


# -- the cache -------------------------------------------------------------------------------------------


def _filled(model, rows: int, length: int, value: float, room: int, zeroed: bool = False):
    cache = new_cache(model, room=room, zeroed=zeroed)
    shape = (rows, 2, length, 8)   # the tiny Llama: 2 key/value heads of 8 dimensions
    keys = value + torch.arange(rows * length, dtype=torch.float32).repeat_interleave(16).view(rows, length, 2, 8)
    for layer in cache.layers:
        layer.update(keys.transpose(1, 2).contiguous(), -keys.transpose(1, 2).contiguous())
    assert cache.layers[0].keys.shape == shape
    return cache


def test_rows_write_at_their_own_positions_and_joined_rows_start_at_the_front(make_model):
    model = make_model()
    cache = _filled(model, rows=3, length=4, value=100.0, room=8, zeroed=True)
    assert can_admit(cache) and not can_admit(type(cache)(config=model.config))   # plain layers cannot
    joining = _filled(model, rows=2, length=3, value=500.0, room=3)
    cache.batch_select_indices(torch.tensor([2]))   # two rows leave; the third moves to the front
    admit_rows(cache, joining, starts=[1, 0], lengths=[2, 3])
    layer = cache.layers[0]
    assert layer.keys.shape == (3, 2, 4, 8)
    assert torch.equal(layer.keys[0], _filled(model, 3, 4, 100.0, 8).layers[0].keys[2])
    assert torch.equal(layer.keys[1, :, :2], joining.layers[0].keys[0, :, 1:3])   # left-aligned, padding dropped
    assert torch.equal(layer.values[2, :, :3], joining.layers[0].values[1])
    new = torch.full((3, 2, 1, 8), 7.0)
    write_columns(cache, torch.tensor([4, 2, 3]))
    layer.update(new, -new)
    write_columns(cache, None)
    assert layer.keys.shape[2] == 5   # up to the furthest row's new position
    assert (layer.keys[0, :, 4] == 7).all() and (layer.keys[1, :, 2] == 7).all() and (layer.keys[2, :, 3] == 7).all()
    assert torch.equal(layer.keys[1, :, :2], joining.layers[0].keys[0, :, 1:3])   # nothing else moved
    assert (layer.keys[1:, :, 4] == 0).all()   # zeroed room: a position no row ever wrote holds zeros
    assert (layer.keys[1, :, 3] == 100 + 7).all()   # one a row that left wrote keeps its (finite) numbers


def test_a_budget_that_leaves_rows_out_leaves_the_weights_unpacked(make_model, tokenizer, prompts, monkeypatch):
    model = with_lora(lively(make_model()))
    packing = []
    real = LeanStep.for_model.__func__
    monkeypatch.setattr(LeanStep, "for_model", classmethod(
        lambda cls, model, adapters=(), pack_rows=None: packing.append(pack_rows) or real(cls, model, adapters, pack_rows)))
    per_row = cache_bytes_per_token(model) * (max(len(p) for p in prompts) + 6)
    expected = generate_ids(model, prompts, 6, [tokenizer.eos_token_id], 2, batch_size=len(prompts))
    assert packing == [len(prompts)]   # no budget: packed for the whole batch
    for budget, packed in ((len(prompts) * per_row, len(prompts)),   # every row fits: still packed
                           (3 * per_row, None)):                    # rows left out: memory is short, no copy
        packing.clear()
        assert generate_ids(model, prompts, 6, [tokenizer.eos_token_id], 2, batch_size=len(prompts),
                            cache_budget=budget) == expected
        assert packing == [packed]


def test_a_batch_of_prompts_runs_in_pieces_with_the_same_answers(model, tokenizer, prompts, monkeypatch):
    expected = [plain_generate(model, p, 8, tokenizer.eos_token_id) for p in prompts]
    heads = []
    real = LeanStep.__call__

    def recording(self, tokens, *args, head=True, **kwargs):
        if tokens.dim() == 2:
            heads.append((tokens.shape[1], head))
        return real(self, tokens, *args, head=head, **kwargs)

    monkeypatch.setattr(LeanStep, "__call__", recording)
    monkeypatch.setattr(generation, "PREFILL_TOKENS", 3 * len(prompts))   # 3 positions of every row per piece
    assert decode(model, prompts, 8, [tokenizer.eos_token_id], 2, draft_tokens=0) == expected
    pieces = [n for n, _ in heads]
    assert sum(pieces) == max(len(p) for p in prompts) and max(pieces) <= 3 and max(pieces) - min(pieces) <= 1
    assert [h for _, h in heads] == [False] * (len(heads) - 1) + [True]   # the LM head for the last piece only
