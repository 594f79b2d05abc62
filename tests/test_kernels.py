"""oneDNN's products: the same numbers as torch's default ones, forward and backward, chosen by measurement."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

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


_GROWTH = """
import os, sys
import torch
from alignkit import kernels
torch.set_num_threads(1)
weight = torch.randn(512, 256)
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
kernels.onednn_product(torch.randn(300, 256), weight)
start = resident_mb()
for rows in range(300, 300 + 4 * 200, 4):  # 200 row counts, as packed batches bring
    x = torch.randn(rows, 256)
    y = kernels.onednn_product(x, weight)
    kernels.onednn_product(y.t(), x.t())  # a weight gradient's product
print(os.environ["LRU_CACHE_CAPACITY"], os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], resident_mb() - start)
"""


@pytest.mark.skipif(not onednn_available() or not sys.platform.startswith("linux"), reason="oneDNN on Linux")
def test_importing_alignkit_bounds_onednns_kernel_caches():
    def grown(**environment) -> tuple[str, str, float]:
        env = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
        done = subprocess.run([sys.executable, "-c", _GROWTH], env={**env, **environment}, capture_output=True,
                              text=True, check=True)
        lru, primitives, megabytes = done.stdout.split()
        return lru, primitives, float(megabytes)

    lru, primitives, bounded = grown()
    assert (lru, primitives) == (str(kernels.KERNEL_CACHE_CAPACITY),) * 2
    # a user's own setting stands: oneDNN's and torch's default of 1,024 kept entries
    lru, primitives, unbounded = grown(LRU_CACHE_CAPACITY="1024", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024")
    assert (lru, primitives) == ("1024", "1024")
    assert unbounded > 200 and bounded < 0.6 * unbounded, (bounded, unbounded)   # 245-255 MB unbounded, 70 bounded
