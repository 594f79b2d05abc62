"""The chat's key/value cache kept from one answer to the next: only a new message is computed, and the
answers are those of answering every prompt from scratch."""

from __future__ import annotations

import pytest
import torch
from conftest import lively, with_lora

from alignkit.evaluate import Chat
from alignkit.generation import LeanStep, merged_lora
from alignkit.kv_cache import ConversationCache

MESSAGES = ["Hello there, who are you?", "Tell me more about that, please.", "Why?", "And after that, what happened?"]


@pytest.fixture
def model(make_model):
    return with_lora(lively(make_model()))


@pytest.fixture
def computed(monkeypatch):
    """The number of tokens each forward computes, lean step or the model's own (prompts, then answer steps)."""
    seen = []
    real_step = LeanStep.__call__
    monkeypatch.setattr(LeanStep, "__call__", lambda self, tokens, *a, **k: seen.append(tokens.shape[-1]
                        if tokens.dim() == 2 else 1) or real_step(self, tokens, *a, **k))
    return seen


def _answers(model, tokenizer, fresh: bool, computed: list, **options) -> tuple[list[str], list[int]]:
    """The chat's answers to MESSAGES and the tokens each answer's prompt computed; ``fresh`` forgets
    the kept cache before every answer (what answering from scratch does)."""
    chat = Chat(model, tokenizer, max_new_tokens=12, **options)
    answers, prefills = [], []
    for text in MESSAGES:
        if fresh:
            chat.cache = ConversationCache()
        computed.clear()
        answers.append(chat.answer(text)[0])
        prefills.append(computed[0] if computed else None)
    return answers, prefills


@pytest.mark.parametrize("lean", [True, False])
def test_later_answers_compute_only_the_new_message_and_answer_as_from_scratch(model, tokenizer, computed,
                                                                             monkeypatch, lean):
    if not lean:   # the model's own forward on the kept cache
        monkeypatch.setattr(LeanStep, "for_model", classmethod(lambda cls, model, adapters=(), pack_rows=None: None))
    with merged_lora(model):
        fresh, fresh_prefills = _answers(model, tokenizer, True, computed)
        kept, kept_prefills = _answers(model, tokenizer, False, computed)
    assert kept == fresh and len(set(fresh)) > 1
    if lean:
        chat = Chat(model, tokenizer, max_new_tokens=12)
        for i, prefill in enumerate(kept_prefills):
            full = len(chat.prompt_ids(MESSAGES[i])[0])
            assert fresh_prefills[i] == full   # from scratch: every token of the conversation
            if i:   # kept: the tokens after the shared start only, far fewer than the whole conversation
                assert prefill < full - 20
            chat.turns += [{"role": "user", "content": MESSAGES[i]}, {"role": "assistant", "content": kept[i]}]


def test_sampled_chats_draw_the_same_with_the_cache_kept(model, tokenizer, computed):
    from alignkit.generation import Sampling

    with merged_lora(model):
        fresh, _ = _answers(model, tokenizer, True, computed, sampling=Sampling(temperature=0.8, top_p=0.9, seed=3))
        kept, _ = _answers(model, tokenizer, False, computed, sampling=Sampling(temperature=0.8, top_p=0.9, seed=3))
    assert kept == fresh


def test_the_kept_cache_is_cut_to_the_shared_start(model, tokenizer):
    reuse = ConversationCache()
    from alignkit.generation import decode

    prompt = list(range(100, 130))
    with merged_lora(model):
        first = decode(model, [prompt], 5, [-1], 2, reuse=reuse)[0]
        assert reuse.ids == (prompt + first)[:len(prompt) + 4]   # the last answer token was never computed
        assert reuse.cache.get_seq_length() == len(reuse.ids)
        cache, past = reuse.claim(model, prompt[:20] + [7, 8, 9], 40)
        assert past == 20 and cache.get_seq_length() == 20 and reuse.cache is None   # in use until kept
        reuse.keep(cache, prompt[:20])
        _, past = reuse.claim(model, prompt[:20], 40)
        assert past == 19   # the prompt's last token is computed again: its logits pick the first answer token


def test_an_answer_that_fails_drops_the_cache(model, tokenizer, monkeypatch):
    from alignkit.generation import decode

    reuse = ConversationCache()
    with merged_lora(model):
        decode(model, [list(range(100, 130))], 5, [-1], 2, reuse=reuse)
        assert reuse.cache is not None

        def fail(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(LeanStep, "__call__", fail)
        with pytest.raises(KeyboardInterrupt):
            decode(model, [list(range(100, 140))], 5, [-1], 2, reuse=reuse)
        assert reuse.cache is None
        with pytest.raises(ValueError, match="one prompt at a time"):
            decode(model, [[1, 2], [3, 4]], 5, [-1], 2, reuse=reuse)
    assert torch.is_grad_enabled()
