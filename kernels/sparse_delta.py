"""Triton kernels of the sparse-delta linear (stitchops/reference/sparse_delta.py has the math).

Two kernels; the GEMMs around them are cuBLAS's (through PyTorch) on the scratch W':

- ``_scatter_delta_kernel``: W' = W + S(δ). One program per BLOCK_J entries adds δ_j to its
  element of a copy of W. Indices are unique (the op checks), so no two programs write one
  element: no atomics.
  Cost: OUT·IN elements copied (read + write), nnz read-modify-writes.

- ``_sddmm_kernel``: dδ_j = Σ_t G[t, r_j]·x[t, c_j]. Program (j-block, token split) loads,
  for BLOCK_T tokens at a time, the [BLOCK_T, BLOCK_J] tiles G[t, r_j] and x[t, c_j] (rows
  of the entries in the block; sorted indices make neighbouring entries share a row of G
  and sit in nearby columns of x) and accumulates their products over t in fp32. Each
  token split writes its own fp32 partial [splits, nnz]; kernels/partials.py sums them in a
  fixed order. Deterministic, no atomics.
  FLOPs: 2·T·nnz. Minimum bytes: T·(IN + OUT)·s read once (s: bytes per element; fewer
  when the entries touch few rows / columns) + 8·nnz (index) + nnz·s written. The gathered
  loads touch 2·T·nnz elements; neighbouring entries share rows of G and cache lines of x, so
  most of them hit L1/L2: the kernel is bound by those gathers at low density and by the
  floor's bytes at high density.

Offsets are int64 in the SDDMM (tokens up to millions times the row stride); the dispatch's
generic int32 span rule still applies to the Triton backend as a whole.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from stitchops.kernels.partials import sum_ranges
from stitchops.kernels.tuning import launch_sizes, programs_to_fill

from stitchops._runtime import new_output

BLOCK_SCATTER = 256
BLOCK_J = 64  # entries per SDDMM program (the fast dimension of its tiles)
BLOCK_T = 32  # tokens per SDDMM step (128 under Triton's CPU interpreter)
MIN_TOKENS_PER_SPLIT = 256  # a split's work stays well above a launch's fixed cost


@triton.jit
def _scatter_delta_kernel(w_ptr, delta_ptr, index_ptr, nnz, BLOCK: tl.constexpr):
    """w[index[j]] += delta[j] for j in this program's block (w: the contiguous copy)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < nnz
    idx = tl.load(index_ptr + offs, mask=mask, other=0)
    d = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + idx, (w + d).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sddmm_kernel(
    grad_ptr,
    x_ptr,
    index_ptr,
    part_ptr,
    nnz,
    tokens,
    tokens_per_split,
    in_features,
    stride_gt,
    stride_go,
    stride_xt,
    stride_xi,
    BLOCK_J: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """part[split, j] = Σ_{t in split} G[t, r_j]·x[t, c_j] (fp32)."""
    pid_j = tl.program_id(0)
    split = tl.program_id(1)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < nnz
    idx = tl.load(index_ptr + offs_j, mask=mask_j, other=0)
    rows = idx // in_features
    cols = idx - rows * in_features
    g_cols = rows * stride_go  # int64
    x_cols = cols * stride_xi
    t_begin = split.to(tl.int64) * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, tokens)
    acc = tl.zeros((BLOCK_T, BLOCK_J), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask = (offs_t < t_end)[:, None] & mask_j[None, :]
        g = tl.load(grad_ptr + offs_t[:, None] * stride_gt + g_cols[None, :], mask=mask, other=0.0)
        xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + x_cols[None, :], mask=mask, other=0.0)
        acc += g.to(tl.float32) * xv.to(tl.float32)
    tl.store(part_ptr + split.to(tl.int64) * nnz + offs_j, tl.sum(acc, axis=0), mask=mask_j)


def sparse_delta_weight(
    weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """W' = W + S(δ) as a new contiguous tensor."""
    w = weight.contiguous().clone()
    nnz = index.numel()
    if nnz:
        grid = (triton.cdiv(nnz, BLOCK_SCATTER),)
        _scatter_delta_kernel[grid](w, delta.contiguous(), index, nnz, BLOCK=BLOCK_SCATTER)
    return w


def token_splits(tokens: int, nnz: int, device: torch.device) -> int:
    """Token splits of the SDDMM: enough programs to fill the device, each split keeping at
    least MIN_TOKENS_PER_SPLIT tokens."""
    blocks = triton.cdiv(nnz, BLOCK_J)
    wanted = triton.cdiv(4 * programs_to_fill(device), blocks)
    return max(1, min(wanted, tokens // MIN_TOKENS_PER_SPLIT))


def sparse_delta_grad(grad_y: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """dδ [nnz] in x's dtype for 2-D ``grad_y`` [T, OUT] and ``x`` [T, IN] (any strides)."""
    tokens, in_features = x.shape
    nnz = index.numel()
    if nnz == 0 or tokens == 0:
        return torch.zeros(nnz, device=x.device, dtype=x.dtype)
    splits = token_splits(tokens, nnz, x.device)
    per_split = triton.cdiv(tokens, splits)
    splits = triton.cdiv(tokens, per_split)
    part = new_output(splits, nnz, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(nnz, BLOCK_J), splits)
    _sddmm_kernel[grid](
        grad_y,
        x,
        index,
        part,
        nnz,
        tokens,
        per_split,
        in_features,
        grad_y.stride(0),
        grad_y.stride(1),
        x.stride(0),
        x.stride(1),
        BLOCK_J=BLOCK_J,
        **launch_sizes({"BLOCK_T": BLOCK_T}, {"BLOCK_T": 128}),
        num_warps=4,
    )
    return sum_ranges([(part, 1.0)], x.dtype)[0]
