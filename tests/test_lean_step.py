"""The lean step's products: weights packed once for the CPU's matrix library."""

from __future__ import annotations

import pytest
import torch

from alignkit import lean_step
from alignkit.lean_step import PACKED_FROM_ROWS, Product, weight_packing

packing = pytest.mark.skipif(not weight_packing(), reason="this build of torch cannot pack weights for MKL")


@packing
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_products_equal_the_plain_ones_for_any_row_count(with_bias):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(70, 48, generator=generator)
    bias = torch.randn(70, generator=generator) if with_bias else None
    product = Product(weight, bias, pack_rows=16)   # packed for 16 rows, used for every count
    assert product.packed is not None
    for rows in (1, 2, 3, 4, 5, 16, 17, 130):
        x = torch.randn(rows, 48, generator=generator)
        residual = torch.randn(rows, 70, generator=generator)
        expected = x.double() @ weight.double().t() + (bias.double() if with_bias else 0)
        torch.testing.assert_close(product(x).double(), expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(product(x, residual).double(), expected + residual.double(), rtol=1e-5, atol=1e-4)
    assert torch.equal(weight, torch.randn(70, 48, generator=torch.Generator().manual_seed(0)))   # not written


@packing
def test_weights_are_packed_only_where_it_helps():
    weight = torch.randn(8, 4)
    assert Product(weight, pack_rows=PACKED_FROM_ROWS).packed is not None
    assert Product(weight, pack_rows=PACKED_FROM_ROWS - 1).packed is None   # few rows: streamed as it is
    assert Product(weight).packed is None
    assert Product(weight.double(), pack_rows=8).packed is None             # MKL's packed product is float32


@packing
def test_no_packed_copy_without_memory_for_it(monkeypatch, make_model):
    import psutil

    class Scarce:
        available = 1000
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Scarce())
    lean = lean_step.LeanStep.for_model(make_model(), pack_rows=32)
    assert lean is not None and lean.head.packed is None
    assert all(product.packed is None for layer in lean.layers for product in layer if isinstance(product, Product))
