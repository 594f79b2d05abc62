"""Drafted decoding: several tokens per lean step, a single greedy stream checking prompt-lookup drafts,
and the last row of a batch continuing with drafts once the others have ended."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, lively, plain_generate, with_lora

from alignkit.generation import LeanStep, chat_prompt_ids, decode, merged_lora
from alignkit.kv_cache import new_cache
from alignkit.lean_step import BASE, DraftPayoff


@pytest.fixture
def model(make_model):
    """A tiny model with a LoRA adapter that changes its answers (merged while decoding)."""
    return with_lora(lively(make_model()))


def test_several_tokens_per_step_are_the_models_own_logits(model, tokenizer):
    prompt = torch.tensor([chat_prompt_ids(tokenizer, PROMPTS[1])])
    following = torch.tensor([[11, 12, 13, 14]])
    with merged_lora(model), torch.no_grad():
        lean = LeanStep.for_model(model)
        theirs, ours = new_cache(model, room=64), new_cache(model, room=64)
        for cache in (theirs, ours):
            model(input_ids=prompt, cache=cache)
        positions = torch.arange(prompt.shape[1], prompt.shape[1] + 4)[None]
        expected = model(input_ids=following, position_ids=positions, cache=theirs).logits
        torch.testing.assert_close(lean(following, positions, None, ours), expected, rtol=1e-5, atol=1e-5)
        assert ours.get_seq_length() == prompt.shape[1] + 4
        for layer in ours.layers:   # forgetting drafted positions: the next token sees what the model's cache holds
            layer.truncate(prompt.shape[1] + 2)
        theirs = new_cache(model, room=64)
        model(input_ids=torch.cat([prompt, following[:, :2]], 1), cache=theirs)
        expected = model(input_ids=following[:, 3:], position_ids=positions[:, 2:3], cache=theirs).logits[:, -1]
        torch.testing.assert_close(lean(following[0, 3:], positions[:, 2:3], None, ours), expected, rtol=1e-5, atol=1e-5)


def test_drafted_single_streams_are_greedy_decoding(make_model, model, tokenizer, monkeypatch, always_draft):
    steps = []
    real = LeanStep.__call__
    monkeypatch.setattr(LeanStep, "__call__", lambda self, tokens, *a, **k: steps.append(tokens.numel()) or real(self, tokens, *a, **k))
    repeating = make_model()   # untrained weights repeat the last tokens: drafts are right
    streamed = []

    def stream(row, token):
        streamed.append(token)

    for m in (repeating, model):
        for text in PROMPTS:
            prompt = chat_prompt_ids(tokenizer, text)
            expected = plain_generate(m, prompt, 30, stop=-1)
            steps.clear()
            with merged_lora(m) if m is model else torch.no_grad():
                undrafted = decode(m, [prompt], 30, [-1], pad_id=2, draft_tokens=0)[0]
                assert steps[0] == len(prompt)   # the prompt, through the lean step as well
                assert len(steps) == 30 and max(steps[1:]) == 1   # then one token per step
                steps.clear()
                streamed.clear()
                drafted = decode(m, [prompt], 30, [-1], pad_id=2, on_token=stream)[0]
            assert drafted == undrafted == expected == streamed
            if m is repeating:
                assert len(steps) < 21 and max(steps[1:]) > 1   # several tokens taken per step
            # a stop token inside an accepted draft ends the answer there, and is streamed
            stop = expected[7]
            streamed.clear()
            with merged_lora(m) if m is model else torch.no_grad():
                cut = decode(m, [prompt], 30, [stop], pad_id=2, on_token=stream)[0]
            assert cut == expected[:expected.index(stop)] and streamed == cut + [stop]


def test_the_last_row_of_a_batch_continues_with_drafts_and_answers_as_greedy(make_model, tokenizer, monkeypatch,
                                                                            always_draft):
    steps = []
    real = LeanStep.__call__
    monkeypatch.setattr(LeanStep, "__call__", lambda self, tokens, *a, **k: steps.append(tuple(tokens.shape))
                        or real(self, tokens, *a, **k))
    # the base (untrained) repeats its last token, so drafts of the row it answers are right; the adapter
    # answers vary, and each of its rows stops at a token of its answer: the base's row is left alone
    model = with_lora(make_model())
    prompts = [chat_prompt_ids(tokenizer, text) for text in PROMPTS]
    alone = min(range(len(prompts)), key=lambda i: len(prompts[i]))   # left-padded in the batch
    assert len(prompts[alone]) < max(len(p) for p in prompts)
    adapters = [BASE if i == alone else "default" for i in range(len(prompts))]
    with model.disable_adapter():
        base_answer = plain_generate(model, prompts[alone], 30, stop=-1)
    expected = [base_answer if i == alone else plain_generate(model, p, 30, stop=-1) for i, p in enumerate(prompts)]
    stops = [next(t for t in e[2 + 3 * i:] if t not in base_answer) for i, e in enumerate(expected) if i != alone]
    want = [e[:min((e.index(s) for s in stops if s in e), default=len(e))] for e in expected]
    assert len(want[alone]) == 30 and max(len(w) for i, w in enumerate(want) if i != alone) < 25
    undrafted = decode(model, prompts, 30, stops, pad_id=2, adapters=adapters, draft_tokens=0)
    assert all(len(shape) == 1 for shape in steps[1:])   # one token per row and step
    steps.clear()
    streamed = []
    drafted = decode(model, prompts, 30, stops, pad_id=2, adapters=adapters,
                     on_token=lambda row, token: streamed.append((row, token)))
    assert drafted == undrafted == want
    several = [shape for shape in steps[1:] if len(shape) == 2]   # steps that took drafted tokens
    assert several and all(rows == 1 for rows, _ in several) and max(n for _, n in several) > 1
    assert len(steps) < 25   # fewer steps than tokens: the drafts were kept
    for row, answer in enumerate(want):   # each token streamed once, under its own row, the stop token too
        mine = [token for r, token in streamed if r == row]
        assert mine == answer + ([] if len(answer) == 30 else [expected[row][len(answer)]])


def test_drafts_are_checked_while_drafted_steps_give_more_tokens_per_second():
    payoff = DraftPayoff()
    payoff.record(5.0, 1, drafted=True), payoff.record(5.0, 1, drafted=False)   # first of each kind: warm-up only
    assert payoff.wanted()                        # drafts are checked until a drafted step is timed ...
    payoff.record(0.2, 2, drafted=True)
    assert not payoff.wanted()                    # ... then one step runs without, so both kinds are measured
    payoff.record(0.1, 1, drafted=False)
    assert payoff.wanted()                        # 2 tokens in 0.2 s: as many per second as one-token steps
    cheap = DraftPayoff()
    cheap.record(9, 1, drafted=True), cheap.record(9, 1, drafted=False)
    cheap.record(0.12, 3, drafted=True), cheap.record(0.1, 1, drafted=False)
    assert all(cheap.wanted() for _ in range(40))


def test_drafts_that_cost_more_than_they_give_are_checked_once_in_a_while():
    payoff = DraftPayoff()
    payoff.record(0.01, 3, drafted=True), payoff.record(9, 1, drafted=False)   # warm-up only
    payoff.record(0.2, 1.5, drafted=True)         # a 3-token step at twice one token's cost, 1.5 tokens kept
    payoff.record(0.1, 1, drafted=False)
    checked = [payoff.wanted() for _ in range(3 * DraftPayoff.PROBE_EVERY)]
    assert sum(checked) == 3 and checked[DraftPayoff.PROBE_EVERY - 1]   # one probe in PROBE_EVERY
    for _ in range(8):                            # the answer starts repeating: the probes keep all 3 tokens
        payoff.record(0.2, 3, drafted=True)
    assert all(payoff.wanted() for _ in range(10))


def test_a_stream_whose_drafts_do_not_pay_steps_one_token_at_a_time(make_model, tokenizer, monkeypatch):
    steps = []
    real = LeanStep.__call__
    monkeypatch.setattr(LeanStep, "__call__", lambda self, tokens, *a, **k: steps.append(tuple(tokens.shape))
                        or real(self, tokens, *a, **k))
    repeating = make_model()   # untrained weights repeat the last tokens: every draft would be right
    prompt = chat_prompt_ids(tokenizer, PROMPTS[0])
    expected = plain_generate(repeating, prompt, 30, stop=-1)
    monkeypatch.setattr(DraftPayoff, "wanted", lambda self: False)
    assert decode(repeating, [prompt], 30, [-1], pad_id=2)[0] == expected
    assert len(steps) == 30 and all(len(shape) == 1 for shape in steps[1:])   # the prompt, then a token a step
