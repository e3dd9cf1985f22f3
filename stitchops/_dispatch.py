"""Backend selection shared by every op, from one declaration per op.

An op declares itself once (``Op``): its name, where the entry points of its torch and
triton backends live (the cuda backend's are the functions of ``stitchops._C`` of the same
names), and the dtypes its kernels take. Per call it adds the few facts only it knows: the
elements its Triton kernels index beyond the inputs, and its own limits (LoRA: rank <= 128).
Everything generic is derived here: where the tensors live, whether Triton or the extension
exists and fits this GPU, the dtype, Triton's int32 offsets, bfloat16 under Triton's CPU
interpreter.

Dispatch walks the op's priority list and takes the first backend with no reasons. A forced
backend (``use_backend(name)`` or ``STITCHOPS_BACKEND=name``) that has reasons raises
``BackendUnavailableError`` listing every backend's reasons: never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from stitchops import _backends
from stitchops._runtime import triton_interpreting

BACKENDS = ("torch", "triton", "cuda")
# The order for CUDA tensors: Triton's tuned tensor-core kernels, then the CUDA ones (second
# until a GPU measurement says otherwise), then the reference. CPU tensors take the reference.
GPU_PRIORITY = ("triton", "cuda", "torch")

# Triton kernels form element offsets in int32 (row index × row stride): every tensor they
# index must span fewer elements than this. The CUDA kernels use int64 offsets.
TRITON_MAX_SPAN = 2**31

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "stitchops_backend", default=None
)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message lists every backend's reasons."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown stitchops backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every stitchops op inside the block to run on backend ``name``.

    ``use_backend(None)`` restores automatic selection inside the block. Forcing a backend
    that cannot run a call raises ``BackendUnavailableError`` at that call.
    """
    token = _forced.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or, failing that, ``STITCHOPS_BACKEND``."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("STITCHOPS_BACKEND", "").strip()
    if env in ("", "auto"):
        return None
    try:
        return _check_name(env)
    except ValueError as err:
        raise ValueError(f"STITCHOPS_BACKEND: {err}") from None


def span(t: torch.Tensor) -> int:
    """1 + the largest element offset of ``t`` (its numel when contiguous; 0 when empty)."""
    if t.numel() == 0:
        return 0
    extents = zip(t.shape, t.stride(), strict=True)
    return 1 + sum((size - 1) * abs(stride) for size, stride in extents)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


@dataclass(frozen=True)
class Op:
    """One op's declaration: what the shared dispatch needs to choose and call a backend.

    Every backend module provides the same entry points (``entries``) with the same
    arguments: ``reference`` (pure PyTorch), ``triton`` (launchers in ``stitchops.kernels``)
    and ``stitchops._C`` (the binding, called through ``stitchops._cuda``, which adds the
    device guard, the stream and poisoned outputs).
    """

    name: str  # stitchops.<name>, stitchops::<name>
    entries: tuple[str, ...]  # e.g. ("lora_forward", "lora_backward")
    reference: str  # module of the torch backend
    triton: str  # module of the triton backend
    kernel_dtypes: tuple[torch.dtype, ...]  # what the triton and cuda kernels take

    def reasons(
        self,
        backend: str,
        tensors: Sequence[torch.Tensor],
        *,
        written: int = 0,
        limits: Sequence[str] = (),
    ) -> list[str]:
        """Why ``backend`` cannot run a call on ``tensors`` (the inputs present; the first
        gives the dtype). ``written``: the most elements a Triton kernel indexes in an output
        or scratch tensor. ``limits``: the op's own reasons against its kernels."""
        if backend == "torch":
            return []  # the reference takes every call the op's checks let through
        reasons = _backends.device_reasons(backend, tensors)
        if backend == "triton":
            widest = max(written, *map(span, tensors))
            if widest >= TRITON_MAX_SPAN:
                reasons.append(
                    f"a tensor spans {widest} elements, past the Triton kernels' int32 offsets "
                    "(< 2^31); the cuda backend (int64 offsets) takes it"
                )
        dtype = tensors[0].dtype
        if dtype not in self.kernel_dtypes:
            reasons.append(f"dtype {dtype} is not supported ({_dtype_names(self.kernel_dtypes)})")
        if backend == "triton" and dtype == torch.bfloat16 and triton_interpreting():
            reasons.append("the Triton CPU interpreter computes bfloat16 wrongly; use float16/32")
        return reasons + list(limits)

    def choose(
        self, tensors: Sequence[torch.Tensor], *, written: int = 0, limits: Sequence[str] = ()
    ) -> str:
        """The backend for one call (arguments as for ``reasons``)."""
        reasons = {
            name: functools.partial(self.reasons, name, tensors, written=written, limits=limits)
            for name in BACKENDS
        }
        priority = GPU_PRIORITY if tensors[0].is_cuda else ("torch",)
        return choose(self.name, reasons, priority)

    def entry(self, backend: str, function: str) -> Callable:
        """Entry point ``function`` of ``backend``, imported at the first call that needs it."""
        if function not in self.entries:
            raise ValueError(f"{self.name} declares no entry point {function!r}")
        if backend == "cuda":
            from stitchops import _cuda

            return _cuda.entry(function)
        module = importlib.import_module(self.reference if backend == "torch" else self.triton)
        return getattr(module, function)


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Declare ``op`` (once per name): stitchops info and the tests list what is declared."""
    if OPS.setdefault(op.name, op) is not op:
        raise ValueError(f"op {op.name!r} is declared twice")
    return op


ReasonFn = Callable[[], list[str]]


def choose(op: str, reasons: dict[str, ReasonFn], priority: Sequence[str]) -> str:
    """Pick the backend for one call of ``op``.

    ``reasons`` maps each backend to a function returning why it cannot run this call.
    ``priority`` is the automatic order for this call (decided by the op from the device).
    """
    forced = forced_backend()
    if forced is not None:
        if reasons[forced]():
            raise BackendUnavailableError(_report(op, forced, reasons))
        return forced
    for name in priority:
        if not reasons[name]():
            if name == "torch" and priority[0] != "torch":
                _warn_slow_path(op, _report(op, None, reasons))
            return name
    raise BackendUnavailableError(_report(op, None, reasons))


@functools.cache
def _warn_slow_path(op: str, report: str) -> None:
    warnings.warn(
        f"stitchops.{op} is running on the unfused PyTorch reference on CUDA tensors.\n{report}",
        stacklevel=5,
    )


def _report(op: str, forced: str | None, reasons: dict[str, ReasonFn]) -> str:
    head = (
        f"stitchops.{op}: backend {forced!r} was forced but cannot run this call."
        if forced
        else f"stitchops.{op}: no backend can run this call."
    )
    lines = [head, "Backends:"]
    for name, fn in reasons.items():
        why = fn()
        lines.append(f"  {name}: " + ("can run" if not why else "; ".join(why)))
    return "\n".join(lines)


def available_backends(device: str | torch.device | None = None) -> dict[str, str | None]:
    """Which backends can run on ``device`` (default: cuda if present, else cpu).

    Returns ``{name: None}`` for a usable backend and ``{name: reason}`` otherwise. Op-specific
    limits (dtype, rank) are reported by the op itself when a call is refused.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = [torch.empty(0, device=device)]
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        why = _backends.device_reasons(name, probe)
        out[name] = "; ".join(why) if why else None
    return out
