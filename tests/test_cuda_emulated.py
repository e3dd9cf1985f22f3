"""The host emulator of the CUDA backend (tests/cuda_emulator) and what it runs.

Without a GPU, conftest.py runs every ``backend="cuda"`` test on csrc/*.cu compiled for host
threads. Here: the emulator's own contract and the CUDA it supports; every op's cuda tests
(tests/op_tables.py) once more with the kernels built under AddressSanitizer (the host
counterpart of compute-sanitizer's memcheck: an out-of-bounds read or write of any tensor or
shared array aborts with its source line); and a torch-free driver with every op's
racecheck_<op>.cpp under ThreadSanitizer (the counterpart of racecheck: a missing
__syncthreads is reported as a data race with its source line).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cuda_emulator import build, supported
from op_tables import ops

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU runs the real kernels (test_lora.py, backend cuda)"
)


def test_translate_rewrites_only_launches():
    src = "k<T, 16><<<grid, THREADS, 0, stream>>>(a);\nint x = a << 2;\nf<<<g, b>>>(p, q);"
    assert build.translate(src + "\nh<<<1, 32>>>( );") == (
        "::emu::launch(k<T, 16>, ::emu::Config{grid, THREADS, 0, stream}, a);\nint x = a << 2;\n"
        "::emu::launch(f, ::emu::Config{g, b}, p, q);\n::emu::launch(h, ::emu::Config{1, 32});"
    )


def test_kernels_use_only_what_the_emulator_supports():
    """Every CUDA identifier in csrc/ is one the emulator's headers define (supported.py)."""
    used = supported.used_in(sorted((ROOT / "csrc").glob("*.cu*")))
    missing = {
        name: sorted(files) for name, files in used.items() if name not in supported.all_supported()
    }
    assert not missing, f"not emulated (extend tests/cuda_emulator, then supported.py): {missing}"
    include = ROOT / "tests" / "cuda_emulator" / "include"
    for header, names in supported.SUPPORTED.items():
        text = (include / header).read_text()
        absent = [n for n in names if n.removeprefix("wmma::") not in text]
        assert not absent, f"{header} lists {absent} but does not define them"


def test_emulated_kernels_compute_and_count_launches(emulated_cuda_extension):
    ext = emulated_cuda_extension
    before = ext.emulated_launches()
    x, w = torch.randn(70, 33), torch.randn(65, 33)
    y, _ = ext.lora_forward(x, w, None, None, None, 1.0, None, False, 0)
    assert ext.emulated_launches() == before + 1
    assert torch.allclose(y, x @ w.t(), atol=1e-5)
    with pytest.raises(TypeError, match="weight has dtype Float but x has Double"):
        ext.lora_forward(x.double(), w, None, None, None, 1.0, None, False, 0)


@pytest.mark.slow
def test_cuda_suite_under_address_sanitizer(tmp_path, emulated_cuda_extension):
    try:
        libasan, libstdcxx = (
            subprocess.run(
                [build.compiler(), f"-print-file-name={lib}"], capture_output=True, text=True
            ).stdout.strip()
            for lib in ("libasan.so", "libstdc++.so")
        )
    except RuntimeError:
        libasan = libstdcxx = ""
    if not os.path.isabs(libasan):
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have g++ with libasan")
        pytest.skip("no libasan")
    env = {
        **os.environ,
        "STITCHOPS_EMULATE_SANITIZE": "address",
        # The session's build directory: the ASan build reuses its compiled binding.
        "STITCHOPS_EMULATOR_CACHE": str(emulated_cuda_extension.cache_dir),
        # libstdc++ too: python is no C++ program, and without it ASan's __cxa_throw
        # interceptor finds no real one, so a C++ exception (TORCH_CHECK) would abort.
        "LD_PRELOAD": f"{libasan} {libstdcxx}" if os.path.isabs(libstdcxx) else libasan,
        "ASAN_OPTIONS": f"detect_leaks=0:log_path={tmp_path / 'asan'}",
    }
    selection = " or ".join(f"({op.asan_select})" for op in ops())
    cmd = [
        sys.executable,
        *"-m pytest -q -p no:cacheprovider -k".split(),
        selection,
        *(str(ROOT / "tests" / op.test_file) for op in ops()),
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    reports = "\n".join(p.read_text() for p in tmp_path.glob("asan*"))
    assert not reports, reports[:6000]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " skipped" not in result.stdout.splitlines()[-2], result.stdout[-2000:]
    assert "tests ran csrc/*.cu on the host emulator" in result.stdout


@pytest.mark.slow
def test_kernels_are_race_free_under_thread_sanitizer(tmp_path):
    """No data race between the threads of a block (a missing __syncthreads would be one),
    nor between blocks (two blocks writing the same element: all blocks run at once)."""
    try:
        exe = build.build_racecheck(tmp_path)
    except RuntimeError as err:
        if os.environ.get("CI") == "true" or "-fsanitize=thread" not in str(err):
            raise
        pytest.skip(f"no ThreadSanitizer here: {str(err)[-300:]}")
    # Every block of a launch at once: races between blocks are races between host threads.
    env = {
        **os.environ,
        "TSAN_OPTIONS": "halt_on_error=1",
        "STITCHOPS_EMULATE_CONCURRENT_BLOCKS": "1024",
    }
    result = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert "ThreadSanitizer" not in output, output[-6000:]
    assert result.returncode == 0 and "racecheck: all results match" in output, output[-3000:]
    for op in ops():  # each op's driver ran
        assert f"racecheck: {op.name}" in output, output[-3000:]
    # The check itself can fail: a barrier left out, and two blocks on one element.
    for race, kernel in (
        ("missing-barrier", "missing_barrier"),
        ("blocks-collide", "blocks_collide"),
    ):
        result = subprocess.run(
            [str(exe), race], env=env, capture_output=True, text=True, timeout=300
        )
        output = result.stdout + result.stderr
        assert result.returncode != 0, (race, output[-3000:])
        summary = rf"SUMMARY: ThreadSanitizer: data race \S*racecheck\.cpp:\d+ in {kernel}\b"
        assert re.search(summary, output), (race, output[-3000:])


def test_emulator_semantics_selftest(tmp_path):
    """The harness itself: grid coverage, barriers, WMMA products, cp.async timing."""
    exe = build.build_selftest(tmp_path)
    try:  # an emulator that deadlocks (a barrier, the thread pool) fails, not hangs
        result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the emulator selftest hung for 120 s: a deadlock in the emulator")
    assert result.returncode == 0 and "selftest: all passed" in result.stdout, result.stdout
    for misuse, message in (
        ("misaligned-wmma", "wmma: misaligned operand"),
        ("misaligned-cp-async", "cp.async: bad copy"),
    ):
        result = subprocess.run([str(exe), misuse], capture_output=True, text=True)
        assert result.returncode != 0 and message in result.stderr, (misuse, result.stderr)
