"""SPViT's head-mixed stencil in plain PyTorch (thesis ch. 4, Eq. 4.5-4.7).

SPViT turns a multi-head self-attention layer into a k×k convolution made of its own value
weights: a mixing ``mix[h, p]`` (softmax over the heads h of learned logits) says how much
head h's values feed kernel tap p. On the value projection ``v = x·W_vᵀ`` viewed per head,
``v [B, N, H, D]`` with N = prefix + gh·gw tokens (the prefix: class / distillation tokens,
then the patch tokens row-major on a gh × gw grid), the stencil is

    out[b, prefix + i·gw + j, d] = Σ_p Σ_h mix[h, p] · v[b, prefix + (i+dy_p)·gw + (j+dx_p), h, d]

summed over the taps whose position (i+dy_p, j+dx_p) lies inside the map (zero padding),
taps in the official code's order ``p = a + k·c`` ↔ ``(dy, dx) = (a − k//2, c − k//2)``
(a: the row, c: the column of the k×k kernel); the prefix rows of ``out`` are zero. With
``v = x·W_vᵀ`` this is ``F.conv2d`` of the patch-token map with the kernel
``K[o, ch, a, c] = Σ_h mix[h, a + k·c] · W_v[h·D + o, ch]``, padding k//2.

Gradients, with G = dL/dout [B, N, D] (its prefix rows unused):

    dv[b, prefix + (i+dy_p)·gw + (j+dx_p), h, d] += mix[h, p] · G[b, prefix + i·gw + j, d]
    dmix[h, p] = Σ_b Σ_(i, j) Σ_d G[b, prefix + i·gw + j, d]
                                  · v[b, prefix + (i+dy_p)·gw + (j+dx_p), h, d]

Cost per call, P = gh·gw: the forward B·P·k²·H·D multiply-adds; the backward twice that.
Minimum bytes: v read once (B·N·H·D elements), out written once (B·N·D). The official code
forms the k²-times tensor ``v @ softmax(mix)`` [B, P, D, k²], a zero-padded copy of it and a
gather of its taps (a scatter-add in the backward): about 3·k² / H times v's memory.

Every backend provides the two entry points below with these arguments; this one loops
over the taps (one [B, P, D] temporary at a time, no k²-times tensor) and computes half
precision in float32.
"""

from __future__ import annotations

import torch

# The gradients the backward computes, in the order of its ``needs`` flags and its results.
GRADIENTS = ("v", "mix")
KERNEL_SIZES = (1, 3, 5, 7)


def taps(k: int) -> list[tuple[int, int]]:
    """(dy, dx) of each tap p = a + k·c of a k×k kernel, in that order."""
    r = k // 2
    return [(p % k - r, p // k - r) for p in range(k * k)]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _spans(size: int, offset: int) -> tuple[slice, slice]:
    """(destination, source) index ranges along one side: dst[t] = src[t + offset]."""
    lo, hi = max(0, -offset), min(size, size - offset)
    if hi <= lo:
        return slice(0, 0), slice(0, 0)
    return slice(lo, hi), slice(lo + offset, hi + offset)


def head_mixed_conv(
    v: torch.Tensor, mix: torch.Tensor, grid: tuple[int, int], prefix: int = 1
) -> torch.Tensor:
    """The op by its definition, differentiable by autograd in v and mix, any dtype."""
    return head_mixed_conv_forward(v, mix, grid[0], grid[1], prefix)


# Images per step of the CPU path: an eighth of the batch, so that its temporaries (the
# k²-times mixed values, the shifted gradients) stay an eighth of one k²-times tensor.
def _chunks(batch: int) -> list[slice]:
    size = max(1, batch // 8)
    return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]


def head_mixed_conv_forward(
    v: torch.Tensor, mix: torch.Tensor, gh: int, gw: int, prefix: int
) -> torch.Tensor:
    """out [B, N, D] in v's dtype (definition in the module docstring). For a chunk of images:
    the heads mixed for every tap in one GEMM, u = mixᵀ·v [k², c, gh, gw, D], then each tap's
    map u[p] added, shifted, into the output maps (no padded copy, no gather)."""
    b, n, heads, dim = v.shape
    k = round(mix.shape[1] ** 0.5)
    dtype = _compute_dtype(v)
    weights = mix.to(dtype).t()  # [k², H]
    out = torch.zeros(b, n, dim, device=v.device, dtype=dtype)
    grid = out[:, prefix:].view(b, gh, gw, dim)
    for chunk in _chunks(b):
        patches = v[chunk, prefix:].to(dtype).permute(2, 0, 1, 3)  # [H, c, P, D]
        mixed = (weights @ patches.reshape(heads, -1)).view(k * k, -1, gh, gw, dim)
        for p, (dy, dx) in enumerate(taps(k)):
            (rows, rows_src), (cols, cols_src) = _spans(gh, dy), _spans(gw, dx)
            grid[chunk, rows, cols] += mixed[p][:, rows_src, cols_src]
    return out.to(v.dtype)


def _shifted_grads(g: torch.Tensor, k: int) -> torch.Tensor:
    """[k², c, gh, gw, D] of G [c, gh, gw, D]: tap p at position q holds G at q − off_p (the
    output whose tap p reads q), zero where that output is outside the map."""
    stacked = g.new_zeros(k * k, *g.shape)
    for p, (dy, dx) in enumerate(taps(k)):
        (rows, rows_src), (cols, cols_src) = _spans(g.shape[1], dy), _spans(g.shape[2], dx)
        stacked[p][:, rows_src, cols_src] = g[:, rows, cols]
    return stacked


def head_mixed_conv_backward(
    grad: torch.Tensor,
    v: torch.Tensor,
    mix: torch.Tensor,
    gh: int,
    gw: int,
    prefix: int,
    needs: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dv [B, N, H, D], dmix [H, k²]), each where its flag in ``needs`` is set (else None).
    Per chunk of images, with Gs [k², c·P·D] the shifted gradients (``_shifted_grads``):
    dv = mix·Gs and dmix += v·Gsᵀ (v as [H, c·P·D]), two GEMMs."""
    need_v, need_mix = needs
    b, n, heads, dim = v.shape
    k = round(mix.shape[1] ** 0.5)
    dtype = _compute_dtype(v)
    weights = mix.to(dtype)
    dv = torch.zeros(b, n, heads, dim, device=v.device, dtype=dtype) if need_v else None
    dmix = torch.zeros(heads, k * k, device=v.device, dtype=dtype) if need_mix else None
    for chunk in _chunks(b):
        g = grad[chunk, prefix:].to(dtype).reshape(-1, gh, gw, dim)
        shifted = _shifted_grads(g, k).view(k * k, -1)  # [k², c·P·D]
        if need_v:
            patch_dv = (weights @ shifted).view(heads, -1, gh * gw, dim)  # [H, c, P, D]
            dv[chunk, prefix:] = patch_dv.permute(1, 2, 0, 3)
        if need_mix:
            patches = v[chunk, prefix:].to(dtype).permute(2, 0, 1, 3).reshape(heads, -1)
            dmix += patches @ shifted.t()
    return (dv.to(v.dtype) if need_v else None, dmix.to(mix.dtype) if need_mix else None)
