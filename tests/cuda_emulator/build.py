"""Build and install the host emulation of ``stitchops._C`` (see include/cuda_runtime.h).

``build()`` compiles every ``csrc/*.cu`` as plain C++ against the emulated CUDA runtime in
``include/``, and ``csrc/binding.cpp`` against the installed (CPU) torch with
``-DSTITCHOPS_HOST_EMULATION`` (its tensors then live on the CPU); it links them into an
extension module and imports it. ``install(ext, monkeypatch)`` points the ``cuda`` backend
at that module for CPU tensors. tests/conftest.py does both when ``STITCHOPS_EMULATE_CUDA=1``;
tests/test_cuda_emulated.py runs the cuda-backend tests that way.

``STITCHOPS_EMULATE_SANITIZE=address`` builds the kernels with AddressSanitizer (run Python
with ``LD_PRELOAD`` of libasan, as test_cuda_emulated.py does): the host counterpart of
compute-sanitizer's memcheck for out-of-bounds reads and writes. ``build_racecheck()`` links
the kernels under ThreadSanitizer into racecheck.cpp's torch-free driver: the counterpart of
compute-sanitizer's racecheck (a missing ``__syncthreads`` is a host data race).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"

# Its own module name: an extension module is initialised once per name and process, and
# test_cuda_build.py imports the nvcc-built binding as "_C" in the same process.
MODULE_NAME = "_stitchops_emulated_C"

# kernel<T, 0><<<grid, threads, shmem, stream>>>(args)  ->  emu::launch(kernel<T, 0>, ..., args)
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^;<>]*>)?)\s*<<<([^;]*?)>>>\s*\(")


def translate(source: str) -> str:
    """CUDA source → C++ for the emulator: only the launch syntax changes."""
    return _LAUNCH.sub(r"::emu::launch(\1, \2, ", source)


def _compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise RuntimeError("the CUDA emulator needs a C++20 compiler (g++), none is on PATH")
    return cxx


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}")


def _fingerprint(sanitize: str) -> str:
    h = hashlib.sha256()
    for path in sorted([*CSRC.iterdir(), *HERE.rglob("*.h"), *HERE.glob("*.cpp"), Path(__file__)]):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    h.update(f"{torch.__version__}|{sanitize}|{sysconfig.get_config_var('EXT_SUFFIX')}".encode())
    return h.hexdigest()[:16]


def _translated_kernels(out: Path) -> list[Path]:
    """csrc/*.cu rewritten for the emulator, plus its runtime, as C++ files under ``out``."""
    sources = []
    for src in [*sorted(CSRC.glob("*.cu")), HERE / "runtime.cpp"]:
        translated = out / (src.stem + ".emulated.cpp")
        translated.write_text(f'#line 1 "{src}"\n' + translate(src.read_text()))
        sources.append(translated)
    return sources


def _kernel_flags(sanitize: str) -> list[str]:
    san = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"] if sanitize else []
    return ["-std=c++20", "-O1", "-g", "-pthread", *san, "-Wno-unknown-pragmas",
            f"-I{HERE / 'include'}", f"-I{CSRC}"]  # fmt: skip


def build_racecheck(out: Path) -> Path:
    """racecheck.cpp + the kernels under ThreadSanitizer, as one torch-free executable."""
    out.mkdir(parents=True, exist_ok=True)
    exe = out / "racecheck"
    _run([_compiler(), *_kernel_flags("thread"), *map(str, _translated_kernels(out)),
          str(HERE / "racecheck.cpp"), "-o", str(exe)])  # fmt: skip
    return exe


def build(cache_dir: Path) -> object:
    """Compile (or reuse from ``cache_dir``) and import the emulated extension module."""
    from torch.utils.cpp_extension import include_paths

    sanitize = os.environ.get("STITCHOPS_EMULATE_SANITIZE", "")
    out = Path(cache_dir) / f"emulated-{_fingerprint(sanitize)}"
    module = out / (MODULE_NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    if not module.exists():
        out.mkdir(parents=True, exist_ok=True)
        cxx = _compiler()
        objects = []
        for src in _translated_kernels(out):
            obj = src.with_suffix(".o")
            _run([cxx, "-c", "-fPIC", *_kernel_flags(sanitize), str(src), "-o", str(obj)])
            objects.append(obj)
        binding = out / "binding.o"
        _run([cxx, "-c", "-std=c++20", "-O0", "-fPIC", "-DSTITCHOPS_HOST_EMULATION",
              f"-DTORCH_EXTENSION_NAME={MODULE_NAME}", '-DSTITCHOPS_CUDA_VERSION="emulated"',
              f'-DSTITCHOPS_TORCH_VERSION="{torch.__version__}"',
              *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
              f"-I{CSRC}",
              str(CSRC / "binding.cpp"), "-o", str(binding)])  # fmt: skip
        torch_lib = Path(torch.__file__).parent / "lib"
        partial = module.with_suffix(".partial")
        san = [f"-fsanitize={sanitize}"] if sanitize else []
        _run([cxx, "-shared", "-pthread", *san, str(binding), *map(str, objects),
              f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
              "-o", str(partial)])  # fmt: skip
        partial.rename(module)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, module)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    if ext.cuda_version() != "emulated":
        raise RuntimeError(f"{module} is not the emulated build")
    counter = ctypes.c_long.in_dll(ctypes.CDLL(str(module)), "stitchops_emulated_launches")
    ext.emulated_launches = lambda: counter.value
    return ext


def install(ext: object, monkeypatch) -> None:
    """Route the ``cuda`` backend to ``ext`` for CPU tensors (undone with ``monkeypatch``)."""
    from stitchops import _cuda, _dispatch

    real_reasons = _dispatch.device_reasons

    def device_reasons(backend, tensors):
        if backend != "cuda":
            return real_reasons(backend, tensors)
        devices = {t.device.type for t in tensors}
        return [] if devices == {"cpu"} else [f"emulated cuda takes CPU tensors, got {devices}"]

    monkeypatch.setattr(_dispatch, "device_reasons", device_reasons)
    monkeypatch.setattr(_cuda, "_C", ext)
    monkeypatch.setattr(_cuda, "_stream", lambda t: 0)
    monkeypatch.setattr(_cuda, "_device_guard", lambda t: contextlib.nullcontext())
