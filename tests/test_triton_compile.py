"""The Triton kernels compile for real GPUs here, with no GPU: tensor cores and a pipeline.

Under the CPU interpreter (each op's tests) the kernels' semantics are tested, but not that
Triton can compile them for sm_80 / sm_90, nor how. tests/triton_aot.py compiles every
autotune config of every kernel that tests/op_tables.py declares, down to a cubin (Triton's
bundled ptxas), for both archs and both element widths; here we check what it reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from op_tables import (
    SHARED_MEMORY,
    SUM_RANGES,
    fallback_archs,
    fallback_variant,
    ops,
    plain_variant,
)

from stitchops import _backends

HERE = Path(__file__).resolve().parent
# Largest dynamic shared memory one block may use (A100: 163 KB, H100/H200: 227 KB).
SHARED_LIMIT = {arch: SHARED_MEMORY[arch] for arch in (80, 90)}


def _kernels_module(op):
    import importlib

    return importlib.import_module(f"stitchops.kernels.{op.kernels}")


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    if _backends.triton_missing_reason():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have triton")
        pytest.skip(_backends.triton_missing_reason())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # STITCHOPS_AOT_PYTHON: compile with another environment's Triton (e.g. 3.6, the GPU
    # image's), as benchmarks/NOTES.md describes; by default this test's own.
    python = os.environ.get("STITCHOPS_AOT_PYTHON", sys.executable)
    result = subprocess.run(
        [python, str(HERE / "triton_aot.py")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def grid(compiled) -> list[dict]:
    """Every config × arch × dtype of the main specialisation of each kernel."""
    return [row for row in compiled if "variant" not in row]


def test_every_config_compiles_for_both_archs(grid):
    kernels = {row["kernel"] for row in grid}
    declared = {
        getattr(_kernels_module(op), k.attr).fn.__name__ for op in ops() for k in op.aot_kernels
    }
    assert kernels == declared
    for kernel in kernels:
        rows = [row for row in grid if row["kernel"] == kernel]
        assert {(row["arch"], row["dtype"]) for row in rows} == {
            (80, "bf16"),
            (80, "fp32"),
            (90, "bf16"),
            (90, "fp32"),
        }
        assert all(row["cubin_bytes"] > 0 for row in rows)


def _expected_mma(arch: int, block_m: int) -> set[str]:
    """Hopper's wgmma needs 64 rows per warpgroup; below that, as on Ampere, mma.sync.
    On Blackwell, tcgen05 where Triton picks it, else mma.sync."""
    if arch == 90:
        return {"wgmma"} if block_m >= 64 else {"mma.sync"}
    return {"tcgen05", "mma.sync"} if arch >= 100 else {"mma.sync"}


def test_main_loops_use_tensor_cores_and_are_pipelined(compiled):
    plain = {plain_variant(k.attr) for op in ops() for k in op.aot_plain}
    for row in compiled:
        if row.get("variant") == SUM_RANGES or row.get("variant") in plain:
            continue
        expected = _expected_mma(row["arch"], row["config"]["BLOCK_M"])
        where = f"{row['kernel']} sm_{row['arch']} {row['dtype']} {row['config']}"
        assert row["mma"] in expected, where
        assert row["async_copies"] > 0, f"{where}: no asynchronous copies (loop not pipelined)"


def test_some_config_fits_each_arch(grid):
    for kernel in {row["kernel"] for row in grid}:
        for arch, limit in SHARED_LIMIT.items():
            for dtype in ("bf16", "fp32"):
                key = (kernel, arch, dtype)
                rows = [r for r in grid if (r["kernel"], r["arch"], r["dtype"]) == key]
                fitting = [r for r in rows if r["shared"] <= limit]
                assert fitting, f"{kernel} sm_{arch} {dtype}: no config fits {limit} B"
                if dtype == "bf16":  # every 16-bit config must fit: none is wasted
                    assert len(fitting) == len(rows), f"{kernel} sm_{arch} bf16"


def test_every_other_specialisation_compiles_and_fits(compiled):
    """No LoRA, ranks 64 / 128, the split-K dW pass, subsets of the backward's outputs."""
    variants = {r["variant"] for r in compiled if r.get("variant") in _declared_variants()}
    assert variants == _declared_variants()
    for variant in variants:
        for arch, limit in SHARED_LIMIT.items():
            rows = [r for r in compiled if r.get("variant") == variant and r["arch"] == arch]
            assert rows and all(r["cubin_bytes"] > 0 for r in rows), (variant, arch)
            assert any(r["shared"] <= limit for r in rows), f"{variant} sm_{arch}: none fits"


def _declared_variants() -> set[str]:
    return {v.name for op in ops() for v in op.aot_variants}


def test_fallback_tilings_fit_every_rank_and_dtype(compiled):
    """At each op's most demanding flags (LoRA: rank 128), fp32 and bf16, every kernel of the
    op: each fallback tiling fits every arch its family falls back to it on (LoRA: UNTUNED
    on sm_80, sm_90 and sm_100, SMALL on the 99 KB GPUs, sm_86/89/120).

    The fallbacks are in the autotune space, so some tiling fits every call the op accepts on
    those GPUs; with STITCHOPS_AUTOTUNE=0 a launch runs the one its GPU calls for.
    """
    for op in ops():
        module = _kernels_module(op)
        for kernel in op.aot_kernels:
            tuned = getattr(module, kernel.attr)
            for _, tiling in tuned.space.fallbacks:
                archs = fallback_archs(tuned.space, tiling)
                assert archs, (op.name, tiling)
                rows = [
                    r
                    for r in compiled
                    if r["op"] == op.name
                    and r["kernel"] == tuned.fn.__name__
                    and r.get("variant") == fallback_variant(tiling)
                ]
                assert {(r["arch"], r["dtype"]) for r in rows} == {
                    (arch, dtype) for arch in archs for dtype in ("bf16", "fp32")
                }, (op.name, kernel.attr, tiling)
                for row in rows:
                    limit = SHARED_MEMORY[row["arch"]]
                    where = f"{tiling} {row['kernel']} sm_{row['arch']} {row['dtype']}"
                    assert row["shared"] <= limit, f"{where}: {row['shared']} B > {limit} B"
    from stitchops.kernels import lora

    assert fallback_archs(lora.SPACE, lora.UNTUNED) == [80, 90, 100]
    assert fallback_archs(lora.SPACE, lora.SMALL) == [86, 89, 120]
    assert min(SHARED_LIMIT.values()) == lora.UNTUNED_MIN_SHARED


def test_partial_sums_compile_for_both_archs(compiled):
    """The backward's last step (kernels/partials.py), for every output dtype and arch."""
    rows = [r for r in compiled if r.get("variant") == SUM_RANGES]
    assert {(r["arch"], r["dtype"]) for r in rows} == {
        (arch, dtype) for arch in SHARED_LIMIT for dtype in ("bf16", "fp32")
    }
    for row in rows:
        assert row["cubin_bytes"] > 0 and row["shared"] <= 99 * 1024, row


def test_memory_bound_kernels_compile_for_both_archs(compiled):
    """Each op's plain kernels (sparse delta: the scatter and the SDDMM), every arch and
    dtype, within the smallest GPU's shared memory."""
    for op in ops():
        for kernel in op.aot_plain:
            rows = [r for r in compiled if r.get("variant") == plain_variant(kernel.attr)]
            assert {(r["arch"], r["dtype"]) for r in rows} == {
                (arch, dtype) for arch in SHARED_LIMIT for dtype in ("bf16", "fp32")
            }, kernel.attr
            for row in rows:
                assert row["cubin_bytes"] > 0 and row["shared"] <= 99 * 1024, row
