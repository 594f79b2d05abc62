"""One forward routine for every algorithm: summed response log-probs per sequence.

SFT (train and eval), the DPO policy and the DPO reference all go through
:func:`sequence_logps`, so a speed or correctness fix lands everywhere at once.

Three levers keep it fast and small:
- Only response positions reach the LM head, in chunks (``losses.token_logps``): the full
  (B, T, V) logits tensor is never built.
- ``packed=True`` removes padding. Where the model's attention is plain causal SDPA
  (:func:`flat_supported`), every token of the batch sits in one row without a single pad token
  (:func:`flat_layout`) and attention runs block by block, each sequence causal on its own
  (:func:`block_attention`): no FLOP goes to padding, and no mask is built. Other SDPA or eager
  models pack rows into bins of equal length with restarting ``position_ids`` and a block-diagonal
  causal mask (:func:`pack_batch`), so few FLOPs go to pad tokens; any other attention runs padded
  (:func:`layout` says which).
- ``shared_prompts=N`` (DPO): rows ``i`` and ``N + i`` share a prompt, which then runs once:
  the packed unit is ``prompt, chosen, rejected``, and the rejected tokens see the prompt but
  not the chosen ones, with positions that continue from the prompt as if the chosen were absent.

Every layout is described by ``token_index`` (B, T): where each original token's hidden state sits
in the flattened output, so the log-prob gather is the same code for all of them.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .gyms import IGNORE_INDEX
from .losses import token_logps


def _unwrap(model):
    """The transformers ``*ForCausalLM`` inside PEFT / accelerate wrappers (LoRA layers stay in place)."""
    while hasattr(model, "module") and not hasattr(model, "get_decoder"):
        model = model.module  # DDP / accelerate wrappers
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def plan_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: group item indices into bins whose total length fits ``capacity``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def choose_capacity(sizes: list[int], attention_ratio: float) -> int:
    """The bin length that packs ``sizes`` at the least estimated cost.

    Bins as long as the longest unit waste room when units vary (a DPO pair is prompt + two
    answers); longer bins waste less but every token then attends over more positions. Cost of a
    layout = slots * (1 + capacity / attention_ratio), where ``attention_ratio`` is how many
    positions of attention cost as much as one token's linear layers.
    """
    longest = max(sizes)
    best = None
    for factor in (1.0, 1.5, 2.0, 3.0, 4.0):
        capacity = int(longest * factor)
        cost = len(plan_bins(sizes, capacity)) * capacity * (1 + capacity / attention_ratio)
        if best is None or cost < best[0]:
            best = (cost, capacity)
    return best[1]


def _units(input_ids, attention_mask, labels, shared_prompts: int):
    """Split rows into packing units: lists of (row, first token, last token + 1, group).

    A unit is one row, or with ``shared_prompts`` a pair's prompt + chosen + rejected. ``group``
    tells which tokens of a unit may see each other (0 = the shared prompt, seen by all).
    """
    lengths = attention_mask.sum(dim=1).tolist()
    if not shared_prompts:
        return [[(r, 0, n, 1)] for r, n in enumerate(lengths)]
    units = []
    for i in range(shared_prompts):
        j = shared_prompts + i
        # The prompt is everything before the first response label, in both rows.
        p = min(int((labels[i] != IGNORE_INDEX).nonzero()[0]), int((labels[j] != IGNORE_INDEX).nonzero()[0]))
        if not torch.equal(input_ids[i, :p], input_ids[j, :p]):
            units += [[(i, 0, lengths[i], 1)], [(j, 0, lengths[j], 1)]]
            continue
        units.append([(i, 0, p, 0), (i, p, lengths[i], 1), (j, p, lengths[j], 2)])
    return units


def pack_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
               shared_prompts: int = 0, capacity: int | None = None,
               attention_ratio: float | None = None) -> dict[str, torch.Tensor]:
    """Pack the tokens of right-padded rows into R bins of ``capacity`` tokens (see the module doc).

    Args: (B, T) tensors; ``shared_prompts`` = number of pairs when rows i and B/2 + i share a prompt;
    ``capacity`` fixes the bin length, else :func:`choose_capacity` picks it with ``attention_ratio``
    (without one, bins are as long as the longest unit).
    Returns ``input_ids`` and ``position_ids`` (R, C), ``mask`` (R, 1, C, C) boolean (True = may
    attend; padding attends to padding so no softmax row is empty) and ``token_index`` (B, T): the
    flat index in (R * C) holding each original token, -1 on padding.
    """
    units = _units(input_ids, attention_mask, labels, shared_prompts)
    sizes = [sum(end - start for _, start, end, _ in u) for u in units]
    if capacity is None and attention_ratio:
        capacity = choose_capacity(sizes, attention_ratio)
    capacity = max(capacity or 0, max(sizes))
    bins = plan_bins(sizes, capacity)
    device = input_ids.device
    out_ids = input_ids.new_zeros((len(bins), capacity))
    out_pos = torch.zeros_like(out_ids)
    unit_of = torch.full_like(out_ids, -1)   # which unit a packed token belongs to
    group = torch.zeros_like(out_ids)        # its visibility group inside the unit
    token_index = torch.full_like(input_ids, -1)
    for b, members in enumerate(bins):
        at = 0
        for u in members:
            for row, start, end, grp in units[u]:
                n = end - start
                out_ids[b, at:at + n] = input_ids[row, start:end]
                # Positions are those of the original row: the rejected response continues from the
                # prompt exactly as if the chosen one were not there.
                out_pos[b, at:at + n] = torch.arange(start, end, device=device)
                unit_of[b, at:at + n] = u
                group[b, at:at + n] = grp
                token_index[row, start:end] = b * capacity + at + torch.arange(n, device=device)
                if grp == 2:  # the rejected row's prompt tokens are the shared ones
                    token_index[row, :start] = token_index[row - shared_prompts, :start]
                at += n
    same_unit = unit_of[:, :, None] == unit_of[:, None, :]
    visible = (group[:, None, :] == 0) | (group[:, :, None] == group[:, None, :])
    causal = torch.ones(capacity, capacity, dtype=torch.bool, device=device).tril_()
    return {"input_ids": out_ids, "position_ids": out_pos, "mask": (same_unit & visible & causal)[:, None],
            "token_index": token_index}


def flat_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                shared_prompts: int = 0) -> dict:
    """Every real token of right-padded rows in one row, and the attention blocks that keep them apart.

    Args as :func:`pack_batch`. Returns ``input_ids`` and ``position_ids`` (1, N) with N the number of
    distinct tokens (a shared prompt counts once), ``token_index`` (B, T) as :func:`pack_batch` gives it,
    and ``blocks``: a tuple of ``(queries, sources)``, one per run of consecutive tokens that attend
    alike, in row order (their ``queries`` counts add up to N). ``sources`` lists the key/value tokens
    of the block as ``(block, start, end)`` slices of earlier blocks or of itself; every query sees
    the sources up to its own position (causal, aligned at the end). A plain row is one block that
    sees itself; a DPO unit ``prompt, chosen, rejected`` is a block ``prompt + chosen`` and a block
    ``rejected`` that sees the prompt and itself.
    """
    units = _units(input_ids, attention_mask, labels, shared_prompts)
    ids, positions, blocks = [], [], []
    token_index = torch.full_like(input_ids, -1)
    device, at = input_ids.device, 0

    def place(row, start, end):
        nonlocal at
        n = end - start
        ids.append(input_ids[row, start:end])
        positions.append(torch.arange(start, end, device=device))
        token_index[row, start:end] = at + torch.arange(n, device=device)
        at += n

    for unit in units:
        if len(unit) == 1:
            row, start, end, _ = unit[0]
            if end > start:
                place(row, start, end)
                blocks.append((end - start, ((len(blocks), 0, end - start),)))
            continue
        (i, _, p, _), (_, _, chosen_end, _), (j, _, rejected_end, _) = unit
        place(i, 0, chosen_end)   # the prompt and the chosen response: one causal sequence
        blocks.append((chosen_end, ((len(blocks), 0, chosen_end),)))
        token_index[j, :p] = token_index[i, :p]
        if rejected_end > p:      # the rejected response sees the prompt (the previous block's start) and itself
            place(j, p, rejected_end)
            blocks.append((rejected_end - p, ((len(blocks) - 1, 0, p), (len(blocks), 0, rejected_end - p))))
    empty = input_ids.new_zeros(0)
    return {"input_ids": torch.cat(ids or [empty])[None], "position_ids": torch.cat(positions or [empty])[None],
            "token_index": token_index, "blocks": tuple(blocks)}


def causal_at_end(queries: int, width: int, device=None) -> torch.Tensor:
    """(queries, width) boolean mask of the last ``queries`` of ``width`` positions attending causally:
    query ``i`` sees positions ``0 .. width - queries + i`` (new tokens after a prefix they all see)."""
    return torch.ones(queries, width, dtype=torch.bool, device=device).tril_(width - queries)


BLOCK_ATTENTION = "alignkit_blocks"
"""The attention implementation name under which :func:`block_attention` is registered with transformers."""


def block_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    blocks=None, **kwargs):
    """Attention over :func:`flat_layout`'s blocks, as a transformers attention function.

    ``query`` (1, heads, N, D) and ``key``/``value`` (1, kv_heads, N, D) hold one row; each block's
    queries attend to its ``sources`` through ``scaled_dot_product_attention``: causal without a mask
    when a block sees only itself, else with the causal mask aligned at the end. Returns the output
    (1, N, heads, D) and no weights, as transformers' SDPA function does.
    """
    if attention_mask is not None or kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise ValueError("block attention computes plain causal attention only (no mask, window, softcap or sinks)")
    sizes = [n for n, _ in blocks]
    queries, keys, values = (t.split(sizes, dim=2) for t in (query, key, value))
    gqa = {"enable_gqa": True} if query.shape[1] != key.shape[1] else {}
    outs = []
    for b, (n, sources) in enumerate(blocks):
        if sources == ((b, 0, n),):
            k, v, causal, mask = keys[b], values[b], True, None
        else:
            k = torch.cat([keys[s][:, :, start:end] for s, start, end in sources], dim=2)
            v = torch.cat([values[s][:, :, start:end] for s, start, end in sources], dim=2)
            causal, mask = False, causal_at_end(n, k.shape[2], query.device)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            queries[b], k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling, **gqa))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


@functools.cache
def _register_block_attention() -> None:
    """Make :func:`block_attention` known to transformers (once): its attention function, and a mask
    function that builds no mask (the blocks say who sees whom).

    Gradient checkpointing recomputes a layer's forward during backward, after the forward has set the
    model's attention implementation back to SDPA, with the same arguments (``blocks`` among them).
    So SDPA's function is wrapped too: given ``blocks`` it computes :func:`block_attention`, otherwise
    exactly what it computed before."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    def sdpa_or_blocks(module, query, key, value, attention_mask, *args, blocks=None, **kwargs):
        if blocks is not None:
            return block_attention(module, query, key, value, attention_mask, *args, blocks=blocks, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    AttentionInterface.register(BLOCK_ATTENTION, block_attention)
    AttentionInterface.register("sdpa", sdpa_or_blocks)
    AttentionMaskInterface.register(BLOCK_ATTENTION, lambda *args, **kwargs: None)


_FLAT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite")


def flat_supported(model) -> bool:
    """Whether ``model`` (a causal LM, PEFT- or accelerate-wrapped or not) runs :func:`flat_layout`
    batches: a model family whose every layer is full causal attention through transformers' SDPA
    function, without sliding windows or score soft-capping, so that :func:`block_attention` computes
    what its attention does. Other models take :func:`pack_batch`'s bins."""
    config = getattr(_unwrap(model), "config", None)
    if config is None or getattr(config, "model_type", None) not in _FLAT_FAMILIES:
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    if getattr(config, "attn_logit_softcapping", None):
        return False
    return all(t == "full_attention" for t in getattr(config, "layer_types", None) or ())


def layout(model, packed: bool = True) -> str:
    """How :func:`sequence_logps` lays out ``model``'s batches: ``"flat"`` (:func:`flat_layout`, where
    :func:`flat_supported`), ``"bins"`` (:func:`pack_batch`, for other SDPA or eager attention) or
    ``"padded"`` (``packed=False``, or an attention that takes neither)."""
    if packed and flat_supported(model):
        return "flat"
    config = getattr(_unwrap(model), "config", None)
    return "bins" if packed and getattr(config, "_attn_implementation", None) in ("sdpa", "eager") else "padded"


@contextlib.contextmanager
def _block_attention_for(config):
    """``config``'s attention implementation set to :func:`block_attention` for the duration."""
    _register_block_attention()
    previous = config._attn_implementation
    config._attn_implementation = BLOCK_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def _attention_ratio(decoder) -> float:
    """Attention span (in positions) that costs as much as one token's linear layers, per layer.

    Linear FLOPs per token ~ 2 * (weights of one layer); attention FLOPs per token ~ 4 * span * hidden.
    """
    layers = getattr(decoder, "layers", None)
    hidden = getattr(decoder.config, "hidden_size", None)
    if not layers or not hidden:
        return 4096.0
    return sum(p.numel() for p in layers[0].parameters()) / (2 * hidden)


def sequence_logps(model, batch: dict[str, torch.Tensor], packed: bool = True, chunk_size: int = 1024,
                   shared_prompts: int = 0):
    """Summed log-prob of each row's response tokens and the number of those tokens.

    Args:
        model: a causal LM (optionally wrapped by PEFT); LoRA adapters active as set by the caller.
        batch: ``input_ids``, ``attention_mask``, ``labels``, each (B, T), right-padded.
        packed: drop padding (one row with per-sequence attention, or bins; same result, fewer FLOPs);
            a model whose attention takes neither (not SDPA or eager) runs padded.
        chunk_size: positions per LM-head chunk.
        shared_prompts: with ``packed``, the number of pairs whose rows ``i`` and ``shared_prompts + i``
            start with the same prompt (DPO batches); the prompt then runs once per pair.

    Returns:
        ``(logps, n_tokens)``: (B,) float32 sums of response-token log-probs, (B,) long counts.
    """
    lm = _unwrap(model)
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    device = head.weight.device
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    n_rows, width = ids.shape
    form = layout(lm, packed)
    if form == "flat":
        p = flat_layout(ids, mask, labels, shared_prompts=shared_prompts)
        with _block_attention_for(lm.config):
            hidden = decoder(input_ids=p["input_ids"], position_ids=p["position_ids"], use_cache=False,
                             blocks=p["blocks"]).last_hidden_state  # (1, N, H)
        token_index = p["token_index"]
    elif form == "bins":
        p = pack_batch(ids, mask, labels, shared_prompts=shared_prompts, attention_ratio=_attention_ratio(decoder))
        bins_mask = p["mask"]
        if lm.config._attn_implementation == "eager":   # eager attention adds its mask to the scores
            bins_mask = torch.zeros(bins_mask.shape, dtype=head.weight.dtype, device=device).masked_fill_(
                ~bins_mask, torch.finfo(head.weight.dtype).min)
        hidden = decoder(input_ids=p["input_ids"], position_ids=p["position_ids"],
                         attention_mask=bins_mask, use_cache=False).last_hidden_state  # (R, C, H)
        token_index = p["token_index"]
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
        token_index = torch.arange(n_rows * width, device=device).view(n_rows, width)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    # The hidden state of token t predicts token t + 1 of the same row.
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX  # (B, T - 1)
    source = token_index[:, :-1][selected]
    logps = token_logps(hidden[source], head.weight, targets[selected], chunk_size=chunk_size,
                        bias=getattr(head, "bias", None))  # (M,)
    rows = torch.arange(n_rows, device=device)[:, None].expand_as(selected)[selected]
    sums = torch.zeros(n_rows, dtype=torch.float32, device=device).index_add(0, rows, logps)
    return sums, response_counts(labels)


def check_token_ids(model, batch: dict) -> dict:
    """``batch`` as it is, once its ``*input_ids`` tensors are checked to hold only ids of ``model``'s vocabulary:
    a gym built with another model's tokenizer is an ArgumentError naming the id, not an index error deep
    in the embedding lookup."""
    from .errors import ArgumentError

    vocab = _unwrap(model).get_input_embeddings().num_embeddings
    for key, ids in batch.items():
        if key.endswith("input_ids") and torch.is_tensor(ids) and ids.numel():
            low, high = ids.min().item(), ids.max().item()
            if low < 0 or high >= vocab:
                raise ArgumentError(f"batch {key} holds token id {high if high >= vocab else low}, outside the model's "
                                    f"vocabulary of {vocab}: the gym's tokenizer is not this model's (build the gym "
                                    "with the tokenizer of the model the agent trains)")
    return batch


def response_counts(labels: torch.Tensor) -> torch.Tensor:
    """(B,) the number of response tokens of each row whose log-prob :func:`sequence_logps` sums."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


class ResponseLogps(torch.nn.Module):
    """:func:`sequence_logps` of ``model`` as a module's forward.

    A data-parallel wrapper (accelerate's DDP) synchronises gradients only for forwards run through
    it, so the training step calls the policy through this module once accelerate has prepared it.
    Under FSDP2 and ZeRO-3 this module is the root that gathers the weights no decoder layer owns
    (embeddings, LM head) for the forward: every forward of a sharded model goes through it.
    """

    def __init__(self, model, packed: bool = True):
        super().__init__()
        self.model, self.packed = model, packed

    @property
    def _no_split_modules(self):
        """The model's own layer classes (what accelerate's FSDP wraps one by one)."""
        return getattr(self.model, "_no_split_modules", None)

    def forward(self, input_ids, attention_mask, labels, shared_prompts: int = 0):
        """``(logps, n_tokens)``, each (B,), as :func:`sequence_logps` returns them."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return sequence_logps(self.model, batch, packed=self.packed, shared_prompts=shared_prompts)
