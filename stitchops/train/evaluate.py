"""Measure every stitch: accuracy (classifiers) or mIoU (segmentation), FLOPs, parameters
and latency; Pareto frontier; plot."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm


@dataclass
class StitchResult:
    id: int
    kind: str
    route: str
    flops: int
    params: int
    accuracy: float
    latency_ms: float
    on_frontier: bool = False


@dataclass
class StitchTable:
    """Rows of ``eval_stitches``; ``frontier`` lists the Pareto-optimal stitch ids."""

    rows: list[StitchResult]
    device: str
    frontier: list[int] = field(default_factory=list)
    metric: str = "top-1 accuracy"  # what ``StitchResult.accuracy`` holds ("mIoU", ...)

    def accuracy(self) -> dict[int, float]:
        return {r.id: r.accuracy for r in self.rows}

    def format(self) -> str:
        lines = [
            f"{'id':>4} {'kind':6} {'MFLOPs':>10} {'params(M)':>9} "
            f"{'mIoU %' if self.metric == 'mIoU' else 'acc %':>6} "
            f"{'ms/batch':>8} {'pareto':6} route"
        ]
        for r in sorted(self.rows, key=lambda r: r.flops):
            lines.append(
                f"{r.id:4d} {r.kind:6} {r.flops / 1e6:10.2f} {r.params / 1e6:9.3f} "
                f"{100 * r.accuracy:6.2f} {r.latency_ms:8.2f} {'*' if r.on_frontier else '':6} "
                f"{r.route}"
            )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(
            {
                "device": self.device,
                "metric": self.metric,
                "frontier": self.frontier,
                "rows": [asdict(r) for r in self.rows],
            },
            indent=1,
        )


def pareto_frontier(points: list[tuple[int, float, float]]) -> list[int]:
    """Ids of (id, cost, accuracy) points that no cheaper-or-equal point beats."""
    best, frontier = float("-inf"), []
    for pid, _, acc in sorted(points, key=lambda p: (p[1], -p[2])):
        if acc > best:
            frontier.append(pid)
            best = acc
    return frontier


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_repeats(latency_repeats: int) -> None:
    if latency_repeats < 1:
        raise ValueError(f"latency_repeats must be >= 1, got {latency_repeats}")


def median_latency_ms(model, images, patch_size=None, repeats: int = 5) -> float:
    """Median wall time of ``model(images)`` in ms over ``repeats`` calls, after one untimed
    warm-up call (the first call of a stitch pays for allocations and lazy set-up)."""
    model(images, patch_size=patch_size)
    times = []
    for _ in range(repeats):
        _synchronize(images.device)
        start = time.perf_counter()
        model(images, patch_size=patch_size)
        _synchronize(images.device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def eval_stitches(
    model, loader, ids=None, patch_size=None, device=None, progress=True, latency_repeats=5
) -> StitchTable:
    """Top-1 accuracy, FLOPs, params and batch latency of every stitch (or ``ids``).

    ``loader`` yields (images, labels); ``device`` defaults to the model's. Latency: the
    median of ``latency_repeats`` timed forwards of the first batch, after the accuracy pass
    and one more untimed call have warmed the stitch up. The selected stitch is restored
    afterwards.
    """
    _check_repeats(latency_repeats)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ids = [s.id for s in model.stitches] if ids is None else list(ids)
    previous, was_training = model.stitches[model.active].id, model.training
    model.eval()
    rows = []
    bar = tqdm(ids, desc="evaluating stitches", disable=not progress, leave=False)
    for sid in bar:
        stitch = model.select(sid)
        correct = total = 0
        first = None
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            first = images if first is None else first
            logits = model(images, patch_size=patch_size)
            correct += int((logits.argmax(-1) == labels).sum())
            total += labels.numel()
        if total == 0:
            raise ValueError("eval_stitches got an empty loader")
        img_size = tuple(first.shape[-2:])  # FLOPs at the size evaluated
        flops = model.flops(sid, img_size=img_size, patch_size=patch_size)
        latency = median_latency_ms(model, first, patch_size, latency_repeats)
        rows.append(
            StitchResult(
                sid, stitch.kind, stitch.describe(), flops, stitch.params, correct / total, latency
            )
        )
    model.select(previous)
    model.train(was_training)
    return _table(rows, device, "top-1 accuracy")


@torch.no_grad()
def eval_seg_stitches(
    model, loader, ids=None, device=None, progress=True, latency_repeats=5, inference=None
) -> StitchTable:
    """mIoU, FLOPs (backbone route + head), params and batch latency of every stitch (or
    ``ids``) of a ``Segmenter`` whose backbone is a dense ``StitchedViT``, or of the one model
    when it is not stitched (id 0). ``loader`` yields (images, masks); ``inference``: keyword
    arguments of ``Segmenter.predict`` (default: whole images; ``mode="slide"`` with ``crop``
    and ``stride`` for Segmenter's sliding windows).
    """
    from stitchops.models.segflops import segmenter_flops, segmenter_params
    from stitchops.train.segmetrics import ConfusionMatrix

    _check_repeats(latency_repeats)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stitched = getattr(model.backbone, "stitches", None)
    all_ids = [s.id for s in stitched] if stitched is not None else [0]
    ids = all_ids if ids is None else list(ids)
    previous = model.backbone.stitches[model.backbone.active].id if stitched else None
    was_training = model.training
    model.eval()
    rows = []
    for sid in tqdm(ids, desc="evaluating stitches", disable=not progress, leave=False):
        stitch = model.backbone.select(sid) if stitched is not None else None
        matrix = ConfusionMatrix(model.num_classes, device=device)
        first = None
        for images, masks in loader:
            images, masks = images.to(device), masks.to(device)
            first = images if first is None else first
            matrix.update(model.predict(images, **(inference or {})).argmax(1), masks)
        if first is None:
            raise ValueError("eval_seg_stitches got an empty loader")
        matrix.all_reduce()
        ph, pw = model.patch_size()  # FLOPs at the first image's size, padded to the grid
        img_size = (
            first.shape[-2] + -first.shape[-2] % ph,
            first.shape[-1] + -first.shape[-1] % pw,
        )
        rows.append(
            StitchResult(
                sid,
                stitch.kind if stitch else "anchor",
                stitch.describe() if stitch else "model",
                segmenter_flops(model, img_size),
                segmenter_params(model),
                matrix.scores()["mIoU"],
                median_latency_ms(model.predict, first, None, latency_repeats),
            )
        )
    if stitched is not None:
        model.backbone.select(previous)
    model.train(was_training)
    return _table(rows, device, "mIoU")


@torch.no_grad()
def eval_classifier(
    model, loader, patch_size=None, device=None, latency_repeats=5, name: str = "model"
) -> StitchTable:
    """Top-1 accuracy, FLOPs, params and batch latency of one classifier (an anchor, SPT's
    fine-tuned or merged model), as a one-row table (id 0)."""
    from stitchops.models.flops import model_flops

    _check_repeats(latency_repeats)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    first = None
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        first = images if first is None else first
        correct += int((model(images, patch_size=patch_size).argmax(-1) == labels).sum())
        total += labels.numel()
    if total == 0:
        raise ValueError("eval_classifier got an empty loader")
    flops = model_flops(model, img_size=tuple(first.shape[-2:]), patch_size=patch_size)
    params = sum(p.numel() for p in model.parameters())
    row = StitchResult(
        0,
        "anchor",
        name,
        flops,
        params,
        correct / total,
        median_latency_ms(model, first, patch_size, latency_repeats),
    )
    model.train(was_training)
    return _table([row], device, "top-1 accuracy")


def combine_tables(tables: list[StitchTable]) -> StitchTable:
    """One table of several one-model tables' rows, numbered in order."""
    if len(tables) == 1:
        return tables[0]
    rows = [dataclasses.replace(row, id=i) for i, t in enumerate(tables) for row in t.rows]
    return _table(rows, tables[0].device, tables[0].metric)


def _table(rows: list[StitchResult], device, metric: str) -> StitchTable:
    """The rows with their Pareto frontier (metric against FLOPs) marked."""
    frontier = pareto_frontier([(r.id, r.flops, r.accuracy) for r in rows])
    for r in rows:
        r.on_frontier = r.id in frontier
    return StitchTable(rows, str(device), frontier, metric=metric)


def plot_stitches(table: StitchTable, path, title: str = "stitches") -> None:
    """PNG of accuracy vs GFLOPs: every stitch, the Pareto frontier, the anchors as stars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(
            "plotting needs matplotlib, a dependency of stitchops: pip install matplotlib"
        ) from exc
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    scale, unit = (1e9, "G") if max(r.flops for r in table.rows) >= 1e9 else (1e6, "M")
    kinds = sorted({r.kind for r in table.rows if r.kind != "anchor"})
    for kind in kinds:
        rows = [r for r in table.rows if r.kind == kind]
        ax.scatter(
            [r.flops / scale for r in rows],
            [100 * r.accuracy for r in rows],
            s=18,
            alpha=0.7,
            label=kind,
        )
    front = sorted((r for r in table.rows if r.on_frontier), key=lambda r: r.flops)
    ax.plot(
        [r.flops / scale for r in front],
        [100 * r.accuracy for r in front],
        "k-",
        lw=1,
        label="Pareto frontier",
    )
    anchors = [r for r in table.rows if r.kind == "anchor"]
    ax.scatter(
        [r.flops / scale for r in anchors],
        [100 * r.accuracy for r in anchors],
        marker="*",
        s=220,
        c="gold",
        edgecolors="k",
        zorder=5,
        label="anchors",
    )
    ax.set_xlabel(f"{unit}FLOPs per image")
    ax.set_ylabel(f"{table.metric} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def validation_accuracy(model, data: str, device, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on ``data``'s validation split."""
    from stitchops.train.data import load_dataset

    cfg = model.cfg
    loader = torch.utils.data.DataLoader(
        load_dataset(data, "val", cfg.img_size, cfg.in_chans), batch_size=batch_size
    )
    was_training = model.training
    model.eval()
    right = total = 0
    for images, labels in loader:
        logits = model(images.to(device))
        right += (logits.argmax(1) == labels.to(device)).sum().item()
        total += len(labels)
    model.train(was_training)
    return right / max(total, 1)


def segmentation_loader(
    data: str, model, num_classes: int, seed: int, reduce_zero_label=None, batch_size: int = 16
):
    """The validation images of ``data`` for a segmentation model: batches of the generated
    shapes, or one image at a time from a folder (their sizes differ)."""
    from stitchops.train.segdata import load_seg_dataset

    backbone = model.backbone
    first = (backbone.anchors[0] if hasattr(backbone, "anchors") else backbone).cfg
    dataset = load_seg_dataset(data, "val", first, num_classes, seed, reduce_zero_label)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size if data == "shapes" else 1)


@torch.no_grad()
def segmentation_miou(model, cfg, device) -> float:
    """mIoU of a (not stitched) segmentation model on its validation data, whole images."""
    loader = segmentation_loader(
        cfg.val_data or cfg.data, model, model.num_classes, cfg.seed, cfg.reduce_zero_label
    )
    table = eval_seg_stitches(model, loader, device=device, progress=False, latency_repeats=1)
    return table.rows[0].accuracy
