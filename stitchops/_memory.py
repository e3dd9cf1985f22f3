"""Output allocation for kernel launchers, with NaN poisoning for tests.

Inside ``poison_outputs()`` every buffer a kernel must fully overwrite is filled with NaN
instead of left uninitialised, so an element the kernel forgot to write fails the test
instead of passing by luck.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def poisoning() -> bool:
    return _poison


def new_output(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer the kernel will fully overwrite (NaN-filled while poisoning)."""
    if _poison:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)
