"""Test configuration for machines with and without a GPU.

Without a GPU:
- Triton kernels run through the CPU interpreter (TRITON_INTERPRET must be set before triton
  is imported, hence here, before any test module).
- Tests parametrised with ``backend="cuda"`` run csrc/*.cu compiled for host threads
  (tests/cuda_emulator) on CPU tensors, through the real binding and op layer. The terminal
  summary says how many did and how many kernel launches they made.
  ``STITCHOPS_EMULATE_CUDA=0`` turns this off (those tests then skip).

With a GPU:
- The Triton kernels run the GPU's fallback tiling (``STITCHOPS_AUTOTUNE=0``, unless the
  shell sets it): autotuning every shape the suite uses would compile some 750 kernels (108
  autotune keys on the CPU suite, × 7-9 tilings; tests/triton_aot.py takes ~1.3 s a compile
  on our CPU machine), over ten minutes of compiling. Each tiling of the autotune space is
  still run, pinned, by test_every_triton_tiling_matches_float64_reference.
"""

import os
from pathlib import Path

import pytest
import torch

if torch.cuda.is_available():
    os.environ.setdefault("STITCHOPS_AUTOTUNE", "0")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_EMULATED = {"tests": 0, "launches": 0}


@pytest.fixture(autouse=True)
def _seed_and_no_forced_backend(monkeypatch):
    """Fresh random data per test, and no STITCHOPS_BACKEND leaking in from the shell."""
    monkeypatch.delenv("STITCHOPS_BACKEND", raising=False)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def emulated_cuda_extension(tmp_path_factory):
    """csrc/*.cu + csrc/binding.cpp built for host threads (built once per session)."""
    from cuda_emulator import build

    try:
        build.compiler()
    except RuntimeError as err:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(err))
    cache = os.environ.get("STITCHOPS_EMULATOR_CACHE")
    return build.build(Path(cache) if cache else tmp_path_factory.mktemp("emulated_cuda"))


def _wants_emulated_cuda(request) -> bool:
    callspec = getattr(request.node, "callspec", None)
    return (
        callspec is not None
        and callspec.params.get("backend") == "cuda"
        and not torch.cuda.is_available()
        and os.environ.get("STITCHOPS_EMULATE_CUDA", "1") != "0"
        and not os.environ.get("STITCHOPS_TEST_AUDIT")  # the audit runs no kernel
    )


@pytest.fixture(autouse=True)
def _emulate_cuda_without_gpu(request, monkeypatch):
    if not _wants_emulated_cuda(request):
        yield
        return
    from cuda_emulator import build

    ext = request.getfixturevalue("emulated_cuda_extension")
    build.install(ext, monkeypatch)
    before = ext.emulated_launches()
    yield
    _EMULATED["tests"] += 1
    _EMULATED["launches"] += ext.emulated_launches() - before


def pytest_report_header(config):
    from stitchops import _runtime

    if _runtime.triton_interpreting():
        return "triton: CPU interpreter, one small tiling (each autotune tiling pinned in turn)"
    return f"triton: {_runtime.triton_tuning()}"


def pytest_terminal_summary(terminalreporter):
    if _EMULATED["tests"]:
        terminalreporter.write_line(
            f"cuda backend: {_EMULATED['tests']} tests ran csrc/*.cu on the host emulator "
            f"(tests/cuda_emulator, no GPU here), {_EMULATED['launches']} kernel launches"
        )
