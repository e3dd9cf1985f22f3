"""Imports point down the layers of DESIGN.md, read from every module's source (ast).

From the bottom: the backends and what they share (reference/, kernels/, the extension's
call path, the runtime switches), then the op plumbing and the ops, then nn, models, train
(and spt, spvit), the demos, and the command line beside ``stitchops/__init__.py`` (the
facade, which loads the upper layers lazily). An import, even inside a function, may point
at its own layer or one below, never above; and inside a layer the imports form no circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = (
    (
        "stitchops._runtime",
        "stitchops._memory",
        "stitchops.reference",
        "stitchops.kernels",
        "stitchops._cuda",
        "stitchops._C",
    ),
    ("stitchops._backends", "stitchops._dispatch", "stitchops.ops"),
    ("stitchops.nn",),
    ("stitchops.models",),
    ("stitchops.train", "stitchops.spt", "stitchops.spvit"),
    ("stitchops.demos",),
    ("stitchops.cli", "stitchops.__main__", "stitchops"),
)


def layer_of(module: str) -> int:
    """The layer of ``module``: that of the longest prefix named in LAYERS (the package
    name alone only for the facade itself, so that a new subpackage must be placed)."""
    best, found = -1, None
    for index, names in enumerate(LAYERS):
        for name in names:
            prefix = module.startswith(name + ".") and name != "stitchops"
            if (module == name or prefix) and len(name) > best:
                best, found = len(name), index
    if found is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py")
    return found


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (kernels/ as stitchops.kernels)."""
    found = {}
    for folder, package in (
        (ROOT / "stitchops", "stitchops"),
        (ROOT / "kernels", "stitchops.kernels"),
    ):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The stitchops modules ``name`` imports, resolved to the most specific known module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # a submodule imported by name, else the module itself
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {t for t in targets if t == "stitchops" or t.startswith("stitchops.")}


def test_every_import_points_down_the_layers():
    found = modules()
    upward = [
        f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
        for name, path in sorted(found.items())
        if name != "stitchops"
        for target in sorted(imports(name, path, set(found) | {"stitchops._C"}))
        if layer_of(target) > layer_of(name)
    ]
    assert not upward, "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports in ``graph`` (module -> the modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node, path):
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if state.get(target) is None:
                found = visit(target, [*path, target])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if state.get(start) is None:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_circles_inside_a_layer():
    """Modules import each other in one direction: none needs an import inside a function
    to break a circle (packages' ``__init__`` re-exports left out: they only gather)."""
    found = modules()
    known = set(found) | {"stitchops._C"}
    graph = {
        name: {
            t
            for t in imports(name, path, known)
            if t != name and t in found and found[t].name != "__init__.py"
        }
        for name, path in found.items()
        if path.name != "__init__.py"
    }
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_sees_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_check_sees_an_upward_import():
    """An import of the facade or an upper layer from a bottom module is caught."""
    known = set(modules())
    fake = ROOT / "kernels" / "lora.py"
    assert "stitchops.kernels.tuning" in imports("stitchops.kernels.lora", fake, known)
    assert layer_of("stitchops.kernels.lora") == 0 < layer_of("stitchops._dispatch")
    assert layer_of("stitchops.train.loop") > layer_of("stitchops.models.vit")
    assert layer_of("stitchops") == len(LAYERS) - 1


@pytest.mark.parametrize("module", ["stitchops.ops", "stitchops.reference.lora", "stitchops"])
def test_lower_layers_load_no_training_code(module: str):
    """``import stitchops.ops`` (or the reference, or the package) loads neither the upper
    layers nor anything torch itself does not load (the training code's packages, triton).

    The baseline includes torch's FLOP counter, which the ops register their formulas with:
    it imports triton itself where triton is installed."""
    probe = (
        "import sys, torch, torch.utils.flop_counter; before = set(sys.modules); "
        f"import {module}; "
        "print('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    upper = ("stitchops.train", "stitchops.models", "stitchops.nn")
    unwanted = [
        m
        for m in loaded
        if m.startswith(upper)
        or (
            not m.startswith("stitchops")
            and m.split(".")[0].lstrip("_") not in sys.stdlib_module_names
        )
    ]
    assert not unwanted, unwanted
    assert "stitchops.ops.lora" in loaded or module == "stitchops.reference.lora"


def test_the_package_keeps_its_public_names():
    import stitchops

    for name in stitchops.__all__:
        assert getattr(stitchops, name) is not None, name
    assert stitchops.models.StitchedViT and stitchops.nn.StitchingLayer
    assert stitchops.eval_stitches is stitchops.train.evaluate.eval_stitches
    with pytest.raises(AttributeError, match="no attribute 'lora_lineer'"):
        stitchops.lora_lineer  # noqa: B018
