"""Matrix products through oneDNN where that measures faster than torch's default (MKL) on this CPU.

torch multiplies float32 matrices on x86 CPUs with Intel's MKL, which on AMD processors runs far below
the machine: on a 2-core AMD EPYC with AVX-512 it reached ~170 GFLOP/s where oneDNN, which torch ships
as well, reached ~370-390 on the same products (the embedded model's (1536, 576) weight at 256-2,048
rows; 2.2-2.7x at 1-30 rows). :func:`onednn_pays` measures the two on a weight shape once per process;
:func:`linear` is ``F.linear`` through oneDNN, forward and backward; :func:`use_fast_linears` makes a
model's linear layers use it where it pays. On a CPU where MKL is as fast (Intel), nothing changes.
The results differ from MKL's in the last bits (~1e-6 relative), as any two float32 kernels do.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import statistics
import time
import types

import torch
from torch import nn

from . import KERNEL_CACHE_CAPACITY  # noqa: F401 - set in the environment by the package's import

ONEDNN_GAIN = 1.1
"""How many times faster oneDNN's products must measure than torch's default ones on this machine
before they are used (:func:`onednn_pays`)."""

_ONEDNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if hasattr(torch.ops, "mkldnn") else None


def _register_flops() -> None:
    """Teach ``torch.utils.flop_counter`` oneDNN's linear product (2 x rows x in x out), so FLOP counts
    (``FlopCounterMode``, the throughput benchmark's utilisation) include the products it computes."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(_ONEDNN)
    def _flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape) * w_shape[0]


if _ONEDNN is not None:
    _register_flops()


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` by oneDNN, without autograd (``x`` (..., in) float32 on the CPU,
    ``weight`` (out, in), any strides); only where :func:`onednn_available`."""
    return _ONEDNN(x, weight, bias, "none", [], "")


def onednn_product_with(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor, op: str,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(x @ weight.T (+ bias)) + other`` (``op="add"``) or ``* other`` (``op="mul"``) by oneDNN in one call,
    ``other`` of the product's shape: the same numbers as the product and a separate addition or
    multiplication, bit for bit, one operation fewer. Only where :func:`onednn_available`."""
    return _ONEDNN.binary(x, other, weight, bias, op)


def _default_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


@functools.cache
def onednn_available() -> bool:
    """Whether this build of torch has oneDNN's float32 linear product and it computes ``x @ w.T``."""
    if _ONEDNN is None or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(24, 40, generator=generator), torch.randn(7, 40, generator=generator)
    try:
        return bool(torch.allclose(onednn_product(x, weight), x @ weight.t(), rtol=1e-4, atol=1e-4))
    except RuntimeError:
        return False


def onednn_pays(out_features: int, in_features: int) -> bool:
    """Whether products with an (``out_features``, ``in_features``) float32 weight measure at least
    :data:`ONEDNN_GAIN` times faster through oneDNN than through torch's default on this machine, at 8
    rows (a decoding step) and at 512 (a training batch's tokens). Measured once per process, shape and
    torch thread count, alternating the two, in ~0.1-0.3 s. The environment variable ``ALIGNKIT_ONEDNN``
    decides instead: ``0`` never, ``1`` wherever this build of torch has it."""
    if not onednn_available():
        return False
    choice = os.environ.get("ALIGNKIT_ONEDNN", "").strip()
    if choice in ("0", "1"):
        return choice == "1"
    return _onednn_pays(out_features, in_features, torch.get_num_threads())


@functools.cache
def _onednn_pays(out_features: int, in_features: int, threads: int) -> bool:
    generator = torch.Generator().manual_seed(0)
    for rows, most in ((8, 8), (512, 1)):
        weights = sample_weights(out_features, in_features, most, generator)
        x = torch.randn(rows, in_features, generator=generator)
        if not measures_faster(_default_product, onednn_product, x, [(w,) for w in weights], ONEDNN_GAIN):
            return False
    return True


def sample_weights(out_features: int, in_features: int, most: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Random float32 weights of this shape (rows cut to at most 32 MB a matrix) to time products on:
    as many as make ~32 MB, at most ``most``, so a pass streams them from memory as a decoding step
    streams a model's weights."""
    out_features = max(1, min(out_features, (8 << 20) // in_features))
    count = max(1, min(most, (8 << 20) // (out_features * in_features)))
    return [torch.randn(out_features, in_features, generator=generator) for _ in range(count)]


def measures_faster(default, candidate, x: torch.Tensor, operands: list[tuple], gain: float, rounds: int = 5) -> bool:
    """Whether ``candidate(x, *operand)`` over every operand of ``operands`` takes at most 1/``gain`` of
    the time ``default(x, *operand)`` takes: one untimed pass each (kernels built, caches filled), then
    ``rounds`` passes of each, alternating so a busy moment of the machine falls on both; medians compared."""
    def seconds(product) -> float:
        start = time.perf_counter()
        for operand in operands:
            product(x, *operand)
        return time.perf_counter() - start

    seconds(default), seconds(candidate)
    plain, fast = [], []
    for _ in range(rounds):
        plain.append(seconds(default))
        fast.append(seconds(candidate))
    return statistics.median(plain) >= gain * statistics.median(fast)


class _Linear(torch.autograd.Function):
    """``F.linear`` with its forward and its input and weight gradients computed by oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return onednn_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_product(grad, weight.t())
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            flat = grad.reshape(-1, grad.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = onednn_product(flat.t(), x.reshape(-1, x.shape[-1]).t())
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)`` computed by oneDNN (forward and backward) for
    float32 CPU tensors; anything else goes to ``F.linear``."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or not onednn_available():
        return torch.nn.functional.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)


def matmul_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (no autograd of its own), by oneDNN where that measures faster for ``weight``'s
    shape on this machine (float32 CPU tensors; :func:`onednn_pays`), else by torch's default."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 \
            and onednn_pays(*weight.shape):
        return onednn_product(x, weight)
    return x @ weight.T


def _fast_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def use_fast_linears(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` (LoRA's base layers and its own small ones included)
    compute through :func:`linear` where oneDNN measures faster on this machine (:func:`onednn_pays`,
    on the shape that holds most of the weights), for float32 weights on the CPU. The layers stay ``nn.Linear``
    with the same parameters; only their ``forward`` is replaced, on the instance. Returns the number
    of layers that now use it (0 where it does not pay)."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
               and m.weight.dtype == torch.float32]
    if not linears:
        return 0
    weight_of_shape = collections.Counter()
    for module in linears:
        weight_of_shape[tuple(module.weight.shape)] += module.weight.numel()
    if not onednn_pays(*weight_of_shape.most_common(1)[0][0]):
        return 0
    for module in linears:
        if not uses_fast_linear(module):
            module.forward = types.MethodType(_fast_forward, module)
    return len(linears)


def uses_fast_linear(module: nn.Module) -> bool:
    """Whether ``module``'s forward was replaced by :func:`use_fast_linears`."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _fast_forward
