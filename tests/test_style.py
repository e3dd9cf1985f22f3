"""The tree is ruff-clean (lint and format) and its C++ clang-formatted, as CI requires."""

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
    result = subprocess.run([clang_format, "--dry-run", "-Werror", *map(str, sources)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, "run clang-format -i on:\n" + result.stderr[-4000:]
