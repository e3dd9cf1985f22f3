"""Shared test helpers: backend availability, error metrics, the accuracy rule."""

from __future__ import annotations

import pytest
import torch

from stitchops.ops import lora as lora_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative error floors per dtype, for results whose same-dtype reference is itself exact.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def require_backend(backend: str, x: torch.Tensor, rank: int = 0) -> None:
    """Skip (with the backend's own reason) when ``backend`` cannot run on this machine."""
    reasons = [] if backend == "torch" else lora_ops._kernel_reasons(backend, x, [x], rank, 1)
    if reasons:
        pytest.skip(f"{backend} cannot run here: {'; '.join(reasons)}")


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max |value - ref| / max |ref|, computed in float64; NaN anywhere gives inf."""
    value, ref = value.double(), ref.double()
    if not torch.isfinite(value).all():
        return float("inf")
    scale = ref.abs().max().item() if ref.numel() else 1.0
    return ((value - ref).abs().max().item() if ref.numel() else 0.0) / max(scale, 1e-30)


def assert_accurate(name: str, value, same_dtype_ref, ref64) -> None:
    """The project's rule: error vs float64 at most 2x that of the same-dtype PyTorch
    reference (plus the dtype's floor, for outputs the reference gets exactly)."""
    assert value.shape == ref64.shape, f"{name}: shape {value.shape} != {ref64.shape}"
    err = rel_err(value, ref64)
    bound = 2 * rel_err(same_dtype_ref, ref64) + FLOOR[value.dtype]
    assert err <= bound, f"{name}: relative error {err:.3e} > bound {bound:.3e}"
