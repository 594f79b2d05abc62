"""Loss functions for SFT and preference optimisation: pure functions of tensors (no model,
no optimizer, no global state), each checked against its formula in ``tests/test_losses.py``.

Shapes: ``B`` preference pairs, ``N`` selected (response) token positions, ``H`` hidden
size, ``V`` vocabulary size. Sequence log-probs for preference losses are SUMS over response
tokens, ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)``, as in the DPO paper; NLL terms are
per-TOKEN means. Preference losses return one value per pair, un-averaged, so the caller
picks the denominator: gradient accumulation divides by the size of the whole optimizer
step (``n_pairs`` / ``n_tokens``) and so matches one large batch exactly.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import matmul_t

# --------------------------------------------------------------------------- token log-probs


class _ChunkLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[labels]`` for one chunk, with a hand-written backward.

    d logp_i / d logits_i = onehot(labels_i) - softmax(logits_i), so backward needs only the
    softmax. With ``keep`` the forward turns the logits into that softmax in place and keeps it:
    backward is then one matmul. Without ``keep`` only the inputs are kept and backward recomputes
    the logits first (one more matmul, no (n, V) block held between forward and backward).
    Math in float32 whatever the input dtype. Backward runs once (it works in place).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, keep):
        logp, lse, probs = _normalise(_logits(hidden, weight, bias), labels)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, probs if keep else None)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, labels, lse, probs = ctx.saved_tensors
        if probs is None:
            probs = _shifted_exp(_logits(hidden, weight, bias), lse.unsqueeze(1))  # the softmax again
        # grad_logits = g * (onehot - softmax), built in place over the probabilities.
        grad = probs.mul_(-grad_logp.float().unsqueeze(1))
        grad.scatter_add_(1, labels.unsqueeze(1), grad_logp.float().unsqueeze(1))
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = matmul_t(grad, weight.float().T).to(hidden.dtype) if need_h else None
        grad_w = matmul_t(grad.T, hidden.float().T).to(weight.dtype) if need_w else None
        grad_b = grad.sum(0).to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # Upcast inside the chunk: a float32 copy of a bf16 LM head is transient, not held for the step.
    logits = matmul_t(hidden.float(), weight.float())
    return logits.add_(bias.float()) if bias is not None else logits


# exp() of float32 inputs below ~-87.3 gives denormals or 0, and the vectorised CPU exp runs 8-20x
# slower there. Clamping x - max at -80 first changes each term by under e^-80 ~ 1.8e-35 against a
# sum >= 1 (the max term is e^0), far below float32 resolution: the results are the same.
EXP_FLOOR = -80.0


def _shifted_exp(logits: Tensor, shift: Tensor) -> Tensor:
    """``exp(logits - shift)`` in place, the exponent floored at ``EXP_FLOOR``; ``shift`` (n, 1)."""
    return logits.sub_(shift).clamp_(min=EXP_FLOOR).exp_()


def _normalise(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p[labels], logsumexp, softmax)`` of (n, V) float32 ``logits``, overwritten in place.

    The stable log-sum-exp (max, then exp of the differences) in passes over one buffer: no
    (n, V) temporaries, which on CPU cost fresh pages on every call.
    """
    picked = logits.gather(1, labels.unsqueeze(1)).squeeze(1)  # (n,)
    peak = logits.amax(dim=1, keepdim=True)  # (n, 1)
    probs = _shifted_exp(logits, peak)  # unnormalised, each in (0, 1]
    total = probs.sum(dim=1)  # (n,) >= 1
    lse = peak.squeeze(1) + total.log()
    return picked - lse, lse, probs.div_(total.unsqueeze(1))


def token_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    keep_budget_mb: float = 512.0,
) -> Tensor:
    """Log-probability of each label token, without the usual (N, V) logits bookkeeping.

    For each row ``i``::

        logits_i = hidden_i @ weight.T (+ bias)                      # (V,)
        logp_i   = logits_i[labels_i] - logsumexp_v(logits_i[v])     # = log_softmax(logits_i)[labels_i]

    Rows go ``chunk_size`` at a time, in float32 whatever the input dtype, through a custom
    autograd function (``_ChunkLogps``): when gradients are needed and all N x V softmax values fit
    in ``keep_budget_mb``, they are kept (computed in place over the logits, no other copy) and
    backward is one matmul per chunk; past the budget each chunk keeps nothing and backward
    recomputes its logits, so memory holds one ``(chunk_size, V)`` block at a time.

    Args:
        hidden: (N, H) final hidden states at the positions to score (already selected,
            e.g. response tokens only, shifted so that row ``i`` predicts ``labels[i]``).
        weight: (V, H) LM-head weight.
        labels: (N,) long, target token ids in ``[0, V)``; masked positions (such as -100)
            must be removed before the call.
        chunk_size: rows per chunk, >= 1.
        bias: optional (V,) LM-head bias.
        keep_budget_mb: memory allowed for softmax values kept between forward and backward.

    Returns:
        (N,) float32 log-probabilities (each <= 0). Nothing is summed or averaged here.
    """
    if (
        (hidden.dim(), weight.dim(), labels.dim()) != (2, 2, 1)
        or hidden.shape[0] != labels.shape[0]
        or hidden.shape[1] != weight.shape[1]
    ):
        raise ValueError(
            f"expected hidden (N, H), weight (V, H), labels (N,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)

    inputs = [t for t in (hidden, weight, bias) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        pieces = []
        for start in range(0, hidden.shape[0], chunk_size):
            logits = _logits(hidden[start:start + chunk_size], weight, bias)
            pieces.append(_normalise(logits, labels[start:start + chunk_size])[0])
        return torch.cat(pieces)
    keep = hidden.shape[0] * weight.shape[0] * 4 <= keep_budget_mb * 2**20
    return torch.cat([_ChunkLogps.apply(hidden[start:start + chunk_size], weight, bias,
                                        labels[start:start + chunk_size], keep)
                      for start in range(0, hidden.shape[0], chunk_size)])


# --------------------------------------------------------------------------- SFT


def _check_count(value: int | float | Tensor, name: str) -> None:
    # Tensor counts are not inspected: reading them would force a device sync each step.
    if not isinstance(value, Tensor) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def sft_loss(logps: Tensor, n_tokens: int | float | Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood per token (the usual causal-LM cross-entropy).

    ::

        loss = -sum_i logps_i / n_tokens

    With the default ``n_tokens = logps.numel()`` this equals
    ``F.cross_entropy(logits, labels, ignore_index=-100)`` over the unmasked tokens. For
    gradient accumulation pass the token count of the WHOLE optimizer step: micro-batch
    losses and gradients then sum to those of one big batch (dividing each micro-batch by
    its own count would over-weight short micro-batches).

    Args:
        logps: (N,) per-token log-probs of the target tokens (``token_logps``); summed.
        n_tokens: the denominator, > 0; defaults to ``logps.numel()``.

    Returns a scalar tensor.
    """
    if n_tokens is None:
        n_tokens = logps.numel()
    _check_count(n_tokens, "n_tokens")
    return -logps.sum() / n_tokens


# --------------------------------------------------------------------------- preference losses


def _log_ratio_margin(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    # h = log[pi(y_w) / ref(y_w)] - log[pi(y_l) / ref(y_l)], shared by DPO, IPO and hinge.
    return (pc - rc) - (pr - rr)


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    *,
    label_smoothing: float = 0.0,
) -> Tensor:
    """DPO loss (Rafailov et al. 2023, arXiv:2305.18290, eq. 7), optionally label-smoothed.

    ::

        h    = (pc - rc) - (pr - rr)
        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    ``eps = 0`` is eq. 7 exactly. ``eps > 0`` is conservative DPO (cDPO; Mitchell 2023,
    "A note on DPO with noisy preferences", a technical note not on arXiv): it treats each
    label as flipped with probability ``eps``, so the loss no longer pushes ``h`` to
    infinity. Valid range ``0 <= eps < 0.5``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            (B,) log-probs of the chosen / rejected responses, SUMMED over response tokens.
        beta: inverse temperature (strength of the implicit KL penalty), > 0.
        label_smoothing: ``eps`` above.

    Returns (B,) per-pair losses, not averaged.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h = _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """IPO loss (Azar et al. 2023, arXiv:2310.12036, eq. 17; ``beta`` is the paper's tau).

    ::

        h    = (pc - rc) - (pr - rr)
        loss = (h - 1 / (2 * beta)) ** 2

    Regresses the log-ratio margin onto ``1/(2 beta)`` instead of pushing it without bound.
    Inputs are log-probs SUMMED over response tokens, as in the paper's formula. Note: many
    implementations feed IPO token-AVERAGED log-probs instead; on sums ``h`` grows with
    response length, so a given ``beta`` (0.1 -> target 5 nats) is relatively weaker.

    Args/Returns: as ``sigmoid_loss`` (inputs (B,), output (B,) un-averaged).
    """
    h = _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """Hinge (SLiC-style) loss on the reference-normalised margin.

    ::

        h    = (pc - rc) - (pr - rr)
        loss = max(0, 1 - beta * h)

    Source: the calibration loss of SLiC-HF (Zhao et al. 2023, arXiv:2305.10425, eq. 1),
    ``max(0, delta - log pi(y_w) + log pi(y_l))``. Deviations: that margin is on raw policy
    log-probs without a reference model, and its regularising term is left out here; we use
    the reference-normalised ``h`` with ``delta = 1/beta`` (the loss equals
    ``beta * max(0, 1/beta - h)``), as RSO does (Liu et al. 2023, arXiv:2309.06657).
    Pairs with ``beta * h >= 1`` give zero loss and zero gradient.

    Args/Returns: as ``sigmoid_loss`` (inputs (B,), output (B,) un-averaged).
    """
    h = _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1.0 - beta * h)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    simpo_gamma: float = 0.5,
) -> Tensor:
    """SimPO loss (Meng et al. 2024, arXiv:2405.14734, eq. 6): reference-free, length-normalised.

    ::

        loss = -log sigmoid(beta * (pc / len_c - pr / len_r) - gamma)

    Reference log-probs are accepted for a uniform signature and ignored (may be None).
    ``gamma``, the target reward margin, enters directly as in eq. 6 (some implementations
    take ``gamma / beta`` instead). The paper's ``beta`` is 2 or more (up to 10); alignkit's
    default of 0.1 is meant for DPO, so raise beta for SimPO. An empty response counts as
    one token (its summed log-prob is 0), which avoids 0/0.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) log-probs SUMMED over response tokens.
        ref_chosen_logps, ref_rejected_logps: ignored.
        beta: reward scale, > 0.
        chosen_lengths, rejected_lengths: (B,) number of response tokens of each sequence.
        simpo_gamma: ``gamma`` above.

    Returns (B,) per-pair losses, not averaged.
    """
    chosen_avg = policy_chosen_logps / chosen_lengths.clamp_min(1)
    rejected_avg = policy_rejected_logps / rejected_lengths.clamp_min(1)
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg) - simpo_gamma)


PREFERENCE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
}
"""The valid ``loss_type`` names. Each maps to ``f(pc, pr, rc, rr, beta, **options) -> (B,)``."""


def preference_loss(
    loss_type: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss of the named type, plus the implicit rewards for logging.

    The loss is ``PREFERENCE_LOSSES[loss_type]`` (formula and paper in each function's
    docstring), called with only the options it declares. Rewards are detached::

        chosen_rewards   = beta * (pc - rc)          rejected_rewards = beta * (pr - rr)
        simpo:  chosen_rewards = beta * pc / len_c   rejected_rewards = beta * pr / len_r

    Args:
        loss_type: a key of ``PREFERENCE_LOSSES``.
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs SUMMED over response tokens.
        ref_chosen_logps, ref_rejected_logps: (B,) reference log-probs, summed the same way;
            None is allowed only for the reference-free ``simpo``.
        beta: > 0.
        chosen_lengths, rejected_lengths: (B,) response token counts; required by ``simpo``.
        label_smoothing: cDPO ``eps``, only for ``sigmoid``.
        simpo_gamma: SimPO target margin, only for ``simpo``.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,), none averaged.

    Raises:
        ValueError: unknown ``loss_type`` (the message lists the valid names), missing reference
            log-probs or lengths, mismatched shapes, ``beta <= 0``, or ``label_smoothing`` for a
            loss other than ``sigmoid``.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(
            f"unknown preference loss {loss_type!r}; valid names: {', '.join(sorted(PREFERENCE_LOSSES))}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the 'sigmoid' loss only, not {loss_type!r}")
    reference_free = loss_type == "simpo"
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss {loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    if loss_type == "simpo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("loss 'simpo' needs chosen_lengths and rejected_lengths (response token counts)")

    pairs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = [tuple(t.shape) for t in (*pairs, chosen_lengths, rejected_lengths) if t is not None]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1:
        raise ValueError(f"inputs must all have one shape (B,); got shapes {shapes}")

    loss_fn = PREFERENCE_LOSSES[loss_type]
    options = dict(
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        simpo_gamma=simpo_gamma,
    )
    accepted = inspect.signature(loss_fn).parameters
    losses = loss_fn(*pairs, beta, **{k: v for k, v in options.items() if k in accepted})

    with torch.no_grad():
        if reference_free:
            chosen_rewards = beta * policy_chosen_logps / chosen_lengths.clamp_min(1)
            rejected_rewards = beta * policy_rejected_logps / rejected_lengths.clamp_min(1)
        else:
            chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
            rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    return losses, chosen_rewards, rejected_rewards


# --------------------------------------------------------------------------- DPO + NLL


def dpo_nll_loss(
    pref_losses: Tensor,
    chosen_logps_sum: Tensor,
    chosen_token_count: int | Tensor,
    nll_alpha: float,
    n_pairs: int | Tensor | None = None,
    n_tokens: int | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Preference loss plus ``alpha`` times the per-token NLL of the chosen responses.

    ::

        dpo_term = sum_b pref_losses_b / n_pairs
        nll_term = -sum_b chosen_logps_sum_b / n_tokens
        loss     = dpo_term + nll_alpha * nll_term

    By default ``n_pairs = B`` and ``n_tokens = chosen_token_count``: means over this batch.
    For gradient accumulation pass the pair and chosen-token counts of the WHOLE optimizer
    step: the micro-batch losses (their gradients, ``dpo_term`` and ``nll_term`` too) then
    sum to those of one large batch. ``nll_alpha = 0`` is plain preference optimisation.

    Source: DPO+NLL of Iterative RPO (Pang et al. 2024, arXiv:2404.19733, eq. 3), which adds
    ``alpha * L_NLL``, ``L_NLL = -log M(y_w | x) / |y_w|``, to the DPO loss. Deviation: eq. 3
    divides each pair's NLL by that pair's length, then averages over pairs; we divide the
    summed chosen log-probs by the total chosen-token count (every token weighs the same,
    as in ``sft_loss``), which is what makes accumulation exact. Only chosen RESPONSE
    tokens count, not the prompt.

    Args:
        pref_losses: (B,) un-averaged per-pair losses from ``preference_loss``.
        chosen_logps_sum: (B,) policy log-probs of the chosen responses, SUMMED over tokens.
        chosen_token_count: chosen response tokens in this batch (int, scalar tensor, or (B,)
            per-pair counts, which are summed).
        nll_alpha: weight of the NLL term, >= 0.
        n_pairs: pair count of the whole optimizer step, > 0 (default: B).
        n_tokens: chosen-token count of the whole optimizer step, > 0 (default:
            ``chosen_token_count``).

    Returns ``(loss, dpo_term, nll_term)``, scalars; only ``loss`` carries gradient (the two
    terms are detached, for logging).
    """
    if nll_alpha < 0:
        raise ValueError(f"nll_alpha must be >= 0, got {nll_alpha}")
    if n_pairs is None:
        n_pairs = pref_losses.numel()
    if n_tokens is None:
        n_tokens = chosen_token_count.sum() if isinstance(chosen_token_count, Tensor) else chosen_token_count
    _check_count(n_pairs, "n_pairs")

    dpo_term = pref_losses.sum() / n_pairs
    nll_term = sft_loss(chosen_logps_sum, n_tokens)
    # alpha 0 keeps the NLL out of the loss's graph: no extra backward, and no 0 * inf = NaN.
    loss = dpo_term + nll_alpha * nll_term if nll_alpha != 0 else dpo_term
    return loss, dpo_term.detach(), nll_term.detach()
