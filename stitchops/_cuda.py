"""The one call path into the CUDA backend (``stitchops._C``), imported only when chosen.

Every op's cuda entry point is a function of ``stitchops._C`` taking the call's tensors
and, last, the current CUDA stream as an integer; ``entry(name)`` wraps it with what every
call needs: the NaN-poisoning switch of ``stitchops._runtime``, a device guard on the first
tensor's device, and that device's current stream.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

from stitchops import _runtime

try:
    from stitchops import _C
except ImportError:  # the dispatcher reports why (_backends.cuda_extension_missing_reason)
    _C = None


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device)


def _first_tensor(args: tuple) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


@functools.cache
def entry(name: str) -> Callable:
    """``stitchops._C.<name>`` called on the device of its first tensor argument."""

    def call(*args):
        _C.set_poison_outputs(_runtime.poisoning())
        device_tensor = _first_tensor(args)
        with _device_guard(device_tensor):
            return getattr(_C, name)(*args, _stream(device_tensor))

    call.__name__ = call.__qualname__ = name
    return call


@contextlib.contextmanager
def pinned(setter: str, value: int) -> Iterator[None]:
    """Inside the block, the extension's tuning knob ``setter`` (a function of ``_C`` that
    sets it and returns the value it replaces) holds ``value``; on exit the replaced value
    is back, so blocks nest."""
    outer = getattr(_C, setter)(value)
    try:
        yield
    finally:
        getattr(_C, setter)(outer)
