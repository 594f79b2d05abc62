"""One forward routine for every algorithm: summed response log-probs per sequence.

SFT (train and eval), the DPO policy and the DPO reference all go through
:func:`sequence_logps`, so a speed or correctness fix lands everywhere at once.

Three levers keep it fast and small:
- Only response positions reach the LM head, in chunks (``losses.token_logps``): the full
  (B, T, V) logits tensor is never built.
- ``packed=True`` removes most padding: short rows share a packed row with restarting
  ``position_ids`` and a block-diagonal causal mask, so few FLOPs go to pad tokens.
  (With SDPA attention, ``position_ids`` alone do not separate sequences: the 4-D mask is needed.)
- ``shared_prompts=N`` (DPO): rows ``i`` and ``N + i`` share a prompt, which then runs once:
  the packed unit is ``prompt, chosen, rejected``, and the rejected tokens see the prompt but
  not the chosen ones, with positions that continue from the prompt as if the chosen were absent.

Every layout is described by ``token_index`` (B, T): where each original token's hidden state sits
in the flattened output, so the log-prob gather is the same code for all of them.
"""

from __future__ import annotations

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
        packed: drop padding and pack rows into bins (same result, fewer FLOPs).
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
    if packed:
        p = pack_batch(ids, mask, labels, shared_prompts=shared_prompts, attention_ratio=_attention_ratio(decoder))
        hidden = decoder(input_ids=p["input_ids"], position_ids=p["position_ids"],
                         attention_mask=p["mask"], use_cache=False).last_hidden_state  # (R, C, H)
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
