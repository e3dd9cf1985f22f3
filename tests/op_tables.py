"""What the test machinery every op shares takes from each op, and how it finds them.

An op declares ``OP_TESTS = OpTests(...)`` in its own test module (tests/test_<op>.py);
``ops()`` collects every such declaration, and nothing of an op is written into the shared
runs:
- ``test_file``: the declaring module. Its tests parametrised with ``backend="cuda"`` run on
  the host emulator without a GPU (conftest.py), once more under AddressSanitizer
  (test_cuda_emulated.py), and under compute-sanitizer on a GPU (test_cuda_sanitizer.py,
  with ``sanitizer_select``: a pytest ``-k`` expression per tool, racecheck being slow).
- ``kernels``: its module in kernels/; ``aot``: the specialisations tests/triton_aot.py
  compiles for real GPUs (every autotune config of each main one, the variants with a few).
- Its ThreadSanitizer driver is ``tests/cuda_emulator/racecheck_<name>.cpp`` (found by name).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class AotKernel:
    """One TunedKernel of an op's kernels module, compiled at one specialisation."""

    attr: str  # its name in the module (a TunedKernel)
    flags: dict  # the launch's compile-time flags
    unit_strides: tuple[str, ...]  # strides that are 1 for contiguous inputs


@dataclass(frozen=True)
class AotVariant:
    """Another specialisation launches ask for, compiled in bf16 with a few configs."""

    name: str
    kernel: str  # an AotKernel's attr
    overrides: dict
    unit_strides: tuple[str, ...] | None = None  # None: the kernel's own


@dataclass(frozen=True)
class AotPlain:
    """A fixed-size, memory-bound kernel (a plain ``triton.jit`` function, no tensor cores):
    compiled for both archs and element widths with its launch's constants."""

    attr: str
    constants: dict
    num_warps: int = 4
    unit_strides: tuple[str, ...] = ()


def plain_variant(attr: str) -> str:
    """tests/triton_aot.py's variant name for an AotPlain kernel's rows."""
    return f"plain {attr}"


@dataclass(frozen=True)
class OpTests:
    """One op's declaration (module docstring): its name, its kernels module, the sanitizer
    and ASan selections, the specialisations the AOT compile checks."""

    name: str
    kernels: str  # module of kernels/
    sanitizer_select: dict[str, str]
    # The cuda tests rerun under AddressSanitizer on the host emulator (ASan slows them ~3×).
    asan_select: str = "cuda"
    aot_kernels: tuple[AotKernel, ...] = ()
    aot_variants: tuple[AotVariant, ...] = ()
    # Flags at which the family's fallback tilings must fit every GPU they are for.
    aot_fallback_flags: dict = field(default_factory=dict)
    fp32_pointers: frozenset[str] = frozenset()  # pointer arguments that are always fp32
    aot_plain: tuple[AotPlain, ...] = ()
    # Arguments whose type is not the default (a pointer to the call's dtype, an int32 size):
    # e.g. {"index_ptr": "*i64", "inv_temperature": "fp32"}.
    arg_types: dict = field(default_factory=dict)
    test_file: str = ""  # the declaring module, filled in by ops()


@functools.cache
def ops() -> tuple[OpTests, ...]:
    """Every op's declaration: the ``OP_TESTS`` of each test module that has one, in file
    order, with its ``test_file`` filled in. (A function, not a constant: the test modules
    import this one.)"""
    found = []
    for path in sorted(HERE.glob("test_*.py")):
        if declares_op(path):
            declared = importlib.import_module(path.stem).OP_TESTS
            found.append(dataclasses.replace(declared, test_file=path.name))
    return tuple(found)


def declares_op(path: Path) -> bool:
    """Whether a test module assigns ``OP_TESTS`` at its top level (read, not imported)."""
    tree = ast.parse(path.read_text())
    return any(
        isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "OP_TESTS" for t in node.targets)
        for node in tree.body
    )


# Shared memory one block may use per arch (opt-in): A100 163 KB; RTX 30 / 40 / 50, L4, L40,
# A10 99 KB; H100 / H200 and B200 227 KB. tests/triton_aot.py compiles a family's fallback
# tiling for every arch whose shared memory makes it the one the family falls back to.
SHARED_MEMORY = {
    80: 163 * 1024,
    86: 99 * 1024,
    89: 99 * 1024,
    90: 227 * 1024,
    100: 227 * 1024,
    120: 99 * 1024,
}
SUM_RANGES = "sum_ranges"  # tests/triton_aot.py's rows of the shared kernels/partials.py


def fallback_variant(tiling) -> str:
    """tests/triton_aot.py's variant name for a fallback tiling's rows."""
    return f"fallback {tuple(tiling)}"


def fallback_archs(space, tiling) -> list[int]:
    """The archs on which a TilingSpace falls back to ``tiling``."""
    return [
        arch
        for arch, shared in SHARED_MEMORY.items()
        if next(t for needed, t in space.fallbacks if shared >= needed) == tiling
    ]
