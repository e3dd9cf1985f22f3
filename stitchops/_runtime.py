"""The bottom layer every backend shares: environment switches and output allocation.

``kernels/`` (Triton), ``stitchops._cuda`` (the compiled extension) and ``stitchops.ops``
import this module and nothing above it, so the switches the kernels read and the NaN
poisoning the tests rely on have one home.

Switches (environment variables):
  TRITON_INTERPRET=1      Triton kernels run through Triton's CPU interpreter, on CPU tensors
  STITCHOPS_AUTOTUNE=0    no autotuning on a GPU: each kernel runs its GPU's fallback tiling

Inside ``poison_outputs()`` every buffer a kernel must fully overwrite is filled with NaN
instead of left uninitialised, so an element a kernel forgot to write fails the test instead
of passing by luck.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator

import torch


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton runs its kernels on CPU tensors, through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_autotune_enabled() -> bool:
    """False with STITCHOPS_AUTOTUNE=0: one fallback tiling per GPU, no search (read at import
    of the Triton kernels)."""
    return os.environ.get("STITCHOPS_AUTOTUNE", "1") != "0"


def triton_tuning() -> str:
    """How the Triton kernels pick their tiling on a GPU, in words (stitchops info, tests)."""
    if triton_autotune_enabled():
        return "autotuned per shape"
    return "STITCHOPS_AUTOTUNE=0, one fallback tiling"


_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Inside the block, kernel outputs start as NaN (for tests: unwritten elements show)."""
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


@contextlib.contextmanager
def constant_shapes() -> Iterator[None]:
    """Read sizes as Python values inside the block without torch.jit.trace's warning.

    A trace (fvcore's FLOP counter traces models) is specialised to its inputs' shapes anyway:
    argument checks, the token grid and the patch stride are constants of it.
    """
    if not torch.jit.is_tracing():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """Inside the block, torch.jit.trace records nothing: for constants computed once and
    cached (FlexiViT's PI-resize matrix), which a trace must see as constants, not as the ops
    of their first computation (its re-run check would find the graphs differ)."""
    state = torch._C._get_tracing_state()
    if state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


# A CPU parallel region whose work is shorter than a scheduler time slice loses more than it
# gains once another process keeps a core busy: the second thread waits for a slice at every
# region (measured: Expedit's band loop at two threads, 1.2 s against 0.09 s at one, with one
# busy neighbour). One thread per this much work of a step (≈ 10 ms of one core).
CPU_STEP_GRAIN_FLOPS = 1e9

# The intra-op threads the caller allowed, while a ``cpu_threads_for`` block is active (an
# inner block may use more threads than the outer one set, up to this).
_allowed_threads: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "stitchops_cpu_threads", default=None
)


@contextlib.contextmanager
def cpu_threads_for(t: torch.Tensor, step_flops: float) -> Iterator[None]:
    """Inside the block, torch's intra-op threads for CPU steps of ``step_flops`` each: one
    per ``CPU_STEP_GRAIN_FLOPS`` (at least one, at most what the caller had set, also inside
    an outer block), restored on exit; no change for tensors off the CPU."""
    allowed = _allowed_threads.get() or torch.get_num_threads()
    current = torch.get_num_threads()
    wanted = max(1, min(allowed, int(step_flops // CPU_STEP_GRAIN_FLOPS)))
    token = _allowed_threads.set(allowed)
    try:
        if t.device.type != "cpu" or wanted == current:
            yield
            return
        torch.set_num_threads(wanted)
        try:
            yield
        finally:
            torch.set_num_threads(current)
    finally:
        _allowed_threads.reset(token)
