"""Float64 formulations of Expedit-Segmenter's official code (``mmseg/ops/cluster.py``,
``mmseg/ops/reconstruction.py``, commit 63f4066), written from its description and a
reading of its source, not copied: the tests compare stitchops' ``numerics="official"``
with them. Also the candidate lists of the paper and tokens at a ViT's scales."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dense_candidates(size: tuple[int, int], grid: tuple[int, int], window: int) -> torch.Tensor:
    """[N, M] bool: pixel p may pick centre i. Cells from F.interpolate of a 2-D map of cell
    numbers (not the reference's per-axis indices), candidates listed by explicit loops."""
    (height, width), (h, w), r = size, grid, window // 2
    numbers = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    cell = F.interpolate(numbers, size=(height, width), mode="nearest").view(-1).long()
    allowed = torch.zeros(height * width, h * w, dtype=torch.bool)
    for p in range(height * width):
        cy, cx = divmod(int(cell[p]), w)
        for i in range(max(0, cy - r), min(h, cy + r + 1)):
            for j in range(max(0, cx - r), min(w, cx + r + 1)):
                allowed[p, i * w + j] = True
    return allowed


def official_cluster(x, grid, window, iters, temperature):
    """Expedit-Segmenter's clustering as its code evaluates it, in x's dtype: pixel-to-centre
    distances ‖x‖² + ‖s‖² − 2 s·x over all M centres (no clamp), 1e16 added off a pixel's
    candidates, a softmax over the centres of −d/τ, and centres Σ_p a x / max(Σ_p a, 1e−16)."""
    b, height, width, c = x.shape
    allowed = dense_candidates((height, width), grid, window).T.to(x.device)  # [M, N]
    pixels = x.permute(0, 3, 1, 2).reshape(b, c, -1)  # [B, C, N]
    s = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), grid).reshape(b, c, -1)  # [B, C, M]
    for _ in range(iters):
        d = (
            pixels.square().sum(1)[:, None, :]
            + s.square().sum(1)[:, :, None]
            - 2 * torch.einsum("bcm,bcn->bmn", s, pixels)
        )
        d = d + (~allowed) * 1e16
        a = torch.softmax(-d / temperature, dim=1)
        s = torch.bmm(a, pixels.transpose(1, 2)) / a.sum(2, keepdim=True).clamp(min=1e-16)
        s = s.transpose(1, 2)
    return s.transpose(1, 2).reshape(b, *grid, c)


def official_topk(x, centres, values, k, temperature):
    """The official reconstruction as its code evaluates it, in x's dtype: weights
    exp(−d/τ) (d = ‖x‖² + ‖s‖² − 2x·s over all centres), the entries ≥ the row's k-th
    largest kept, F.normalize over the row (its 1e−12 floor), then the product with values."""
    b, height, width, c = x.shape
    feat, sfeat = x.reshape(b, -1, c), centres.reshape(b, -1, c)
    d = (
        feat.square().sum(2)[:, :, None]
        + sfeat.square().sum(2)[:, None, :]
        - 2 * torch.einsum("bnc,bmc->bnm", feat, sfeat)
    )
    weight = torch.exp(-d / temperature)
    kth = weight.topk(k, dim=2).values.min(dim=-1, keepdim=True).values
    attention = torch.where(weight >= kth, weight, torch.zeros_like(weight))
    attention = F.normalize(attention, dim=2)
    out = torch.einsum("bnm,bmc->bnc", attention, values.reshape(b, -1, values.shape[-1]))
    return out.reshape(b, height, width, -1)


def realistic_tokens(size, channels, squared_norm, seed=0, regions=7, batch=1):
    """Tokens as a ViT's: regions (nearest of ``regions`` random seeds) with a mean token
    each plus noise, scaled to a mean squared norm of ``squared_norm``."""
    g = torch.Generator().manual_seed(seed)
    height, width = size
    seeds = torch.rand(regions, 2, generator=g, dtype=torch.float64) * torch.tensor(size)
    yy, xx = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    label = ((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)
    means = torch.randn(batch, regions, channels, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, height, width, channels, generator=g, dtype=torch.float64)
    x = means[:, label] + 0.6 * noise
    return x * math.sqrt(squared_norm / x.square().sum(-1).mean())
