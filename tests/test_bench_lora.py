"""benchmarks/bench_lora.py's cuda comparisons check correctness before they time.

Without a GPU the cuda backend runs on the host emulator (conftest.py), so the benchmark's
own code paths for it run there too, at a small shape; on a GPU they run on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from harness import DEVICE, require_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_lora

from stitchops.ops.lora import LORA


@pytest.mark.parametrize("backend", ["cuda"])
def test_cuda_column_tile_variants_are_checked_then_timed(backend: str):
    require_backend(LORA, backend, torch.zeros(1, device=DEVICE))
    acceptance = (256 * 197, (384, 1024), 16, torch.bfloat16)
    assert bench_lora._compares_column_tiles(*acceptance, ["triton", "cuda"])
    assert not bench_lora._compares_column_tiles(*acceptance, ["triton"])
    smaller = (64 * 197, (384, 1024), 16, torch.bfloat16)  # another token count: not compared
    assert not bench_lora._compares_column_tiles(*smaller, ["cuda"])

    ceilings = {"matmul_TFLOPs": {"float32": 1.0}, "bandwidth_GBps": 10.0}
    extra = {
        name: bench_lora.cuda_with_column_tiles(tiles)
        for name, tiles in (("cuda_1tile", 1), ("cuda_3tiles", 3))
    }
    rows = bench_lora.run_case(40, 40, 200, 16, torch.float32, DEVICE, 1.0, ceilings, extra)
    assert [row["pass"] for row in rows] == ["fwd", "fwd+bwd"]
    for row in rows:
        for name in extra:
            assert row[name]["error"] < 1e-4 and row[name]["ms"] > 0, (row["pass"], name)

    wrong = {"cuda_broken": lambda **kw: bench_lora.cuda_with_column_tiles(2)(**kw) * 1.01}
    with pytest.raises(AssertionError, match="refusing to time"):
        bench_lora.run_case(40, 40, 200, 16, torch.float32, DEVICE, 1.0, ceilings, wrong)
