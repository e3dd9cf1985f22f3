"""Argument checks shared by the ops: clear errors naming the argument, nothing cast or moved."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value: object, ndim: int | None = None) -> torch.Tensor:
    """``value`` must be a floating-point tensor (of ``ndim`` dims when given)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {value.dtype}"
        )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)} ({meaning}), got {tuple(value.shape)}"
        )


def same_dtype_and_device(reference: str, named: dict[str, torch.Tensor | None]) -> None:
    """Every tensor in ``named`` has the dtype and device of ``named[reference]``."""
    ref = named[reference]
    for name, value in named.items():
        if value is None or name == reference:
            continue
        if value.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {value.dtype} but {reference} has {ref.dtype}; stitchops "
                f"does not cast silently: convert with .to({ref.dtype})"
            )
        if value.device != ref.device:
            raise ValueError(
                f"{name} is on {value.device} but {reference} is on {ref.device}; move it "
                f"with .to({str(ref.device)!r})"
            )


def int_at_least(name: str, value: object, low: int) -> int:
    """``value`` must be an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def finite_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)
