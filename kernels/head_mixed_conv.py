"""Triton kernels of SPViT's head-mixed stencil (stitchops/reference/head_mixed_conv.py has
the math).

    out[b, prefix + q, d] = Σ_p Σ_h mix[h, p] · v[b, prefix + q + off_p, h, d]

Three memory-bound kernels, fp32 accumulation, no atomics (deterministic):

- ``_forward_kernel``: program (b, BLOCK_Q patch positions, BLOCK_D channels). For every tap
  (unrolled, k constexpr) and head, it loads the [BLOCK_Q, BLOCK_D] tile of v at the tap's
  shifted positions (masked outside the map: zero padding, never a padded copy) and adds it
  scaled by mix[h, p]. A program's taps read its positions' rows of v with a halo of k//2
  map rows; the other programs' halos hit L2. No k²-times tensor is formed.
- ``_grad_v_kernel``: the transposed stencil, dv[b, q, h, d] = Σ_p mix[h, p] · G[b, q − off_p, d]
  (outputs whose tap p reads position q), program (b, BLOCK_Q, BLOCK_D), heads in turn.
- ``_grad_mix_kernel``: part[program, h, p] = Σ_(q in block) Σ_d G[b, q, d] · v[b, q + off_p, h, d],
  program (b, BLOCK_Q positions) looping over the channels; kernels/partials.py sums the
  programs' fp32 partials in a fixed order.

FLOPs: forward B·P·k²·H·D multiply-adds (P = gh·gw); the backward twice that. Minimum bytes:
forward B·N·H·D·s read + B·N·D·s written (s: bytes per element); backward G and v read,
dv written. The taps' shifted loads touch k²·H times v's elements per output; all but the
first of each hit L1/L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from stitchops.kernels.partials import sum_ranges
from stitchops.kernels.tuning import launch_sizes

from stitchops._runtime import new_output

BLOCK_Q = 64  # patch positions per program
BLOCK_D = 32  # channels per program (forward, dv); the dmix kernel loops over them
INTERPRETED = {"BLOCK_Q": 256, "BLOCK_D": 64}  # fewer, larger steps under the CPU interpreter


@triton.jit
def _shifted(q, gh, gw, p, K: tl.constexpr, SIGN: tl.constexpr):
    """The positions q + SIGN·off_p of the patch positions q, and whether they are inside the
    map (tap p = a + K·c at (dy, dx) = (a − K//2, c − K//2))."""
    dy = SIGN * (p % K - K // 2)
    dx = SIGN * (p // K - K // 2)
    row = q // gw + dy
    col = q % gw + dx
    inside = (row >= 0) & (row < gh) & (col >= 0) & (col < gw) & (q < gh * gw)
    return row * gw + col, inside


@triton.jit
def _forward_kernel(
    v_ptr,
    mix_ptr,
    out_ptr,
    heads,
    dim,
    gh,
    gw,
    prefix,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_on,
    K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep_d = d < dim
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    v_base = v_ptr + b * stride_vb + d[None, :] * stride_vd
    for p in tl.static_range(K * K):
        src, inside = _shifted(q, gh, gw, p, K, 1)
        rows = (prefix + src).to(tl.int64) * stride_vn
        for h in range(heads):
            weight = tl.load(mix_ptr + h * K * K + p).to(tl.float32)
            tile = tl.load(
                v_base + rows[:, None] + h * stride_vh,
                mask=inside[:, None] & keep_d[None, :],
                other=0.0,
            )
            acc += weight * tile.to(tl.float32)
    rows_out = (prefix + q).to(tl.int64) * stride_on
    mask = (q < gh * gw)[:, None] & keep_d[None, :]
    tl.store(
        out_ptr + b * stride_ob + rows_out[:, None] + d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _grad_v_kernel(
    g_ptr,
    mix_ptr,
    dv_ptr,
    heads,
    dim,
    gh,
    gw,
    prefix,
    stride_gb,
    stride_gn,
    stride_gd,
    stride_vb,
    stride_vn,
    stride_vh,
    K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep_d = d < dim
    g_base = g_ptr + b * stride_gb + d[None, :] * stride_gd
    rows_out = (prefix + q).to(tl.int64) * stride_vn
    mask = (q < gh * gw)[:, None] & keep_d[None, :]
    for h in range(heads):
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        for p in tl.static_range(K * K):
            dst, inside = _shifted(q, gh, gw, p, K, -1)  # the outputs whose tap p reads q
            weight = tl.load(mix_ptr + h * K * K + p).to(tl.float32)
            rows = (prefix + dst).to(tl.int64) * stride_gn
            tile = tl.load(
                g_base + rows[:, None], mask=inside[:, None] & keep_d[None, :], other=0.0
            )
            acc += weight * tile.to(tl.float32)
        tl.store(
            dv_ptr + b * stride_vb + rows_out[:, None] + h * stride_vh + d[None, :],
            acc.to(dv_ptr.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _grad_mix_kernel(
    g_ptr,
    v_ptr,
    part_ptr,
    heads,
    dim,
    gh,
    gw,
    prefix,
    stride_gb,
    stride_gn,
    stride_gd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    q = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    out = (b * tl.num_programs(1) + block) * heads * K * K  # this program's partial row
    rows_g = (prefix + q).to(tl.int64) * stride_gn
    keep_q = q < gh * gw
    for p in tl.static_range(K * K):
        src, inside = _shifted(q, gh, gw, p, K, 1)
        rows_v = (prefix + src).to(tl.int64) * stride_vn
        for h in range(heads):
            acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                keep_d = d < dim
                both = (keep_q & inside)[:, None] & keep_d[None, :]
                g = tl.load(
                    g_ptr + b * stride_gb + rows_g[:, None] + d[None, :] * stride_gd,
                    mask=both,
                    other=0.0,
                )
                x = tl.load(
                    v_ptr
                    + b * stride_vb
                    + rows_v[:, None]
                    + h * stride_vh
                    + d[None, :] * stride_vd,
                    mask=inside[:, None] & keep_d[None, :],
                    other=0.0,
                )
                acc += g.to(tl.float32) * x.to(tl.float32)
            tl.store(part_ptr + out + h * K * K + p, tl.sum(tl.sum(acc, axis=1), axis=0))


def _sizes() -> dict[str, int]:
    return launch_sizes({"BLOCK_Q": BLOCK_Q, "BLOCK_D": BLOCK_D}, INTERPRETED)


def _kernel_size(mix: torch.Tensor) -> int:
    return round(mix.shape[1] ** 0.5)


def head_mixed_conv_forward(
    v: torch.Tensor, mix: torch.Tensor, gh: int, gw: int, prefix: int
) -> torch.Tensor:
    """out [B, N, D] in v's dtype, for v [B, N, H, D] of any strides."""
    b, n, heads, dim = v.shape
    out = new_output(b, n, dim, device=v.device, dtype=v.dtype)
    out[:, :prefix] = 0
    sizes = _sizes()
    if b * gh * gw * dim:
        grid = (b, triton.cdiv(gh * gw, sizes["BLOCK_Q"]), triton.cdiv(dim, sizes["BLOCK_D"]))
        _forward_kernel[grid](
            v,
            mix.contiguous(),
            out,
            heads,
            dim,
            gh,
            gw,
            prefix,
            *v.stride(),
            out.stride(0),
            out.stride(1),
            K=_kernel_size(mix),
            **sizes,
        )
    return out


def head_mixed_conv_backward(
    grad: torch.Tensor,
    v: torch.Tensor,
    mix: torch.Tensor,
    gh: int,
    gw: int,
    prefix: int,
    needs: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dv [B, N, H, D] in v's dtype, dmix [H, k²] in mix's dtype), where ``needs`` asks."""
    need_v, need_mix = needs
    b, n, heads, dim = v.shape
    k, mix = _kernel_size(mix), mix.contiguous()
    sizes, work = _sizes(), b * gh * gw * dim
    dv = dmix = None
    if need_v:
        dv = new_output(b, n, heads, dim, device=v.device, dtype=v.dtype)
        dv[:, :prefix] = 0
        if work:
            grid = (b, triton.cdiv(gh * gw, sizes["BLOCK_Q"]), triton.cdiv(dim, sizes["BLOCK_D"]))
            _grad_v_kernel[grid](
                grad,
                mix,
                dv,
                heads,
                dim,
                gh,
                gw,
                prefix,
                *grad.stride(),
                dv.stride(0),
                dv.stride(1),
                dv.stride(2),
                K=k,
                **sizes,
            )
    if need_mix:
        blocks = triton.cdiv(gh * gw, sizes["BLOCK_Q"])
        part = new_output(b * blocks, heads * k * k, device=v.device, dtype=torch.float32)
        if work:
            _grad_mix_kernel[(b, blocks)](
                grad, v, part, heads, dim, gh, gw, prefix, *grad.stride(), *v.stride(), K=k, **sizes
            )
        else:
            part.zero_()
        dmix = sum_ranges([(part, 1.0)], mix.dtype)[0].view(heads, k * k)
    return dv, dmix
