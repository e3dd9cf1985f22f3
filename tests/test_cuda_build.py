"""The CUDA sources build wherever nvcc is on PATH, GPU or not.

Every ``csrc/*.cu`` is compiled for sm_80 and sm_90a, and the torch binding is compiled,
linked with those objects and imported, so a broken CUDA source or binding fails CI on a
machine without a GPU. The sources are also compiled for the archs a user may build for
with STITCHOPS_CUDA_ARCHS (Blackwell's sm_100 and sm_120), down to machine code. (The
kernels run in tests/test_lora.py, backend cuda: on the GPU, or on the host emulator of
tests/cuda_emulator without one.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from cuda_emulator import build
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ("80", "90a")
OTHER_ARCHS = ("100", "120")  # B200 / RTX 50: not in the default build, but supported

pytestmark = pytest.mark.slow


def _compile_command(nvcc: str, src: Path, obj: Path, archs: tuple[str, ...]) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # The flags torch's CUDAExtension adds in setup.py's real build (no implicit half /
    # bf16 conversions or operators), so code that only builds without them fails here.
    # --threads 0: the archs compile side by side, one per core.
    return [
        nvcc,
        *"-c -std=c++17 -O2 -Xcompiler -fPIC".split(),
        *COMMON_NVCC_FLAGS,
        *"--threads 0".split(),
        *gencode,
        "-I",
        str(CSRC),
        str(src),
        "-o",
        str(obj),
    ]


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    return nvcc


def _cuda_lib_dir(nvcc: str, scratch: Path) -> Path | None:
    """Where libcudart_static.a lives, asked of nvcc itself (PATH may hold a wrapper)."""
    probe = scratch / "probe.cu"
    probe.write_text("")
    dry = subprocess.run([nvcc, "--dryrun", "-c", str(probe)], capture_output=True, text=True)
    for line in dry.stderr.splitlines() + dry.stdout.splitlines():
        if line.startswith("#$ TOP="):
            top = Path(line.split("=", 1)[1].strip())
            for cand in (top / "lib64", top / "targets/x86_64-linux/lib", top / "lib"):
                if (cand / "libcudart_static.a").exists():
                    return cand.resolve()
    return None


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> list[Path]:
    """Every kernel source compiled once (position-independent, both archs)."""
    nvcc, out = _nvcc(), tmp_path_factory.mktemp("cu")
    built = [out / (src.stem + ".o") for src in KERNEL_SOURCES]
    build.run_all(
        [
            _compile_command(nvcc, src, obj, ARCHS)
            for src, obj in zip(KERNEL_SOURCES, built, strict=True)
        ]
    )
    return built


def test_there_are_kernel_sources():
    assert KERNEL_SOURCES, "csrc/ has no .cu files"


@pytest.mark.parametrize(
    "source", [p.name for p in sorted(CSRC.glob("*.cu*")) + sorted(CSRC.glob("*.h"))]
)
def test_kernel_sources_are_torch_free(source: str):
    text = (CSRC / source).read_text()
    assert not re.search(r'#include\s*[<"](torch|ATen|c10)/', text), f"{source} includes torch"


def test_every_cu_compiles_for_sm80_and_sm90a(objects):
    assert [o.stem for o in objects] == [s.stem for s in KERNEL_SOURCES]
    assert all(o.stat().st_size > 0 for o in objects)


@pytest.mark.parametrize("source", [p.name for p in KERNEL_SOURCES])
def test_every_cu_compiles_for_blackwell(source: str, tmp_path):
    obj = tmp_path / "kernel.o"
    build.run(_compile_command(_nvcc(), CSRC / source, obj, OTHER_ARCHS))
    assert obj.stat().st_size > 0


def test_binding_links_and_imports(objects, tmp_path):
    """Compile the binding (csrc/binding.cpp and every csrc/binding/bind_<op>.cpp) against this
    torch, link the kernels, import, call."""
    cuda_lib = _cuda_lib_dir(_nvcc(), tmp_path)
    if cuda_lib is None:
        pytest.skip("nvcc's toolkit has no libcudart_static.a")
    try:
        build.compiler()
    except RuntimeError as err:
        pytest.skip(str(err))
    binding = build.compile_binding(
        tmp_path / "binding", "_C", "test", '-DSTITCHOPS_CUDA_ARCHS="80;90a"'
    )
    module = tmp_path / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    ext = build.link_and_import(
        module,
        "_C",
        [*binding, *objects],
        f"-L{cuda_lib}",
        "-lcudart_static",
        "-lrt",
        "-lpthread",
        "-ldl",
    )
    assert ext.torch_version() == torch.__version__ and ext.cuda_version() == "test"
    assert ext.cuda_archs() == "80;90a"
    ext.set_poison_outputs(False)
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
            ext.lora_forward(x, w, None, None, None, 1.0, None, False, 0)
    with pytest.raises(RuntimeError, match="x has 4 features but weight has IN = 5"):
        ext.lora_forward(x, torch.randn(5, 5), None, None, None, 1.0, None, False, 0)
