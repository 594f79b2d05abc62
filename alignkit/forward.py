"""One forward routine for every algorithm: summed response log-probs per sequence.

SFT (train and eval), the DPO policy and the DPO reference all go through
:func:`sequence_logps`, so a speed or correctness fix lands everywhere at once.

Two levers keep it fast and small:
- Only response positions reach the LM head, in chunks (``losses.token_logps``): the full
  (B, T, V) logits tensor is never built.
- ``packed=True`` removes most padding: short rows share a packed row with restarting
  ``position_ids`` and a block-diagonal causal mask, so few FLOPs go to pad tokens.
  (With SDPA attention, ``position_ids`` alone do not separate sequences: the 4-D mask is needed.)
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


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the positions that predict them: ``targets[:, t] = labels[:, t + 1]``.

    labels: (B, T) with -100 on ignored tokens. Returns (B, T); the last column is ignored.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def plan_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: group row indices into bins whose total length fits ``capacity``."""
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


def pack_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
               capacity: int | None = None):
    """Pack the non-padding tokens of B right-padded rows into R <= B rows of ``capacity`` tokens.

    Bins are as long as the longest row unless ``capacity`` says otherwise, so attention costs
    about what it did padded while the linear layers (most of the FLOPs) skip the padding.

    Args: (B, T) tensors. Returns ``input_ids``, ``position_ids``, ``targets``, ``row_of`` (the
    source row of each token, -1 on padding), each (R, C), and ``mask`` (R, 1, C, C) boolean
    (True = may attend: same sequence and not in the future; padding attends to padding so no
    softmax row is empty).
    """
    lengths = attention_mask.sum(dim=1).tolist()
    capacity = max(capacity or 0, max(lengths))
    bins = plan_bins(lengths, capacity)
    shape = (len(bins), capacity)
    out_ids = input_ids.new_zeros(shape)
    out_pos = input_ids.new_zeros(shape)
    out_targets = targets.new_full(shape, IGNORE_INDEX)
    row_of = input_ids.new_full(shape, -1)
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            n = lengths[i]
            out_ids[r, at:at + n] = input_ids[i, :n]
            out_pos[r, at:at + n] = torch.arange(n)
            out_targets[r, at:at + n] = targets[i, :n]
            row_of[r, at:at + n] = i
            at += n
    same = row_of[:, :, None] == row_of[:, None, :]
    causal = torch.ones(capacity, capacity, dtype=torch.bool, device=input_ids.device).tril_()
    return {"input_ids": out_ids, "position_ids": out_pos, "targets": out_targets,
            "row_of": row_of, "mask": (same & causal)[:, None]}


def sequence_logps(model, batch: dict[str, torch.Tensor], packed: bool = True, chunk_size: int = 1024):
    """Summed log-prob of each row's response tokens and the number of those tokens.

    Args:
        model: a causal LM (optionally wrapped by PEFT); LoRA adapters active as set by the caller.
        batch: ``input_ids``, ``attention_mask``, ``labels``, each (B, T), right-padded.
        packed: drop padding and pack rows into one sequence (same result, fewer FLOPs).
        chunk_size: positions per LM-head chunk.

    Returns:
        ``(logps, n_tokens)``: (B,) float32 sums of response-token log-probs, (B,) long counts.
    """
    lm = _unwrap(model)
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    device = head.weight.device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    targets = shifted_targets(batch["labels"].to(device))
    n_rows = ids.shape[0]
    if packed:
        p = pack_batch(ids, mask, targets)
        hidden = decoder(input_ids=p["input_ids"], position_ids=p["position_ids"],
                         attention_mask=p["mask"], use_cache=False).last_hidden_state  # (R, C, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_targets, row_of = p["targets"].reshape(-1), p["row_of"].reshape(-1)
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_targets = targets.reshape(-1)
        row_of = torch.arange(n_rows, device=device).repeat_interleave(ids.shape[1])
    selected = flat_targets != IGNORE_INDEX
    logps = token_logps(hidden[selected], head.weight, flat_targets[selected], chunk_size=chunk_size,
                        bias=getattr(head, "bias", None))  # (M,)
    rows = row_of[selected]
    sums = torch.zeros(n_rows, dtype=torch.float32, device=device).index_add(0, rows, logps)
    counts = torch.zeros(n_rows, dtype=torch.long, device=device).index_add(0, rows, torch.ones_like(rows))
    return sums, counts
