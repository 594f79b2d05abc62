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
prompt, the conversation or itself takes several tokens a step. The stream times its own steps and
checks drafts only while that gives more tokens per second (:class:`alignkit.lean_step.DraftPayoff`).

:func:`merged_lora` puts each LoRA layer's merged weight ``W + scale * B @ A`` in the layer's place for
the duration, so a token costs what it costs without an adapter; the original weight tensors are
never written, so they are exactly what they were afterwards, also when generation fails.

Several adapters on one base answer in one batch: :func:`decode` with ``adapters`` (one adapter name
per prompt, :data:`BASE` for the base model alone) computes each row's LoRA update from its own
adapter, the way PEFT's mixed-adapter batches do, so comparing N configurations costs about one
decoding pass over N times the rows instead of N passes.

More prompts than a batch holds (``rows_at_once``, e.g. from a key/value cache budget) join it as
its rows end, so it stays full instead of finishing each batch's longest answers on a few rows.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .kv_cache import (
    ConversationCache,
    admit_rows,
    can_admit,
    forget_from,
    forgets_positions,
    new_cache,
    rows_in_budget,
    write_columns,
)
from .lean_step import (
    DRAFT_TOKENS,
    LeanStep,
    adapter_segments,
    decode_with_drafts,
    prompt_mask,
    staying_rows,
)
from .quality import Answer
from .sampling import Sampling, next_tokens

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


def decode(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
           sampling: Sampling | None = None, generators: list[torch.Generator] | None = None,
           on_token: Callable[[int, int], None] | None = None, adapters: list[str] | None = None,
           draft_tokens: int = DRAFT_TOKENS, reuse: ConversationCache | None = None,
           rows_at_once: int | None = None, pack_weights: bool = True) -> list[list[int]]:
    """The answer token ids to each prompt (a list of token ids), up to ``max_new_tokens`` each.

    Prompts are left-padded into one batch. An answer ends at its first token in ``stop_ids``
    (which is not returned); that row then leaves the batch and the loop ends when no row is left.
    ``on_token(row, token)`` is called for each new token of each row as soon as it is chosen
    (stop tokens included), for streaming. ``generators`` (one per prompt; default:
    ``sampling.generators`` keyed by the prompts' indices) draw each prompt's samples, so its draws
    do not depend on the batch it shares; greedy decoding draws nothing. The logits themselves can
    differ in the last bits with the batch's size (matrix products round by their shapes), which
    changes an answer only where a draw falls on a boundary between two tokens or two are tied.

    ``rows_at_once`` caps the batch: the first that many prompts start, and the others join, in
    their order, as rows end (several at a time, each joining row's prompt computed in one forward):
    the batch stays full instead of finishing its longest answer on a few rows, and the key/value
    cache holds at most that many rows. Rows that joined sit beside rows of other lengths, each
    writing at its own position. Where the model's forward is not :class:`LeanStep`'s, the prompts
    decode instead batch after batch of (about) equal sizes.

    ``adapters`` (one name per prompt; :data:`BASE` for the base model alone) answers each prompt with
    its own LoRA adapter of the PEFT ``model``, all in one batch (see :func:`mixable_adapters` for the
    adapters this accepts; nothing may be merged). Without it the model answers as it is.

    A single greedy prompt (the chat) drafts up to ``draft_tokens`` tokens by prompt lookup
    (:class:`PromptLookup`) and checks them in one step, which reads the weights once for all of
    them: the tokens are greedy decoding's own, several per step where the answer repeats the text,
    checked while that gives more tokens per second than a token per step (:class:`alignkit.lean_step.DraftPayoff`; 0 turns
    drafting off). So does the last row of a greedy batch once every other row has ended and
    no prompt waits: often an answer that repeats itself up to the token limit, which drafts then take
    ~3 tokens a step. Rows of a batch, sampling and the repetition penalty decode one token per step.

    ``reuse`` (a single prompt; the chat's) keeps the key/value cache of this prompt and its answer for
    the next call: a later prompt that starts with the same tokens (the conversation so far) computes
    only the tokens after them, so a long conversation's next answer starts as soon as a short one's.
    The reused keys and values are those a fresh computation gives, up to float rounding.

    ``pack_weights=False`` keeps the weights as they are for batches of 4 rows or more, instead of a copy
    packed for the CPU's matrix library where that measures faster on this machine
    (:func:`alignkit.lean_step.packs_weights`): on a CPU where it does, a batch's steps are then ~5%
    slower on the embedded model, for ~0.6 GB less resident memory.
    """
    if rows_at_once is not None and rows_at_once < 1:
        raise ValueError(f"rows_at_once must be >= 1 (got {rows_at_once})")
    if reuse is None:
        return _decode(model, prompts, max_new_tokens, stop_ids, pad_id, sampling, generators, on_token, adapters,
                       draft_tokens, rows_at_once=rows_at_once, pack_weights=pack_weights)
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


JOIN_SHARE = 8
"""Waiting prompts join a batch once this share of its rows (1/8) has ended (at least one row): each
joining costs a forward of their prompts, so they join a few at a time, while the batch stays nearly full."""

PREFILL_TOKENS = 8192
"""A batch's prompts run through the lean step in pieces of at most about this many tokens (every row's
next positions, the cache filling piece by piece), so their activations never hold a whole large batch
of prompts: 16 prompts of 380-512 tokens (7,638 in all) raised peak memory by 1.15-1.2 GB at once,
0.8-0.9 GB in pieces of 4,096 tokens, in the same time (that 0.52 GB key/value cache included). The demo's
comparison (90 prompts, 4,230 positions) runs in one piece: pieces round the logits differently."""


class _Rows:
    """Per-row state of a decoding batch, aligned with its rows: which prompt each row answers, its adapter
    group, its generator, how many tokens it has chosen, and where its real positions start."""

    def __init__(self, rows, groups, drawing, starts):
        self.rows, self.groups, self.drawing, self.starts = rows, groups, drawing, starts
        self.counts = [0] * len(rows)

    def reorder(self, order: list[int]) -> None:
        """Keep the rows ``order`` names, in that order."""
        self.rows, self.groups = [self.rows[i] for i in order], [self.groups[i] for i in order]
        self.counts, self.starts = [self.counts[i] for i in order], [self.starts[i] for i in order]
        if self.drawing is not None:
            self.drawing = [self.drawing[i] for i in order]

    def extend(self, other: _Rows) -> None:
        """Add ``other``'s rows after these."""
        self.rows, self.groups = self.rows + other.rows, self.groups + other.groups
        self.counts, self.starts = self.counts + other.counts, self.starts + other.starts
        if self.drawing is not None:
            self.drawing = self.drawing + other.drawing


def _prefill(model, lean, prompts, batch: _Rows, adapters, pad_id: int, cache, past: int = 0):
    """The prompts of ``batch``'s rows, left-padded into one batch, run on ``cache`` (which holds the first
    ``past`` tokens of a single prompt). Returns the last position's logits (R, V), the mask of real
    tokens (R, width), each row's last position (R, 1) and whether any row is padded."""
    device = next(model.parameters()).device
    width = max(len(prompts[r]) for r in batch.rows)
    ids = torch.full((len(batch.rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch.rows):   # left padding: every prompt ends where its answer starts
        ids[i, width - len(prompts[r]):] = torch.tensor(prompts[r], dtype=torch.long)
        mask[i, width - len(prompts[r]):] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Positions count real tokens only, as generate numbers them: padding does not shift a prompt.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    padded = any(len(prompts[r]) < width for r in batch.rows)
    if lean is not None:   # the prompts through the lean step too: 1.1-1.25x the model's own forward here
        attend = prompt_mask(mask) if padded else None
        segments = adapter_segments(batch.groups)
        pieces = min(math.ceil(len(batch.rows) * (width - past) / PREFILL_TOKENS), width - past)
        bounds = [past + (width - past) * i // pieces for i in range(pieces + 1)]   # as even as they go
        for start, end in itertools.pairwise(bounds):
            logits = lean(ids[:, start:end], positions[:, start:end], attend[:, :, start:end, :end] if padded else None,
                          cache, segments, last_only=True, head=end == width)
    else:
        per_row = {"adapter_names": [adapters[r] for r in batch.rows]} if adapters else {}
        logits = model(input_ids=ids[:, past:], attention_mask=mask, position_ids=positions[:, past:], cache=cache,
                       use_cache=True, logits_to_keep=1, **per_row).logits[:, -1]
    return logits, mask.bool(), positions[:, -1:], padded


def _seen_tokens(prompts, rows, vocabulary: int, device) -> torch.Tensor:
    """(rows, vocabulary) booleans: the tokens of each row's prompt (for the repetition penalty)."""
    seen = torch.zeros(len(rows), vocabulary, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        seen[i, torch.tensor(prompts[r], dtype=torch.long, device=device)] = True
    return seen


def _decode(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
            sampling: Sampling | None, generators: list[torch.Generator] | None,
            on_token: Callable[[int, int], None] | None, adapters: list[str] | None, draft_tokens: int,
            cache=None, past: int = 0, rows_at_once: int | None = None, pack_weights: bool = True) -> list[list[int]]:
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
    group_of = [names.index(a) for a in adapters] if adapters else [0] * len(prompts)
    capacity = min(rows_at_once or len(prompts), len(prompts))
    lean = LeanStep.for_model(model, tuple(names), pack_rows=capacity if pack_weights else None)
    waiting = list(range(capacity, len(prompts)))[::-1]   # popped from the end: in the order given
    first = sorted(range(capacity), key=group_of.__getitem__)   # each adapter's rows one slice of the batch
    if cache is None:   # rows that join need room for the longest prompt; zeros keep unwritten positions finite
        cache = new_cache(model, room=max(len(prompts[r]) for r in (range(len(prompts)) if waiting else first))
                          + max_new_tokens, zeroed=bool(waiting))
    if waiting and (lean is None or past or not can_admit(cache)):   # rows join through the lean step only
        return _batch_after_batch(model, prompts, max_new_tokens, stop_ids, pad_id, sampling, generators, on_token,
                                  adapters, draft_tokens, capacity, pack_weights)
    batch = _Rows(first, [group_of[r] for r in first],
                  [generators[r] for r in first] if generators is not None else None, [])
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    joining_at = max(1, capacity // JOIN_SHARE)

    with torch.no_grad():
        logits, mask, position, padded = _prefill(model, lean, prompts, batch, adapters, pad_id, cache, past)
        batch.starts = [mask.shape[1] - len(prompts[r]) for r in batch.rows]
        # A greedy row decoding alone drafts tokens: a single prompt from the start, the last row of a batch
        # once every other has ended (often an answer repeating itself up to the token limit).
        drafting = (lean is not None and draft_tokens > 0 and sampling.greedy and sampling.repetition_penalty == 1
                    and forgets_positions(cache))
        if drafting and len(prompts) == 1:
            answers[0] = decode_with_drafts(lean, cache, prompts[0], [], [int(logits[0].float().max(-1).indices)],
                                            max_new_tokens, stop_ids, on_token, adapter_segments(batch.groups),
                                            draft_tokens)
            return answers
        penalised = sampling.repetition_penalty != 1
        seen = _seen_tokens(prompts, batch.rows, logits.shape[-1], device) if penalised else None
        columns = None   # each row's next position in the cache, once rows of different lengths share it
        while True:
            tokens = next_tokens(logits, sampling, seen, batch.drawing)
            ended = torch.isin(tokens, stops).tolist()
            for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True)):
                if on_token is not None:
                    on_token(row, token)
                batch.counts[i] += 1
                if not ended[i]:
                    answers[row].append(token)
                    ended[i] = batch.counts[i] == max_new_tokens
            if all(ended) and not waiting:
                break
            if any(ended):   # finished rows leave the batch: no more work for them
                order = staying_rows(ended, batch.groups)
                keep = torch.tensor(order, dtype=torch.long, device=device)
                cache.batch_select_indices(keep)
                batch.reorder(order)
                tokens, mask, position = tokens[keep], mask[keep], position[keep]
                seen = seen[keep] if seen is not None else None
                if columns is not None:
                    columns = columns[keep]
                    if len(order):   # positions past every remaining row are no longer looked at
                        forget_from(cache, int(columns.max()))
                        mask = mask[:, :cache.get_seq_length()]
            if drafting and len(batch.rows) == 1 and not waiting:   # a row left alone, or one that joined alone
                if columns is not None:
                    forget_from(cache, int(columns[0]))
                    write_columns(cache, None)
                row = batch.rows[0]
                decode_with_drafts(lean, cache, prompts[row], answers[row], [], max_new_tokens, stop_ids,
                                   on_token, adapter_segments(batch.groups), draft_tokens,
                                   padding=batch.starts[0], row=row)
                break
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            position = position + 1
            if batch.rows:
                logits, mask = _step(model, lean, cache, tokens, position, mask, columns, padded, batch, adapters)
                if columns is not None:
                    columns = columns + 1
            if waiting and (not batch.rows or capacity - len(batch.rows) >= min(joining_at, len(waiting))):
                take = [waiting.pop() for _ in range(min(capacity - len(batch.rows), len(waiting)))]
                joined = sorted(take, key=group_of.__getitem__)
                new = _Rows(joined, [group_of[r] for r in joined],
                            [generators[r] for r in joined] if generators is not None else None, [0] * len(joined))
                room = max(len(prompts[r]) for r in joined)
                fresh = new_cache(model, room=room)
                new_logits, new_mask, new_position, _ = _prefill(model, lean, prompts, new, adapters, pad_id, fresh)
                lengths = [len(prompts[r]) for r in joined]
                if columns is None:   # until now every row wrote at the same position
                    columns = torch.full((len(batch.rows),), mask.shape[1], dtype=torch.long, device=device)
                admit_rows(cache, fresh, [room - n for n in lengths], lengths)
                del fresh
                width = cache.get_seq_length()
                mask = torch.cat([mask, mask.new_zeros(mask.shape[0], width - mask.shape[1])], dim=1)
                mask = torch.cat([mask, torch.arange(width, device=device)[None] < new_mask.sum(1, keepdim=True)])
                columns = torch.cat([columns, torch.tensor(lengths, dtype=torch.long, device=device)])
                position = torch.cat([position, new_position])
                logits = torch.cat([logits, new_logits]) if batch.rows else new_logits
                if seen is not None:
                    seen = torch.cat([seen, _seen_tokens(prompts, joined, seen.shape[1], device)])
                batch.extend(new)
                padded = True
                order = staying_rows([False] * len(batch.rows), batch.groups)
                if order != sorted(order):
                    keep = torch.tensor(order, dtype=torch.long, device=device)
                    cache.batch_select_indices(keep)
                    batch.reorder(order)
                    mask, position, logits, columns = mask[keep], position[keep], logits[keep], columns[keep]
                    seen = seen[keep] if seen is not None else None
    return answers


def _step(model, lean, cache, tokens, position, mask, columns, padded: bool, batch: _Rows, adapters):
    """One decoding step of every row of ``batch``: ``tokens`` (R,) at ``position`` (R, 1) into ``cache`` (each row
    at its own position of ``columns`` when given, else all after the filled part). Returns the next logits
    (R, V) and the mask of real cache positions, the new ones included."""
    rows = tokens.shape[0]
    if columns is None:
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
    else:
        width = max(mask.shape[1], int(columns.max()) + 1)
        if width > mask.shape[1]:
            mask = torch.cat([mask, mask.new_zeros(rows, width - mask.shape[1])], dim=1)
        mask[torch.arange(rows, device=mask.device), columns] = True
        write_columns(cache, columns)
    if lean is not None:
        return lean(tokens, position, mask[:, None, None, :] if padded else None, cache,
                    adapter_segments(batch.groups)), mask
    per_row = {"adapter_names": [adapters[r] for r in batch.rows]} if adapters else {}
    logits = model(input_ids=tokens[:, None], attention_mask=mask.long(), position_ids=position, cache=cache,
                   use_cache=True, logits_to_keep=1, **per_row).logits[:, -1]
    return logits, mask


def _batch_after_batch(model, prompts, max_new_tokens, stop_ids, pad_id, sampling, generators, on_token, adapters,
                       draft_tokens, rows_at_once: int, pack_weights: bool) -> list[list[int]]:
    """:func:`decode` of ``prompts`` in consecutive batches of at most ``rows_at_once`` rows, as even as they go."""
    size = math.ceil(len(prompts) / math.ceil(len(prompts) / rows_at_once))
    answers: list[list[int]] = []
    for start in range(0, len(prompts), size):
        part = list(range(start, min(start + size, len(prompts))))
        answers += _decode(model, [prompts[i] for i in part], max_new_tokens, stop_ids, pad_id, sampling,
                           [generators[i] for i in part] if generators is not None else None,
                           (lambda row, token, part=part: on_token(part[row], token)) if on_token else None,
                           [adapters[i] for i in part] if adapters else None, draft_tokens, pack_weights=pack_weights)
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

    Prompts are sorted by length and decoded at most ``batch_size`` at a time (left-padded, so similar
    lengths share a batch and little is padding; a prompt joins the batch as soon as rows end, see
    :func:`decode`'s ``rows_at_once``), with the LoRA weights merged for the duration
    (:func:`merged_lora`). Greedy answers are those of ``model.generate(do_sample=False)``.
    With ``adapters`` (one adapter name per prompt, see :func:`decode`) each prompt is answered by its
    own adapter, prompts of different adapters sharing batches; nothing is merged then.
    ``cache_budget`` (bytes) caps the rows at once so that the key/value cache, preallocated for the
    longest prompt and ``max_new_tokens``, stays within it. Where it leaves out rows (memory is what
    limits the batch), the weights are not packed either (see :func:`decode`'s ``pack_weights``): that
    copy would come on top of the budget. Measured on the demo's comparison (90 of 135 rows at once):
    peak resident memory 3.3-3.5 GB packed, 2.8-2.9 GB not, decoding 56-62 s against 62-63 s.
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
    if not prompts:
        return []
    pack = True
    if cache_budget is not None:
        fits = rows_in_budget(model, prompts, max_new_tokens, cache_budget)
        pack = min(batch_size, len(prompts)) <= fits
        batch_size = max(min(batch_size, fits), 1)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    generators = sampling.generators(range(len(prompts)) if keys is None else keys, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with merged_lora(model) if adapters is None else contextlib.nullcontext():
            out = decode(model, [prompts[i] for i in order], max_new_tokens, stop_ids, pad_id, sampling,
                         [generators[i] for i in order] if generators is not None else None,
                         adapters=[adapters[i] for i in order] if adapters is not None else None,
                         draft_tokens=draft_tokens, rows_at_once=batch_size, pack_weights=pack)
    finally:
        model.train(was_training)
    answers: list[list[int]] = [[] for _ in prompts]
    for i, ids in zip(order, out, strict=True):
        answers[i] = ids
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
    if isinstance(prompts, (str, dict)) or not all(isinstance(p, (str, list)) for p in prompts):
        from .errors import ArgumentError

        got = (f"a {type(prompts).__name__}: wrap one prompt in a list" if isinstance(prompts, (str, dict)) else
               f"an item that is a {type(next(p for p in prompts if not isinstance(p, (str, list)))).__name__}")
        raise ArgumentError(f"prompts must be a list of prompts, each text or a list of messages (got {got})")
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
