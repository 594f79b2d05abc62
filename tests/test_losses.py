"""Tests for alignkit.losses: each loss against its formula, worked by hand.

Expected values are computed with the ``math`` module from the numbers in each docstring,
never with the code under test, so a wrong sign, scale or denominator fails.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from alignkit.losses import (
    PREFERENCE_LOSSES,
    dpo_nll_loss,
    preference_loss,
    sft_loss,
    token_logps,
)


def softplus(x: float) -> float:
    """-log(sigmoid(-x)) = log(1 + e^x), written out with math."""
    return math.log1p(math.exp(x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# Three pairs shared by the reference-based losses (pc, pr, rc, rr = policy/reference,
# chosen/rejected, summed log-probs), with h = (pc - rc) - (pr - rr):
#   pair 1: pc=-1, pr=-3, rc=-2, rr=-2  ->  h = (1) - (-1) =  2   policy prefers chosen
#   pair 2: pc=-4, pr=-2, rc=-3, rr=-3  ->  h = (-1) - (1) = -2   policy prefers rejected
#   pair 3: pc=-5, pr=-5, rc=-5, rr=-5  ->  h = 0                 policy equals reference
PC, PR, RC, RR = t(-1.0, -4.0, -5.0), t(-3.0, -2.0, -5.0), t(-2.0, -3.0, -5.0), t(-2.0, -3.0, -5.0)


# --------------------------------------------------------------------------- registry


def test_registry_holds_exactly_the_documented_losses():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo", "hinge", "simpo"}


def test_unknown_loss_type_lists_the_valid_names():
    with pytest.raises(ValueError) as excinfo:
        preference_loss("dpo", PC, PR, RC, RR, beta=0.1)
    for name in PREFERENCE_LOSSES:
        assert name in str(excinfo.value)
    assert "'dpo'" in str(excinfo.value)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_reference_losses_need_reference_logps(loss_type):
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss(loss_type, PC, PR, None, None, beta=0.1)


def test_simpo_needs_lengths():
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss("simpo", PC, PR, None, None, beta=2.0)


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="sigmoid"):
        preference_loss("ipo", PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        preference_loss("sigmoid", PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        preference_loss("sigmoid", PC, PR[:2], RC, RR, beta=0.1)


# --------------------------------------------------------------------------- preference losses


def test_sigmoid_loss_by_hand():
    """DPO, beta = 0.1; loss = -log sigmoid(beta * h) = log(1 + e^(-beta * h)).

    pair 1: h =  2 -> beta*h =  0.2 -> log(1 + e^-0.2) = 0.598139
    pair 2: h = -2 -> beta*h = -0.2 -> log(1 + e^0.2)  = 0.798139  (= 0.598139 + 0.2)
    pair 3: h =  0 -> log 2                             = 0.693147
    rewards: chosen   = 0.1 * (pc - rc) = 0.1 * ( 1, -1, 0) = ( 0.1, -0.1, 0)
             rejected = 0.1 * (pr - rr) = 0.1 * (-1,  1, 0) = (-0.1,  0.1, 0)
    """
    losses, chosen_rewards, rejected_rewards = preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1)
    expected = t(softplus(-0.2), softplus(0.2), math.log(2.0))
    assert_close(losses, expected)
    assert_close(losses, t(0.598139, 0.798139, 0.693147), atol=1e-6, rtol=0)
    assert_close(chosen_rewards, t(0.1, -0.1, 0.0))
    assert_close(rejected_rewards, t(-0.1, 0.1, 0.0))


def test_sigmoid_label_smoothing_by_hand():
    """cDPO, beta = 0.1, eps = 0.1; loss = 0.9 * softplus(-beta*h) + 0.1 * softplus(beta*h).

    Since softplus(x) = softplus(-x) + x, for pair 1 (beta*h = 0.2):
        0.9 * 0.598139 + 0.1 * 0.798139 = 0.598139 + 0.1 * 0.2 = 0.618139
    pair 2 (beta*h = -0.2): 0.9 * 0.798139 + 0.1 * 0.598139 = 0.778139
    pair 3 (beta*h = 0):    log 2 = 0.693147 (smoothing does not move the midpoint)
    """
    losses, _, _ = preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    expected = t(
        0.9 * softplus(-0.2) + 0.1 * softplus(0.2),
        0.9 * softplus(0.2) + 0.1 * softplus(-0.2),
        math.log(2.0),
    )
    assert_close(losses, expected)
    assert_close(losses, t(0.618139, 0.778139, 0.693147), atol=1e-6, rtol=0)


def test_sigmoid_gradient_by_hand():
    """d/d pc of -log sigmoid(beta*h) = -beta * sigmoid(-beta*h); d/d pr is its negative.

    pair 1 (beta*h = 0.2): -0.1 * sigmoid(-0.2) = -0.1 / (1 + e^0.2) = -0.0450166
    The reference log-probs get the opposite gradients; rewards carry none at all.
    """
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    rc, rr = RC.clone().requires_grad_(), RR.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = preference_loss("sigmoid", pc, pr, rc, rr, beta=0.1)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses[0].backward()
    g = -0.1 / (1.0 + math.exp(0.2))
    assert_close(pc.grad, t(g, 0.0, 0.0))
    assert_close(pr.grad, t(-g, 0.0, 0.0))
    assert_close(rc.grad, t(-g, 0.0, 0.0))
    assert_close(rr.grad, t(g, 0.0, 0.0))


def test_ipo_loss_by_hand():
    """IPO, beta = 0.25: target margin 1 / (2 * 0.25) = 2; loss = (h - 2)^2.

    pair 1: h =  2 -> (2 - 2)^2  = 0   (already at the target: no push beyond it)
    pair 2: h = -2 -> (-2 - 2)^2 = 16
    pair 3: h =  0 -> (0 - 2)^2  = 4
    """
    losses, chosen_rewards, _ = preference_loss("ipo", PC, PR, RC, RR, beta=0.25)
    target = 1.0 / (2.0 * 0.25)
    assert_close(losses, t((2.0 - target) ** 2, (-2.0 - target) ** 2, (0.0 - target) ** 2))
    assert_close(losses, t(0.0, 16.0, 4.0))
    assert_close(chosen_rewards, t(0.25, -0.25, 0.0))


def test_hinge_loss_by_hand():
    """Hinge, beta = 0.1; loss = max(0, 1 - beta * h).

    pair 1: pc=-1, pr=-3,  rc=-2, rr=-2 -> h =  2 -> max(0, 1 - 0.2) = 0.8
    pair 2: pc=-4, pr=-2,  rc=-3, rr=-3 -> h = -2 -> max(0, 1 + 0.2) = 1.2
    pair 3: pc=-1, pr=-21, rc=-1, rr=-1 -> h = 0 - (-20) = 20 -> max(0, 1 - 2) = 0,
            and past the margin the gradient is 0 as well.
    """
    pc = t(-1.0, -4.0, -1.0).requires_grad_()
    pr, rc, rr = t(-3.0, -2.0, -21.0), t(-2.0, -3.0, -1.0), t(-2.0, -3.0, -1.0)
    losses, _, rejected_rewards = preference_loss("hinge", pc, pr, rc, rr, beta=0.1)
    assert_close(losses, t(max(0.0, 1 - 0.1 * 2), max(0.0, 1 + 0.1 * 2), max(0.0, 1 - 0.1 * 20)))
    assert_close(losses, t(0.8, 1.2, 0.0))
    assert_close(rejected_rewards, t(-0.1, 0.1, -2.0))
    losses.sum().backward()
    assert_close(pc.grad, t(-0.1, -0.1, 0.0))


def test_simpo_loss_by_hand():
    """SimPO, beta = 2, gamma = 0.5; loss = log(1 + e^-(beta * (pc/lc - pr/lr) - gamma)).

    pair 1: pc=-6 over 3 tokens = -2, pr=-8 over 2 = -4:  2 * ( 2) - 0.5 =  3.5 -> 0.029750
    pair 2: pc=-10 over 5 = -2,       pr=-3 over 3 = -1:  2 * (-1) - 0.5 = -2.5 -> 2.578890
    pair 3: pc=-4 over 4 = -1,        pr=-5 over 5 = -1:  2 * ( 0) - 0.5 = -0.5 -> 0.974077
    rewards: chosen = 2 * pc/lc = (-4, -4, -2); rejected = 2 * pr/lr = (-8, -2, -2).
    Reference log-probs play no part: passing None or arbitrary values gives the same loss.
    """
    pc, pr = t(-6.0, -10.0, -4.0), t(-8.0, -3.0, -5.0)
    lc, lr = torch.tensor([3, 5, 4]), torch.tensor([2, 3, 5])
    losses, chosen_rewards, rejected_rewards = preference_loss(
        "simpo", pc, pr, None, None, beta=2.0, chosen_lengths=lc, rejected_lengths=lr, simpo_gamma=0.5
    )
    assert_close(losses, t(softplus(-3.5), softplus(2.5), softplus(0.5)))
    assert_close(losses, t(0.029750, 2.578890, 0.974077), atol=1e-6, rtol=0)
    assert_close(chosen_rewards, t(-4.0, -4.0, -2.0))
    assert_close(rejected_rewards, t(-8.0, -2.0, -2.0))

    refs = (t(9.0, 9.0, 9.0), t(-9.0, -9.0, -9.0))
    with_refs, _, _ = preference_loss(
        "simpo", pc, pr, *refs, beta=2.0, chosen_lengths=lc, rejected_lengths=lr
    )
    assert_close(with_refs, losses)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_rewards_are_detached_beta_times_log_ratio(loss_type):
    torch.manual_seed(0)
    pc, pr = (torch.randn(5) * 3).requires_grad_(), (torch.randn(5) * 3).requires_grad_()
    rc, rr = torch.randn(5) * 3, torch.randn(5) * 3
    losses, chosen_rewards, rejected_rewards = preference_loss(loss_type, pc, pr, rc, rr, beta=0.3)
    assert losses.shape == (5,) and losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    assert_close(chosen_rewards, 0.3 * (pc.detach() - rc))
    assert_close(rejected_rewards, 0.3 * (pr.detach() - rr))


# --------------------------------------------------------------------------- DPO + NLL


def test_dpo_nll_loss_by_hand():
    """Two pairs: DPO losses 0.598139 and 0.798139 (pairs 1 and 2 above), mean 0.698139.

    Chosen responses: summed log-probs -6 over 2 tokens and -2 over 6 tokens.
    NLL = -(-6 + -2) / (2 + 6) = 8 / 8 = 1.0 per token
          (the per-pair mean of the paper would be (3 + 1/3) / 2 = 1.667: not what we do).
    alpha = 0.5 -> loss = 0.698139 + 0.5 * 1.0 = 1.198139
    """
    pref = t(softplus(-0.2), softplus(0.2))
    loss, dpo_term, nll_term = dpo_nll_loss(pref, t(-6.0, -2.0), torch.tensor([2, 6]), nll_alpha=0.5)
    dpo_mean = (softplus(-0.2) + softplus(0.2)) / 2
    assert_close(dpo_term, torch.tensor(dpo_mean))
    assert_close(nll_term, torch.tensor(1.0))
    assert_close(loss, torch.tensor(dpo_mean + 0.5 * 1.0))
    assert_close(loss, torch.tensor(1.198139), atol=1e-6, rtol=0)


def test_nll_alpha_zero_is_plain_dpo():
    """alpha = 0: loss = mean of the three DPO losses; the NLL is reported but adds no gradient.

    NLL over 9 chosen tokens: -(-1 - 4 - 5) / 9 = 10/9.
    d loss / d pc_b = -beta * sigmoid(-beta * h_b) / 3, with beta * h = (0.2, -0.2, 0):
        (-0.1 / (1 + e^0.2), -0.1 / (1 + e^-0.2), -0.1 / 2) / 3
    """
    pc, pr = t(-1.0, -4.0, -5.0).requires_grad_(), PR.clone().requires_grad_()
    losses, _, _ = preference_loss("sigmoid", pc, pr, RC, RR, beta=0.1)
    loss, dpo_term, nll_term = dpo_nll_loss(losses, pc, 9, nll_alpha=0.0)
    assert_close(loss, losses.mean())
    assert_close(nll_term, torch.tensor(10.0 / 9.0))
    loss.backward()
    assert_close(pc.grad, t(-0.1 / (1.0 + math.exp(0.2)), -0.1 / (1.0 + math.exp(-0.2)), -0.1 / 2) / 3)


def test_dpo_nll_accumulation_matches_one_batch():
    """Micro-batches of 3 and 1 pairs, divided by the whole step's counts, sum to the batch of 4."""
    torch.manual_seed(0)
    policy = torch.randn(2, 4, requires_grad=True)
    ref = torch.randn(2, 4)
    counts = torch.tensor([3, 7, 2, 5])

    def step(idx, n_pairs=None, n_tokens=None):
        pc, pr = policy[0, idx] * 4, policy[1, idx] * 4
        losses, _, _ = preference_loss("sigmoid", pc, pr, ref[0, idx], ref[1, idx], beta=0.1)
        return dpo_nll_loss(losses, pc, counts[idx], nll_alpha=1.0, n_pairs=n_pairs, n_tokens=n_tokens)

    full = step(torch.arange(4))
    full[0].backward()
    full_grad, policy.grad = policy.grad.clone(), None

    parts = [step(idx, n_pairs=4, n_tokens=int(counts.sum())) for idx in (torch.arange(3), torch.tensor([3]))]
    for part in parts:
        part[0].backward()
    for i in range(3):
        assert_close(parts[0][i] + parts[1][i], full[i])
    assert_close(policy.grad, full_grad)


# --------------------------------------------------------------------------- SFT


def test_sft_loss_equals_cross_entropy_with_ignore_index():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :2] = -100  # a masked prompt
    labels[1, 4:] = -100  # padding
    keep = labels != -100
    logps = logits.log_softmax(-1)[keep].gather(1, labels[keep].unsqueeze(1)).squeeze(1)
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert_close(sft_loss(logps), expected)
    assert_close(sft_loss(logps, n_tokens=int(keep.sum()) * 2), expected / 2)


def test_sft_loss_by_hand_and_accumulation():
    """logps (-1, -2, -3) and (-6): one batch -> 12 / 4 = 3.0 per token.

    Split into micro-batches over the whole step's 4 tokens: 6/4 + 6/4 = 3.0, whereas
    per-micro-batch means would give 6/3 + 6/1 = 8.0 (wrong, hence n_tokens).
    """
    assert_close(sft_loss(t(-1.0, -2.0, -3.0, -6.0)), torch.tensor(3.0))
    parts = sft_loss(t(-1.0, -2.0, -3.0), n_tokens=4) + sft_loss(t(-6.0), n_tokens=4)
    assert_close(parts, torch.tensor(3.0))
    with pytest.raises(ValueError, match="n_tokens"):
        sft_loss(t(), n_tokens=0)


# --------------------------------------------------------------------------- token log-probs


def _reference_logps(hidden, weight, labels, bias=None):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return logits.log_softmax(-1)[torch.arange(len(labels)), labels]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("keep_budget_mb", [256.0, 0.0])   # softmax kept / recomputed in backward
def test_token_logps_matches_log_softmax_values_and_gradients(chunk_size, with_bias, keep_budget_mb):
    torch.manual_seed(0)
    n, h, v = 7, 5, 13
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    bias = torch.randn(v, requires_grad=True) if with_bias else None
    labels = torch.randint(0, v, (n,))
    upstream = torch.randn(n)  # a non-uniform upstream gradient catches row mix-ups

    params = [x for x in (hidden, weight, bias) if x is not None]

    ours = token_logps(hidden, weight, labels, chunk_size=chunk_size, bias=bias, keep_budget_mb=keep_budget_mb)
    grads = torch.autograd.grad((ours * upstream).sum(), params)
    ref = _reference_logps(hidden, weight, labels, bias)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)

    assert ours.shape == (n,) and ours.dtype == torch.float32
    assert (ours <= 0).all()
    assert_close(ours, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        assert_close(got, want)


@pytest.mark.parametrize("keep_budget_mb", [256.0, 0.0])
def test_token_logps_exact_for_logits_far_below_the_max(keep_budget_mb):
    """Spreads of hundreds of nats (exp() underflows to 0 there): labels far below the max still get
    their exact log-prob, the no-grad path agrees, and gradients match log_softmax's."""
    torch.manual_seed(0)
    n, h, v = 6, 4, 11
    hidden = torch.randn(n, h, dtype=torch.float64).mul(60).float().requires_grad_()
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    ref = _reference_logps(hidden, weight, labels)
    assert ref.min() < -200  # some labels sit far below their row's max
    ours = token_logps(hidden, weight, labels, keep_budget_mb=keep_budget_mb)
    assert_close(ours, ref, rtol=1e-6, atol=1e-4)
    with torch.no_grad():
        assert_close(token_logps(hidden, weight, labels), ref.detach(), rtol=1e-6, atol=1e-4)
    upstream = torch.randn(n)
    for got, want in zip(torch.autograd.grad((ours * upstream).sum(), [hidden, weight]),
                         torch.autograd.grad((ref * upstream).sum(), [hidden, weight]), strict=True):
        assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_token_logps_does_not_keep_logits_for_backward():
    """Past the budget only chunk inputs are saved; within it, the in-place softmax and nothing more."""
    torch.manual_seed(0)
    n, h, v = 10, 4, 97
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (n,))

    def saved_shapes(fn):
        shapes = []

        def pack(x):
            shapes.append(tuple(x.shape))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn()
        return shapes

    def holds_logits(shapes):
        return any(len(s) == 2 and s[1] == v for s in shapes)

    assert holds_logits(saved_shapes(lambda: _reference_logps(hidden, weight, labels)))  # the check bites
    # past the memory budget nothing (N, V)-shaped is kept: backward recomputes each chunk
    assert not holds_logits(saved_shapes(lambda: token_logps(hidden, weight, labels, chunk_size=4,
                                                             keep_budget_mb=0)))
    # within the budget only the softmax is kept, one block per chunk (no separate logits copy)
    kept = [s for s in saved_shapes(lambda: token_logps(hidden, weight, labels, chunk_size=4)) if s[-1:] == (v,)]
    assert kept == [(4, v), (4, v), (2, v)]


def test_token_logps_upcasts_low_precision_and_skips_checkpoint_without_grad():
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 8).bfloat16(), torch.randn(20, 8).bfloat16()
    labels = torch.randint(0, 20, (6,))
    with torch.no_grad():
        ours = token_logps(hidden, weight, labels, chunk_size=4)
    assert ours.dtype == torch.float32 and ours.grad_fn is None
    assert_close(ours, _reference_logps(hidden.float(), weight.float(), labels))
    assert token_logps(hidden[:0], weight, labels[:0]).shape == (0,)
    with pytest.raises(ValueError):
        token_logps(hidden, weight, labels[:3])
