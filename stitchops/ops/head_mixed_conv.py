"""``stitchops.head_mixed_conv``: SPViT's convolution made of an attention layer's heads.

    out[b, prefix + i·gw + j, d] = Σ_p Σ_h mix[h, p] · v[b, prefix + (i+dy_p)·gw + (j+dx_p), h, d]

(zero outside the map; taps p = a + k·c at (dy, dx) = (a − k//2, c − k//2); the prefix rows
of ``out`` are zero). Registered as ``stitchops::head_mixed_conv`` and
``stitchops::head_mixed_conv_backward`` with fake implementations for torch.compile, tied
together by ``torch.library.register_autograd``. The math and costs are in
``stitchops.reference.head_mixed_conv``.

Declared to the shared dispatch as ``HEAD_MIXED_CONV`` with two entry points per backend.
CUDA tensors: triton, then cuda, then torch (all three are memory-bound stencils; the Triton
one is the default as for the other ops until a GPU measurement says otherwise). CPU
tensors run on the torch reference, a loop over the taps without a k²-times tensor.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from stitchops import _dispatch
from stitchops._runtime import constant_shapes
from stitchops.ops import _checks
from stitchops.reference import head_mixed_conv as reference

HEAD_MIXED_CONV = _dispatch.register(
    _dispatch.Op(
        name="head_mixed_conv",
        entries=("head_mixed_conv_forward", "head_mixed_conv_backward"),
        reference="stitchops.reference.head_mixed_conv",
        triton="stitchops.kernels.head_mixed_conv",
        kernel_dtypes=(torch.float16, torch.bfloat16, torch.float32),
    )
)


@torch.library.custom_op("stitchops::head_mixed_conv", mutates_args=())
def _forward_op(v: torch.Tensor, mix: torch.Tensor, gh: int, gw: int, prefix: int) -> torch.Tensor:
    backend = HEAD_MIXED_CONV.choose([v, mix])
    return HEAD_MIXED_CONV.entry(backend, "head_mixed_conv_forward")(v, mix, gh, gw, prefix)


@_forward_op.register_fake
def _(v, mix, gh, gw, prefix):
    return v.new_empty(v.shape[0], v.shape[1], v.shape[3])


@torch.library.custom_op("stitchops::head_mixed_conv_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor,
    v: torch.Tensor,
    mix: torch.Tensor,
    gh: int,
    gw: int,
    prefix: int,
    needs: list[bool],
) -> list[torch.Tensor]:
    """(dv, dmix), each where its flag in ``needs`` is set; one not asked for is empty."""
    backend = HEAD_MIXED_CONV.choose([grad, v, mix])
    entry = HEAD_MIXED_CONV.entry(backend, "head_mixed_conv_backward")
    grads = entry(grad, v, mix, gh, gw, prefix, needs)
    return [g if g is not None else v.new_empty(0) for g in grads]


@_backward_op.register_fake
def _(grad, v, mix, gh, gw, prefix, needs):
    return [
        v.new_empty(v.shape) if needs[0] else v.new_empty(0),
        mix.new_empty(mix.shape) if needs[1] else mix.new_empty(0),
    ]


def _setup_context(ctx, inputs, output):
    v, mix, gh, gw, prefix = inputs
    ctx.save_for_backward(v, mix)
    ctx.geometry = (gh, gw, prefix)


def _backward(ctx, grad):
    v, mix = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    dv, dmix = torch.ops.stitchops.head_mixed_conv_backward(
        grad.contiguous(), v, mix, *ctx.geometry, needs
    )
    return (dv if needs[0] else None, dmix if needs[1] else None, None, None, None)


torch.library.register_autograd(
    "stitchops::head_mixed_conv", _backward, setup_context=_setup_context
)


# FLOPs for torch.utils.flop_counter (2 per multiply-add): B·P·k²·H·D per stencil pass.
@register_flop_formula(torch.ops.stitchops.head_mixed_conv)
def _forward_flops(v_shape, mix_shape, gh, gw, prefix, **kwargs):
    return 2 * v_shape[0] * gh * gw * math.prod(mix_shape) * v_shape[3]


@register_flop_formula(torch.ops.stitchops.head_mixed_conv_backward)
def _backward_flops(grad_shape, v_shape, mix_shape, gh, gw, prefix, needs, **kwargs):
    return sum(needs) * 2 * v_shape[0] * gh * gw * math.prod(mix_shape) * v_shape[3]


def _check(v, mix, grid, prefix) -> tuple[int, int]:
    _checks.tensor("v", v, ndim=4)
    _checks.tensor("mix", mix, ndim=2)
    _checks.same_dtype_and_device("v", {"v": v, "mix": mix})
    heads, taps = mix.shape
    k = math.isqrt(taps)
    if heads != v.shape[2]:
        raise ValueError(f"mix has {heads} rows but v [B, N, H, D] has H = {v.shape[2]} heads")
    if k * k != taps or k not in reference.KERNEL_SIZES:
        raise ValueError(
            f"mix must be [H, k²] with k one of {reference.KERNEL_SIZES}, got {taps} columns"
        )
    if not isinstance(grid, tuple | list) or len(grid) != 2:
        raise TypeError(f"grid must be a (gh, gw) pair, got {grid!r}")
    gh = _checks.int_at_least("grid[0]", grid[0], 1)
    gw = _checks.int_at_least("grid[1]", grid[1], 1)
    _checks.int_at_least("prefix", prefix, 0)
    if v.shape[1] != prefix + gh * gw:
        raise ValueError(
            f"v has N = {v.shape[1]} tokens but prefix + gh·gw = {prefix} + {gh}·{gw} = "
            f"{prefix + gh * gw}"
        )
    return gh, gw


def head_mixed_conv(
    v: torch.Tensor, mix: torch.Tensor, grid: tuple[int, int], *, prefix: int = 1
) -> torch.Tensor:
    """SPViT's head-mixed k×k stencil over a token map (thesis ch. 4, Eq. 4.5-4.7).

    Args:
        v: [B, N, H, D] the value projection viewed per head (any strides), N = prefix +
            gh·gw: the prefix tokens, then the patch tokens row-major.
        mix: [H, k²] the mixing weights (SPViT: a softmax over the heads), k in 1, 3, 5, 7;
            column p = a + k·c is the tap at row offset a − k//2, column offset c − k//2.
        grid: (gh, gw), rectangular grids included.
        prefix: tokens before the map (1: a class token); their rows of the output are zero.

    Returns:
        [B, N, D] in v's dtype: Σ over taps inside the map and heads of mix[h, p] times
        the shifted v; differentiable in v and mix (fp32 accumulation, deterministic).
    """
    with constant_shapes():
        gh, gw = _check(v, mix, grid, prefix)
    return torch.ops.stitchops.head_mixed_conv(v, mix, gh, gw, prefix)
