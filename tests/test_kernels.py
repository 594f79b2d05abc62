"""oneDNN's products: the same numbers as torch's default ones, forward and backward, chosen by measurement."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import check_timed_choice, with_lora
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from alignkit import kernels
from alignkit.kernels import linear, matmul_t, onednn_available, use_fast_linears, uses_fast_linear

onednn = pytest.mark.skipif(not onednn_available(), reason="this build of torch has no oneDNN linear product")


@onednn
@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24)])
@pytest.mark.parametrize("trained_weight", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_onednn_linear_and_its_gradients_equal_torchs(shape, trained_weight, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator, requires_grad=True)
    weight = torch.randn(40, 24, generator=generator, requires_grad=trained_weight)
    bias = torch.randn(40, generator=generator, requires_grad=True) if with_bias else None
    grad = torch.randn(*shape[:-1], 40, generator=generator)
    leaves = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    got = linear(x, weight, bias)
    got_grads = torch.autograd.grad(got, leaves, grad)
    want = torch.nn.functional.linear(x, weight, bias)
    want_grads = torch.autograd.grad(want, leaves, grad)
    assert got.grad_fn is not None and "_Linear" in type(got.grad_fn).__name__   # oneDNN's, not F.linear's
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matmul_t(x.detach(), weight.detach()), want.detach() - (bias if with_bias else 0),
                               rtol=1e-5, atol=1e-5)


@onednn
def test_flop_counts_include_onednn_products():
    x, weight = torch.randn(6, 24), torch.randn(40, 24)
    with FlopCounterMode(display=False) as counter:
        kernels.onednn_product(x, weight)
    assert counter.get_total_flops() == 2 * 6 * 24 * 40


@onednn
def test_onednn_is_chosen_only_where_it_measures_faster(monkeypatch):
    check_timed_choice(monkeypatch, kernels, kernels._onednn_pays.__wrapped__, "_default_product", "onednn_product")
    monkeypatch.setenv("ALIGNKIT_ONEDNN", "0")   # the user's choice overrides the measurement
    assert kernels.onednn_pays(64, 32) is False
    monkeypatch.setenv("ALIGNKIT_ONEDNN", "1")
    assert kernels.onednn_pays(64, 32) is True


@onednn
def test_a_model_with_fast_linears_computes_and_trains_the_same(make_model, tokenizer, monkeypatch):
    ids = torch.tensor([tokenizer("a short text to score").input_ids])
    plain = with_lora(make_model())
    fast = copy.deepcopy(plain)
    monkeypatch.setenv("ALIGNKIT_ONEDNN", "1")
    linears = [m for m in fast.modules() if type(m) is nn.Linear]
    assert use_fast_linears(fast) == len(linears) > 0
    assert all(uses_fast_linear(m) for m in linears)   # still nn.Linear: PEFT and the lean step see the same layers
    results = []
    for model in (plain, fast):
        loss = model(input_ids=ids, labels=ids).loss
        trained = [p for n, p in model.named_parameters() if p.requires_grad]
        results.append((loss, torch.autograd.grad(loss, trained)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    twin = copy.deepcopy(fast)   # a copy's layers compute with their own weights
    layer = next(m for m in twin.modules() if type(m) is nn.Linear)
    assert uses_fast_linear(layer) and layer.forward.__self__ is layer


def test_no_layer_changes_where_onednn_does_not_pay(make_model, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_ONEDNN", "0")
    model = make_model()
    assert use_fast_linears(model) == 0
    assert not any(uses_fast_linear(m) for m in model.modules())
