"""setup.py's STITCHOPS_CUDA_ARCHS parsing (the function alone: importing setup.py builds)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


@pytest.fixture(scope="module")
def gencode_flags():
    tree = ast.parse(SETUP.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_gencode_flags")
    namespace: dict = {}
    exec(compile(ast.Module([fn], type_ignores=[]), str(SETUP), "exec"), namespace)
    return namespace["_gencode_flags"]


def test_arch_list_becomes_gencode_flags(gencode_flags):
    assert gencode_flags("80;90a, sm_100;;12.0") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_120,code=sm_120",
    ]


@pytest.mark.parametrize("arch", ["75", "sm_70", "8.6x", "hopper"])
def test_archs_the_kernels_cannot_use_are_refused(gencode_flags, arch):
    with pytest.raises(SystemExit, match="STITCHOPS_CUDA_ARCHS"):
        gencode_flags(arch)
