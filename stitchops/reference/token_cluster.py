"""Expedit's token clustering and reconstruction in plain PyTorch (NeurIPS 2022, Sec. 3,
Eq. 2-4): the spec the kernels follow and the CPU path.

Shapes: x [B, H, W, C] patch tokens (channels last, no class token), N = H·W pixels;
centres s [B, h, w, C], M = h·w; values v [B, h, w, D].

Cells and candidates. Pixel p = (y, x) falls in cell (cy, cx): the (h, w) index that
``F.interpolate(size=(H, W), mode="nearest")`` maps it to (PyTorch's float rule, which is
not always floor(y·h/H)). Its candidate centres are the cells within ±r rows and columns of
its own, r = window // 2, cut at the borders: K ≤ (2r+1)² of them.

Clustering (Eq. 2-3): s⁰ = adaptive_avg_pool2d(x, (h, w)); then ``iters`` times
    a_pi = softmax_{i ∈ cand(p)} (−‖x_p − s_i‖² / τ)          (E-step)
    s_i  = Σ_p a_pi x_p / Σ_p a_pi                             (M-step)
A centre whose total affinity is 0 (every pixel that could pick it prefers others by more
than float range) keeps its previous value; the official code sets it to zero. As in the
official code the affinities are constants for the gradient (computed under no_grad), so
the gradient reaches x through the last M-step (and the pooling, for centres never
updated); ``affinity_grad=True`` differentiates through every step.

Reconstruction (Eq. 4), ``mode="local"``: w_pi = softmax over cand(p) of −‖x_p − s_i‖²/τ,
y_p = Σ_i w_pi v_i. ``mode="topk"`` (the official code): d_pi over all M centres,
e_pi = exp(−(d_pi − min_j d_pj)/τ), the entries ≥ the k-th largest of the row kept (ties
kept), ŵ_p = e_p / max(‖e_p‖₂, 1e−12) (an L2 norm, not a convex combination), y_p = ŵ_p·v.
The shift by the row minimum changes nothing in exact arithmetic and keeps float32 rows
from underflowing to zero (the official code's exp(−d/τ) does once d > ≈ 5,000 at τ = 50).

Cost per clustering iteration: 3·N·K·C FLOPs for the distances and 2·N·K·C for the M-step
sums (≈ 0.4 GMAC at N = 1600, K = 25, C = 1024, 5 iterations), against the official code's
dense N × M distances (≈ 14 GMAC there).

This implementation works by bands: the pixels of one row of cells only ever pick centres in
the 2r+1 rows of cells around it, so each band is two small GEMMs (distances as
‖x‖² − 2x·sᵀ + ‖s‖² to the band's (2r+1)·w centres, masked to ±r columns, and the M-step
sums aᵀx), N·(2r+1)·w·C multiply-adds per step: between the local count and the dense one,
on the GEMM units, with [pixels of a band, (2r+1)·w] weights as the only intermediate.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Pixels per chunk of topk mode's [B, pixels, M] weights.
_CHUNK_ELEMENTS = 1 << 24


def cell_index(size_out: int, size_in: int, device=None) -> torch.Tensor:
    """[size_out] int64: the source index of each output position under PyTorch's nearest
    interpolation from ``size_in`` to ``size_out`` (taken from F.interpolate itself)."""
    source = torch.arange(size_in, dtype=torch.float32, device=device).view(1, 1, size_in)
    return F.interpolate(source, size=size_out, mode="nearest").view(size_out).long()


@dataclass(frozen=True)
class Band:
    """The pixels of one row of cells and the centres they may pick."""

    pixels: slice  # flat pixel indices (whole pixel rows: the mapping is monotone)
    centres: slice  # flat centre indices: the cell rows within ±r, every column
    allowed: torch.Tensor  # [pixels, centres] bool: also within ±r columns


def bands(hw_in: tuple[int, int], grid: tuple[int, int], window: int, device=None) -> list[Band]:
    """The bands of an H × W map clustered to h × w (every cell row has pixels: h <= H)."""
    (height, width), (h, w), r = hw_in, grid, window // 2
    cy = cell_index(height, h, device)
    cx = cell_index(width, w, device)
    near_columns = (cx[:, None] - torch.arange(w, device=device)[None, :]).abs() <= r  # [W, w]
    out = []
    for row in range(h):
        ys = (cy == row).nonzero().flatten()
        first, last = int(ys[0]), int(ys[-1]) + 1
        low, high = max(0, row - r), min(h, row + r + 1)
        allowed = near_columns.repeat(last - first, high - low)
        out.append(Band(slice(first * width, last * width), slice(low * w, high * w), allowed))
    return out


def squared_distances(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[B, n, m] ‖x_p − s_i‖² for x [B, n, C] and s [B, m, C], as ‖x‖² − 2x·sᵀ + ‖s‖² (a GEMM;
    clamped at 0 against rounding)."""
    cross = x @ s.transpose(1, 2)
    return (
        x.square().sum(-1, keepdim=True) - 2 * cross + s.square().sum(-1)[:, None, :]
    ).clamp_min(0)


def band_weights(x: torch.Tensor, s: torch.Tensor, band: Band, temperature: float):
    """[B, pixels, centres] softmax over each pixel's candidates of −‖x_p − s_i‖²/τ (0 off
    them) for the band's pixels of x [B, N, C] and its centres of s [B, M, C]."""
    d = squared_distances(x[:, band.pixels], s[:, band.centres])
    logits = (-d / temperature).masked_fill(~band.allowed, float("-inf"))
    return torch.softmax(logits, dim=-1)


def m_step(x, s, band_list, temperature, frozen: bool):
    """One EM iteration: (new centres [B, M, C], weights of every band, totals Σ_p a_pi [B, M]).
    A centre with no affinity keeps its value; ``frozen``: the weights are constants."""
    numer = torch.zeros_like(s)
    totals = s.new_zeros(s.shape[:2])
    weights = []
    for band in band_list:
        with torch.no_grad() if frozen else contextlib.nullcontext():
            a = band_weights(x, s, band, temperature)
        weights.append(a)
        numer.index_add_(1, _range(band.centres, s), a.transpose(1, 2) @ x[:, band.pixels])
        totals.index_add_(1, _range(band.centres, s), a.sum(1))
    empty = totals == 0  # NaN stays NaN: a NaN pixel reaches its centres
    safe = torch.where(empty, torch.ones_like(totals), totals)
    return torch.where(empty[..., None], s, numer / safe[..., None]), weights, totals


def _range(part: slice, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(part.start, part.stop, device=like.device)


def initial_centres(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """s⁰ [B, h, w, C]: adaptive average pooling of x [B, H, W, C] (PyTorch's bins)."""
    return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)


def accumulation(dtype: torch.dtype) -> torch.dtype:
    """What the math runs in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def token_cluster(
    x: torch.Tensor,
    grid: tuple[int, int],
    window: int = 5,
    iters: int = 5,
    temperature: float = 50.0,
    affinity_grad: bool = False,
) -> torch.Tensor:
    """Centres [B, h, w, C] of x [B, H, W, C] (module docstring), differentiable by autograd;
    computed in float32 (float64 for float64), returned in x's dtype."""
    b, height, width, c = x.shape
    band_list = bands((height, width), grid, window, x.device)
    flat = x.reshape(b, height * width, c).to(accumulation(x.dtype))
    s = initial_centres(flat.view(b, height, width, c), grid).reshape(b, grid[0] * grid[1], c)
    for _ in range(iters):
        s = m_step(flat, s, band_list, temperature, frozen=not affinity_grad)[0]
    return s.reshape(b, grid[0], grid[1], c).to(x.dtype)


def topk_weights(x: torch.Tensor, s: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """[B, N, M] the official code's weights: e = exp(−(d − min d)/τ) over all centres, the
    entries ≥ the row's k-th largest kept, the row divided by max(‖e‖₂, 1e−12)."""
    b, n = x.shape[:2]
    out = []
    step = max(1, _CHUNK_ELEMENTS // max(s.shape[1] * max(b, 1), 1))
    for start in range(0, n, step):
        part = x[:, start : start + step]
        d = squared_distances(part, s)
        e = torch.exp(-(d - d.min(dim=-1, keepdim=True).values) / temperature)
        kth = e.topk(k, dim=-1).values[..., -1:]
        e = torch.where(e >= kth, e, torch.zeros_like(e))
        out.append(e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return torch.cat(out, dim=1) if out else x.new_zeros(b, 0, s.shape[1])


def token_reconstruct(
    x: torch.Tensor,
    centres: torch.Tensor,
    values: torch.Tensor,
    window: int = 5,
    temperature: float = 50.0,
    mode: str = "local",
    k: int = 20,
    affinity_grad: bool = False,
) -> torch.Tensor:
    """y [B, H, W, D] from x [B, H, W, C], centres [B, h, w, C], values [B, h, w, D];
    computed in float32 (float64 for float64), returned in values' dtype."""
    b, height, width, c = x.shape
    grid = tuple(centres.shape[1:3])
    acc = accumulation(x.dtype)
    flat = x.reshape(b, height * width, c).to(acc)
    s = centres.reshape(b, grid[0] * grid[1], c).to(acc)
    v = values.reshape(b, grid[0] * grid[1], values.shape[-1]).to(acc)
    frozen = contextlib.nullcontext() if affinity_grad else torch.no_grad()
    if mode == "topk":
        with frozen:
            weights = topk_weights(flat, s, k, temperature)
        y = weights @ v
    else:
        parts = []
        for band in bands((height, width), grid, window, x.device):
            with frozen:
                a = band_weights(flat, s, band, temperature)
            parts.append(a @ v[:, band.centres])
        y = torch.cat(parts, dim=1)
    return y.reshape(b, height, width, v.shape[-1]).to(values.dtype)


# The entry points of the torch backend (the triton and cuda kernels take the same
# arguments). They run below autograd (inside the registered ops): the backwards are the
# explicit adjoints, with the affinities constant as in the forward.


def token_cluster_forward(x, grid, window, iters, temperature) -> torch.Tensor:
    return token_cluster(x, grid, window, iters, temperature)


def token_cluster_backward(grad, x, grid, window, iters, temperature) -> torch.Tensor:
    """dx for centres = token_cluster(x) with constant affinities: walking the iterations
    back, a centre updated at step t passes g_i / Σ_p a_pi to its pixels (weights a_pi); one
    that kept its value passes g_i on to step t − 1, and at the start to the pooling."""
    b, height, width, c = x.shape
    acc = accumulation(x.dtype)
    band_list = bands((height, width), grid, window, x.device)
    flat = x.reshape(b, height * width, c).to(acc)
    m = grid[0] * grid[1]
    s = initial_centres(flat.view(b, height, width, c), grid).reshape(b, m, c)
    history = []
    for _ in range(iters):
        s, weights, totals = m_step(flat, s, band_list, temperature, frozen=True)
        history.append((weights, totals))
    g = grad.reshape(b, m, c).to(acc)
    dx = torch.zeros_like(flat)
    for weights, totals in reversed(history):
        kept = totals == 0
        per_centre = torch.where(
            kept[..., None], 0.0, g / torch.where(kept, 1.0, totals)[..., None]
        )
        for band, a in zip(band_list, weights, strict=True):
            dx[:, band.pixels] += a @ per_centre[:, band.centres]
        g = torch.where(kept[..., None], g, 0.0)
    pooled = g.reshape(b, *grid, c).permute(0, 3, 1, 2)
    source = flat.view(b, height, width, c).permute(0, 3, 1, 2)
    dx += torch.ops.aten._adaptive_avg_pool2d_backward(pooled, source).permute(0, 2, 3, 1).reshape(
        b, height * width, c)  # fmt: skip
    return dx.reshape(x.shape).to(x.dtype)


def token_reconstruct_forward(x, centres, values, window, temperature, mode, k) -> torch.Tensor:
    return token_reconstruct(x, centres, values, window, temperature, mode, k)


def token_reconstruct_backward(grad, x, centres, values, window, temperature, mode, k):
    """d values = Wᵀ·dy, W the reconstruction weights [N, M] (constant)."""
    b, height, width, c = x.shape
    grid = tuple(centres.shape[1:3])
    acc = accumulation(x.dtype)
    flat = x.reshape(b, height * width, c).to(acc)
    s = centres.reshape(b, grid[0] * grid[1], c).to(acc)
    dy = grad.reshape(b, height * width, values.shape[-1]).to(acc)
    if mode == "topk":
        dv = topk_weights(flat, s, k, temperature).transpose(1, 2) @ dy
    else:
        dv = dy.new_zeros(b, s.shape[1], dy.shape[-1])
        for band in bands((height, width), grid, window, x.device):
            a = band_weights(flat, s, band, temperature)
            dv.index_add_(1, _range(band.centres, s), a.transpose(1, 2) @ dy[:, band.pixels])
    return dv.reshape(values.shape).to(values.dtype)
