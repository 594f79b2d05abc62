"""The lean step's parts: products with weights packed once for the CPU's matrix library, the prompts'
attention mask, the rows that stay in a batch, drafts by prompt lookup."""

from __future__ import annotations

import pytest
import torch
from conftest import check_timed_choice

from alignkit import kernels, lean_step
from alignkit.lean_step import (
    PACKED_FROM_ROWS,
    Product,
    PromptLookup,
    adapter_segments,
    prompt_mask,
    staying_rows,
    weight_packing,
)

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
def test_weights_are_packed_only_where_packed_products_measure_faster(monkeypatch):
    check_timed_choice(monkeypatch, lean_step, lean_step._packing_pays.__wrapped__, "_plain_product", "_packed_product")
    packed = lean_step._packed_product
    x, weight = torch.randn(5, 32), torch.randn(64, 32)   # both compute the product
    torch.testing.assert_close(packed(x, weight, torch.ops.mkl._mkl_reorder_linear_weight(weight, 32)), x @ weight.t())


@packing
@pytest.mark.parametrize("pays", [False, True])
def test_the_lean_step_packs_its_weights_where_that_measured_faster(monkeypatch, make_model, pays):
    shapes = []
    monkeypatch.setenv("ALIGNKIT_ONEDNN", "0")   # MKL's products: packing is its choice to make
    monkeypatch.setattr(lean_step, "packing_pays", lambda *shape: shapes.append(shape) or pays)
    model = make_model()
    lean = lean_step.LeanStep.for_model(model, pack_rows=32)
    assert shapes == [tuple(model.model.layers[0].mlp.gate_proj.weight.shape)]   # measured on the MLP's shape
    products = [lean.head] + [p for layer in lean.layers for p in layer if isinstance(p, Product)]
    assert len(products) == 1 + 5 * len(model.model.layers)
    assert all((p.packed is not None) == pays for p in products)
    few = lean_step.LeanStep.for_model(model, pack_rows=PACKED_FROM_ROWS - 1)   # few rows: never packed
    assert few.head.packed is None


@packing
def test_no_packed_copy_without_memory_for_it(monkeypatch, make_model):
    import psutil

    class Scarce:
        available = 1000
    monkeypatch.setenv("ALIGNKIT_ONEDNN", "0")
    monkeypatch.setattr(lean_step, "packing_pays", lambda *shape: True)   # faster, but no room for the copy
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Scarce())
    lean = lean_step.LeanStep.for_model(make_model(), pack_rows=32)
    assert lean is not None and lean.head.packed is None
    assert all(product.packed is None for layer in lean.layers for product in layer if isinstance(product, Product))


def test_a_prompt_sees_its_own_real_tokens_up_to_itself():
    got = prompt_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert got.shape == (2, 1, 4, 4)
    assert got[0, 0].int().tolist() == [[1, 0, 0, 0],    # padding sees only itself
                                         [0, 1, 0, 0],
                                         [0, 0, 1, 0],    # real tokens never see the padding
                                         [0, 0, 1, 1]]
    assert got[1, 0].int().tolist() == torch.ones(4, 4).tril().int().tolist()


@pytest.mark.parametrize("ended, groups, order", [
    ([False, True, False, False], [0, 0, 0, 0], [0, 3, 2]),              # the last row fills the gap
    ([True, False, False, False], [0, 0, 0, 0], [3, 1, 2]),
    ([False, False, False, True], [0, 0, 0, 0], [0, 1, 2]),              # nothing moves
    ([False, True, False, False, False, False], [0, 0, 0, 1, 1, 2], [0, 2, 4, 3, 5]),
    ([True, True, False, True, False, False], [0, 0, 1, 1, 1, 2], [2, 4, 5]),
    ([True, True], [0, 1], []),
])
def test_rows_that_stay_keep_their_place_and_their_adapter_groups(ended, groups, order):
    got = staying_rows(ended, groups)
    assert got == order
    assert sorted(got) == [i for i, end in enumerate(ended) if not end]
    new_groups = [groups[i] for i in got]
    assert new_groups == sorted(new_groups)   # each adapter's rows one slice, in the same order
    assert len(adapter_segments(new_groups)) == len(set(new_groups))


def test_prompt_lookup_drafts_what_followed_the_longest_latest_match():
    text = PromptLookup([5, 1, 2, 7, 8, 6, 2, 9, 4])
    assert text.draft(3) == []                     # 4 was not seen before
    text.extend([1, 2])
    assert text.draft(2) == [7, 8]                 # "1 2" was followed by 7 8 (a bare "2" last by 9)
    text.extend([3])
    assert text.draft(5) == [] and text.draft(0) == []
    text.extend([6, 2])
    assert text.draft(2) == [9, 4]                 # "6 2" -> 9 4
    text = PromptLookup([3, 3, 3])
    assert text.draft(4) == [3]                    # only what exists after the match


@pytest.mark.parametrize("rows", [1, 6, 300])
def test_the_lean_norm_is_transformers_rms_norm(rows, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(rows)
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(48, generator=generator))
        x = 4 * torch.randn(rows, 48, generator=generator)
        expected = norm(x)
        torch.testing.assert_close(lean_step._rms_norm(x, norm.weight, 1e-5), expected, rtol=1e-6, atol=1e-6)
        monkeypatch.setattr(lean_step, "_TORCH_RMS_NORM", None)   # a torch without rms_norm
        torch.testing.assert_close(lean_step._rms_norm(x, norm.weight, 1e-5), expected, rtol=1e-6, atol=1e-6)


def test_products_through_onednn_need_no_packed_copy(monkeypatch, make_model):
    monkeypatch.setenv("ALIGNKIT_ONEDNN", "1")
    monkeypatch.setattr(lean_step, "packing_pays", lambda *shape: True)   # packing would pay, were it MKL's
    lean = lean_step.LeanStep.for_model(make_model(), pack_rows=32)
    products = [lean.head] + [p for layer in lean.layers for p in layer if isinstance(p, Product)]
    assert all(p.onednn and p.packed is None for p in products) == kernels.onednn_available()
