"""Test configuration: run Triton kernels through the CPU interpreter where there is no GPU.

TRITON_INTERPRET must be set before triton is imported, hence here, before any test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_no_forced_backend(monkeypatch):
    """Fresh random data per test, and no STITCHOPS_BACKEND leaking in from the shell."""
    monkeypatch.delenv("STITCHOPS_BACKEND", raising=False)
    torch.manual_seed(0)
