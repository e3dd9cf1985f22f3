"""Build and install the host emulation of ``stitchops._C`` (see include/cuda_runtime.h).

``build()`` compiles every ``csrc/*.cu`` as plain C++ against the emulated CUDA runtime in
``include/``, and the binding (``csrc/binding.cpp``, ``csrc/binding/bind_*.cpp``) against the
installed (CPU) torch with
``-DSTITCHOPS_HOST_EMULATION`` (its tensors then live on the CPU); it links them into an
extension module and imports it. ``install(ext, monkeypatch)`` points the ``cuda`` backend
at that module for CPU tensors. tests/conftest.py does both for every ``backend="cuda"``
test on a machine without a GPU (unless ``STITCHOPS_EMULATE_CUDA=0``).
test_cuda_build.py uses ``compile_binding`` / ``link_and_import`` for the nvcc-built binding.

``STITCHOPS_EMULATE_SANITIZE=address`` builds the kernels with AddressSanitizer (run Python
with ``LD_PRELOAD`` of libasan, as test_cuda_emulated.py does): the host counterpart of
compute-sanitizer's memcheck for out-of-bounds reads and writes. ``build_racecheck()`` links
the kernels under ThreadSanitizer into racecheck.cpp's torch-free driver (with each op's
racecheck_<op>.cpp): the counterpart of
compute-sanitizer's racecheck (a missing ``__syncthreads`` is a host data race; with
``STITCHOPS_EMULATE_CONCURRENT_BLOCKS`` > 1 blocks run at once, so two blocks writing the same
element are one too).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"

# Its own module name: an extension module is initialised once per name and process, and
# test_cuda_build.py imports the nvcc-built binding as "_C" in the same process.
MODULE_NAME = "_stitchops_emulated_C"

# kernel<T, 0><<<grid, block[, shmem[, stream]]>>>(args)
#   ->  ::emu::launch(kernel<T, 0>, ::emu::Config{grid, block[, shmem[, stream]]}, args)
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^;<>]*>)?)\s*<<<([^;]*?)>>>\s*\((\s*\))?")


# __shared__ [__align__(n)] type name[dims];  (one declaration per statement, no initialiser)
_SHARED = re.compile(
    r"__shared__\s+(?:__align__\((\d+)\)\s+)?([^;=]*?)\s*\b(\w+)\s*((?:\[[^\]]*\]\s*)*);"
)


def translate(source: str) -> str:
    """CUDA source → C++ for the emulator: launches become emu::launch calls, and each
    __shared__ declaration a reference to the running block's own variable (emu::block_shared:
    created NaN-filled, like uninitialised shared memory, at its first use in the block)."""

    def launch(m: re.Match) -> str:
        head = f"::emu::launch({m[1]}, ::emu::Config{{{m[2]}}}"
        return head + ")" if m[3] else head + ", "

    def shared(m: re.Match) -> str:
        align, type_, name, dims = m[1] or "1", m[2], m[3], m[4].replace(" ", "")
        return (
            f"static char {name}_site; auto& {name} = "
            f"::emu::block_shared<{type_}{dims}, {align}>(&{name}_site);"
        )

    return _SHARED.sub(shared, _LAUNCH.sub(launch, source))


def compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise RuntimeError("the CUDA emulator needs a C++20 compiler (g++), none is on PATH")
    return cxx


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}")


def run_all(cmds: list[list[str]]) -> None:
    """``run`` each command, as many at once as there are cores (one compile per core)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for _ in pool.map(run, cmds):  # re-raises the first failure
            pass


def _compile_kernels(out: Path, sanitize: str, *more_sources: Path) -> list[Path]:
    """Every translated kernel source, the runtime and ``more_sources``, compiled at once to
    objects under ``out``."""
    sources = [*_translated_kernels(out), *more_sources]
    objects = [out / (src.stem + ".o") for src in sources]
    run_all(
        [
            [compiler(), "-c", "-fPIC", *_kernel_flags(sanitize), str(src), "-o", str(obj)]
            for src, obj in zip(sources, objects, strict=True)
        ]
    )
    return objects


def _fingerprint(sanitize: str) -> str:
    h = hashlib.sha256()
    for path in sorted([*CSRC.rglob("*"), *HERE.rglob("*.h"), *HERE.glob("*.cpp"), Path(__file__)]):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    h.update(f"{torch.__version__}|{sanitize}|{sysconfig.get_config_var('EXT_SUFFIX')}".encode())
    return h.hexdigest()[:16]


def _translated(src: Path, out: Path) -> Path:
    translated = out / (src.stem + ".emulated.cpp")
    translated.write_text(f'#line 1 "{src}"\n' + translate(src.read_text()))
    return translated


def _translated_kernels(out: Path) -> list[Path]:
    """csrc/*.cu rewritten for the emulator, plus its runtime, as C++ files under ``out``."""
    return [_translated(src, out) for src in [*sorted(CSRC.glob("*.cu")), HERE / "runtime.cpp"]]


def _kernel_flags(sanitize: str) -> list[str]:
    san = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"] if sanitize else []
    return [
        "-std=c++20",
        "-O1",
        "-g",
        "-pthread",
        *san,
        "-Wno-unknown-pragmas",
        f"-I{HERE / 'include'}",
        f"-I{HERE}",
        f"-I{CSRC}",
    ]


def build_racecheck(out: Path) -> Path:
    """racecheck.cpp, every op's racecheck_<op>.cpp and the kernels under ThreadSanitizer, as
    one torch-free executable."""
    out.mkdir(parents=True, exist_ok=True)
    exe = out / "racecheck"
    drivers = [_translated(src, out) for src in sorted(HERE.glob("racecheck*.cpp"))]
    objects = _compile_kernels(out, "thread", *drivers)
    run([compiler(), *_kernel_flags("thread"), *map(str, objects), "-o", str(exe)])
    return exe


def build_selftest(out: Path) -> Path:
    """selftest.cpp (the emulator checking its own semantics) as an executable."""
    out.mkdir(parents=True, exist_ok=True)
    exe = out / "selftest"
    sources = [_translated(HERE / "selftest.cpp", out), _translated(HERE / "runtime.cpp", out)]
    run([compiler(), *_kernel_flags(""), *map(str, sources), "-o", str(exe)])
    return exe


def binding_sources() -> list[Path]:
    """csrc/binding.cpp and every op's csrc/binding/bind_<op>.cpp, as setup.py finds them."""
    return [CSRC / "binding.cpp", *sorted((CSRC / "binding").glob("bind_*.cpp"))]


def compile_binding(out: Path, name: str, cuda_version: str, *flags: str) -> list[Path]:
    """The binding's sources against the installed torch, for extension module ``name``, as
    objects under ``out`` (compiled at once, one per core)."""
    from torch.utils.cpp_extension import include_paths

    out.mkdir(parents=True, exist_ok=True)
    command = [
        compiler(),
        "-c",
        "-std=c++20",
        "-O0",
        "-fPIC",
        *flags,
        f"-DTORCH_EXTENSION_NAME={name}",
        f'-DSTITCHOPS_CUDA_VERSION="{cuda_version}"',
        f'-DSTITCHOPS_TORCH_VERSION="{torch.__version__}"',
        *[f"-I{p}" for p in include_paths()],
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{CSRC}",
    ]
    objects = [out / (src.stem + ".o") for src in binding_sources()]
    run_all(
        [
            [*command, str(src), "-o", str(obj)]
            for src, obj in zip(binding_sources(), objects, strict=True)
        ]
    )
    return objects


def link_and_import(module: Path, name: str, objects: list[Path], *flags: str):
    """Link ``objects`` with torch's libraries into ``module`` and import it as ``name``."""
    torch_lib = Path(torch.__file__).parent / "lib"
    partial = module.with_suffix(".partial")
    run(
        [
            compiler(),
            "-shared",
            *map(str, objects),
            f"-L{torch_lib}",
            "-lc10",
            "-ltorch",
            "-ltorch_cpu",
            "-ltorch_python",
            *flags,
            "-o",
            str(partial),
        ]
    )
    partial.rename(module)
    return load(module, name)


def load(module: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, module)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    return ext


def _compile_binding_once(directory: Path) -> list[Path]:
    """The emulated binding's objects in ``directory``, compiled unless they are there (whole
    or absent: built aside and renamed, for another process on the same cache)."""
    if not directory.exists():
        partial = directory.with_name(f"{directory.name}.{os.getpid()}.partial")
        compile_binding(partial, MODULE_NAME, "emulated", "-DSTITCHOPS_HOST_EMULATION")
        try:
            partial.rename(directory)
        except OSError:  # another process renamed its own first: the same objects
            shutil.rmtree(partial)
    return [directory / (src.stem + ".o") for src in binding_sources()]


def build(cache_dir: Path) -> object:
    """Compile (or reuse from ``cache_dir``) and import the emulated extension module."""
    sanitize = os.environ.get("STITCHOPS_EMULATE_SANITIZE", "")
    out = Path(cache_dir) / f"emulated-{_fingerprint(sanitize)}"
    module = out / (MODULE_NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    if module.exists():
        ext = load(module, MODULE_NAME)
    else:
        out.mkdir(parents=True, exist_ok=True)
        # The binding is built without the sanitizer, so the plain and the ASan build of one
        # cache directory share it (it is the longest compile: torch's headers).
        binding = Path(cache_dir) / f"binding-{_fingerprint('')}"
        with ThreadPoolExecutor(max_workers=1) as side:  # the binding beside the kernels
            compiled = side.submit(_compile_binding_once, binding)
            kernels = _compile_kernels(out, sanitize)
            objects = [*compiled.result(), *kernels]
        san = [f"-fsanitize={sanitize}"] if sanitize else []
        ext = link_and_import(module, MODULE_NAME, objects, "-pthread", *san)
    if ext.cuda_version() != "emulated":
        raise RuntimeError(f"{module} is not the emulated build")
    ext.cache_dir = Path(cache_dir)
    counter = ctypes.c_long.in_dll(ctypes.CDLL(str(module)), "stitchops_emulated_launches")
    ext.emulated_launches = lambda: counter.value
    return ext


def install(ext: object, monkeypatch) -> None:
    """Route the ``cuda`` backend to ``ext`` for CPU tensors (undone with ``monkeypatch``)."""
    from stitchops import _backends, _cuda

    real_reasons = _backends.device_reasons

    def device_reasons(backend, tensors):
        if backend != "cuda":
            return real_reasons(backend, tensors)
        devices = {t.device.type for t in tensors}
        return [] if devices == {"cpu"} else [f"emulated cuda takes CPU tensors, got {devices}"]

    monkeypatch.setattr(_backends, "device_reasons", device_reasons)
    monkeypatch.setattr(_cuda, "_C", ext)
    monkeypatch.setattr(_cuda, "_stream", lambda t: 0)
    monkeypatch.setattr(_cuda, "_device_guard", lambda t: contextlib.nullcontext())
