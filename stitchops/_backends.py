"""Whether each backend exists on this machine, and on the devices of a call.

Op-independent facts only: Triton installed and recent enough, its CPU interpreter usable
with this NumPy, ``stitchops._C`` built for this torch and this GPU, the call's tensors on a
device the backend runs on. ``stitchops._dispatch`` adds what an op declares (dtypes, limits)
and picks the backend.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

import torch

from stitchops._runtime import triton_interpreting

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
    arrays can be converted to Python scalars"); Triton 3.7 squeezes the array first. A
    kernel that loops over its own share of rows has such a bound (every lora kernel does), so
    the interpreter is refused as a whole. Checked: Triton 3.6 fails with NumPy 2.4.6 and runs with
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
