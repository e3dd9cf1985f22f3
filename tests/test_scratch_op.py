"""An op is only its own files: a scratch op added to a copy of the repository touches no
shared file but its two export lines, and every shared piece finds it.

The scratch op ``scratch_scale`` (y = 2·x) gets the files CONTRIBUTING.md lists: reference,
Triton kernel, CUDA kernel and binding, registration, tests with their ``OP_TESTS``, a
ThreadSanitizer driver, a benchmark with ``TARGETS``. Then, in the copy: the shared test
declarations (op_tables.ops()), the GPU round's kernel tests and benchmarks, the acceptance
targets, the binding's sources, ``stitchops info`` and the op itself find it, its own tests
pass, and ``git diff`` shows only the export lines of stitchops/__init__.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FILES = {
    "stitchops/reference/scratch_scale.py": '''
"""The scratch op's math: y = 2·x."""

import torch


def scratch_scale_forward(x: torch.Tensor) -> torch.Tensor:
    return x * 2
''',
    "kernels/scratch_scale.py": '''
"""The scratch op's Triton kernel: y = 2·x, BLOCK elements per program."""

import torch
import triton
import triton.language as tl

from stitchops._runtime import new_output


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=keep) * 2, mask=keep)


def scratch_scale_forward(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = new_output(*x.shape, device=x.device, dtype=x.dtype)
    _scale_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256)
    return y
''',
    "stitchops/ops/scratch_scale.py": '''
"""The scratch op: declaration, registration, dispatch."""

import torch

from stitchops import _dispatch

SCRATCH_SCALE = _dispatch.register(
    _dispatch.Op(
        name="scratch_scale",
        entries=("scratch_scale_forward",),
        reference="stitchops.reference.scratch_scale",
        triton="stitchops.kernels.scratch_scale",
        kernel_dtypes=(torch.float32,),
    )
)


@torch.library.custom_op("stitchops::scratch_scale", mutates_args=())
def _scratch_scale(x: torch.Tensor) -> torch.Tensor:
    backend = SCRATCH_SCALE.choose([x])
    return SCRATCH_SCALE.entry(backend, "scratch_scale_forward")(x)


@_scratch_scale.register_fake
def _(x):
    return torch.empty_like(x)


def scratch_scale(x: torch.Tensor) -> torch.Tensor:
    """y = 2·x."""
    return _scratch_scale(x)
''',
    "csrc/scratch_scale.h": """
#pragma once
#include <cstdint>

namespace stitchops {
int scratch_scale(const float* x, float* y, int64_t n, void* stream);
}
""",
    "csrc/scratch_scale.cu": """
#include "scratch_scale.h"

namespace stitchops {
__global__ void scratch_scale_kernel(const float* x, float* y, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = 2 * x[i];
}
int scratch_scale(const float* x, float* y, int64_t n, void* stream) {
  if (n == 0) return 0;
  scratch_scale_kernel<<<unsigned((n + 255) / 256), 256, 0, (cudaStream_t)stream>>>(x, y, n);
  return 0;
}
}  // namespace stitchops
""",
    "csrc/binding/bind_scratch_scale.cpp": """
#include "binding/helpers.h"
#include "scratch_scale.h"

namespace stitchops::binding {

STITCHOPS_BIND(scratch_scale) {
  m.def("scratch_scale_forward", [](const at::Tensor& x, int64_t stream) {
    auto y = new_output(x.sizes(), x.options());
    check_status(stitchops::scratch_scale(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(),
                                          stream_of(stream)), "scratch_scale");
    return y;
  });
}

}  // namespace stitchops::binding
""",
    "tests/test_scratch_scale.py": '''
"""The scratch op's tests."""

import harness
import pytest
import torch
from op_tables import OpTests

import stitchops

OP_TESTS = OpTests(
    name="scratch_scale",
    kernels="scratch_scale",
    sanitizer_select={"memcheck": "cuda", "synccheck": "cuda", "racecheck": "cuda"},
)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_doubles(backend):
    x = torch.randn(7, 5, device=harness.DEVICE)
    harness.require_backend(None, backend, x)
    with stitchops.use_backend(backend):
        assert torch.equal(stitchops.scratch_scale(x), 2 * x)
''',
    "tests/cuda_emulator/racecheck_scratch_scale.cpp": """
// The scratch op's ThreadSanitizer driver (elementwise: nothing shared to race on).
""",
    "benchmarks/bench_scratch_scale.py": '''
"""The scratch op's benchmark: its targets."""

from runner import Target

TARGETS = (
    Target(op="scratch_scale", where={"n": 1 << 20, "device": "cuda"},
           implementations=("triton",), bounds=(("vs_baseline", "min", 1.0),),
           what="scratch: at least as fast as 2 * x"),
)


def main():
    pass  # runner.run("scratch_scale", ...) with the cases
''',
}

EXPORTS = (
    (
        "from stitchops.ops.least_squares import least_squares_init\n",
        "from stitchops.ops.least_squares import least_squares_init\n"
        "from stitchops.ops.scratch_scale import scratch_scale\n",
    ),
    ('    "pi_resize_patch_embed",\n', '    "pi_resize_patch_embed",\n    "scratch_scale",\n'),
)

PROBE = """
import json, sys
sys.path[:0] = ["tests", "benchmarks"]
import torch
import stitchops
import op_tables, acceptance, gpu_round
from cuda_emulator import build
print(json.dumps({
    "ops": [op.name for op in op_tables.ops()],
    "kernel_tests": gpu_round.kernel_test_files(),
    "benches": gpu_round._bench_scripts(),
    "targets": sorted({t.op for t in acceptance.targets()}),
    "binding": [p.name for p in build.binding_sources()],
    "value": stitchops.scratch_scale(torch.ones(3)).tolist(),
    "registered": hasattr(torch.ops.stitchops, "scratch_scale"),
}))
"""


def _git(tree: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A copy of the repository's files (tracked and new, not ignored), committed, with the
    scratch op added on top."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    tree = tmp_path_factory.mktemp("scratch") / "repo"
    listed = _git(ROOT, "ls-files", "-co", "--exclude-standard").splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    _git(tree, "init", "-q")
    _git(tree, "add", "-A")
    _git(tree, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    for name, text in FILES.items():
        (tree / name).write_text(text.lstrip("\n"))
    init = tree / "stitchops" / "__init__.py"
    source = init.read_text()
    for old, new in EXPORTS:
        assert old in source, old
        source = source.replace(old, new, 1)
    init.write_text(source)
    # stitchops.kernels is kernels/ (setup.py's package_dir): the same in the copy, for imports
    (tree / "stitchops" / "kernels").symlink_to(tree / "kernels", target_is_directory=True)
    return tree


def _env(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), "TRITON_INTERPRET": "1"}


def test_the_scratch_op_touches_only_its_own_files_and_the_exports(scratch):
    # lines added, removed, path: the import and the __all__ entry, in the facade only
    assert _git(scratch, "diff", "--numstat").split() == ["2", "0", "stitchops/__init__.py"]
    new = sorted(set(_git(scratch, "ls-files", "-o", "--exclude-standard").split()))
    assert new == sorted([*FILES, "stitchops/kernels"])


def test_every_shared_piece_finds_the_scratch_op(scratch):
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=scratch,
        env=_env(scratch),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert "scratch_scale" in found["ops"]
    assert "tests/test_scratch_scale.py" in found["kernel_tests"]
    assert "benchmarks/bench_scratch_scale.py" in found["benches"]
    assert "scratch_scale" in found["targets"]
    assert "bind_scratch_scale.cpp" in found["binding"]
    assert found["value"] == [2.0, 2.0, 2.0] and found["registered"]
    setup = (scratch / "setup.py").read_text()
    assert 'glob.glob("csrc/binding/bind_*.cpp")' in setup and 'glob.glob("csrc/*.cu")' in setup
    info = subprocess.run(
        [sys.executable, "-m", "stitchops", "info"],
        cwd=scratch,
        env=_env(scratch),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "op scratch_scale: torch reference" in info.stdout, info.stderr[-3000:]


def test_the_scratch_ops_own_tests_pass(scratch):
    result = subprocess.run(
        [sys.executable, *"-m pytest -q -p no:cacheprovider tests/test_scratch_scale.py".split()],
        cwd=scratch,
        env=_env(scratch),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "2 passed" in result.stdout
