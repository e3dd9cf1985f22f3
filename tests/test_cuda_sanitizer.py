"""compute-sanitizer over the real CUDA kernels, on a machine with a GPU.

Re-runs every op's cuda-backend tests (tests/op_tables.py) in a subprocess under compute-sanitizer's
memcheck (out-of-bounds and misaligned accesses), racecheck (shared-memory hazards between
the threads of a block) and synccheck (barriers). Without a GPU the same questions are
asked of the host emulator (test_cuda_emulated.py: AddressSanitizer, ThreadSanitizer).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import require_backend
from op_tables import ops

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

TOOLS = ("memcheck", "synccheck", "racecheck")


@pytest.mark.parametrize("op", ops(), ids=lambda op: op.name)
@pytest.mark.parametrize("tool", TOOLS)
def test_cuda_kernels_under_compute_sanitizer(tool: str, op, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no GPU: test_cuda_emulated.py checks the kernels on the host emulator")
    require_backend(None, "cuda", torch.zeros(1, 1, device="cuda"))
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH (it ships with the CUDA toolkit)")
    cmd = [
        sanitizer,
        f"--tool={tool}",
        *"--error-exitcode=97 --target-processes=all".split(),
        sys.executable,
        *"-m pytest -q -p no:cacheprovider -k".split(),
        op.sanitizer_select[tool],
        str(ROOT / "tests" / op.test_file),
    ]
    # Without the caching allocator every tensor is its own allocation, so memcheck sees an
    # access past a tensor's end instead of landing in a neighbour inside the same pool.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if "Device not supported" in output:  # e.g. GPUs behind gVisor refuse the sanitizer
        pytest.skip(f"compute-sanitizer refuses this device: {output[-500:]}")
    assert result.returncode == 0, output[-8000:]
    assert "ERROR SUMMARY: 0 errors" in output, output[-8000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1]
