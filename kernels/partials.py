"""The last step of the backward: per-range fp32 partials summed over ranges, in one launch.

The backward kernels (kernels/lora.py) write each token range's share of dA, dB, the bias
gradient and dW to its own fp32 slice (no atomics, so results are deterministic). Here

    out_i[c] = scale_i · Σ_z part_i[z, c]        part_i [ranges, n_i] fp32 → out_i [n_i]

for up to three partial buffers in one launch, rounded once to the output dtype. In PyTorch
this is a sum, a multiply and a cast per gradient (eight kernel launches for dA, dB and the
bias gradient); a launch costs a few microseconds of GPU time, against some 100-200 µs for
the whole backward at stitching shapes.

Cost: reads 4·ranges·Σn_i bytes, writes Σn_i elements; memory-bound, a few MB at most.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stitchops._runtime import new_output

BLOCK_Z = 16  # ranges summed per load (tl.sum over a [BLOCK_Z, BLOCK_C] tile)
BLOCK_C = 256  # columns per program
MAX_BUFFERS = 3


@triton.jit
def _sum_buffer(
    part_ptr, out_ptr, n, scale, ranges, block, BLOCK_Z: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Columns [block·BLOCK_C, +BLOCK_C) of one buffer: out = scale · Σ_z part[z, ·]."""
    offs_c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < n
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for z0 in range(0, ranges, BLOCK_Z):
        offs_z = z0 + tl.arange(0, BLOCK_Z)
        tile = tl.load(
            part_ptr + offs_z[:, None].to(tl.int64) * n + offs_c[None, :],
            mask=(offs_z < ranges)[:, None] & mask_c[None, :],
            other=0.0,
        )
        acc += tl.sum(tile, axis=0)
    out = acc * tl.cast(scale, tl.float32)
    tl.store(out_ptr + offs_c, out.to(out_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _sum_ranges_kernel(
    part0_ptr,
    out0_ptr,
    n0,
    scale0,
    part1_ptr,
    out1_ptr,
    n1,
    scale1,
    part2_ptr,
    out2_ptr,
    n2,
    scale2,
    ranges,
    BLOCK_Z: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Programs take BLOCK_C columns each: those of buffer 0 first, then 1, then 2.
    The sum runs over ranges in a fixed order, so the result is deterministic."""
    pid = tl.program_id(0)
    blocks0 = tl.cdiv(n0, BLOCK_C)
    blocks1 = tl.cdiv(n1, BLOCK_C)
    if pid < blocks0:
        _sum_buffer(part0_ptr, out0_ptr, n0, scale0, ranges, pid, BLOCK_Z, BLOCK_C)
    elif pid < blocks0 + blocks1:
        _sum_buffer(part1_ptr, out1_ptr, n1, scale1, ranges, pid - blocks0, BLOCK_Z, BLOCK_C)
    else:
        _sum_buffer(
            part2_ptr, out2_ptr, n2, scale2, ranges, pid - blocks0 - blocks1, BLOCK_Z, BLOCK_C
        )


def sum_ranges(
    parts: list[tuple[torch.Tensor, float] | None], dtype: torch.dtype
) -> list[torch.Tensor | None]:
    """[(partial [ranges, *shape] fp32 contiguous, scale) or None, ...] (at most three, on one
    device) → [scale · partial.sum(0) as a ``dtype`` tensor of ``shape``, or None, ...]."""
    if len(parts) > MAX_BUFFERS:
        raise ValueError(f"sum_ranges takes at most {MAX_BUFFERS} buffers, got {len(parts)}")
    present = [p for p in parts if p is not None]
    if not present:
        return [None] * len(parts)
    ranges = present[0][0].shape[0]
    device = present[0][0].device
    outs, args = [], []
    for entry in parts:
        if entry is None:
            outs.append(None)
            continue
        part, scale = entry
        if part.dtype != torch.float32 or not part.is_contiguous() or part.shape[0] != ranges:
            raise ValueError("sum_ranges: partials must be contiguous float32 [ranges, ...]")
        out = new_output(*part.shape[1:], device=device, dtype=dtype)
        outs.append(out)
        args += [part, out, out.numel(), float(scale)]
    dummy = present[0][0]
    args += [dummy, dummy, 0, 1.0] * (MAX_BUFFERS - len(present))
    blocks = sum(triton.cdiv(out.numel(), BLOCK_C) for out in outs if out is not None)
    if blocks:
        _sum_ranges_kernel[(blocks,)](*args, ranges, BLOCK_Z=BLOCK_Z, BLOCK_C=BLOCK_C, num_warps=4)
    return outs
