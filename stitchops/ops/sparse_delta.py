"""``stitchops.sparse_delta_linear``: SPT's unstructured tuning of a frozen linear layer.

    y = x · (W + S(δ))ᵀ + b          S(δ): δ_j at flat index_j = r_j·IN + c_j, zero elsewhere

Registered as ``stitchops::sparse_delta_linear`` and ``stitchops::sparse_delta_linear_backward``,
each with a fake implementation for torch.compile, tied together with
``torch.library.register_autograd``. The math, costs and gradient formulas are in
``stitchops.reference.sparse_delta``.

Design: the forward and dx run one GEMM each on a scratch W' = W + S(δ), built by a scatter
kernel (OUT·IN elements copied, against the 2·T·OUT·IN FLOPs of the GEMM it feeds: at
64×197 tokens, 768 → 3072, the copy is 0.02% of the GEMM's work) and rebuilt in the backward
instead of being saved. The GEMMs are PyTorch's (cuBLAS on a GPU, oneDNN/MKL on a CPU). The
alternative, a sparse correction x[:, c_j]·δ_j added to y's column r_j (an SpMM in the GEMM
epilogue), is measured against it in benchmarks/bench_sparse_delta.py. dδ is an SDDMM over
the index list (2·T·nnz FLOPs), never a dense [OUT, IN] gradient unless W itself trains.

Declared to the shared dispatch as ``SPARSE_DELTA`` with two entry points per backend,
``sparse_delta_weight`` (the scatter) and ``sparse_delta_grad`` (the SDDMM). Backend
choice for CUDA tensors: triton, then cuda, then torch (both kernels are memory-bound
gathers of the same structure; the Triton one is the default as for the other ops). CPU
tensors run on the torch reference, whose SDDMM is PyTorch's ``sparse.sampled_addmm``,
unless a backend is forced.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import register_flop_formula

from stitchops import _dispatch
from stitchops._runtime import constant_shapes
from stitchops.ops import _checks
from stitchops.reference import sparse_delta as reference

SPARSE_DELTA = _dispatch.register(
    _dispatch.Op(
        name="sparse_delta_linear",
        entries=("sparse_delta_weight", "sparse_delta_grad"),
        reference="stitchops.reference.sparse_delta",
        triton="stitchops.kernels.sparse_delta",
        kernel_dtypes=(torch.float16, torch.bfloat16, torch.float32),
    )
)


def _backend(tensors: list[torch.Tensor], weight: torch.Tensor) -> str:
    # Besides its inputs, a Triton kernel indexes the scratch W' [OUT, IN].
    return SPARSE_DELTA.choose(tensors, written=weight.numel())


@contextlib.contextmanager
def pinned_tokens_per_split(tokens: int) -> Iterator[None]:
    """Inside the block, the SDDMM kernels (triton and cuda) split the tokens into ranges of at
    least ``tokens`` (default 256): tests use a few to run several splits at small sizes."""
    from stitchops.kernels import sparse_delta as triton_kernels

    outer = triton_kernels.MIN_TOKENS_PER_SPLIT
    triton_kernels.MIN_TOKENS_PER_SPLIT = tokens
    try:
        from stitchops import _cuda

        cuda_pin = _cuda.pinned("pin_min_tokens_per_split", tokens) if _cuda._C else None
        with cuda_pin or contextlib.nullcontext():
            yield
    finally:
        triton_kernels.MIN_TOKENS_PER_SPLIT = outer


@torch.library.custom_op("stitchops::sparse_delta_linear", mutates_args=())
def _sparse_delta_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    backend = _backend([t for t in (x, weight, delta, bias) if t is not None], weight)
    scatter = SPARSE_DELTA.entry(backend, "sparse_delta_weight")
    return reference.sparse_delta_forward(x, weight, delta, index, bias, scatter)


@_sparse_delta_op.register_fake
def _(x, weight, delta, index, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("stitchops::sparse_delta_linear_backward", mutates_args=())
def _sparse_delta_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    index: torch.Tensor,
    needs: list[bool],
) -> list[torch.Tensor]:
    """The gradients of ``reference.GRADIENTS`` (dx, dW, dδ, dbias), each where its flag in
    ``needs`` (same order) is set; a gradient not asked for is an empty tensor."""
    backend = _backend([grad_y, x, weight, delta], weight)
    grads = reference.sparse_delta_backward(
        grad_y,
        x,
        weight,
        delta,
        index,
        needs,
        SPARSE_DELTA.entry(backend, "sparse_delta_weight"),
        SPARSE_DELTA.entry(backend, "sparse_delta_grad"),
    )
    return [
        g if g is not None and want else x.new_empty(0)
        for g, want in zip(grads, needs, strict=True)
    ]


@_sparse_delta_backward_op.register_fake
def _(grad_y, x, weight, delta, index, needs):
    need_x, need_weight, need_delta, need_bias = needs

    def maybe(needed: bool, *shape: int) -> torch.Tensor:
        return x.new_empty(*shape) if needed else x.new_empty(0)

    out_f, in_f = weight.shape
    return [
        maybe(need_x, x.shape[0], in_f),
        maybe(need_weight, out_f, in_f),
        maybe(need_delta, index.shape[0]),
        maybe(need_bias, out_f),
    ]


_INPUTS = ("x", "weight", "delta", "index", "bias")


def _setup_context(ctx, inputs, output):
    x, weight, delta, index, _bias = inputs
    ctx.save_for_backward(x, weight, delta, index)  # W, not W': the backward rebuilds W'


def _backward(ctx, grad_y):
    x, weight, delta, index = ctx.saved_tensors
    wanted = dict(zip(_INPUTS, ctx.needs_input_grad, strict=True))
    needs = [wanted[name] for name in reference.GRADIENTS]
    grads = dict(
        zip(
            reference.GRADIENTS,
            torch.ops.stitchops.sparse_delta_linear_backward(
                grad_y.contiguous(), x, weight, delta, index, needs
            ),
            strict=True,
        )
    )
    return tuple(
        grads[name] if name in grads and ctx.needs_input_grad[i] else None
        for i, name in enumerate(_INPUTS)
    )


torch.library.register_autograd(
    "stitchops::sparse_delta_linear", _backward, setup_context=_setup_context
)


# FLOPs for torch.utils.flop_counter (2 per multiply-add, as aten.mm): the GEMMs and the SDDMM.
@register_flop_formula(torch.ops.stitchops.sparse_delta_linear)
def _forward_flops(x_shape, weight_shape, *args, **kwargs):
    return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]


@register_flop_formula(torch.ops.stitchops.sparse_delta_linear_backward)
def _backward_flops(grad_shape, x_shape, weight_shape, delta_shape, index_shape, needs, **kwargs):
    need_x, need_weight, need_delta, _need_bias = needs
    tokens, (out_f, in_f) = math.prod(x_shape[:-1]), weight_shape
    gemm = (need_x + need_weight) * 2 * tokens * out_f * in_f
    return gemm + (need_delta and not need_weight) * 2 * tokens * index_shape[0]


def check_index(index: object, weight_shape: tuple[int, int], nnz: int | None = None) -> None:
    """``index`` is an int64 [nnz] tensor of strictly increasing flat indices into a weight of
    ``weight_shape`` (reads its values: a device sync on a GPU)."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise TypeError(f"index must be an int64 tensor of flat indices, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D [nnz], got shape {tuple(index.shape)}")
    if nnz is not None and index.numel() != nnz:
        raise ValueError(f"index has {index.numel()} entries but delta has {nnz}")
    if index.numel() == 0:
        return
    size = weight_shape[0] * weight_shape[1]
    low, high = index.min().item(), index.max().item()
    if low < 0 or high >= size:
        raise ValueError(
            f"index must lie in [0, OUT·IN) = [0, {size}) for weight {tuple(weight_shape)}, "
            f"got values from {low} to {high}"
        )
    steps = index[1:] - index[:-1]
    if index.numel() > 1 and not bool((steps > 0).all()):
        at = int((steps <= 0).nonzero()[0, 0]) + 1
        raise ValueError(
            f"index must be strictly increasing (sorted, no repeats): index[{at - 1}] = "
            f"{index[at - 1].item()}, index[{at}] = {index[at].item()}; sort with "
            "torch.unique(index)"
        )


def _check(x, weight, delta, index, bias, validate_index: bool) -> None:
    _checks.tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension [..., IN], got shape {tuple(x.shape)}")
    _checks.tensor("weight", weight, ndim=2)
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight [OUT, IN] has "
            f"IN = {in_f}"
        )
    _checks.tensor("delta", delta, ndim=1)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (out_f,), "OUT of weight")
    _checks.same_dtype_and_device("x", {"x": x, "weight": weight, "delta": delta, "bias": bias})
    if isinstance(index, torch.Tensor) and index.device != x.device:
        raise ValueError(f"index is on {index.device} but x is on {x.device}")
    if validate_index:
        check_index(index, (out_f, in_f), delta.shape[0])
    elif not isinstance(index, torch.Tensor) or index.shape != delta.shape:
        raise ValueError("index must be a tensor of delta's shape [nnz]")


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    validate_index: bool = True,
) -> torch.Tensor:
    """``y = x·(W + S(δ))ᵀ + b``: a linear layer whose weight moves only at ``index``.

    Args:
        x: [..., IN] activations (any strides).
        weight: [OUT, IN] the pretrained weight W (frozen in SPT; differentiable if it trains).
        delta: [nnz] the tuned entries δ.
        index: int64 [nnz], flat indices ``row·IN + col`` into ``weight``, strictly increasing.
        bias: [OUT] or None.
        validate_index: check that ``index`` is sorted, unique and in range (reads it: a
            device sync on a GPU). ``stitchops.nn.SparseDeltaLinear`` checks its index once
            and passes False; so does a traced or compiled call.

    Returns:
        [..., OUT] in the dtype of x; differentiable in x, weight, delta and bias. dδ is an
        SDDMM (fp32 accumulation); no dense [OUT, IN] gradient unless ``weight`` needs one.
    """
    validate_index = validate_index and not torch.compiler.is_compiling()
    with constant_shapes():
        _check(x, weight, delta, index, bias, validate_index)
    lead = x.shape[:-1]
    # The kernels read index with unit stride (a no-op when it is contiguous).
    y = torch.ops.stitchops.sparse_delta_linear(
        x.reshape(-1, x.shape[-1]), weight, delta, index.contiguous(), bias
    )
    return y.reshape(*lead, weight.shape[0])
