"""``stitchops.lora_linear``: the stitching projection of SN-Net, SN-Netv2 and ESTA.

    y = x · Wᵀ + b + b_s + scale · (x · Aᵀ) · Bᵀ

Registered as ``stitchops::lora_linear`` (forward, returning y and the saved S = x·Aᵀ) and
``stitchops::lora_linear_backward``, each with a fake implementation for torch.compile, and
tied together with ``torch.library.register_autograd``. The math and the gradient formulas
are in ``stitchops.reference.lora``.

Declared to the shared dispatch as ``LORA`` (entry points ``lora_forward`` and
``lora_backward`` in every backend; kernel dtypes; the rank limit of the kernels).

Backend choice for CUDA tensors: triton, then cuda, then torch. The Triton kernel runs its
GEMMs on tensor cores (tl.dot), software-pipelined and autotuned per shape; the CUDA kernel
implements the same fusion independently of Triton, with WMMA tensor-core tiles for
fp16/bf16 (csrc/lora_tc.cu: one fixed tile shape, a cp.async double buffer) and exact
fp32 FMA tiles for fp32 (csrc/lora.cu), so it ranks second. CPU tensors run on the torch
reference unless a backend is forced (``triton`` under TRITON_INTERPRET=1, as in CI).
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from stitchops import _dispatch
from stitchops._runtime import constant_shapes
from stitchops.ops import _checks
from stitchops.reference import lora as reference

MAX_KERNEL_RANK = 128

LORA = _dispatch.register(
    _dispatch.Op(
        name="lora_linear",
        entries=("lora_forward", "lora_backward"),
        reference="stitchops.reference.lora",
        triton="stitchops.kernels.lora",
        kernel_dtypes=(torch.float16, torch.bfloat16, torch.float32),
    )
)


def pinned_column_tiles(tiles: int):
    """Inside this ``with`` block, every CUDA forward covers ``tiles`` output column tiles per
    thread block (csrc/lora.h, ``column_tiles``); blocks nest. Outside every block the binding
    chooses per call (csrc/binding/bind_lora.h, ``forward_column_tiles``). Tests pin it so that
    small shapes exercise the column groups too; benchmarks, to compare counts."""
    from stitchops import _cuda  # imports stitchops._C: only when asked for

    return _cuda.pinned("pin_column_tiles", tiles)


def kernel_limits(rank: int) -> list[str]:
    """Why the triton and cuda kernels refuse a call at this rank (none up to 128)."""
    return [f"rank {rank} > {MAX_KERNEL_RANK}"] if rank > MAX_KERNEL_RANK else []


def _backend(x: torch.Tensor, tensors: list[torch.Tensor], rank: int, out_features: int) -> str:
    """The backend for a call on 2-D ``x`` [T, IN]; ``tensors``: every tensor argument given."""
    # What the Triton kernels write besides the inputs: y [T, OUT] (dy has its shape), dx [T, IN].
    written = math.prod(x.shape[:-1]) * max(out_features, x.shape[-1])
    return LORA.choose(tensors, written=written, limits=kernel_limits(rank))


def _present(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None]


@torch.library.custom_op("stitchops::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    extra_bias: torch.Tensor | None,
    save_s: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    rank = lora_a.shape[0] if lora_a is not None else 0
    backend = _backend(
        x, _present(x, weight, bias, lora_a, lora_b, extra_bias), rank, weight.shape[0]
    )
    # Every kernel reads the [OUT] biases with unit stride (a no-op copy when contiguous).
    bias = bias.contiguous() if bias is not None else None
    extra_bias = extra_bias.contiguous() if extra_bias is not None else None
    forward = LORA.entry(backend, "lora_forward")
    return forward(x, weight, bias, lora_a, lora_b, scale, extra_bias, save_s)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, extra_bias, save_s):
    rank = lora_a.shape[0] if lora_a is not None else 0
    keep = save_s and lora_a is not None
    y = x.new_empty(x.shape[0], weight.shape[0])
    s = x.new_empty(
        x.shape[0] if keep else 0, rank if keep else 0, dtype=reference.saved_s_dtype(x.dtype)
    )
    return y, s


@torch.library.custom_op("stitchops::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    s: torch.Tensor,
    scale: float,
    needs: list[bool],
) -> list[torch.Tensor]:
    """The gradients of ``reference.GRADIENTS`` (dx, dW, dA, dB, dbias), each where its flag in
    ``needs`` (same order) is set; a gradient not asked for is an empty tensor."""
    rank = lora_a.shape[0] if lora_a is not None else 0
    backend = _backend(x, _present(grad_y, x, weight, lora_a, lora_b), rank, weight.shape[0])
    backward = LORA.entry(backend, "lora_backward")
    grads = backward(grad_y.contiguous(), x, weight, lora_a, lora_b, s, scale, needs)
    return [
        g if g is not None and want else x.new_empty(0)
        for g, want in zip(grads, needs, strict=True)
    ]


@_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, s, scale, needs):
    need_x, need_weight, need_a, need_b, need_bias = needs

    def maybe(needed: bool, *shape: int) -> torch.Tensor:
        return x.new_empty(*shape) if needed else x.new_empty(0)

    has_lora = lora_a is not None
    rank = lora_a.shape[0] if has_lora else 0
    out_f, in_f = weight.shape
    return [
        maybe(need_x, x.shape[0], in_f),
        maybe(need_weight, out_f, in_f),
        maybe(need_a and has_lora, rank, in_f),
        maybe(need_b and has_lora, out_f, rank),
        maybe(need_bias, out_f),
    ]


# The forward op's arguments, in order (ctx.needs_input_grad follows them).
_INPUTS = ("x", "weight", "bias", "lora_a", "lora_b", "scale", "extra_bias", "save_s")


def _setup_context(ctx, inputs, output):
    x, weight, _bias, lora_a, lora_b, scale, _extra_bias, _save_s = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_s):
    x, weight, lora_a, lora_b, s = ctx.saved_tensors
    wanted = dict(zip(_INPUTS, ctx.needs_input_grad, strict=True))
    wanted["bias"] = wanted["bias"] or wanted["extra_bias"]  # both receive Σ_t dy
    needs = [wanted[name] for name in reference.GRADIENTS]
    grads = dict(
        zip(
            reference.GRADIENTS,
            torch.ops.stitchops.lora_linear_backward(
                grad_y, x, weight, lora_a, lora_b, s, ctx.scale, needs
            ),
            strict=True,
        )
    )
    grads["extra_bias"] = grads["bias"]
    return tuple(
        grads[name] if name in grads and ctx.needs_input_grad[i] else None
        for i, name in enumerate(_INPUTS)
    )


torch.library.register_autograd("stitchops::lora_linear", _backward, setup_context=_setup_context)


# FLOPs for torch.utils.flop_counter.FlopCounterMode (2 per multiply-add, as for aten.mm), so
# FLOP counts of models built on the op stay right.
def _tokens(x_shape) -> int:
    return math.prod(x_shape[:-1])


@register_flop_formula(torch.ops.stitchops.lora_linear)
def _lora_linear_flops(x_shape, weight_shape, bias_shape, a_shape, b_shape, *args, **kwargs):
    m, (out_f, in_f) = _tokens(x_shape), weight_shape
    rank = a_shape[0] if a_shape is not None and b_shape is not None else 0
    return 2 * m * out_f * in_f + 2 * m * rank * (in_f + out_f)


@register_flop_formula(torch.ops.stitchops.lora_linear_backward)
def _lora_linear_backward_flops(
    grad_shape, x_shape, weight_shape, a_shape, b_shape, s_shape, scale, needs, **kwargs
):
    need_x, need_weight, need_a, need_b, _need_bias = needs
    m, (out_f, in_f) = _tokens(x_shape), weight_shape
    rank = a_shape[0] if a_shape is not None and b_shape is not None else 0
    low_rank = 2 * m * rank * out_f if rank and (need_x or need_a) else 0  # dS = dY·B
    flops = (need_x + need_weight) * 2 * m * out_f * in_f + low_rank
    flops += need_x * 2 * m * rank * in_f + need_a * 2 * m * rank * in_f  # dS·A, dSᵀ·x
    return flops + need_b * 2 * m * rank * out_f  # dYᵀ·S


def _check(x, weight, bias, lora_a, lora_b, scale, extra_bias) -> float:
    _checks.tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension [..., IN], got shape {tuple(x.shape)}")
    _checks.tensor("weight", weight, ndim=2)
    out_f, in_f = weight.shape
    if in_f == 0 or out_f == 0:
        raise ValueError(f"weight [OUT, IN] must have OUT, IN >= 1, got {tuple(weight.shape)}")
    if x.shape[-1] != in_f:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight [OUT, IN] has "
            f"IN = {in_f}"
        )
    for name, vec in (("bias", bias), ("extra_bias", extra_bias)):
        if vec is not None:
            _checks.tensor(name, vec, ndim=1)
            _checks.shape(name, vec, (out_f,), "OUT of weight")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (or both None)")
    if lora_a is not None:
        _checks.tensor("lora_a", lora_a, ndim=2)
        _checks.tensor("lora_b", lora_b, ndim=2)
        rank = lora_a.shape[0]
        if rank < 1:
            raise ValueError(f"lora_a must have rank R >= 1 rows, got shape {tuple(lora_a.shape)}")
        _checks.shape("lora_a", lora_a, (rank, in_f), "[R, IN]")
        if lora_b.shape[1] != rank:
            raise ValueError(
                f"lora_b has rank {lora_b.shape[1]} (shape {tuple(lora_b.shape)}) but lora_a "
                f"has rank {rank}: lora_a is [R, IN], lora_b is [OUT, R]"
            )
        _checks.shape("lora_b", lora_b, (out_f, rank), "[OUT, R]")
    named = {
        "x": x,
        "weight": weight,
        "bias": bias,
        "lora_a": lora_a,
        "lora_b": lora_b,
        "extra_bias": extra_bias,
    }
    _checks.same_dtype_and_device("x", named)
    return _checks.finite_float("scale", scale)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float = 1.0,
    extra_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused stitching projection ``y = x·Wᵀ + b + b_s + scale·(x·Aᵀ)·Bᵀ``.

    Args:
        x: [..., IN] activations (any strides).
        weight: [OUT, IN] stitching matrix W (frozen in SN-Netv2, trained in SN-Net).
        bias: [OUT] bias b, or None.
        lora_a: [R, IN] low-rank down-projection A (peft's ``lora_A``), or None.
        lora_b: [OUT, R] low-rank up-projection B (peft's ``lora_B``), or None.
        scale: multiplier of the low-rank term, alpha / R for peft-style LoRA.
        extra_bias: [OUT] per-stitch bias b_s (ESTA), or None.

    Returns:
        [..., OUT] in the dtype of x. float16/bfloat16/float32 kernels accumulate in fp32.
        Differentiable in x, weight, bias, lora_a, lora_b and extra_bias.
    """
    with constant_shapes():
        scale = _check(x, weight, bias, lora_a, lora_b, scale, extra_bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # S is kept for dB when B trains. A trace keeps it whatever the grad mode, so that its
    # graph does not depend on it (torch.jit.trace re-runs the model under no_grad to check).
    grad_mode = torch.is_grad_enabled() or torch.jit.is_tracing()
    save_s = lora_b is not None and lora_b.requires_grad and grad_mode
    y, _ = torch.ops.stitchops.lora_linear(
        x2, weight, bias, lora_a, lora_b, scale, extra_bias, save_s
    )
    return y.reshape(*lead, weight.shape[0])
