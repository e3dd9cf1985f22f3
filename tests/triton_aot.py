"""Compile stitchops' Triton kernels for real GPUs without a GPU (run as a script).

Used by test_triton_compile.py in a subprocess with TRITON_INTERPRET unset: the test process
itself runs Triton through the interpreter, where ``triton.jit`` builds interpreted
functions. For every op of tests/op_tables.py: every autotune config of each of its main
specialisations for sm_80 and sm_90 in bf16 and fp32, its other specialisations in bf16
with the first, the largest and the most column tiles' configs, and its family's fallback
tilings, at the flags the op names, on every arch each fallback is for; then the shared
partial-sum kernel (kernels/partials.py). Each down to a cubin by Triton's bundled ptxas,
with the specialisation a launch on contiguous inputs at the benchmark's shapes gets (unit
strides constant, pointers and sizes divisible by 16). Prints one JSON line per compiled
kernel, always in the same order (the compiles run in a process per core): op, Triton
version, kernel, arch, dtype, config, shared memory, whether tensor-core MMAs (mma.sync /
wgmma) and asynchronous copies (the software pipeline) are in the code.
"""

from __future__ import annotations

import importlib
import itertools
import json
import multiprocessing
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # op_tables
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kernels/ as package "kernels"

import triton
from op_tables import SUM_RANGES, fallback_archs, fallback_variant, ops, plain_variant
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import partials

ARCHS = (80, 90)
DTYPES = ("bf16", "fp32")
PARTIAL_POINTERS = frozenset({"part0_ptr", "part1_ptr", "part2_ptr"})


# Tensor-core instructions, as they appear in the PTX: Blackwell's, Hopper's, Ampere's.
MMA_KINDS = (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"))


def compile_one(
    fn,
    flags: dict,
    unit_strides,
    dtype: str,
    arch: int,
    config,
    fp32: frozenset,
    arg_types: dict | None = None,
) -> dict:
    """Compile ``fn`` for ``arch``: pointers in ``dtype`` unless ``fp32`` names them (or
    ``arg_types`` gives an argument's type: "*i32", "fp32", ...), other arguments i32."""
    arg_types = arg_types or {}
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
        if name in arg_types:
            signature[name] = arg_types[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32 else f"*{dtype}"
        else:
            signature[name] = "fp32" if name.startswith("scale") else "i32"
        if not signature[name].startswith("fp"):
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


def jobs() -> list[tuple]:
    """What main() compiles, in its output order: (op, kernel attr, flags, unit strides,
    dtype, arch, config, variant or None)."""
    out = []
    for op in ops():
        module = importlib.import_module(f"kernels.{op.kernels}")
        out += _tuned_jobs(op, module) + _variant_jobs(op, module)
        out += _fallback_jobs(op, module) + _plain_jobs(op)
    # The shared last step of deterministic reductions: no dot, launched with fixed sizes.
    config = triton.Config({"BLOCK_Z": partials.BLOCK_Z, "BLOCK_C": partials.BLOCK_C}, num_warps=4)
    for arch in ARCHS:
        for dtype in DTYPES:
            out.append((SUM_RANGES, SUM_RANGES, {}, (), dtype, arch, config, SUM_RANGES))
    return out


def _tuned_jobs(op, module) -> list[tuple]:
    """Every autotune config of each main kernel, both archs and element widths."""
    out = []
    for kernel in op.aot_kernels:
        tuned = getattr(module, kernel.attr)
        for config in [tuned.config(t) for t in tuned.tilings(tuned.space.tilings)]:
            for arch, dtype in itertools.product(ARCHS, DTYPES):
                out.append((op.name, kernel.attr, kernel.flags, kernel.unit_strides, dtype, arch,
                            config, None))  # fmt: skip
    return out


def _variant_jobs(op, module) -> list[tuple]:
    """The other specialisations, bf16, at the first, largest and widest configs."""
    out, main = [], {k.attr: k for k in op.aot_kernels}
    for variant in op.aot_variants:
        base, tuned = main[variant.kernel], getattr(module, variant.kernel)
        space = [tuned.config(t) for t in tuned.tilings(tuned.space.tilings)]
        largest = max(space, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        widest = max(space, key=lambda c: c.kwargs.get("COLUMN_TILES", 1))
        flags = {**base.flags, **variant.overrides}
        strides = variant.unit_strides or base.unit_strides
        for config, arch in itertools.product(dict.fromkeys([space[0], largest, widest]), ARCHS):
            out.append(
                (op.name, variant.kernel, flags, strides, "bf16", arch, config, variant.name)
            )
    return out


def _fallback_jobs(op, module) -> list[tuple]:
    """Each fallback tiling on the archs that fall back to it, at the op's largest flags."""
    out = []
    for kernel in op.aot_kernels:
        tuned = getattr(module, kernel.attr)
        flags = {**kernel.flags, **op.aot_fallback_flags}
        for _, tiling in tuned.space.fallbacks:
            for arch, dtype in itertools.product(fallback_archs(tuned.space, tiling), DTYPES):
                out.append((op.name, kernel.attr, flags, kernel.unit_strides, dtype, arch,
                            tuned.config(tiling), fallback_variant(tiling)))  # fmt: skip
    return out


def _plain_jobs(op) -> list[tuple]:
    """The fixed-size kernels, with their launch's constants."""
    out = []
    for plain in op.aot_plain:
        config = triton.Config(plain.constants, num_warps=plain.num_warps)
        for arch, dtype in itertools.product(ARCHS, DTYPES):
            out.append((op.name, plain.attr, {}, plain.unit_strides, dtype, arch, config,
                        plain_variant(plain.attr)))  # fmt: skip
    return out


def run_job(job: tuple) -> str:
    op_name, attr, flags, unit_strides, dtype, arch, config, variant = job
    arg_types = {}
    if op_name == SUM_RANGES:
        fn, fp32 = partials._sum_ranges_kernel, PARTIAL_POINTERS
    else:
        op = next(o for o in ops() if o.name == op_name)
        kernel = getattr(importlib.import_module(f"kernels.{op.kernels}"), attr)
        fn = kernel if isinstance(kernel, triton.runtime.JITFunction) else kernel.fn
        fp32, arg_types = op.fp32_pointers, op.arg_types
    compiled = compile_one(fn, flags, unit_strides, dtype, arch, config, fp32, arg_types)
    row = {"op": op_name, **compiled}
    return json.dumps(row if variant is None else {**row, "variant": variant})


def main() -> None:
    """One JSON line per job, in jobs()' order, compiled in a process per core."""
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        for line in pool.imap(run_job, jobs()):
            print(line, flush=True)


if __name__ == "__main__":
    main()
