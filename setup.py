"""Build script: pure Python + Triton everywhere; the CUDA extension where torch has CUDA.

Environment variables:
  STITCHOPS_SKIP_CUDA=1        never build stitchops._C
  STITCHOPS_CUDA_ARCHS="80;90a" compute capabilities to compile for (default: 80 and 90a)
  MAX_JOBS                     parallel compile jobs (read by torch's BuildExtension)

No network, git or nvidia-smi calls: the arch list decides, not the visible GPU.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

# Every package under stitchops/, and the Triton kernels of kernels/ as stitchops.kernels
# (so there is no top-level import name "kernels" to clash with other distributions).
PACKAGES = [
    *find_packages(include=["stitchops", "stitchops.*"]),
    "stitchops.kernels",
    *(f"stitchops.kernels.{name}" for name in find_packages("kernels")),
]
PACKAGE_DIR = {"stitchops": "stitchops", "stitchops.kernels": "kernels"}


def _say(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nstitchops setup: {msg}\n{bar}\n", file=sys.stderr)


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace("sm_", "").replace(".", "")
        if not arch:
            continue
        number = arch.rstrip("af")  # 90a, 100f: architecture- / family-specific targets
        if not number.isdigit() or int(number) < 80:
            raise SystemExit(
                f"STITCHOPS_CUDA_ARCHS: {arch!r} is not supported; the kernels need sm_80 or "
                "newer (bf16 tensor cores, cp.async), e.g. STITCHOPS_CUDA_ARCHS='80;90a'"
            )
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _cuda_extension():
    """Return ([ext_modules], cmdclass) for stitchops._C, or ([], {}) with a loud reason."""
    if os.environ.get("STITCHOPS_SKIP_CUDA") == "1":
        _say("STITCHOPS_SKIP_CUDA=1: installing WITHOUT the CUDA backend (torch + triton only).")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _say(
            "torch is not importable in the build environment: installing WITHOUT the CUDA "
            "backend. To build it: install a CUDA build of torch, then "
            "`pip install --no-build-isolation .`"
        )
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        _say(
            f"torch {torch.__version__} has no CUDA (or CUDA_HOME is unset): installing "
            "WITHOUT the CUDA backend; the torch and triton backends remain."
        )
        return [], {}
    archs = os.environ.get("STITCHOPS_CUDA_ARCHS", "80;90a")
    gencode = _gencode_flags(archs)
    built = ";".join(flag.rsplit("sm_", 1)[1] for flag in gencode)
    version_macros = [
        f'-DSTITCHOPS_TORCH_VERSION="{torch.__version__}"',
        f'-DSTITCHOPS_CUDA_VERSION="{torch.version.cuda}"',
        f'-DSTITCHOPS_CUDA_ARCHS="{built}"',  # what stitchops._C reports, for dispatch
    ]
    ext = CUDAExtension(
        name="stitchops._C",
        # the module, every op's binding (each registers itself) and every kernel source
        sources=[
            "csrc/binding.cpp",
            *sorted(glob.glob("csrc/binding/bind_*.cpp")),
            *sorted(glob.glob("csrc/*.cu")),
        ],
        depends=sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/*.cuh")),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={
            "cxx": ["-O3", *version_macros],
            "nvcc": ["-O3", "-std=c++17", *gencode],
        },
    )
    _say(f"building stitchops._C for CUDA {torch.version.cuda}, archs {archs}")
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
