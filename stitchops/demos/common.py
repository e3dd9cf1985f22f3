"""What the demos share: the check for their optional needs, tables, plots, mIoU, and a
note on the timing (threads, the machine's load) under every table that compares speed."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from stitchops.train.images import DataError
from stitchops.train.segmetrics import ConfusionMatrix

NEEDS = {"sklearn": "scikit-learn (the digits)", "matplotlib": "matplotlib (the plots)"}


def require(*modules: str) -> None:
    """DataError before any training when a demo's needs are missing from the environment."""
    missing = [NEEDS[m] for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        packages = " ".join(what.split()[0] for what in missing)
        raise DataError(
            f"the demo needs {' and '.join(missing)}, dependencies of stitchops "
            f"that this environment lacks: pip install {packages}"
        )


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table(header: Sequence[str], rows: Sequence[Sequence], widths: Sequence[int]) -> str:
    """Right-aligned columns but the first (left-aligned), as text."""

    def line(cells):
        first, *rest = (str(c) for c in cells)
        return f"{first:<{widths[0]}} " + " ".join(
            f"{c:>{w}}" for c, w in zip(rest, widths[1:], strict=True)
        )

    return "\n".join([line(header), *(line(r) for r in rows)])


def timing_note() -> str:
    """The conditions of the timings above: medians after a warm-up, the threads, and a
    warning when the machine was busy (its load above its cores): then the times are
    inflated and may not rank the methods."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    note = f"times: medians after a warm-up, {torch.get_num_threads()} CPU thread(s), {cores} cores"
    if load is None:
        return note
    if load > cores:
        return (
            f"{note}; WARNING: the machine was busy (load {load:.1f}): the times are "
            "inflated and may not rank the methods"
        )
    return f"{note}, load {load:.1f}"


@torch.no_grad()
def miou(model, loader) -> float:
    """mIoU of a segmentation model over a loader of (images, masks)."""
    matrix = ConfusionMatrix(model.num_classes)
    was_training = model.training
    model.eval()
    for images, masks in loader:
        matrix.update(model(images).argmax(1), masks)
    model.train(was_training)
    return matrix.scores()["mIoU"]
