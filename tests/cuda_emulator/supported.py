"""The CUDA a kernel in csrc/ may use and still run on the host emulator, in one place.

Identifiers by the header of include/ that emulates them. A new kernel keeps to these, or
extends the emulator (include/*.h) and selftest.cpp with a case showing the new intrinsic's
semantics, then adds it here; tests/test_cuda_emulated.py fails on a csrc/ identifier that
is not listed (and on a listed one the headers no longer define).
"""

from __future__ import annotations

import re
from pathlib import Path

SUPPORTED = {
    "cuda_runtime.h": {
        # qualifiers and launch configuration
        "__global__",
        "__device__",
        "__host__",
        "__forceinline__",
        "__launch_bounds__",
        "__shared__",
        "__restrict__",
        "__align__",
        "threadIdx",
        "blockIdx",
        "blockDim",
        "gridDim",
        # barriers and loads
        "__syncthreads",
        "__syncwarp",
        "__ldg",
        # the runtime calls a kernel file makes
        "cudaStream_t",
        "cudaError_t",
        "cudaSuccess",
        "cudaErrorInvalidValue",
        "cudaGetLastError",
        "cudaGetDevice",
        "cudaDeviceGetAttribute",
        "cudaDevAttrMultiProcessorCount",
        "cudaGetErrorString",
    },
    "cuda_fp16.h": {"__half", "__half2float", "__float2half_rn"},
    "cuda_bf16.h": {"__nv_bfloat16", "__bfloat162float", "__float2bfloat16_rn"},
    "cuda_pipeline.h": {"__pipeline_memcpy_async", "__pipeline_commit", "__pipeline_wait_prior"},
    "mma.h": {  # nvcuda::wmma, fragments held whole by every lane
        "wmma::fragment",
        "wmma::matrix_a",
        "wmma::matrix_b",
        "wmma::accumulator",
        "wmma::row_major",
        "wmma::col_major",
        "wmma::mem_row_major",
        "wmma::mem_col_major",
        "wmma::fill_fragment",
        "wmma::load_matrix_sync",
        "wmma::store_matrix_sync",
        "wmma::mma_sync",
    },
}

# What counts as a CUDA identifier in a kernel source: double-underscore builtins, the
# runtime's cuda* names, the built-in index variables and WMMA's names.
_CUDA_NAME = re.compile(
    r"\b(__[a-z]\w*|cuda[A-Z]\w*|threadIdx|blockIdx|blockDim|gridDim|wmma::\w+)\b"
)


def used_in(sources: list[Path]) -> dict[str, set[str]]:
    """CUDA identifier -> the sources (names) that use it."""
    found: dict[str, set[str]] = {}
    for path in sources:
        text = re.sub(r"//[^\n]*", "", path.read_text())  # not in comments
        for name in _CUDA_NAME.findall(text):
            found.setdefault(name, set()).add(path.name)
    return found


def all_supported() -> set[str]:
    return set().union(*SUPPORTED.values())
