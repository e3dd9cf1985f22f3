"""Sparse-delta linear in plain PyTorch (SPT's unstructured tuning, thesis ch. 2).

    y = x · (W + S(δ))ᵀ + b

Shapes: x [T, IN], W [OUT, IN], δ [nnz], index [nnz] int64 (flat ``r·IN + c``, strictly
increasing), b [OUT], y [T, OUT]. S(δ) is the dense [OUT, IN] matrix holding δ_j at
(r_j, c_j) and zeros elsewhere. With G = dL/dy [T, OUT] and W' = W + S(δ):

    dx  = G · W'                            [T, IN]
    dW  = Gᵀ · x                            [OUT, IN]  (only when W trains)
    dδ_j = Σ_t G[t, r_j] · x[t, c_j]        [nnz]      (an SDDMM: (Gᵀx) sampled at index)
    db  = Σ_t G[t]                          [OUT]

Cost, per call: the forward and dx are GEMMs (2·T·OUT·IN FLOPs each) on a scratch W'
(OUT·IN elements written, rebuilt in the backward rather than saved); dδ is 2·T·nnz FLOPs
over gathered elements. The official code gets dδ as diag(G[:, r]ᵀ · x[:, c]): 2·T·nnz²
FLOPs and an nnz × nnz matrix.

Every backend provides the two entry points below (``sparse_delta_weight`` builds W',
``sparse_delta_grad`` computes dδ); the GEMMs around them are PyTorch's (cuBLAS on a GPU).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from stitchops._runtime import cpu_threads_for

# The gradients the backward computes, in the order of its ``needs`` flags and its results.
GRADIENTS = ("x", "weight", "delta", "bias")

# Elements of one gathered [T, entries] slice in the generic dδ path (64 MB in fp32).
_GATHER_ELEMENTS = 1 << 24
# The CPU dδ path takes the dense Gᵀx GEMM and gathers from it once the entries are at least
# this fraction of W (1/32): at 5% of a 768 × 3072 matrix the GEMM was 1.2-1.7× faster than
# the SDDMM, at 1% 1.6-1.8× slower (measured, 12,608 tokens).
_DENSE_FRACTION = 32
# Elements of the transposed token slices of the CPU dδ path (4 MB in fp32: both slices stay
# in a core's cache; 16 MB measured 1.1-2.2x slower at nnz 3,000).
_TRANSPOSED_ELEMENTS = 1 << 20


def dense_delta(delta: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """S(δ): the dense matrix of ``shape`` with ``delta`` at the flat ``index``, zero elsewhere.
    Differentiable in ``delta``."""
    flat = delta.new_zeros(shape.numel()).index_put((index,), delta)
    return flat.view(shape)


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op written as its definition (a dense S(δ)), differentiable by autograd in every
    argument, any dtype (float64 included)."""
    return F.linear(x, weight + dense_delta(delta, index, weight.shape), bias)


def sparse_delta_weight(
    weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """W' = W + S(δ) as a new tensor (``index`` unique, so the update has no collisions)."""
    flat = weight.flatten().clone()  # a fresh contiguous copy whatever weight's strides
    flat.index_put_((index,), flat.index_select(0, index) + delta)
    return flat.view(weight.shape)


def sparse_delta_grad(grad_y: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """dδ_j = Σ_t G[t, r_j]·x[t, c_j] for 2-D ``grad_y`` [T, OUT] and ``x`` [T, IN], accumulated
    in float32 (float64 for float64), returned in x's dtype. Deterministic. On the CPU: the
    SDDMM (``_sampled_grad``), or once the entries are 1/32 of W or more the dense Gᵀx GEMM
    gathered at ``index``."""
    in_features = x.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    if index.numel() == 0 or x.shape[0] == 0:
        return x.new_zeros(index.numel())
    if not x.is_cuda and index.numel() * _DENSE_FRACTION >= grad_y.shape[1] * in_features:
        return (grad_y.t().to(acc) @ x.to(acc)).flatten()[index].to(x.dtype)
    if not x.is_cuda:
        return _sampled_grad(grad_y, x, index, acc).to(x.dtype)
    rows, cols = index // in_features, index % in_features
    out = torch.empty(index.numel(), device=x.device, dtype=acc)
    step = max(1, _GATHER_ELEMENTS // max(x.shape[0], 1))
    for start in range(0, index.numel(), step):
        r, c = rows[start : start + step], cols[start : start + step]
        g = grad_y.index_select(1, r).to(acc)
        out[start : start + step] = (g * x.index_select(1, c).to(acc)).sum(0)
    return out.to(x.dtype)


def _sampled_grad(
    grad_y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, acc: torch.dtype
) -> torch.Tensor:
    """The CPU path: PyTorch's SDDMM (``sparse.sampled_addmm`` over a CSR pattern), one dot
    product per entry between rows of Gᵀ and of xᵀ, with no [T, nnz] gather. The transposed
    copies (in ``acc``) are made a slice of tokens at a time, so they stay a few MB; each
    slice's 2·tokens·nnz FLOPs earn the intra-op threads ``cpu_threads_for`` gives them (one,
    at SPT's sizes: two were slower, measured)."""
    tokens, out_features = grad_y.shape
    in_features = x.shape[1]
    crow = torch._convert_indices_from_coo_to_csr(index // in_features, out_features)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow,
            index % in_features,
            torch.zeros(index.numel(), dtype=acc),
            (out_features, in_features),
            check_invariants=False,
        )
    step = max(256, _TRANSPOSED_ELEMENTS // (in_features + out_features))
    total = torch.zeros(index.numel(), dtype=acc)
    with cpu_threads_for(x, 2 * step * index.numel()):
        for start in range(0, tokens, step):
            g = grad_y[start : start + step]
            grad_t = g.t().to(acc, memory_format=torch.contiguous_format)
            x_t = x[start : start + step].t().to(acc, memory_format=torch.contiguous_format)
            total += torch.sparse.sampled_addmm(pattern, grad_t, x_t.t(), beta=0.0).values()
    return total


def sparse_delta_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None,
    effective_weight=sparse_delta_weight,
) -> torch.Tensor:
    """y for 2-D x, with W' built by ``effective_weight`` (a backend's entry point)."""
    return F.linear(x, effective_weight(weight, delta, index), bias)


def sparse_delta_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    index: torch.Tensor,
    needs: list[bool],
    effective_weight=sparse_delta_weight,
    delta_grad=sparse_delta_grad,
) -> list[torch.Tensor | None]:
    """(dx, dW, dδ, db) for 2-D tensors, each where its flag in ``needs`` is set (None where
    not); W' rebuilt by ``effective_weight``, dδ from ``delta_grad`` (a backend's entries).
    When dW is computed anyway, dδ is read from it (dδ_j = dW[r_j, c_j])."""
    need_x, need_weight, need_delta, need_bias = needs
    dx = grad_y.mm(effective_weight(weight, delta, index)) if need_x else None
    dw = grad_y.t().mm(x) if need_weight else None
    if need_delta:
        ddelta = (
            dw.flatten().index_select(0, index) if dw is not None else delta_grad(grad_y, x, index)
        )
    else:
        ddelta = None
    dbias = (
        grad_y.sum(0, dtype=torch.promote_types(grad_y.dtype, torch.float32)).to(grad_y.dtype)
        if need_bias
        else None
    )
    return [dx, dw, ddelta, dbias]
