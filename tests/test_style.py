"""The tree is ruff-clean (lint and format) and its C++ clang-formatted, as CI requires."""

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([ruff, *command, str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpp_sources_are_clang_formatted():
    """csrc/ and the CUDA emulator follow .clang-format (clang-format 19, from [test])."""
    clang_format = shutil.which("clang-format")
    if clang_format is None:
        pytest.skip("clang-format is not installed (pip install -e '.[test]')")
    version = subprocess.run([clang_format, "--version"], capture_output=True, text=True).stdout
    if " 19." not in version:
        pytest.skip(f"the style is pinned to clang-format 19 ([test] extra), found: {version}")
    emulator = ROOT / "tests" / "cuda_emulator"
    sources = [
        *sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file()),
        *sorted(emulator.glob("*.cpp")),
        *sorted(emulator.rglob("*.h")),
    ]
    assert sources
    result = subprocess.run(
        [clang_format, "--dry-run", "-Werror", *map(str, sources)], capture_output=True, text=True
    )
    assert result.returncode == 0, "run clang-format -i on:\n" + result.stderr[-4000:]


def python_sources() -> list[Path]:
    folders = ("stitchops", "kernels", "tests", "benchmarks", "docs")
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def _is_triton_kernel(node: ast.FunctionDef) -> bool:
    """A ``@triton.jit`` (or autotuned) function: a kernel body is one program's whole work."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if getattr(target, "attr", getattr(target, "id", None)) in ("jit", "autotune"):
            return True
    return False


def test_no_function_is_longer_than_80_lines():
    """Small functions: none over 80 lines but Triton kernels."""
    long = []
    for path in python_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80 and not _is_triton_kernel(node):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, long


def test_the_formatter_is_rarely_switched_off():
    """`# fmt: skip` only where an aligned table reads better (fewer than 30)."""
    count = sum(p.read_text().count("# fmt: skip") for p in python_sources())
    assert count < 30, count
