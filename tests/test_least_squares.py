"""stitchops.least_squares_init vs the SVD-based definition and SN-Net's pinv."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, rel_err

import stitchops
from stitchops.reference import least_squares as reference


def _data(n=300, in_f=24, out_f=40, noise=0.1, offset=3.0):
    x = torch.randn(n, in_f, dtype=torch.float64) + offset  # non-zero mean, as activations
    true_w = torch.randn(out_f, in_f, dtype=torch.float64)
    y = x @ true_w.t() + torch.randn(out_f, dtype=torch.float64)
    return x, y + noise * torch.randn_like(y)


def test_matches_svd_reference_and_augmented_pinv():
    x, y = _data()
    w, b = stitchops.least_squares_init(x.to(DEVICE), y.to(DEVICE))
    w_ref, b_ref = reference.least_squares_init(x, y)
    assert rel_err(w.cpu(), w_ref) < 1e-9 and rel_err(b.cpu(), b_ref) < 1e-9
    # SN-Net's own formulation: pinv of [X, 1] (full rank here, so the same solution).
    sol = torch.linalg.pinv(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)) @ y
    assert rel_err(w.cpu(), sol[:-1].t()) < 1e-8 and rel_err(b.cpu(), sol[-1]) < 1e-8


def test_float32_input_gives_float32_output_on_input_device():
    x, y = _data()
    w, b = stitchops.least_squares_init(x.float().to(DEVICE), y.float().to(DEVICE))
    assert w.dtype == b.dtype == torch.float32 and w.device.type == DEVICE
    w_ref, _ = reference.least_squares_init(x.float(), y.float())
    assert rel_err(w.cpu(), w_ref) < 1e-5


def test_rank_deficient_source_gives_minimum_norm_solution():
    x, y = _data(in_f=10)
    x = torch.cat([x, x[:, :3], torch.full((len(x), 2), 7.0, dtype=x.dtype)], dim=1)  # dup + const
    w, b = stitchops.least_squares_init(x, y)
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    w_ref, b_ref = reference.least_squares_init(x, y)
    assert rel_err(w, w_ref) < 1e-7 and rel_err(b, b_ref) < 1e-7
    residual = (x @ w.t() + b - y).norm()
    residual_ref = (x @ w_ref.t() + b_ref - y).norm()
    assert residual <= residual_ref * (1 + 1e-9)
    assert torch.equal(w[:, -2:], torch.zeros_like(w[:, -2:])) or w[:, -2:].abs().max() < 1e-9


def test_batches_stream_to_the_same_answer():
    x, y = _data(n=512)
    whole = stitchops.least_squares_init(x, y)
    batches = [
        (x[i : i + 64].reshape(-1, 2, x.shape[1]), y[i : i + 64].reshape(-1, 2, y.shape[1]))
        for i in range(0, 512, 64)
    ]
    streamed = stitchops.least_squares_init(iter(batches))
    assert rel_err(streamed[0], whole[0]) < 1e-10 and rel_err(streamed[1], whole[1]) < 1e-10


def test_ridge_matches_reference():
    x, y = _data(n=60, in_f=30)
    w, b = stitchops.least_squares_init(x, y, ridge=5.0)
    w_ref, b_ref = reference.least_squares_init(x, y, ridge=5.0)
    assert rel_err(w, w_ref) < 1e-9 and rel_err(b, b_ref) < 1e-9
    assert w.norm() < stitchops.least_squares_init(x, y)[0].norm()


def _pair(rows=10, dst_rows=10, dtype=torch.float32):
    return lambda: (
        torch.randn(rows, 3).to(dtype),
        None if dst_rows is None else torch.randn(dst_rows, 4),
    )


BAD = {
    "rows": (_pair(dst_rows=9), {}, ValueError, "10 rows but x_dst has 9"),
    "no-dst": (_pair(dst_rows=None), {}, ValueError, "x_dst is required"),
    "one-row": (_pair(1, 1), {}, ValueError, "at least 2 rows"),
    "ridge": (_pair(), {"ridge": -1.0}, ValueError, "ridge must be >= 0"),
    "int": (_pair(dtype=torch.int64), {}, TypeError, "x_src .batch 0. must be a floating"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_inputs(case):
    make, kwargs, error, message = case
    with pytest.raises(error, match=message):
        stitchops.least_squares_init(*make(), **kwargs)


def test_batches_must_agree():
    batches = [(torch.randn(10, 3), torch.randn(10, 4)), (torch.randn(10, 5), torch.randn(10, 4))]
    with pytest.raises(ValueError, match="batch 1 has 5 -> 4 features"):
        stitchops.least_squares_init(batches)
