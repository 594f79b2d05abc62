"""The lean decoding step: one new token per row of a Llama-family decoder, and per-row LoRA adapters.

:class:`LeanStep` computes what the model's forward computes for one token per row on a key/value
cache, in about half the operations (see its docstring); :func:`alignkit.generation.decode` uses it
whenever the model has the plain shape it computes. With several adapters loaded on one base
(:func:`mixable_adapters`), each row adds the low-rank update of its own adapter, so configurations
that share a base answer in one batch; :data:`BASE` names a row that runs the base alone. A step
also takes several tokens of a row at once: the tokens :class:`PromptLookup` drafts, checked in one
step (:func:`decode_with_drafts`), and the prompts themselves (their last token's logits only, left
padding masked by :func:`prompt_mask`).
"""

from __future__ import annotations

import functools
import itertools
import time

import torch
from torch import nn

from .forward import causal_at_end
from .kernels import measures_faster, onednn_pays, onednn_product, onednn_product_with, sample_weights
from .kv_cache import forget_from

BASE = "__base__"
"""The adapter name of a row that runs the base model alone (PEFT's name for it in mixed batches)."""


DRAFT_TOKENS = 2
"""Tokens a single greedy stream drafts by prompt lookup and checks in one step where that pays (see
:func:`alignkit.generation.decode` and :class:`DraftPayoff`): on a 2-core Intel Xeon a step of 3 tokens
costs ~1.2x one of 1 token, a step of 4 or more ~1.5x; on a 2-core AMD EPYC 3 tokens cost ~2x."""


class PromptLookup:
    """Drafts for greedy decoding by prompt lookup: the tokens that followed the latest earlier
    occurrence of the text's last ``longest`` tokens (or, failing that, of fewer: down to one).

    Answers, and chat answers most of all, repeat what the prompt or the conversation already says:
    names, phrases, code. Each n-gram of the text is indexed as the text grows, so a draft costs a
    dictionary lookup per n-gram length, whatever the length of the text.
    """

    def __init__(self, tokens: list[int], longest: int = 3):
        self.tokens: list[int] = []
        self.longest = longest
        self._next = [{} for _ in range(longest)]   # per n: n-gram -> index of the token that followed it last
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append ``tokens`` to the text."""
        for token in tokens:
            end = len(self.tokens)   # the n-grams ending just before this token are followed by it
            for n in range(1, min(self.longest, end) + 1):
                self._next[n - 1][tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def draft(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that could come next; empty when the text's end was not seen before."""
        if limit < 1:
            return []
        for n in range(min(self.longest, len(self.tokens)), 0, -1):
            start = self._next[n - 1].get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start:start + limit]
        return []


class DraftPayoff:
    """Whether checking drafted tokens pays in one decoding, judged from its own steps: exponential
    averages of the seconds of a one-token step, of a drafted step, and of the tokens a drafted step
    yields. A drafted step reads the weights once for all its tokens, but what it costs beside a
    one-token step depends on the machine (3 tokens: ~1.2x on a 2-core Intel Xeon, ~2x on a 2-core AMD
    EPYC, whose matrix library multiplies a few rows at twice one row's cost), and it yields its drafts
    only while the answer repeats text seen before. Drafts are checked while drafted steps give at
    least the tokens per second of one-token steps, and otherwise one in :attr:`PROBE_EVERY`, so a part
    of the answer that starts repeating is noticed. Drafts are checked until a drafted step is measured,
    then one step runs without, so both kinds are measured before the averages decide."""

    PROBE_EVERY = 16
    WEIGHT = 0.25   # of the newest step in an average

    def __init__(self):
        self.single: float | None = None    # seconds per one-token step
        self.drafted: float | None = None   # seconds per drafted step
        self.tokens: float | None = None    # tokens per drafted step
        self.declined = 0
        self.warm = {False: False, True: False}   # the first step of each kind builds kernels: not timed

    def wanted(self) -> bool:
        """Whether the next step, which has a draft, should check it."""
        if self.drafted is None or self.single is None:
            return self.drafted is None
        if self.tokens * self.single >= self.drafted:
            return True
        self.declined += 1
        return self.declined % self.PROBE_EVERY == 0

    def record(self, seconds: float, tokens: int, drafted: bool) -> None:
        """One step took ``seconds`` and gave ``tokens`` tokens (1 without a draft). The first step of
        each kind only warms up (the matrix library may build its kernels for the new shapes then)."""
        if not self.warm[drafted]:
            self.warm[drafted] = True
            return

        def mean(old, new):
            return new if old is None else old + self.WEIGHT * (new - old)

        if drafted:
            self.drafted, self.tokens = mean(self.drafted, seconds), mean(self.tokens, tokens)
        else:
            self.single = mean(self.single, seconds)


def decode_with_drafts(lean: LeanStep, cache, prompt: list[int], answer: list[int], pending: list[int],
                       max_new_tokens: int, stop_ids: list[int], on_token, segments, draft_tokens: int,
                       padding: int = 0, row: int = 0) -> list[int]:
    """Greedy decoding of one row, ``answer`` (its tokens so far) continued: ``pending`` are chosen tokens not
    yet passed to ``on_token(row, token)``; the cache holds ``padding`` padding positions, then the prompt
    and the answer up to its last token (``pending``'s last, else ``answer``'s). Each step checks tokens
    drafted by prompt lookup (:class:`PromptLookup`) where that pays (:class:`DraftPayoff`): the step's
    logits at every drafted position say which of them greedy decoding would have chosen; those are kept
    up to the first miss, the token greedy chooses there follows, and the cache forgets the rest.
    Returns ``answer``, extended."""
    stops = set(stop_ids)
    text = PromptLookup(prompt + answer)
    payoff = DraftPayoff()
    device = lean.inner.embed_tokens.weight.device
    while True:
        for token in pending:
            if on_token is not None:
                on_token(row, token)
            if token in stops:
                return answer
            answer.append(token)
            if len(answer) == max_new_tokens:
                return answer
        text.extend(pending)
        draft = text.draft(min(draft_tokens, max_new_tokens - len(answer) - 1))
        if draft and not payoff.wanted():
            draft = []
        at = len(text.tokens) - 1   # the position of the last token, which the cache does not hold yet
        ids = torch.tensor([[text.tokens[-1], *draft]], device=device)
        positions = torch.arange(at, at + ids.shape[1], device=device)[None]
        mask = None
        if padding:   # the step's tokens see the real positions before them and themselves, causally
            mask = causal_at_end(ids.shape[1], cache.get_seq_length() + ids.shape[1], device)
            mask[:, :padding] = False
            mask = mask[None, None]
        start = time.perf_counter()
        if not draft:
            pending = [int(lean(ids[0], positions, mask, cache, segments).float().max(-1).indices[0])]
            payoff.record(time.perf_counter() - start, 1, drafted=False)
            continue
        chosen = lean(ids, positions, mask, cache, segments)[0].float().max(-1).indices.tolist()
        kept = 0
        while kept < len(draft) and draft[kept] == chosen[kept]:
            kept += 1
        forget_from(cache, padding + at + 1 + kept)
        pending = draft[:kept] + [chosen[kept]]
        payoff.record(time.perf_counter() - start, len(pending), drafted=True)


PACKED_FROM_ROWS = 4
"""Rows from which a step's products use pre-packed weights (see :class:`Product`): below, the CPU's
matrix library streams the weights once as they are; from 4 rows on it copies each weight matrix into
its blocked layout on every call, which costs more than the product itself."""


@functools.cache
def weight_packing() -> bool:
    """Whether weights can be packed once for MKL's matrix products (x86 CPU builds of torch) and a
    packed weight multiplies any number of rows right: checked once against the plain product, since
    a packed layout serving every row count is what this build's MKL does, not a documented promise."""
    if not (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")):
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(80, 48, generator=generator)
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 64)
        for rows in (1, 4, 7, 33, 130):
            x = torch.randn(rows, 48, generator=generator)
            if not torch.allclose(torch.ops.mkl._mkl_linear(x, packed, weight, None, rows), x @ weight.t(),
                                  rtol=1e-4, atol=1e-4):
                return False
    except RuntimeError:   # a build whose MKL cannot pack
        return False
    return True


PACKING_GAIN = 1.1
"""How many times faster products with packed weights must measure than plain ones on this machine
(:func:`packing_pays`) before decoding packs its weights: the copy costs ~2x the weights' memory."""


def _plain_product(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return x @ weight.t()


def _packed_product(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkl._mkl_linear(x, packed, weight, None, x.shape[0])


def packing_pays(out_features: int, in_features: int) -> bool:
    """Whether, on this machine, products with an (``out_features``, ``in_features``) float32 weight
    packed once for MKL (:class:`Product`) measure at least :data:`PACKING_GAIN` times faster than plain
    ones, at 8 and at 32 rows (a decoding batch's steps). It depends on the CPU: on a 2-core Intel Xeon a
    step of 4-16 rows through every weight of the embedded model took ~30 ms packed against ~40-55 ms
    plain, while on a 2-core AMD EPYC the packed products were 5-30% slower at every row count (4 to 90).
    Measured once per process, shape and torch thread count (~0.2 s), weights streamed from memory
    as a decoding step streams them."""
    return weight_packing() and _packing_pays(out_features, in_features, torch.get_num_threads())


@functools.cache
def _packing_pays(out_features: int, in_features: int, threads: int) -> bool:
    generator = torch.Generator().manual_seed(0)
    weights = sample_weights(out_features, in_features, 8, generator)
    operands = [(w, torch.ops.mkl._mkl_reorder_linear_weight(w, 32)) for w in weights]
    for rows in (8, 32):
        x = torch.randn(rows, in_features, generator=generator)
        if not measures_faster(_plain_product, _packed_product, x, operands, PACKING_GAIN, rounds=7):
            return False
    return True


class Product:
    """``x @ weight.T`` (+ ``bias``) for the rows of a decoding step: by oneDNN with ``onednn`` (see
    :mod:`alignkit.kernels`), else with ``weight`` (out, in) packed once for MKL when ``pack_rows`` is
    given (the most rows a step will have; see :func:`weight_packing`). Steps of :data:`PACKED_FROM_ROWS` rows or more then multiply by the packed
    copy, which saves the library repacking each weight per call where its packed path is fast
    (:func:`packing_pays` says where). The copy is not small: MKL's packed buffer of a (1536, 576)
    matrix is allocated at ~4x its size, and packing the embedded model's 0.54 GB of weights raised
    resident memory by ~1.0 GB."""

    __slots__ = ("weight", "weight_t", "bias", "packed", "pack_rows", "onednn")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack_rows: int | None = None,
                 onednn: bool = False):
        self.weight, self.weight_t, self.bias = weight, weight.t(), bias
        self.packed, self.pack_rows, self.onednn = None, pack_rows or 0, onednn
        if pack_rows and pack_rows >= PACKED_FROM_ROWS and weight.device.type == "cpu" \
                and weight.dtype == torch.float32 and weight_packing():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), pack_rows)

    def times(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``(x @ weight.T + bias) * factor``: in one oneDNN call where products run through oneDNN."""
        if self.onednn:
            return onednn_product_with(x, self.weight, factor, "mul", self.bias)
        return self(x).mul_(factor)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias``, plus ``residual`` when given. More rows than ``pack_rows`` (a prompt's
        tokens) take the plain product: a copy packed for few rows multiplies thousands ~15% slower."""
        rows = x.shape[0]
        if self.onednn:
            if residual is not None:
                return onednn_product_with(x, self.weight, residual, "add", self.bias)
            out = onednn_product(x, self.weight, self.bias)
        elif self.packed is not None and PACKED_FROM_ROWS <= rows <= self.pack_rows:
            out = torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, rows)
        elif self.bias is None:   # the residual, if any, added inside the product
            return x @ self.weight_t if residual is None else torch.addmm(residual, x, self.weight_t)
        else:
            out = torch.addmm(self.bias, x, self.weight_t)
        return out if residual is None else out.add_(residual)


def packs_weights(lm, rows: int | None) -> bool:
    """Whether decoding steps of up to ``rows`` rows on ``lm`` (a causal LM) multiply by weights packed
    once for the CPU's matrix library: float32 weights on the CPU of an MKL build of torch,
    :data:`PACKED_FROM_ROWS` rows or more, memory for a copy of the weights to spare, and products with
    its MLP's weight shape measured faster that way on this machine (:func:`packing_pays`)."""
    weight = lm.get_output_embeddings().weight
    if not rows or rows < PACKED_FROM_ROWS or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    return _room_for_copy(lm) and packing_pays(*_mlp_weight(lm).shape)


def decoding_products(lm, rows: int | None) -> tuple[bool, int | None]:
    """How decoding steps of up to ``rows`` rows on ``lm`` (a causal LM) multiply: whether through oneDNN
    (float32 CPU weights, where it measures faster than MKL on the MLP's weight shape:
    :func:`alignkit.kernels.onednn_pays`), and otherwise the rows the weights are packed for
    (:func:`packs_weights`), None where they stay as they are."""
    head = lm.get_output_embeddings().weight
    onednn = head.device.type == "cpu" and head.dtype == torch.float32 and onednn_pays(*_mlp_weight(lm).shape)
    return onednn, rows if not onednn and packs_weights(lm, rows) else None


def _mlp_weight(lm) -> torch.Tensor:
    """The first layer's MLP gate weight: the shape most of a Llama-family model's weights have."""
    return _base_linear(lm.model.layers[0].mlp.gate_proj).weight


def _room_for_copy(lm) -> bool:
    """Whether packed copies of ``lm``'s weights fit in memory twice over (what is available now), so
    packing never pushes a machine into swap for a faster step."""
    import psutil

    size = sum(p.numel() * p.element_size() for p in lm.parameters())
    return 2 * size < psutil.virtual_memory().available


def plain_lora_config(config: dict) -> bool:
    """Whether an adapter config (``adapter_config.json`` as a dict) is plain LoRA: no DoRA, no LoRA bias,
    no fully trained extra modules (``modules_to_save``, trainable tokens), not another PEFT type."""
    return (config.get("peft_type") == "LORA" and not config.get("use_dora") and not config.get("modules_to_save")
            and not config.get("trainable_token_indices") and not config.get("lora_bias"))


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
    if not all(plain_lora_config(configs[name].to_dict()) for name in wanted):
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


def adapter_segments(groups: list[int]) -> list[tuple[int, int, int]]:
    """``(group, start, end)`` of each run of equal values in ``groups``: with the batch rows sorted by
    adapter and ``groups[i]`` the adapter index of row ``i``, the rows of each adapter (what
    :meth:`LeanStep.__call__` takes as ``segments``)."""
    runs, start = [], 0
    for group, run in itertools.groupby(groups):
        end = start + sum(1 for _ in run)
        runs.append((group, start, end))
        start = end
    return runs


def staying_rows(ended: list[bool], groups: list[int]) -> list[int]:
    """The batch's next row order when the rows marked in ``ended`` leave: the old index of each row that
    stays, the rows of each group (``groups``) contiguous as :func:`adapter_segments` needs them, groups
    in ascending order. Rows already inside their group's new range keep their place; the others fill
    its gaps, so only a few rows move (one per group behind a leaving row, or the rows that joined at
    the end of the batch), where keeping the order would move every row behind them."""
    order: list[int] = []
    for group in sorted(set(groups)):
        staying = [i for i, g in enumerate(groups) if g == group and not ended[i]]
        first = len(order)
        new_end = first + len(staying)
        in_place = {i for i in staying if first <= i < new_end}
        movers = iter(i for i in staying if i not in in_place)
        order += [slot if slot in in_place else next(movers) for slot in range(first, new_end)]
    return order


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

    Products run through oneDNN where it measures faster than MKL; otherwise ``pack_rows`` (the most rows
    a step will take, e.g. the batch size) packs every weight once for MKL (:class:`Product`) where that
    helps (:func:`decoding_products` decides).

    With ``adapters`` (names of LoRA adapters loaded on the model, :data:`BASE` for none) the linear
    layers may be LoRA layers: their base weights are used, and each row adds the low-rank update of
    its own adapter (see :meth:`__call__`'s ``segments``).
    """

    ARCHITECTURES = ("llama", "qwen2")

    def __init__(self, lm, adapters: tuple[str, ...] = (), pack_rows: int | None = None):
        config, inner = lm.config, lm.model
        self.inner = inner
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = inner.layers[0].self_attn.head_dim
        self.adapters = tuple(adapters)
        self.layers, self.lora = [], []
        onednn, pack_rows = decoding_products(lm, pack_rows)
        with torch.no_grad():
            self.head = Product(lm.get_output_embeddings().weight, pack_rows=pack_rows, onednn=onednn)
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv = [_base_linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
                self.layers.append((
                    layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                    Product(torch.cat([m.weight for m in qkv]),
                            torch.cat([m.bias for m in qkv]) if qkv[0].bias is not None else None, pack_rows, onednn),
                    Product(_base_linear(attn.o_proj).weight, pack_rows=pack_rows, onednn=onednn), attn.scaling,
                    layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                    *(Product(_base_linear(m).weight, pack_rows=pack_rows, onednn=onednn)
                      for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))))
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
            dtype = _base_linear(modules[0]).weight.dtype   # PEFT may keep LoRA weights in float32 beside a bf16 base
            a_t = torch.cat([m.lora_A[n].weight.t() for m, n in parts], dim=1).to(dtype)
            b_t = a_t.new_zeros(a_t.shape[1], sum(outs))
            row = 0
            for m, n in parts:
                col = sum(outs[:modules.index(m)])
                rank = m.lora_A[n].weight.shape[0]
                b_t[row:row + rank, col:col + outs[modules.index(m)]] = (m.lora_B[n].weight.t() * m.scaling[n]).to(dtype)
                row += rank
            pieces.append((a_t, b_t))
        return tuple(pieces) if any(p is not None for p in pieces) else None

    @classmethod
    def for_model(cls, model, adapters: tuple[str, ...] = (), pack_rows: int | None = None) -> LeanStep | None:
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
        return cls(lm, adapters, pack_rows)

    def __call__(self, tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None, cache,
                 segments: list[tuple[int, int, int]] = (), last_only: bool = False,
                 head: bool = True) -> torch.Tensor | None:
        """Logits (B, V) of the token after ``tokens`` (B,) at ``position`` (B, 1); ``mask`` (B, 1, 1, L)
        boolean over the cache's positions after this one's (None: every position of every row is real);
        ``cache`` (from :func:`alignkit.kv_cache.new_cache`) receives this token's keys and values. ``segments`` says which
        rows run which adapter: ``(i, start, end)`` gives rows ``start:end`` the adapter ``adapters[i]``.

        Several tokens per row (``tokens`` and ``position`` (B, n), ``mask`` (B, 1, n, L) with each
        token's own causal row; None: causal, every position real) give logits (B, n, V): the token
        after each, as the model's forward over them on the same cache gives them; with ``last_only``
        only the last token's, (B, V), as for a prompt (see :func:`prompt_mask`). ``head=False`` only fills
        the cache and returns None (a prompt's leading part, when it runs in pieces)."""
        many = tokens.dim() == 2
        rows, n = tokens.shape[0], tokens.shape[1] if many else 1
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        hidden = self.inner.embed_tokens(tokens)                       # (B, H) or (B, n, H)
        cos, sin = self.inner.rotary_emb(hidden, position)             # (B, n, D)
        if many:   # one matrix row per token; attention puts each row's tokens back together
            hidden, cos, sin = hidden.reshape(rows * n, -1), cos.reshape(rows * n, 1, dim), sin.reshape(rows * n, 1, dim)
            segments = [(g, start * n, end * n) for g, start, end in segments]
            if mask is None:
                mask = causal_at_end(n, cache.get_seq_length() + n, tokens.device)
        half, queries = dim // 2, heads * dim
        # rotate_half(x) * sin == x.roll(half) * [-sin[:half], sin[half:]], bit for bit: 4 operations a layer, not 7
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        blocked = mask.logical_not() if mask is not None and not many else None   # one for every layer
        for i, (norm1, eps1, qkv_product, o_product, scaling, norm2, eps2, gate, up, down) in enumerate(self.layers):
            lora_qkv, lora_o, lora_gate, lora_up, lora_down = self.lora[i]
            x = _rms_norm(hidden, norm1, eps1)
            qkv = _add_lora(qkv_product(x), x, lora_qkv, segments)
            qk = qkv[:, :queries + kv_heads * dim].view(rows * n, heads + kv_heads, dim)
            qk = torch.mul(qk, cos).add_(qk.roll(half, -1).mul_(sin))
            new_values = qkv[:, queries + kv_heads * dim:]
            if many:
                keys, values = cache.layers[i].update(qk[:, heads:].view(rows, n, kv_heads, dim).transpose(1, 2),
                                                      new_values.view(rows, n, kv_heads, dim).transpose(1, 2))
                out = torch.nn.functional.scaled_dot_product_attention(
                    qk[:, :heads].view(rows, n, heads, dim).transpose(1, 2), keys, values, attn_mask=mask,
                    scale=scaling, enable_gqa=heads != kv_heads).transpose(1, 2).reshape(rows * n, queries)
            else:
                keys, values = cache.layers[i].update(qk[:, heads:].view(rows, kv_heads, 1, dim),
                                                      new_values.view(rows, kv_heads, 1, dim))
                # The query heads of one key/value head attend as one group (what transformers does for one token).
                out = attend_one_token(qk[:, :heads].reshape(rows, kv_heads, heads // kv_heads, dim), keys, values,
                                       mask, scaling, blocked).reshape(rows, queries)
            hidden = _add_lora(o_product(out, hidden), out, lora_o, segments)
            x = _rms_norm(hidden, norm2, eps2)
            act = torch.nn.functional.silu(_add_lora(gate(x), x, lora_gate, segments))
            act = up.times(x, act) if lora_up is None else act.mul_(_add_lora(up(x), x, lora_up, segments))
            hidden = _add_lora(down(act, hidden), act, lora_down, segments)
        if not head:
            return None
        if many and last_only:
            return self.head(self.inner.norm(hidden.view(rows, n, -1)[:, -1]))
        logits = self.head(self.inner.norm(hidden))
        return logits.view(rows, n, -1) if many else logits


ATTENTION_PRODUCTS_FROM_ROWS = 4
"""Rows of a one-token step from which its attention runs as two batched products and a softmax
(:func:`attend_one_token`) instead of ``scaled_dot_product_attention``: on 2 CPU cores, at 4-16 rows and
60-600 cached positions, 1.1-2x as fast (torch's CPU kernel is built for long queries, not one token
per row); at 1-2 rows the two take the same time within noise. The demo's comparison stage (135 rows in
shared batches), 5 rounds alternating with the kernel: median 48.0 -> 43.8 s, within the host's drift."""


def attend_one_token(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, blocked: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per row: ``query`` (B, K, G, D) (the G query heads of each of the K
    key/value heads), ``keys``/``values`` (B, K, L, D), ``mask`` (B, 1, 1, L) boolean (True: attend; None:
    every position). ``blocked`` is ``mask.logical_not()`` when the caller has it (one per step serves
    every layer). From :data:`ATTENTION_PRODUCTS_FROM_ROWS` rows on, ``softmax(q k^T * scale) v`` as two
    batched products; below, ``scaled_dot_product_attention``. The two agree to float rounding (~1e-7)."""
    if query.shape[0] < ATTENTION_PRODUCTS_FROM_ROWS:
        return torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
    scores = torch.matmul(query, keys.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores.masked_fill_(mask.logical_not() if blocked is None else blocked, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values)


def prompt_mask(mask: torch.Tensor) -> torch.Tensor:
    """The (B, 1, n, n) boolean attention mask of left-padded prompts with ``mask`` (B, n) marking their
    real tokens: each token sees the real tokens up to itself. A padding position sees only itself, so
    its (unused) values stay finite and never reach a real token, which never sees it."""
    n = mask.shape[1]
    seen = causal_at_end(n, n, mask.device) & mask.bool()[:, None, :]
    return (seen | torch.eye(n, dtype=torch.bool, device=mask.device))[:, None]


def _base_linear(module: nn.Module) -> nn.Module:
    """The linear layer under a LoRA layer (the module itself when it is not one)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it (``weight * (x * rsqrt(mean(x^2) + eps))``), through
    torch's own ``rms_norm`` where it has one (2.4 on): the same numbers on this CPU, bit for bit, in
    one operation instead of six (a prompt batch's 2,900 rows 2.6 -> 0.9 ms, one row 13.6 -> 10.8 us).
    Calling the norm modules instead made a one-row decoding step 5% slower."""
    if _TORCH_RMS_NORM is not None:
        return _TORCH_RMS_NORM(x, (x.shape[-1],), weight, eps)
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


_TORCH_RMS_NORM = getattr(torch.nn.functional, "rms_norm", None)
