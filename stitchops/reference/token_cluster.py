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
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Pixels per chunk of the gathered [B, pixels, K, C] candidate tensors.
_CHUNK_ELEMENTS = 1 << 24


def cell_index(size_out: int, size_in: int, device=None) -> torch.Tensor:
    """[size_out] int64: the source index of each output position under PyTorch's nearest
    interpolation from ``size_in`` to ``size_out`` (taken from F.interpolate itself)."""
    source = torch.arange(size_in, dtype=torch.float32, device=device).view(1, 1, size_in)
    return F.interpolate(source, size=size_out, mode="nearest").view(size_out).long()


def candidates(hw_in: tuple[int, int], grid: tuple[int, int], window: int, device=None):
    """(index [N, K] int64 into the M = h·w centres, valid [N, K] bool) for the pixels of an
    H × W map in row-major order; K = window², invalid entries point at centre 0."""
    (height, width), (h, w), r = hw_in, grid, window // 2
    cy = cell_index(height, h, device)[:, None].expand(height, width).reshape(-1)
    cx = cell_index(width, w, device)[None, :].expand(height, width).reshape(-1)
    offsets = torch.arange(-r, r + 1, device=device)
    iy = cy[:, None, None] + offsets[None, :, None]  # [N, window, 1]
    ix = cx[:, None, None] + offsets[None, None, :]  # [N, 1, window]
    valid = ((iy >= 0) & (iy < h)) & ((ix >= 0) & (ix < w))
    index = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).reshape(len(cy), -1)
    return torch.where(valid.reshape(len(cy), -1), index, 0), valid.reshape(len(cy), -1)


def _chunks(n: int, per_pixel: int):
    step = max(1, _CHUNK_ELEMENTS // max(per_pixel, 1))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def local_weights(x: torch.Tensor, s: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                  temperature: float) -> torch.Tensor:  # fmt: skip
    """[B, N, K] softmax over each pixel's candidates of −‖x_p − s_i‖²/τ (0 at invalid ones),
    for x [B, N, C] and centres s [B, M, C]."""
    b, n, c = x.shape
    out = []
    for part in _chunks(n, index.shape[1] * c * max(b, 1)):
        gathered = s[:, index[part]]  # [B, n', K, C]
        d = (x[:, part, None, :] - gathered).square().sum(-1)
        logits = (-d / temperature).masked_fill(~valid[part], float("-inf"))
        out.append(torch.softmax(logits, dim=-1))
    return torch.cat(out, dim=1) if out else x.new_zeros(b, 0, index.shape[1])


def m_step(x: torch.Tensor, a: torch.Tensor, index: torch.Tensor, previous: torch.Tensor):
    """s_i = Σ_p a_pi x_p / Σ_p a_pi for x [B, N, C] and affinities a [B, N, K]; a centre with
    no affinity keeps its ``previous`` value [B, M, C]."""
    return m_step_with_totals(x, a, index, previous)[0]


def m_step_with_totals(x, a, index, previous) -> tuple[torch.Tensor, torch.Tensor]:
    """(``m_step``'s centres, the totals Σ_p a_pi [B, M])."""
    b, m, c = previous.shape
    numer = x.new_zeros(b, m, c)
    denom = x.new_zeros(b, m)
    for k in range(index.shape[1]):  # one candidate slot at a time: [B, N, C] sources
        numer = numer.index_add(1, index[:, k], a[:, :, k, None] * x)
        denom = denom.index_add(1, index[:, k], a[:, :, k])
    empty = denom == 0  # NaN stays NaN: a NaN pixel reaches its centres
    safe = torch.where(empty, torch.ones_like(denom), denom)
    return torch.where(empty[..., None], previous, numer / safe[..., None]), denom


def initial_centres(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """s⁰ [B, h, w, C]: adaptive average pooling of x [B, H, W, C] (PyTorch's bins)."""
    return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)


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
    index, valid = candidates((height, width), grid, window, x.device)
    flat = x.reshape(b, height * width, c).to(accumulation(x.dtype))
    s = initial_centres(flat.view(b, height, width, c), grid).reshape(b, grid[0] * grid[1], c)
    for _ in range(iters):
        frozen = contextlib.nullcontext() if affinity_grad else torch.no_grad()
        with frozen:
            a = local_weights(flat, s, index, valid, temperature)
        s = m_step(flat, a, index, s)
    return s.reshape(b, grid[0], grid[1], c).to(x.dtype)


def accumulation(dtype: torch.dtype) -> torch.dtype:
    """What the math runs in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def topk_weights(x: torch.Tensor, s: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """[B, N, M] the official code's weights: e = exp(−(d − min d)/τ) over all centres, the
    entries ≥ the row's k-th largest kept, the row divided by max(‖e‖₂, 1e−12)."""
    b, n = x.shape[:2]
    out = []
    for part in _chunks(n, s.shape[1] * max(b, 1)):
        d = torch.cdist(x[:, part], s, compute_mode="donot_use_mm_for_euclid_dist").square()
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
    grid = centres.shape[1:3]
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
        index, valid = candidates((height, width), tuple(grid), window, x.device)
        with frozen:
            weights = local_weights(flat, s, index, valid, temperature)
        y = (weights[..., None] * v[:, index]).sum(2)
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
    index, valid = candidates((height, width), grid, window, x.device)
    flat = x.reshape(b, height * width, c).to(acc)
    m = grid[0] * grid[1]
    s = initial_centres(flat.view(b, height, width, c), grid).reshape(b, m, c)
    history = []
    for _ in range(iters):
        a = local_weights(flat, s, index, valid, temperature)
        s, totals = m_step_with_totals(flat, a, index, s)
        history.append((a, totals))
    g = grad.reshape(b, m, c).to(acc)
    dx = torch.zeros_like(flat)
    for a, totals in reversed(history):
        kept = totals == 0
        per_pixel = torch.where(kept[..., None], 0.0, g / torch.where(kept, 1.0, totals)[..., None])
        for k in range(index.shape[1]):
            dx += a[:, :, k, None] * per_pixel[:, index[:, k]]
        g = torch.where(kept[..., None], g, 0.0)
    pooled = g.reshape(b, *grid, c).permute(0, 3, 1, 2)
    dx += (
        torch.ops.aten._adaptive_avg_pool2d_backward(
            pooled, flat.view(b, height, width, c).permute(0, 3, 1, 2)
        )
        .permute(0, 2, 3, 1)
        .reshape(b, height * width, c)
    )
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
        index, valid = candidates((height, width), grid, window, x.device)
        weights = local_weights(flat, s, index, valid, temperature)
        dv = dy.new_zeros(b, s.shape[1], dy.shape[-1])
        for slot in range(index.shape[1]):
            dv = dv.index_add(1, index[:, slot], weights[:, :, slot, None] * dy)
    return dv.reshape(values.shape).to(values.dtype)
