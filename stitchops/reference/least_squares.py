"""Least-squares initialisation of a stitching layer (SN-Net Eq. 4-5, with a bias column).

Find W [OUT, IN], b [OUT] minimising ‖X·Wᵀ + 1·bᵀ − Y‖_F for X [N, IN], Y [N, OUT]. The bias
is free (not penalised), so with column means μ, ν and centred data Xc = X − 1μᵀ,
Yc = Y − 1νᵀ the problem splits into Wᵀ = Xc⁺·Yc (the minimum-norm W among all
least-squares solutions) and b = ν − W·μ. This equals the augmented pseudo-inverse
[W, b]ᵀ = [X, 1]⁺·Y of SN-Net's code except when a combination of features is constant, where
the augmented form would also penalise b. ``ridge`` > 0 minimises the residual plus ridge·‖W‖².

This reference runs ``torch.linalg.lstsq`` (gelsd, SVD based) in float64 on the CPU over the
whole data: the definition, slow. ``stitchops.least_squares_init`` streams normal equations.
"""

from __future__ import annotations

import torch


def least_squares_init(
    x_src: torch.Tensor, x_dst: torch.Tensor, ridge: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns float64 (weight [OUT, IN], bias [OUT]) on the CPU."""
    xs = x_src.reshape(-1, x_src.shape[-1]).double().cpu()
    ys = x_dst.reshape(-1, x_dst.shape[-1]).double().cpu()
    mu, nu = xs.mean(0), ys.mean(0)
    xc, yc = xs - mu, ys - nu
    if ridge > 0:
        xc = torch.cat([xc, torch.eye(xs.shape[1], dtype=xs.dtype) * ridge**0.5], dim=0)
        yc = torch.cat([yc, torch.zeros(xs.shape[1], ys.shape[1], dtype=ys.dtype)], dim=0)
    w_t = torch.linalg.lstsq(xc, yc, driver="gelsd").solution  # [IN, OUT]
    weight = w_t.t().contiguous()
    return weight, nu - weight @ mu
