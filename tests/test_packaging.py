"""A non-editable install is the whole package: a wheel built from the sdist, installed
outside the checkout, imports every layer and runs the command line.

CI installs with ``pip install -e``, which maps the checkout's folders and so would never see
a package left out of the wheel; this test builds one (without the CUDA extension) the way
``pip install stitchops-*.tar.gz`` does.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each source folder lands in an installed tree.
SOURCE_ROOTS = {ROOT / "stitchops": "stitchops", ROOT / "kernels": "stitchops/kernels"}


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def source_modules() -> set[str]:
    """Every Python file of the source packages, as its path inside an installed tree."""
    return {
        f"{installed}/{path.relative_to(folder).as_posix()}"
        for folder, installed in SOURCE_ROOTS.items()
        for path in folder.rglob("*.py")
        if "__pycache__" not in path.parts
    }


# Build products and caches of the checkout: a stale egg-info's file list would leak into the
# sdist and hide a package that setup.py leaves out.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", "*.egg-info", "build", "dist", "__pycache__", ".*_cache", "runs", "*.so", "*.o"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The sdist of a clean copy of the checkout and the wheel built from that sdist, as pip
    builds it from an index (without the CUDA extension)."""
    out = tmp_path_factory.mktemp("dist")
    tree = out / "checkout"
    shutil.copytree(ROOT, tree, ignore=NOT_SOURCE)
    env = {**os.environ, "STITCHOPS_SKIP_CUDA": "1"}
    hook = "import sys; from setuptools import build_meta as b; print(b.{}(sys.argv[1]))"
    sdist = (
        out
        / _run([sys.executable, "-c", hook.format("build_sdist"), str(out)], tree, env)
        .strip()
        .splitlines()[-1]
    )
    with tarfile.open(sdist) as archive:
        archive.extractall(out / "src", filter="data")
    (unpacked,) = (out / "src").iterdir()
    wheel_dir = out / "wheel"
    wheel_dir.mkdir()
    wheel = (
        wheel_dir
        / _run([sys.executable, "-c", hook.format("build_wheel"), str(wheel_dir)], unpacked, env)
        .strip()
        .splitlines()[-1]
    )
    return {"sdist": Path(sdist), "wheel": wheel}


@pytest.mark.slow
def test_sdist_carries_what_a_cuda_build_needs(built):
    with tarfile.open(built["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    wanted |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").glob("*.py")}
    wanted |= {"setup.py", "pyproject.toml", "README.md"}
    assert wanted <= names, sorted(wanted - names)


@pytest.mark.slow
def test_wheel_holds_every_source_module(built):
    with zipfile.ZipFile(built["wheel"]) as archive:
        shipped = {n for n in archive.namelist() if n.endswith(".py")}
    assert shipped == source_modules(), (
        f"missing from the wheel: {sorted(source_modules() - shipped)}; "
        f"not in the source: {sorted(shipped - source_modules())}"
    )


@pytest.mark.slow
def test_installed_wheel_imports_and_runs_outside_the_checkout(built, tmp_path):
    target = tmp_path / "site"
    _run(
        [
            sys.executable,
            *"-m pip install --no-deps --no-compile --quiet --target".split(),
            str(target),
            str(built["wheel"]),
        ],
        tmp_path,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = (
        "import stitchops, stitchops.models, stitchops.train, stitchops.kernels, sys; "
        "mods = [stitchops, stitchops.models, stitchops.train, stitchops.kernels]; "
        "print('\\n'.join(m.__file__ for m in mods))"
    )
    files = _run([sys.executable, "-c", probe], elsewhere, env).split()
    assert len(files) == 4 and all(f.startswith(str(target)) for f in files), files
    script = target / "bin" / "stitchops"
    assert "backends on cpu:" in _run([str(script), "info"], elsewhere, env)
    help_text = _run([str(script), "--help"], elsewhere, env)
    assert all(command in help_text for command in ("demo", "train", "eval", "info", "bench"))


# Import names whose distribution is called otherwise.
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn"}


def test_every_imported_package_is_declared():
    """Each third-party module the package imports (stitchops/, kernels/) is a dependency in
    pyproject.toml (triton: its extra; the backend reports it missing otherwise)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    declared |= {
        re.split(r"[<>=\[ ]", d)[0].lower() for d in project["optional-dependencies"]["triton"]
    }
    imported = set()
    for folder in (ROOT / "stitchops", ROOT / "kernels"):
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    ours = ("stitchops", "kernels")
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ours}
    missing = {DISTRIBUTION.get(m, m).lower() for m in third_party} - declared
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
