"""Compile stitchops' Triton kernels for sm_80 and sm_90 without a GPU (run as a script).

Used by test_triton_compile.py in a subprocess with TRITON_INTERPRET unset: the test process
itself runs Triton through the interpreter, where ``triton.jit`` builds interpreted
functions. Every autotune config of every kernel (and kernels/partials.py's one
configuration) is compiled, down to a cubin by Triton's bundled ptxas, with the
specialisation a launch on contiguous inputs at the benchmark's shapes gets (unit strides
constant, pointers and sizes divisible by 16). Prints one JSON
line per compiled kernel, always in the same order (the compiles run in a process per
core): Triton version, kernel, arch, dtype, config, shared memory, whether tensor-core MMAs
(mma.sync / wgmma) and asynchronous copies (the software pipeline) are in the code.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import lora, partials

FP32_BUFFERS = {"s_ptr", "da_part_ptr", "db_part_ptr", "dbias_part_ptr",
                "part0_ptr", "part1_ptr", "part2_ptr"}  # fmt: skip

# Per kernel: the launch's compile-time flags, and the strides that are 1 for contiguous
# inputs (Triton specialises an integer argument equal to 1 into a constant).
KERNELS = {
    "_lowrank_matmul_kernel": (
        dict(
            HAS_LORA=True,
            HAS_BIAS=True,
            HAS_BIAS2=True,
            STORE_S=True,
            SPLIT_K=False,
            BLOCK_R=16,
            GROUP_M=8,
        ),
        ("stride_xk", "stride_wk", "stride_l1k", "stride_l2r", "stride_on"),
    ),
    "_lora_backward_kernel": (
        dict(HAS_LORA=True, NEED_DX=True, NEED_DA=True, NEED_DB=True, NEED_BIAS=True, BLOCK_R=16),
        ("stride_dyo", "stride_wi", "stride_ai", "stride_br", "stride_xi", "stride_dxi"),
    ),
}
ARCHS = (80, 90)
SUM_RANGES = "sum_ranges"  # the variant name of kernels/partials.py's rows
# The fallback tilings are also compiled for the other archs they are meant for: UNTUNED for
# sm_100 (Blackwell datacenter, 227 KB per block like sm_90), SMALL for the 99 KB archs.
UNTUNED_ARCHS = (80, 90, 100)
SMALL_SHARED_ARCHS = (86, 89, 120)  # 99 KB of shared memory per block: GeForce / workstation
DTYPES = ("bf16", "fp32")

# The other specialisations launches ask for, each compiled in bf16 with the first, the
# largest and the most column tiles' autotune config (the full grid above covers configs ×
# dtypes for the main ones):
# name -> (kernel, flag overrides, unit strides, or None to keep the kernel's).
VARIANTS = {
    "forward no LoRA": ("_lowrank_matmul_kernel", dict(HAS_LORA=False, STORE_S=False), None),
    "forward rank 64": ("_lowrank_matmul_kernel", dict(BLOCK_R=64), None),
    "forward rank 128": ("_lowrank_matmul_kernel", dict(BLOCK_R=128), None),
    "dW split-K": (
        "_lowrank_matmul_kernel",
        dict(HAS_LORA=False, HAS_BIAS=False, HAS_BIAS2=False, STORE_S=False, SPLIT_K=True),
        ("stride_xm", "stride_wn", "stride_on"),
    ),
    "backward no LoRA": (
        "_lora_backward_kernel",
        dict(HAS_LORA=False, NEED_DA=False, NEED_DB=False),
        None,
    ),
    "backward rank 128": ("_lora_backward_kernel", dict(BLOCK_R=128), None),
    "backward dx only": (
        "_lora_backward_kernel",
        dict(NEED_DA=False, NEED_DB=False, NEED_BIAS=False),
        None,
    ),
    "backward no dx": ("_lora_backward_kernel", dict(NEED_DX=False), None),
}


# Tensor-core instructions, as they appear in the PTX: Blackwell's, Hopper's, Ampere's.
MMA_KINDS = (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"))


def compile_one(fn, flags: dict, unit_strides, dtype: str, arch: int, config) -> dict:
    constants = {
        **flags,
        **config.kwargs,
        **(
            {"DOT_PRECISION": "tf32" if dtype == "fp32" else "ieee"}
            if "DOT_PRECISION" in fn.arg_names  # the matmul kernels, not the partial sums
            else {}
        ),
        **dict.fromkeys(unit_strides, 1),
    }
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32_BUFFERS else f"*{dtype}"
        else:
            signature[name] = "fp32" if name.startswith("scale") else "i32"
        if not name.startswith("scale"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn, signature, constants, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    return {
        "triton": triton.__version__,
        "kernel": fn.__name__,
        "arch": arch,
        "dtype": dtype,
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        "shared": kernel.metadata.shared,
        "mma": next((kind for kind, instruction in MMA_KINDS if instruction in ptx), ""),
        "async_copies": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma"),
        "cubin_bytes": len(kernel.asm["cubin"]),
    }


def configs(name: str) -> list:
    """The kernel's whole autotune space on a GPU, whatever STITCHOPS_AUTOTUNE says."""
    kernel = getattr(lora, name)
    return [lora.tiling_config(kernel, tiling) for tiling in lora.autotune_tilings(kernel)]


def jobs() -> list[tuple]:
    """What main() compiles, in its output order: (kernel, flags, unit strides, dtype, arch,
    config, variant or None), the kernel named by its attribute of kernels.lora, or
    SUM_RANGES for kernels/partials.py's."""
    out = []
    for name, (flags, unit_strides) in KERNELS.items():
        for config in configs(name):
            for arch in ARCHS:
                for dtype in DTYPES:
                    out.append((name, flags, unit_strides, dtype, arch, config, None))
    for variant, (name, overrides, unit_strides) in VARIANTS.items():
        base_flags, base_strides = KERNELS[name]
        space = configs(name)
        largest = max(space, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        widest = max(space, key=lambda c: c.kwargs.get("COLUMN_TILES", 1))  # forward: S reused
        for config in dict.fromkeys([space[0], largest, widest]):
            for arch in ARCHS:
                out.append((name, {**base_flags, **overrides}, unit_strides or base_strides,
                            "bf16", arch, config, variant))  # fmt: skip
    # The fallback tilings at the largest rank (the most shared memory), in both dtypes, on
    # the archs each is for: UNTUNED on sm_80 / sm_90 / sm_100, SMALL on the 99 KB archs.
    for tiling, archs in ((lora.UNTUNED, UNTUNED_ARCHS), (lora.SMALL, SMALL_SHARED_ARCHS)):
        for name, (flags, unit_strides) in KERNELS.items():
            config = lora.tiling_config(getattr(lora, name), tiling)
            for arch in archs:
                for dtype in DTYPES:
                    out.append((name, {**flags, "BLOCK_R": lora.MAX_RANK}, unit_strides, dtype,
                                arch, config, f"fallback {tuple(tiling)}, rank 128"))  # fmt: skip
    # The backward's last step (kernels/partials.py): no dot, launched with fixed sizes.
    config = triton.Config({"BLOCK_Z": partials.BLOCK_Z, "BLOCK_C": partials.BLOCK_C}, num_warps=4)
    for arch in ARCHS:
        for dtype in DTYPES:
            out.append((SUM_RANGES, {}, (), dtype, arch, config, SUM_RANGES))
    return out


def run_job(job: tuple) -> str:
    name, flags, unit_strides, dtype, arch, config, variant = job
    fn = partials._sum_ranges_kernel if name == SUM_RANGES else getattr(lora, name).fn
    row = compile_one(fn, flags, unit_strides, dtype, arch, config)
    return json.dumps(row if variant is None else {**row, "variant": variant})


def main() -> None:
    """One JSON line per job, in jobs()' order, compiled in a process per core."""
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        for line in pool.imap(run_job, jobs()):
            print(line, flush=True)


if __name__ == "__main__":
    main()
