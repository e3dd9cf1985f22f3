"""kernels/partials.py: the backward's per-range partials, summed over ranges in one launch."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, require_backend


def _sum_ranges():
    """The launcher, where the triton backend can run (here: under TRITON_INTERPRET=1)."""
    require_backend(None, "triton", torch.empty(1, 1, device=DEVICE))
    from stitchops.kernels.partials import sum_ranges

    return sum_ranges


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("ranges", [0, 1, 5, 16, 37])
def test_matches_float64_sum_with_buffers_in_any_slot(ranges: int, dtype: torch.dtype):
    """Three buffers of odd widths (one below a program's 256 columns, one across several
    programs, one 2-D), scales, a missing slot, and range counts around the 16 per load."""
    sum_ranges = _sum_ranges()
    g = torch.Generator().manual_seed(ranges)
    shapes = [(3, 70), (300,), (5, 123)]
    parts = [torch.randn(ranges, *shape, generator=g).to(DEVICE) for shape in shapes]
    scales = [0.25, 1.0, -3.0]
    for missing in (None, 0, 1, 2):
        entries = [
            None if i == missing else (part, scale)
            for i, (part, scale) in enumerate(zip(parts, scales, strict=True))
        ]
        outs = sum_ranges(entries, dtype)
        for i, out in enumerate(outs):
            if i == missing:
                assert out is None
                continue
            want = scales[i] * parts[i].double().sum(0)
            assert out.shape == shapes[i] and out.dtype == dtype
            assert out.is_contiguous()
            tol = 1e-6 if dtype == torch.float32 else 1e-3
            torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * (ranges + 1))


def test_single_buffer_and_empty():
    sum_ranges = _sum_ranges()
    part = torch.arange(12.0, device=DEVICE).reshape(3, 4)
    (out,) = sum_ranges([(part, 0.5)], torch.float32)
    assert out.tolist() == [6.0, 7.5, 9.0, 10.5]
    assert sum_ranges([None, None], torch.float32) == [None, None]
    (empty,) = sum_ranges([(torch.zeros(2, 0, device=DEVICE), 1.0)], torch.float32)
    assert empty.shape == (0,)


def test_is_deterministic():
    sum_ranges = _sum_ranges()
    part = torch.randn(37, 999, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    first = sum_ranges([(part, 0.3)], torch.float32)[0]
    again = sum_ranges([(part, 0.3)], torch.float32)[0]
    assert torch.equal(first, again)


def test_bad_partials_raise_value_error():
    sum_ranges = _sum_ranges()
    part = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="at most 3 buffers"):
        sum_ranges([(part, 1.0)] * 4, torch.float32)
    with pytest.raises(ValueError, match="contiguous float32"):
        sum_ranges([(part.half(), 1.0)], torch.float32)
    with pytest.raises(ValueError, match="contiguous float32"):
        sum_ranges([(torch.zeros(8, 2, device=DEVICE).t(), 1.0)], torch.float32)
    with pytest.raises(ValueError, match="contiguous float32"):
        sum_ranges([(part, 1.0), (torch.zeros(3, 8, device=DEVICE), 1.0)], torch.float32)
