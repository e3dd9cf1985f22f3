"""Backend selection shared by every op.

An op describes each backend by a *reason function*: given the call's tensors it returns the
reasons that backend cannot run the call (an empty list means it can). Dispatch walks the
op's priority list and takes the first backend with no reasons. A forced backend
(``use_backend(name)`` or ``STITCHOPS_BACKEND=name``) that has reasons raises
``BackendUnavailableError`` listing every backend's reasons: never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

BACKENDS = ("torch", "triton", "cuda")

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


def triton_interpreting() -> bool:
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


# The oldest Triton the kernels are tested with (3.6, as torch 2.11 ships it; CI runs 3.9).
MIN_TRITON = (3, 6)


@functools.cache
def triton_missing_reason() -> str | None:
    """Why the triton backend cannot exist here (not installed, too old), or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'triton>=3.6')"
    version = installed_triton_version()
    if version is not None and version < MIN_TRITON:
        return (
            f"triton {_dotted(version)} is older than "
            f"{_dotted(MIN_TRITON)}, the oldest version stitchops' kernels are "
            "tested with: pip install 'triton>=3.6', or use a torch that ships it"
        )
    return None


@functools.cache
def triton_interpreter_reason() -> str | None:
    """Why Triton's CPU interpreter (TRITON_INTERPRET=1) cannot run the kernels here, or None.

    Triton 3.6's interpreter turns a loop bound computed from a program id (a 1-element
    array) into an int with ``int(array)``, which NumPy 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"); Triton 3.7 squeezes the array first. Both
    lora kernels have such a loop. Checked: Triton 3.6 fails with NumPy 2.4.6 and runs with
    2.2.6, 2.3.0 and 2.3.5; Triton 3.7.1, 3.8 and 3.9 squeeze.
    """
    triton_version, numpy_version = installed_triton_version(), _release("numpy")
    if triton_version is None or numpy_version is None:
        return None
    if triton_version < (3, 7) and numpy_version >= (2, 4):
        return (
            f"the CPU interpreter of triton {_dotted(triton_version)} fails with "
            f"numpy {_dotted(numpy_version)} (which refuses int() of a "
            "1-element array): pip install 'numpy<2.4', or 'triton>=3.7'"
        )
    return None


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _release(dist: str) -> tuple[int, int] | None:
    """(major, minor) of an installed distribution, from its metadata; None if unknown."""
    import importlib.metadata

    try:
        release = importlib.metadata.version(dist).split("+")[0].split(".")
        return int(release[0]), int(release[1])
    except (importlib.metadata.PackageNotFoundError, IndexError, ValueError):
        return None


def installed_triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, read from its metadata without importing it;
    None where no distribution says (a source build): then nothing is refused."""
    for dist in ("triton", "pytorch-triton"):
        release = _release(dist)
        if release is not None:
            return release
    return None


@functools.cache
def cuda_extension_missing_reason() -> str | None:
    """Why ``stitchops._C`` cannot be used, or None. Imports it lazily, once."""
    if importlib.util.find_spec("stitchops._C") is None:
        return (
            "stitchops._C is not built (installed without CUDA; rebuild with a CUDA build of "
            "torch: pip install --no-build-isolation .)"
        )
    try:
        from stitchops import _C
    except ImportError as err:
        return f"stitchops._C failed to import: {err}"
    built_torch, built_cuda = _C.torch_version(), _C.cuda_version()
    if built_torch.split("+")[0] != torch.__version__.split("+")[0] or built_cuda != str(
        torch.version.cuda
    ):
        return (
            f"stitchops._C was built for torch {built_torch} / CUDA {built_cuda} but torch "
            f"{torch.__version__} / CUDA {torch.version.cuda} is running; reinstall stitchops"
        )
    return None


def device_reasons(backend: str, tensors: Sequence[torch.Tensor]) -> list[str]:
    """Reasons common to every op: where the tensors live and whether the backend exists."""
    devices = {t.device.type for t in tensors}
    reasons: list[str] = []
    if backend == "triton":
        missing = triton_missing_reason()
        if missing:
            reasons.append(missing)
        if triton_interpreting():
            interpreter = triton_interpreter_reason()
            if interpreter:
                reasons.append(interpreter)
        elif devices != {"cuda"}:
            reasons.append(
                f"tensors are on {sorted(devices)}; triton runs on CUDA tensors, or on CPU "
                "tensors with TRITON_INTERPRET=1"
            )
    elif backend == "cuda":
        if devices != {"cuda"}:
            reasons.append(f"tensors are on {sorted(devices)}, not cuda")
        else:
            missing = cuda_extension_missing_reason()
            if missing:
                reasons.append(missing)
            else:
                index = tensors[0].device.index
                mismatch = _device_mismatch(torch.cuda.current_device() if index is None else index)
                if mismatch:
                    reasons.append(mismatch)
    return reasons


@functools.cache
def _device_mismatch(index: int) -> str | None:
    """capability_reason for CUDA device ``index`` and the built stitchops._C (once each)."""
    return capability_reason(torch.cuda.get_device_capability(index), built_cuda_archs())


def built_cuda_archs() -> str:
    """The machine code stitchops._C holds, "80;90a" (STITCHOPS_CUDA_ARCHS at build time);
    "unknown" for a build older than that record. Call only once _C imports."""
    from stitchops import _C

    return getattr(_C, "cuda_archs", lambda: "unknown")()


def capability_reason(capability: tuple[int, int], built: str = "unknown") -> str | None:
    """Why stitchops._C cannot run on a GPU of this compute capability, or None.

    ``built`` is the module's machine code ("80;90a", from STITCHOPS_CUDA_ARCHS at build
    time). Machine code for sm_XY, or for the family target sm_XYf, runs on compute
    capability X.Z with Z >= Y; an architecture-specific target (sm_90a) only on exactly
    that capability; nothing runs across major versions (the build embeds no PTX to
    recompile).
    """
    major, minor = capability
    if capability < (8, 0):
        return (
            f"the GPU has compute capability {major}.{minor}; stitchops._C needs 8.0 or newer "
            "(bf16 tensor cores, cp.async); the triton backend may still run"
        )
    archs = [a.strip() for a in built.split(";") if a.strip()]
    if not archs or not all(a.rstrip("af").isdigit() for a in archs):
        return None  # an older or emulated build that does not say: let the launch tell
    for arch in archs:
        code = int(arch.rstrip("af"))
        a_major, a_minor = divmod(code, 10)
        exact = arch.endswith("a")
        if a_major == major and (a_minor == minor if exact else a_minor <= minor):
            return None
    return (
        f"stitchops._C holds machine code for sm_{', sm_'.join(archs)}, none of which runs on "
        f"this GPU (compute capability {major}.{minor}); rebuild with "
        f'STITCHOPS_CUDA_ARCHS="{major}{minor}" pip install --no-build-isolation .'
    )


ReasonFn = Callable[[], list[str]]


def choose(op: str, reasons: dict[str, ReasonFn], priority: Sequence[str]) -> str:
    """Pick the backend for one call of ``op``.

    ``reasons`` maps each backend to a function returning why it cannot run this call.
    ``priority`` is the automatic order for this call (decided by the op from the device).
    """
    forced = forced_backend()
    if forced is not None:
        why = reasons[forced]()
        if why:
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
        stacklevel=4,
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
        why = device_reasons(name, probe)
        out[name] = "; ".join(why) if why else None
    return out
