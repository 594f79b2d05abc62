"""Generation without the overheads: merged LoRA weights, a lean decoding loop, sampling and streaming.

:func:`decode` continues token-id prompts with the model's own forward pass (so the numbers are the
model's) but keeps only what answering needs: a key/value cache written in place, the last
position's logits, rows leaving the batch as soon as they end, and no per-step processors unless
sampling asks for them. Greedy decoding runs the computation of ``model.generate(do_sample=False)``
and picks the same tokens; only at a near-tie could the last bits, which a smaller batch (rows that
left) or merged weights round differently, pick another one. For Llama and Qwen2 models each new
token runs through :class:`LeanStep`: the same arithmetic as the model's forward in about half the
operations (query/key/value in one matrix product, residual additions inside the products, no
per-step mask building), which is most of the time of a single stream.

A single greedy stream, the chat's (or the last row of a batch, once the others have ended), checks
tokens drafted by prompt lookup (:class:`PromptLookup`) in one step: the step reads the weights once
for all of them, and keeps those greedy decoding would have chosen, so an answer that repeats its
prompt, the conversation or itself takes several tokens a step.

:func:`merged_lora` puts each LoRA layer's merged weight ``W + scale * B @ A`` in the layer's place for
the duration, so a token costs what it costs without an adapter; the original weight tensors are
never written, so they are exactly what they were afterwards, also when generation fails.

Several adapters on one base answer in one batch: :func:`decode` with ``adapters`` (one adapter name
per prompt, :data:`BASE` for the base model alone) computes each row's LoRA update from its own
adapter, the way PEFT's mixed-adapter batches do, so comparing N configurations costs about one
decoding pass over N times the rows instead of N passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import sampling_problems
from .kv_cache import ConversationCache, cache_bytes_per_token, forgets_positions, new_cache
from .lean_step import (
    DRAFT_TOKENS,
    LeanStep,
    adapter_segments,
    decode_with_drafts,
    prompt_mask,
    staying_rows,
)
from .quality import Answer


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    ``temperature`` 0 is greedy (the most likely token); above 0 the token is drawn from the
    softmax of ``logits / temperature``, restricted to the smallest set of most likely tokens whose
    probabilities add up to ``top_p``. ``repetition_penalty`` > 1 makes every token already in the
    row (prompt or answer) less likely, as transformers' ``repetition_penalty`` does: a positive
    logit is divided by it, a negative one multiplied. ``seed`` makes sampling reproducible.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        problems = sampling_problems(self.temperature, self.top_p, self.repetition_penalty, name=str)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        """True when every token is the most likely one (no randomness)."""
        return self.temperature == 0

    def generator(self, device="cpu") -> torch.Generator | None:
        """A random generator seeded with ``seed`` (None: torch's global one)."""
        if self.seed is None or self.greedy:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def generators(self, keys, device="cpu") -> list[torch.Generator] | None:
        """One generator per prompt, seeded from ``seed`` and the prompt's key (e.g. its index), so a
        prompt's draws do not depend on which other prompts share its batch, or in which order (its
        logits may, by float rounding: see :func:`decode`).
        None when nothing is drawn or no ``seed`` is set (torch's global generator then draws)."""
        if self.seed is None or self.greedy:
            return None
        return [torch.Generator(device=device).manual_seed(
            int.from_bytes(hashlib.sha256(f"{self.seed}:{key}".encode()).digest()[:8], "little") >> 1)
            for key in keys]


# ---------------------------------------------------------------------------------------------
# Merged LoRA weights
# ---------------------------------------------------------------------------------------------


def _merged_stand_in(layer) -> nn.Module | None:
    """A plain ``nn.Linear`` computing what the LoRA ``layer`` computes now, or None when it can't.

    Plain LoRA on an ``nn.Linear`` only (no DoRA or other variants, no LoRA bias, no hooks on the
    base layer such as offloading); anything else keeps its LoRA layer, which stays correct.
    """
    from peft.tuners.lora import Linear as LoraLinear

    if type(layer) is not LoraLinear:
        return None
    base = layer.get_base_layer()
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return None
    if layer.disable_adapters or layer.merged:   # the base weight alone is what the layer computes
        return base
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if any(a in layer.lora_variant or layer.lora_bias.get(a) for a in adapters):
        return None
    weight = base.weight
    with torch.no_grad():
        for adapter in adapters:
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    merged = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
    merged.weight = nn.Parameter(weight.detach(), requires_grad=False)
    merged.bias = base.bias   # shared, never written
    return merged


@contextlib.contextmanager
def merged_lora(model) -> Iterator:
    """Within the block, ``model``'s LoRA layers are replaced by plain linear layers holding the merged
    weights, so generation pays nothing per token for the adapter.

    Nothing of the model is written: each LoRA layer is put back as it was on leaving (also on an
    exception), so its base and adapter weights are bit-for-bit what they were. Outputs are those of
    the adapted model up to float rounding (``x @ (W + BA)`` rounds differently from ``x @ W + x @ BA``).
    Layers this cannot merge (DoRA, LoRA bias, quantized or hooked base layers) run unchanged. A model
    without LoRA layers is left alone. Costs one extra copy of the adapted weight matrices while inside.
    """
    from peft.tuners.lora import LoraLayer

    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, layer in targets:
            stand_in = _merged_stand_in(layer)
            if stand_in is None:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, stand_in)
            swapped.append((parent, child, layer))
        yield model
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)


# ---------------------------------------------------------------------------------------------
# The decoding loop
# ---------------------------------------------------------------------------------------------


def stop_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS (the end-of-turn token training teaches)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if not ids and configured is not None:   # no EOS in the tokenizer: the model's own stop tokens
        ids = [configured] if isinstance(configured, int) else list(configured)
    return ids


def pad_token_id(tokenizer) -> int:
    """The id left padding uses (the EOS when the tokenizer has no pad token)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _next_tokens(logits: torch.Tensor, sampling: Sampling, seen: torch.Tensor | None,
                 generators: list[torch.Generator] | None) -> torch.Tensor:
    """One token per row from the last position's ``logits`` (B, V); each row draws from its own
    generator of ``generators`` (None: all rows from torch's global one)."""
    scores = logits.float()
    if seen is not None:
        penalty = sampling.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if sampling.greedy:
        # max(-1) returns argmax's index (the first of equal maxima) about 2.5x faster on the CPU.
        return scores.max(-1).indices
    scores = scores / sampling.temperature
    # One uniform number per row, from the row's own generator, picks the token by inverse CDF.
    if generators is None:
        uniform = torch.rand(scores.shape[0], device=scores.device)
    else:
        uniform = torch.cat([torch.rand(1, generator=g, device=scores.device) for g in generators])
    if sampling.top_p >= 1:
        return _draw(scores.softmax(-1), uniform)
    return _draw_nucleus(scores, sampling.top_p, uniform)


def _draw(probs: torch.Tensor, uniform: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the token whose share of the cumulative ``probs`` (B, K; need not sum to 1) holds
    ``uniform`` (B,) in [0, 1); ``tokens`` (B, K) names the columns (default: their indices)."""
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[1] - 1)
    return pick.squeeze(1) if tokens is None else tokens.gather(1, pick).squeeze(1)


NUCLEUS_FIRST = 256
"""The nucleus (top-p) is looked for among this many most likely tokens first; rows whose nucleus is
larger are sorted in full."""


def _draw_nucleus(scores: torch.Tensor, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Top-p sampling: per row, a draw among the smallest set of most likely tokens whose probability
    reaches ``top_p`` (the most likely one always stays), without sorting the whole vocabulary where
    the set lies within the first :data:`NUCLEUS_FIRST` tokens."""
    k = min(NUCLEUS_FIRST, scores.shape[-1])
    top, tokens = scores.topk(k, dim=-1)                            # sorted, most likely first
    probs = (top - scores.logsumexp(-1, keepdim=True)).exp()        # their true probabilities
    before = probs.cumsum(-1) - probs                               # probability of the more likely tokens
    out = _draw(probs.masked_fill(before >= top_p, 0.0), uniform, tokens)
    wide = ((before[:, -1] + probs[:, -1]) < top_p).nonzero().squeeze(1)   # nucleus reaching past the first k
    if len(wide):
        full, order = scores[wide].sort(-1, descending=True)
        full = full.softmax(-1)
        out[wide] = _draw(full.masked_fill(full.cumsum(-1) - full >= top_p, 0.0), uniform[wide], order)
    return out


def decode(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
           sampling: Sampling | None = None, generators: list[torch.Generator] | None = None,
           on_token: Callable[[int, int], None] | None = None, adapters: list[str] | None = None,
           draft_tokens: int = DRAFT_TOKENS, reuse: ConversationCache | None = None) -> list[list[int]]:
    """The answer token ids to each prompt (a list of token ids), up to ``max_new_tokens`` each.

    Prompts are left-padded into one batch. An answer ends at its first token in ``stop_ids``
    (which is not returned); that row then leaves the batch and the loop ends when no row is left.
    ``on_token(row, token)`` is called for each new token of each row as soon as it is chosen
    (stop tokens included), for streaming. ``generators`` (one per prompt; default:
    ``sampling.generators`` keyed by the prompts' indices) draw each prompt's samples, so its draws
    do not depend on the batch it shares; greedy decoding draws nothing. The logits themselves can
    differ in the last bits with the batch's size (matrix products round by their shapes), which
    changes an answer only where a draw falls on a boundary between two tokens or two are tied.

    ``adapters`` (one name per prompt; :data:`BASE` for the base model alone) answers each prompt with
    its own LoRA adapter of the PEFT ``model``, all in one batch (see :func:`mixable_adapters` for the
    adapters this accepts; nothing may be merged). Without it the model answers as it is.

    A single greedy prompt (the chat) drafts up to ``draft_tokens`` tokens by prompt lookup
    (:class:`PromptLookup`) and checks them in one step, which reads the weights once for all of
    them: the tokens are greedy decoding's own, several per step where the answer repeats the text
    (0 turns drafting off). So does the last row of a greedy batch once every other row has ended:
    often an answer that repeats itself up to the token limit, which drafts then take ~3 tokens a
    step. Rows of a batch, sampling and the repetition penalty decode one token per step.

    ``reuse`` (a single prompt; the chat's) keeps the key/value cache of this prompt and its answer for
    the next call: a later prompt that starts with the same tokens (the conversation so far) computes
    only the tokens after them, so a long conversation's next answer starts as soon as a short one's.
    The reused keys and values are those a fresh computation gives, up to float rounding.
    """
    if reuse is None:
        return _decode(model, prompts, max_new_tokens, stop_ids, pad_id, sampling, generators, on_token, adapters,
                       draft_tokens)
    if len(prompts) != 1:
        raise ValueError(f"a reused cache serves one prompt at a time (got {len(prompts)})")
    cache, past = reuse.claim(model, prompts[0], len(prompts[0]) + max_new_tokens)
    emitted: list[int] = []

    def record(row: int, token: int) -> None:
        emitted.append(token)
        if on_token is not None:
            on_token(row, token)

    answers = _decode(model, prompts, max_new_tokens, stop_ids, pad_id, sampling, generators, record, adapters,
                      draft_tokens, cache, past)
    reuse.keep(cache, prompts[0] + emitted)   # not reached on an error: the cache is then dropped
    return answers


def _decode(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
            sampling: Sampling | None, generators: list[torch.Generator] | None,
            on_token: Callable[[int, int], None] | None, adapters: list[str] | None, draft_tokens: int,
            cache=None, past: int = 0) -> list[list[int]]:
    """:func:`decode` on ``cache`` (a new one when None), which holds the first ``past`` tokens of the only prompt."""
    sampling = sampling or Sampling()
    device = next(model.parameters()).device
    answers: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens < 1:
        return answers
    if adapters is not None and len(adapters) != len(prompts):
        raise ValueError(f"{len(adapters)} adapter names for {len(prompts)} prompts")
    if adapters is not None and not hasattr(model, "peft_config"):
        raise ValueError("adapter names need a PEFT model holding those adapters")
    if generators is None:
        generators = sampling.generators(range(len(prompts)), device)
    elif len(generators) != len(prompts):
        raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
    names = list(dict.fromkeys(adapters or ()))   # each adapter once, in order of appearance
    # The batch rows hold the prompts grouped by adapter, so each adapter's rows are one slice.
    group_of = [names.index(a) for a in adapters] if adapters else [0] * len(prompts)
    rows = sorted(range(len(prompts)), key=group_of.__getitem__)
    groups = [group_of[r] for r in rows]
    drawing = [generators[r] for r in rows] if generators is not None else None   # aligned with the batch rows
    segments = adapter_segments(groups)   # (adapter, first row, end row) of the batch, while rows leave
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts[r] for r in rows):   # left padding: every prompt ends where its answer starts
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Positions count real tokens only, as generate numbers them: padding does not shift a prompt.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    if cache is None:
        cache = new_cache(model, room=width + max_new_tokens)
    lean = LeanStep.for_model(model, tuple(names), pack_rows=len(prompts))
    padded = any(len(p) < width for p in prompts)   # without padding no position needs masking

    def per_row():   # the model's own forward takes each row's adapter name
        return {"adapter_names": [adapters[r] for r in rows]} if adapters else {}

    with torch.no_grad():
        if lean is not None:   # the prompts through the lean step too: 1.1-1.25x the model's own forward here
            logits = lean(ids[:, past:], positions[:, past:], prompt_mask(mask) if padded else None, cache, segments,
                          last_only=True)
        else:
            logits = model(input_ids=ids[:, past:], attention_mask=mask, position_ids=positions[:, past:], cache=cache,
                           use_cache=True, logits_to_keep=1, **per_row()).logits[:, -1]
        position = positions[:, -1:]
        # A greedy row decoding alone drafts tokens: a single prompt from the start, the last row of a batch
        # once every other has ended (often an answer repeating itself up to the token limit).
        drafting = (lean is not None and draft_tokens > 0 and sampling.greedy and sampling.repetition_penalty == 1
                    and forgets_positions(cache))
        if drafting and len(prompts) == 1:
            answers[0] = decode_with_drafts(lean, cache, prompts[0], [], [int(logits[0].float().max(-1).indices)],
                                            max_new_tokens, stop_ids, on_token, segments, draft_tokens)
            return answers
        seen = None   # (rows, vocabulary): the tokens each row holds, for the repetition penalty
        if sampling.repetition_penalty != 1:
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=device).scatter_(1, ids, mask.bool())
        for step in range(max_new_tokens):
            tokens = _next_tokens(logits, sampling, seen, drawing)
            chosen = tokens.tolist()
            ended = torch.isin(tokens, stops)
            ended_list = ended.tolist()
            for row, token, end in zip(rows, chosen, ended_list, strict=True):
                if on_token is not None:
                    on_token(row, token)
                if not end:
                    answers[row].append(token)
            if step == max_new_tokens - 1 or all(ended_list):
                break
            if any(ended_list):   # finished rows leave the batch: no more work for them
                order = staying_rows(ended_list, groups)
                keep = torch.tensor(order, dtype=torch.long, device=device)
                cache.batch_select_indices(keep)
                rows, groups = [rows[i] for i in order], [groups[i] for i in order]
                if drawing is not None:
                    drawing = [drawing[i] for i in order]
                segments = adapter_segments(groups)
                tokens, mask, position = tokens[keep], mask[keep], position[keep]
                seen = seen[keep] if seen is not None else None
                if drafting and len(rows) == 1:
                    row = rows[0]
                    decode_with_drafts(lean, cache, prompts[row], answers[row], [], max_new_tokens, stop_ids,
                                       on_token, segments, draft_tokens, padding=width - len(prompts[row]), row=row)
                    break
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            position = position + 1
            if lean is not None:
                logits = lean(tokens, position, mask.bool()[:, None, None, :] if padded else None, cache, segments)
            else:
                logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position, cache=cache,
                               use_cache=True, logits_to_keep=1, **per_row()).logits[:, -1]
    return answers


# ---------------------------------------------------------------------------------------------
# Text in, text out
# ---------------------------------------------------------------------------------------------


def chat_prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of ``prompt`` (text: one user turn; or a message list) followed by the assistant
    header, exactly as training renders the context of an answer."""
    from .gyms import as_messages, context_ids

    return context_ids(tokenizer, as_messages(prompt, "user"))


def answer_text(tokenizer, ids: list[int]) -> str:
    """The text of generated ``ids``, special tokens left out, surrounding whitespace stripped."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
                 batch_size: int = 8, sampling: Sampling | None = None,
                 adapters: list[str] | None = None, cache_budget: int | None = None,
                 keys: list | None = None, draft_tokens: int = DRAFT_TOKENS) -> list[list[int]]:
    """The answer token ids to each token-id prompt (stop token left out), in the order of ``prompts``.

    Prompts are sorted by length and decoded ``batch_size`` at a time (left-padded, so similar
    lengths share a batch and little is padding), with the LoRA weights merged for the duration
    (:func:`merged_lora`). Greedy answers are those of ``model.generate(do_sample=False)``.
    With ``adapters`` (one adapter name per prompt, see :func:`decode`) each prompt is answered by its
    own adapter, prompts of different adapters sharing batches; nothing is merged then.
    ``cache_budget`` (bytes) caps the rows of a batch so that its key/value cache, preallocated for the
    longest prompt and ``max_new_tokens``, stays within it; the batches are then of even sizes.
    Sampled answers draw from one generator per prompt, seeded from ``sampling.seed`` and the prompt's
    key of ``keys`` (default: its index): a prompt with the same key gets the same draws whatever
    the batches (see :meth:`Sampling.generators` and, for rounding, :func:`decode`). A batch of one
    greedy prompt checks ``draft_tokens`` drafted tokens per step (see :func:`decode`).
    """
    sampling = sampling or Sampling()
    if keys is not None and len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if cache_budget is not None and prompts:
        per_row = cache_bytes_per_token(model) * (max(len(p) for p in prompts) + max_new_tokens)
        batch_size = max(min(batch_size, cache_budget // per_row), 1)
        batch_size = math.ceil(len(prompts) / math.ceil(len(prompts) / batch_size))   # as few, as even
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    generators = sampling.generators(range(len(prompts)) if keys is None else keys, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with merged_lora(model) if adapters is None else contextlib.nullcontext():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                out = decode(model, [prompts[i] for i in batch], max_new_tokens, stop_ids, pad_id, sampling,
                             [generators[i] for i in batch] if generators is not None else None,
                             adapters=[adapters[i] for i in batch] if adapters is not None else None,
                             draft_tokens=draft_tokens)
                for i, ids in zip(batch, out, strict=True):
                    answers[i] = ids
    finally:
        model.train(was_training)
    return answers


def generate_replies(model, tokenizer, prompts: list, max_new_tokens: int = 200, batch_size: int = 8, *,
                     sampling: Sampling | None = None, adapters: list[str] | None = None,
                     cache_budget: int | None = None, keys: list | None = None) -> list[Answer]:
    """Answer each prompt (text: one user turn; or a message list), in the order of ``prompts``.

    Prompts are rendered as training renders them (:func:`chat_prompt_ids`) and answered by
    :func:`generate_ids`: sorted by length into batches of ``batch_size`` (fewer rows where
    ``cache_budget`` says so), with merged LoRA weights (or, with ``adapters``, each by its own adapter).
    Greedy unless ``sampling`` says otherwise; greedy answers are those of
    ``model.generate(do_sample=False)``, sampled ones reproducible when ``sampling.seed`` is set (per
    prompt and its key of ``keys``, whatever the batches).
    """
    encoded = [chat_prompt_ids(tokenizer, p) for p in prompts]
    out = generate_ids(model, encoded, max_new_tokens, stop_token_ids(model, tokenizer), pad_token_id(tokenizer),
                       batch_size, sampling, adapters, cache_budget, keys)
    # The ids leave the stop token out: fewer than the limit means the answer stopped by itself.
    return [Answer(answer_text(tokenizer, ids), len(ids) < max_new_tokens) for ids in out]


def generate_answers(model, tokenizer, prompts: list, max_new_tokens: int = 200, batch_size: int = 8, *,
                     temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                     seed: int | None = None) -> list[str]:
    """The text of :func:`generate_replies` for each prompt; greedy by default.

    With ``temperature`` > 0 answers are sampled (see :class:`Sampling`), reproducibly when ``seed``
    is given.
    """
    sampling = Sampling(temperature, top_p, repetition_penalty, seed)
    return [r.text for r in generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size,
                                             sampling=sampling)]


class TextStream:
    """Turns tokens arriving one by one into text pieces, for printing an answer as it is generated.

    ``push(token)`` returns the text that token completes (often a word piece; nothing while a
    multi-byte character is still incomplete or for a stop token); ``ids`` holds every token pushed
    but the stop tokens.
    """

    def __init__(self, tokenizer, stop_ids: list[int]):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.ids: list[int] = []
        self._shown = ""

    def push(self, token: int) -> str:
        """The new text once ``token`` is appended."""
        if token in self.stop_ids:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd") or not text.startswith(self._shown):
            return ""   # an unfinished character, or a merge that rewrote the text so far: wait
        piece, self._shown = text[len(self._shown):], text
        return piece

    def finish(self) -> str:
        """Whatever of the answer's text :meth:`push` has not returned yet."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        piece = text[len(self._shown):] if text.startswith(self._shown) else ""
        self._shown = text
        return piece
