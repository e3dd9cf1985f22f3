"""The demos: small end-to-end runs of each method on a laptop CPU, apps built on the
library (``stitchops demo NAME``). Each module has ``run(out, ..., progress, seed)`` and the
``OPTIONS`` of the command line it takes (``anchor_epochs``, ``stitch_epochs``); ``DEMOS``
maps the command's names to the modules (imported when run) and says what each shows."""

from __future__ import annotations

import importlib
from types import ModuleType

DEMOS = {
    "cls": "SN-Netv2 end to end on the bundled digits: two anchors, every stitch (runs/demo)",
    "seg": "stitched ViTs as segmentation backbones on generated shapes (runs/demo-seg)",
    "spt": "SPT against LoRA and full fine-tuning of a digits ViT (runs/demo-spt)",
    "expedit": "a trained Segmenter expedited without fine-tuning (runs/demo-expedit)",
    "faseg": "FASeg's decoder ablations, thesis Tables 5.4 / 5.6 (runs/demo-faseg)",
}


def demo(name: str) -> ModuleType:
    """The demo module called ``name`` (one of ``DEMOS``)."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}: one of {', '.join(DEMOS)}")
    return importlib.import_module(f"stitchops.demos.{name}")
