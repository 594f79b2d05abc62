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
import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import sampling_problems
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


BASE = "__base__"
"""The adapter name of a row that runs the base model alone (PEFT's name for it in mixed batches)."""


def mixable_adapters(model, names) -> bool:
    """Whether ``model`` (a PEFT model) can answer rows of the adapters ``names`` (:data:`BASE` allowed) in
    one batch: each is loaded, and each is plain LoRA on linear layers (no DoRA or other variants, no LoRA
    bias, no fully trained extra modules such as ``modules_to_save`` or trainable tokens), nothing is
    merged into the base weights, and the adapters are enabled."""
    from peft.tuners.lora import LoraLayer

    wanted = {n for n in names if n != BASE}
    configs = getattr(model, "peft_config", {})
    if not wanted <= set(configs):
        return False
    for name in wanted:
        config = configs[name]
        if (getattr(config, "peft_type", None) != "LORA" or getattr(config, "use_dora", False)
                or getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None)
                or getattr(config, "lora_bias", False)):
            return False
    if any(type(m).__name__ in ("ModulesToSaveWrapper", "TrainableTokensWrapper") for m in model.modules()):
        return False
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or not wanted <= set().union(*(layer.lora_A.keys() for layer in layers)):
        return False
    for layer in layers:
        if layer.merged or layer.disable_adapters or layer.lora_embedding_A:
            return False
        if any(n in layer.lora_variant or layer.lora_bias.get(n) for n in wanted if n in layer.lora_A):
            return False
    return True


def _segments(groups: list[int]) -> list[tuple[int, int, int]]:
    """``(group, start, end)`` of each run of equal values in ``groups`` (rows sorted by adapter)."""
    runs, start = [], 0
    for group, run in itertools.groupby(groups):
        end = start + sum(1 for _ in run)
        runs.append((group, start, end))
        start = end
    return runs


def _add_lora(out: torch.Tensor, x: torch.Tensor, pieces, segments) -> torch.Tensor:
    """``out`` with each row's low-rank update added in place: rows ``start:end`` of group ``g`` get
    ``x[start:end] @ a_t @ b_t`` where ``pieces[g]`` is ``(a_t, b_t)`` (the scaling folded into ``b_t``)
    or None (no update: the base model, or an adapter without this layer)."""
    if pieces is None:
        return out
    for group, start, end in segments:
        piece = pieces[group]
        if piece is not None:
            out[start:end].addmm_(x[start:end] @ piece[0], piece[1])
    return out


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
                 generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from the last position's ``logits`` (B, V)."""
    scores = logits.float()
    if seen is not None:
        penalty = sampling.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if sampling.greedy:
        # max(-1) returns argmax's index (the first of equal maxima) about 2.5x faster on the CPU.
        return scores.max(-1).indices
    scores = scores / sampling.temperature
    if sampling.top_p < 1:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        before = probs.cumsum(-1) - probs          # probability of the more likely tokens
        sorted_scores = sorted_scores.masked_fill(before >= sampling.top_p, -math.inf)  # the first always stays
        scores = torch.full_like(scores, -math.inf).scatter(-1, order, sorted_scores)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


class LeanStep:
    """One new token per row through a Llama-family decoder, without the module machinery.

    Computes what the model's forward computes for one token per row on a key/value cache (RMSNorm,
    rotary positions from the model's own ``rotary_emb``, grouped-query attention through
    ``scaled_dot_product_attention``, SiLU MLP) with the query/key/value weights concatenated into
    one matrix and the residual additions fused into the products: about half the operations per
    layer (fusing gate and up as well measured no faster, for 200 MB more on the embedded model).
    Built by :meth:`for_model`, which accepts only models whose every layer is this shape (plain
    linear layers, i.e. LoRA merged first, SDPA attention, no sliding window, no biases except on
    query/key/value); anything else decodes with its own forward. The query/key/value matrices are
    copies: nothing of the model is written.

    With ``adapters`` (names of LoRA adapters loaded on the model, :data:`BASE` for none) the linear
    layers may be LoRA layers: their base weights are used, and each row adds the low-rank update of
    its own adapter (see :meth:`__call__`'s ``segments``).
    """

    ARCHITECTURES = ("llama", "qwen2")

    def __init__(self, lm, adapters: tuple[str, ...] = ()):
        config, inner = lm.config, lm.model
        self.inner, self.head = inner, lm.get_output_embeddings()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = inner.layers[0].self_attn.head_dim
        self.adapters = tuple(adapters)
        self.layers, self.lora = [], []
        with torch.no_grad():
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv = [_base_linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
                self.layers.append((
                    layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                    torch.cat([m.weight for m in qkv]).t(),
                    torch.cat([m.bias for m in qkv]) if qkv[0].bias is not None else None,
                    _base_linear(attn.o_proj).weight.t(), attn.scaling,
                    layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                    *(_base_linear(m).weight.t() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))))
                self.lora.append(tuple(self._low_rank(modules) for modules in (
                    (attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj,), (mlp.up_proj,),
                    (mlp.down_proj,))))

    def _low_rank(self, modules):
        """Per adapter, ``(a_t, b_t)`` with ``x @ a_t @ b_t`` the update of the outputs of ``modules`` side
        by side (one product for query/key/value: ``b_t`` is block-diagonal), or None where the adapter has
        none of them; None for all when no adapter touches them."""
        pieces = []
        for name in self.adapters:
            parts = [(m, name) for m in modules if name != BASE and name in getattr(m, "lora_A", {})]
            if not parts:
                pieces.append(None)
                continue
            outs = [_base_linear(m).out_features for m in modules]
            a_t = torch.cat([m.lora_A[n].weight.t() for m, n in parts], dim=1)
            b_t = a_t.new_zeros(a_t.shape[1], sum(outs))
            row = 0
            for m, n in parts:
                col = sum(outs[:modules.index(m)])
                rank = m.lora_A[n].weight.shape[0]
                b_t[row:row + rank, col:col + outs[modules.index(m)]] = m.lora_B[n].weight.t() * m.scaling[n]
                row += rank
            pieces.append((a_t, b_t))
        return tuple(pieces) if any(p is not None for p in pieces) else None

    @classmethod
    def for_model(cls, model, adapters: tuple[str, ...] = ()) -> LeanStep | None:
        """A :class:`LeanStep` for ``model`` (a causal LM, PEFT-wrapped or not), or None when any of its
        layers is not the plain Llama shape this step computes. Without ``adapters`` every linear layer
        must be plain (LoRA merged first); with them, LoRA layers on plain linear layers are accepted
        (:func:`mixable_adapters` says whether the adapters are plain LoRA)."""
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(lm, "config", None)
        inner = getattr(lm, "model", None)
        if config is None or inner is None or getattr(config, "model_type", None) not in cls.ARCHITECTURES:
            return None
        if (getattr(config, "_attn_implementation", None) != "sdpa" or config.hidden_act != "silu"
                or getattr(config, "use_sliding_window", False) or getattr(config, "partial_rotary_factor", 1.0) != 1.0
                or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ())):
            return None
        if adapters and not mixable_adapters(model, adapters):
            return None
        from peft.tuners.lora import Linear as LoraLinear

        head = lm.get_output_embeddings()
        if type(head) is not nn.Linear or head.bias is not None or type(inner.embed_tokens) is not nn.Embedding:
            return None
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if set(dict(attn.named_children())) != {"q_proj", "k_proj", "v_proj", "o_proj"}:
                return None   # extra parts (e.g. query/key norms) this step does not compute
            modules = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            linears = [_base_linear(m) if adapters else m for m in modules]
            if any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in linears):
                return None   # a LoRA layer that could not be merged, or a hooked layer
            if adapters and any(type(m) not in (nn.Linear, LoraLinear) or m._forward_hooks or m._forward_pre_hooks
                                for m in modules):
                return None
            if any(m.bias is not None for m in linears[3:]) or len({m.bias is None for m in linears[:3]}) > 1:
                return None
            if layer._forward_hooks or layer._forward_pre_hooks or attn._forward_hooks or attn._forward_pre_hooks:
                return None
        return cls(lm, adapters)

    def __call__(self, tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None, cache,
                 segments: list[tuple[int, int, int]] = ()) -> torch.Tensor:
        """Logits (B, V) of the token after ``tokens`` (B,) at ``position`` (B, 1); ``mask`` (B, 1, 1, L)
        boolean over the cache's positions after this one's (None: every position of every row is real);
        ``cache`` (from :func:`new_cache`) receives this token's keys and values. ``segments`` says which
        rows run which adapter: ``(i, start, end)`` gives rows ``start:end`` the adapter ``adapters[i]``."""
        rows, heads, kv_heads, dim = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        hidden = self.inner.embed_tokens(tokens)                       # (B, H)
        cos, sin = self.inner.rotary_emb(hidden, position)             # (B, 1, D)
        half, queries = dim // 2, heads * dim
        for i, (norm1, eps1, qkv_t, qkv_bias, o_t, scaling, norm2, eps2, gate_t, up_t, down_t) in enumerate(self.layers):
            lora_qkv, lora_o, lora_gate, lora_up, lora_down = self.lora[i]
            x = _rms_norm(hidden, norm1, eps1)
            qkv = x @ qkv_t if qkv_bias is None else torch.addmm(qkv_bias, x, qkv_t)
            qkv = _add_lora(qkv, x, lora_qkv, segments)
            qk = qkv[:, :queries + kv_heads * dim].view(rows, heads + kv_heads, dim)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            keys, values = cache.layers[i].update(qk[:, heads:].view(rows, kv_heads, 1, dim),
                                                  qkv[:, queries + kv_heads * dim:].view(rows, kv_heads, 1, dim))
            # The query heads of one key/value head attend as one group (what transformers does for one token).
            out = torch.nn.functional.scaled_dot_product_attention(
                qk[:, :heads].reshape(rows, kv_heads, heads // kv_heads, dim), keys, values, attn_mask=mask,
                scale=scaling).reshape(rows, queries)
            hidden = _add_lora(torch.addmm(hidden, out, o_t), out, lora_o, segments)
            x = _rms_norm(hidden, norm2, eps2)
            gate = _add_lora(x @ gate_t, x, lora_gate, segments)
            act = torch.nn.functional.silu(gate) * _add_lora(x @ up_t, x, lora_up, segments)
            hidden = _add_lora(torch.addmm(hidden, act, down_t), act, lora_down, segments)
        return self.head(self.inner.norm(hidden))


def _base_linear(module: nn.Module) -> nn.Module:
    """The linear layer under a LoRA layer (the module itself when it is not one)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it, written out: calling the norm modules instead made
    a one-row decoding step 5% slower."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def decode(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
           sampling: Sampling | None = None, generator: torch.Generator | None = None,
           on_token: Callable[[int, int], None] | None = None, adapters: list[str] | None = None) -> list[list[int]]:
    """The answer token ids to each prompt (a list of token ids), up to ``max_new_tokens`` each.

    Prompts are left-padded into one batch. An answer ends at its first token in ``stop_ids``
    (which is not returned); that row then leaves the batch and the loop ends when no row is left.
    ``on_token(row, token)`` is called for each new token of each row as soon as it is chosen
    (stop tokens included), for streaming. ``generator`` (default: ``sampling.generator()``) draws
    the samples; greedy decoding draws nothing.

    ``adapters`` (one name per prompt; :data:`BASE` for the base model alone) answers each prompt with
    its own LoRA adapter of the PEFT ``model``, all in one batch (see :func:`mixable_adapters` for the
    adapters this accepts; nothing may be merged). Without it the model answers as it is.
    """
    sampling = sampling or Sampling()
    device = next(model.parameters()).device
    answers: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens < 1:
        return answers
    if adapters is not None and len(adapters) != len(prompts):
        raise ValueError(f"{len(adapters)} adapter names for {len(prompts)} prompts")
    if adapters is not None and not hasattr(model, "peft_config"):
        raise ValueError("adapter names need a PEFT model holding those adapters")
    if generator is None:
        generator = sampling.generator(device)
    names = list(dict.fromkeys(adapters or ()))   # each adapter once, in order of appearance
    # The batch rows hold the prompts grouped by adapter, so each adapter's rows are one slice.
    rows = sorted(range(len(prompts)), key=lambda i: names.index(adapters[i])) if adapters else list(range(len(prompts)))
    groups = [names.index(adapters[r]) for r in rows] if adapters else []
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
    cache = new_cache(model, room=width + max_new_tokens)
    lean = LeanStep.for_model(model, tuple(names))
    padded = any(len(p) < width for p in prompts)   # without padding no position needs masking

    def per_row():   # the model's own forward takes each row's adapter name
        return {"adapter_names": [adapters[r] for r in rows]} if adapters else {}

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1, **per_row()).logits[:, -1]
        position = positions[:, -1:]
        seen = None   # (rows, vocabulary): the tokens each row holds, for the repetition penalty
        if sampling.repetition_penalty != 1:
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=device).scatter_(1, ids, mask.bool())
        for step in range(max_new_tokens):
            tokens = _next_tokens(logits, sampling, seen, generator)
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
                keep = (~ended).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows = [r for r, end in zip(rows, ended_list, strict=True) if not end]
                groups = [g for g, end in zip(groups, ended_list, strict=True) if not end] if adapters else []
                tokens, mask, position = tokens[keep], mask[keep], position[keep]
                seen = seen[keep] if seen is not None else None
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            position = position + 1
            if lean is not None:
                logits = lean(tokens, position, mask.bool()[:, None, None, :] if padded else None, cache,
                              _segments(groups))
            else:
                logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position, cache=cache,
                               use_cache=True, logits_to_keep=1, **per_row()).logits[:, -1]
    return answers


def new_cache(model, room: int = 0):
    """An empty key/value cache for ``model``: transformers' ``DynamicCache`` for its config, with
    room for ``room`` positions in each full-attention layer, so a new token is written in place
    instead of copying the whole cache (other kinds of layer, such as sliding windows, stay as
    they are). Meant for :func:`decode`, which only appends and drops rows."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    if room > 0:
        roomy = _roomy_layer_type()
        cache.layers = [roomy(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.cache
def _roomy_layer_type():
    """The class of :func:`new_cache`'s layers (made on first use: transformers loads late)."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A ``DynamicLayer`` writing into preallocated tensors (twice as large when full); ``keys``
        and ``values`` are views of the filled part. Appending and ``batch_select_indices`` only."""

        def __init__(self, room: int):
            super().__init__()
            self.room, self.length = room, 0

        def _allocate(self, like_keys, like_values, room):
            kept_keys, kept_values = self.keys, self.values
            self._keys = like_keys.new_empty(*like_keys.shape[:2], room, like_keys.shape[3])
            self._values = like_values.new_empty(*like_values.shape[:2], room, like_values.shape[3])
            if self.length:
                self._keys[:, :, :self.length] = kept_keys
                self._values[:, :, :self.length] = kept_values

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._allocate(key_states, value_states, max(self.room, key_states.shape[-2]))
            end = self.length + key_states.shape[-2]
            if end > self._keys.shape[-2]:
                self._allocate(key_states, value_states, max(end, 2 * self._keys.shape[-2]))
            self._keys[:, :, self.length:end] = key_states
            self._values[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices) -> None:
            # Rows only leave: the kept rows' filled positions move to the front of the same buffers
            # (no fresh allocation, and the empty room is not copied).
            if self.is_initialized:
                kept = indices.shape[0] if isinstance(indices, torch.Tensor) else len(indices)
                for buffer in (self._keys, self._values):
                    filled = buffer[:, :, :self.length]
                    buffer[:kept, :, :self.length] = filled[indices]
                self._keys, self._values = self._keys[:kept], self._values[:kept]
                self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    return RoomyLayer


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


def cache_bytes_per_token(model) -> int:
    """Bytes one token of one row takes in ``model``'s key/value cache (keys and values of every layer)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * kv_heads * dim * next(model.parameters()).element_size()


def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
                 batch_size: int = 8, sampling: Sampling | None = None,
                 adapters: list[str] | None = None, cache_budget: int | None = None) -> list[list[int]]:
    """The answer token ids to each token-id prompt (stop token left out), in the order of ``prompts``.

    Prompts are sorted by length and decoded ``batch_size`` at a time (left-padded, so similar
    lengths share a batch and little is padding), with the LoRA weights merged for the duration
    (:func:`merged_lora`). Greedy answers are those of ``model.generate(do_sample=False)``.
    With ``adapters`` (one adapter name per prompt, see :func:`decode`) each prompt is answered by its
    own adapter, prompts of different adapters sharing batches; nothing is merged then.
    ``cache_budget`` (bytes) caps the rows of a batch so that its key/value cache, preallocated for the
    longest prompt and ``max_new_tokens``, stays within it; the batches are then of even sizes.
    """
    sampling = sampling or Sampling()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if cache_budget is not None and prompts:
        per_row = cache_bytes_per_token(model) * (max(len(p) for p in prompts) + max_new_tokens)
        batch_size = max(min(batch_size, cache_budget // per_row), 1)
        batch_size = math.ceil(len(prompts) / math.ceil(len(prompts) / batch_size))   # as few, as even
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    generator = sampling.generator(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with merged_lora(model) if adapters is None else contextlib.nullcontext():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                out = decode(model, [prompts[i] for i in batch], max_new_tokens, stop_ids, pad_id, sampling, generator,
                             adapters=[adapters[i] for i in batch] if adapters is not None else None)
                for i, ids in zip(batch, out, strict=True):
                    answers[i] = ids
    finally:
        model.train(was_training)
    return answers


def generate_replies(model, tokenizer, prompts: list, max_new_tokens: int = 200, batch_size: int = 8, *,
                     sampling: Sampling | None = None, adapters: list[str] | None = None,
                     cache_budget: int | None = None) -> list[Answer]:
    """Answer each prompt (text: one user turn; or a message list), in the order of ``prompts``.

    Prompts are rendered as training renders them (:func:`chat_prompt_ids`) and answered by
    :func:`generate_ids`: sorted by length into batches of ``batch_size`` (fewer rows where
    ``cache_budget`` says so), with merged LoRA weights (or, with ``adapters``, each by its own adapter).
    Greedy unless ``sampling`` says otherwise; greedy answers are those of
    ``model.generate(do_sample=False)``, sampled ones reproducible when ``sampling.seed`` is set.
    """
    encoded = [chat_prompt_ids(tokenizer, p) for p in prompts]
    out = generate_ids(model, encoded, max_new_tokens, stop_token_ids(model, tokenizer), pad_token_id(tokenizer),
                       batch_size, sampling, adapters, cache_budget)
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
