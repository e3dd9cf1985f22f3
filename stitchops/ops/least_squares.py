"""``stitchops.least_squares_init``: SN-Net's least-squares stitching-layer init, on device.

Definition (see ``stitchops.reference.least_squares``): minimum-norm W and free bias b of
min ‖X·Wᵀ + 1·bᵀ − Y‖ (SN-Net Eq. 4-5), or the ridge solution.

Strategy: one streaming pass accumulates, in float64 on the tensors' device, the count n,
the column sums of X and Y and the Gram blocks XᵀX [IN, IN], XᵀY [IN, OUT] of data shifted
by the first batch's means (the shift keeps the later centring free of cancellation). Then

    C = Xcᵀ·Xc = V·diag(λ)·Vᵀ (eigh),   Wᵀ = V·diag(1/λ on λ > rtol²·λ_max, else 0)·Vᵀ·Xcᵀ·Yc

which is the pseudo-inverse solution of the centred problem: directions where X is (near)
rank-deficient get zero weight instead of blowing up. With ridge > 0, 1/(λ + ridge) is used
for every eigenvalue. Cost: 2·N·IN·(IN + OUT) fp64 FLOPs on the GPU (cuBLAS DGEMM) and one
(IN × IN) eigh, against an SVD of the whole [N, IN + 1] matrix for ``torch.linalg.pinv``.

Only the torch backend exists for this op: the work is two GEMMs and a small eigh, which
cuBLAS / cuSOLVER already do at the hardware limit; there is nothing for a kernel to fuse.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from stitchops.ops import _checks

# Relative cut-off on the centred x_src's singular values (least_squares_init's rtol).
DEFAULT_RTOL = 1e-5


class _NormalEquations:
    """Running float64 sums of one least-squares problem (shifted by the first batch mean)."""

    def __init__(self) -> None:
        self.n = 0
        self.shift_x = self.shift_y = None
        self.sum_x = self.sum_y = self.xtx = self.xty = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        y = y.reshape(-1, y.shape[-1]).to(torch.float64)
        if x.shape[0] == 0:
            return
        if self.shift_x is None:
            self.shift_x, self.shift_y = x.mean(0), y.mean(0)
            in_f, out_f = x.shape[1], y.shape[1]
            f64 = {"device": x.device, "dtype": torch.float64}
            self.sum_x, self.sum_y = torch.zeros(in_f, **f64), torch.zeros(out_f, **f64)
            self.xtx = torch.zeros(in_f, in_f, **f64)
            self.xty = torch.zeros(in_f, out_f, **f64)
        x = x - self.shift_x
        y = y - self.shift_y
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.xtx.addmm_(x.t(), x)
        self.xty.addmm_(x.t(), y)

    def solve(self, ridge: float, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
        mean_x, mean_y = self.sum_x / self.n, self.sum_y / self.n
        cov = self.xtx - self.n * torch.outer(mean_x, mean_x)
        cross = self.xty - self.n * torch.outer(mean_x, mean_y)
        cov = 0.5 * (cov + cov.t())
        eigval, eigvec = torch.linalg.eigh(cov)
        if ridge > 0:
            inv = 1.0 / (eigval.clamp_min(0) + ridge)
        else:
            cutoff = rtol**2 * eigval.max().clamp_min(0)
            keep = eigval > cutoff
            inv = torch.where(keep, 1.0 / torch.where(keep, eigval, 1.0), 0.0)
        w_t = eigvec @ (inv[:, None] * (eigvec.t() @ cross))  # [IN, OUT]
        weight = w_t.t()
        bias = (self.shift_y + mean_y) - weight @ (self.shift_x + mean_x)
        return weight, bias


def least_squares_init(
    x_src: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
    x_dst: torch.Tensor | None = None,
    ridge: float = 0.0,
    rtol: float = DEFAULT_RTOL,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares stitching layer: (weight [OUT, IN], bias [OUT]) with x_src·Wᵀ + b ≈ x_dst.

    Args:
        x_src: [..., IN] source activations (front anchor), or an iterable of
            (x_src, x_dst) batches, accumulated in one pass (then leave ``x_dst`` None).
        x_dst: [..., OUT] target activations (end anchor), same leading size as x_src.
        ridge: L2 penalty on W (bias unpenalised); 0 gives the minimum-norm solution.
        rtol: with ridge = 0, singular values of the centred x_src below rtol × the largest
            are treated as zero (rank-deficient or near-constant features get zero weight).
        dtype: result dtype (default: that of x_src).

    Returns:
        (weight, bias) on x_src's device. Sums run in float64 on that device.
    """
    ridge = _checks.finite_float("ridge", ridge)
    rtol = _checks.finite_float("rtol", rtol)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if isinstance(x_src, torch.Tensor):
        if x_dst is None:
            raise ValueError("x_dst is required when x_src is a tensor")
        batches: Iterable = [(x_src, x_dst)]
    else:
        if x_dst is not None:
            raise ValueError("pass x_dst=None when x_src is an iterable of (src, dst) batches")
        batches = x_src
    eq = _NormalEquations()
    first = None
    for i, (src, dst) in enumerate(batches):
        _checks.tensor(f"x_src (batch {i})", src)
        _checks.tensor(f"x_dst (batch {i})", dst)
        if src.shape[:-1].numel() != dst.shape[:-1].numel():
            raise ValueError(
                f"x_src (batch {i}) has {src.shape[:-1].numel()} rows but x_dst has "
                f"{dst.shape[:-1].numel()}: they must be activations of the same tokens"
            )
        if src.device != dst.device:
            raise ValueError(f"x_dst (batch {i}) is on {dst.device} but x_src is on {src.device}")
        if first is None:
            first = src, dst
        elif src.device != first[0].device:
            raise ValueError(f"batch {i} is on {src.device} but batch 0 is on {first[0].device}")
        elif src.shape[-1] != first[0].shape[-1] or dst.shape[-1] != first[1].shape[-1]:
            raise ValueError(
                f"batch {i} has {src.shape[-1]} -> {dst.shape[-1]} features, batch 0 has "
                f"{first[0].shape[-1]} -> {first[1].shape[-1]}"
            )
        eq.add(src, dst)
    if eq.n < 2:
        raise ValueError(f"least_squares_init needs at least 2 rows of data, got {eq.n}")
    weight, bias = eq.solve(ridge, rtol)
    out_dtype = dtype or first[0].dtype
    return weight.to(out_dtype).contiguous(), bias.to(out_dtype).contiguous()
