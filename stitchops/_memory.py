"""Peak memory of a stretch of work, the same way for the benchmarks and the training loop.

On a GPU: torch's peak allocation counter. On a CPU (Linux): the process's peak resident
set, after handing freed heap pages back to the OS (glibc's malloc_trim) and resetting the
peak (/proc/self/clear_refs): the pages the work's allocations touched, whoever made them.
Elsewhere there is no figure (None).
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch

_CLEAR_REFS = "/proc/self/clear_refs"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(key + ":")).split()[1]) * 1024


def start_peak(device: torch.device | str) -> int | None:
    """Reset the peak on ``device``; returns the baseline ``peak_since`` subtracts."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if not os.path.exists(_CLEAR_REFS):
        return None
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the peak includes them
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open(_CLEAR_REFS, "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak_since(device: torch.device | str, baseline: int | None) -> int | None:
    """Bytes held at the peak since ``start_peak`` returned ``baseline``, beyond it."""
    if baseline is None:
        return None
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    return _status_bytes("VmHWM") - baseline
