"""The demos: small end-to-end runs of each method on a laptop CPU, apps built on the
library (``stitchops demo NAME``).

A demo is one module here: ``DESCRIPTION`` (one line for ``stitchops demo --help``),
``OPTIONS`` (the command line's options it takes: ``anchor_epochs``, ``stitch_epochs``) and
``run(out, ..., progress, seed)``. ``DEMOS`` finds them (reading, not importing, each
module), so a new demo is its own file; ``demo(name)`` imports one to run it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
DEFAULT = "cls"  # ``stitchops demo`` alone: the README's first command


def _descriptions() -> dict[str, str]:
    """name → DESCRIPTION of every demo module, the default first."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            targets = getattr(node, "targets", [])
            if any(getattr(t, "id", None) == "DESCRIPTION" for t in targets):
                found[path.stem] = ast.literal_eval(node.value)
    return {name: found[name] for name in sorted(found, key=lambda n: (n != DEFAULT, n))}


DEMOS = _descriptions()


def demo(name: str) -> ModuleType:
    """The demo module called ``name`` (one of ``DEMOS``)."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}: one of {', '.join(DEMOS)}")
    return importlib.import_module(f"stitchops.demos.{name}")
