"""``stitchops demo seg``: SN-Netv2 as a flexible segmentation backbone, end to end on CPU.

On the generated shapes (six classes, 32×32 images, no download): pretrain a small and a
large ViT anchor, each with a Segmenter linear head; stitch them two-way (SN-Netv2) with one
head on the large anchor's width, started from the large anchor's; train briefly; evaluate
mIoU, FLOPs, params and latency of every stitch; draw ``stitches.png`` (mIoU against FLOPs,
frontier marked) and ``predictions.png`` (images, ground truth, and the predictions of the
small anchor, a middle stitch and the large anchor, with the class colours).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from stitchops.demos.common import pyplot, require, timing_note
from stitchops.train.evaluate import eval_seg_stitches, plot_stitches
from stitchops.train.images import IMAGENET_MEAN, IMAGENET_STD
from stitchops.train.loop import TrainConfig, load_trained, train
from stitchops.train.segdata import GeneratedShapes

DESCRIPTION = "stitched ViTs as segmentation backbones on generated shapes (runs/demo-seg)"
OPTIONS = ("anchor_epochs", "stitch_epochs")

SPEC = "vit_small_test:img_size=32,patch_size=4,in_chans=3,num_classes=6,num_heads={h},"
SMALL = SPEC.format(h=2) + "embed_dim=32,depth=4"
LARGE = SPEC.format(h=4) + "embed_dim=96,depth=8"
COLOURS = torch.tensor(
    [[70, 70, 70], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]],
    dtype=torch.uint8,
)


def run(out="runs/demo-seg", anchor_epochs=20, stitch_epochs=8, progress=True, seed=0) -> dict:
    """Run the demo; returns the summary it prints (also saved as ``summary.json``)."""
    require("matplotlib")
    out, start = Path(out), time.time()
    common = dict(
        task="seg",
        data="shapes",
        batch_size=32,
        progress=progress,
        seed=seed,
        warmup_steps=20,
        lr=2e-3,
    )
    weights = []
    for name, spec in (("anchor_small", SMALL), ("anchor_large", LARGE)):
        print(f"[demo seg] pretraining {name}: {spec}", flush=True)
        cfg = TrainConfig(
            mode="anchor", anchors=[spec], out=str(out / name), epochs=anchor_epochs, **common
        )
        weights.append(str(train(cfg, overwrite=True)))
    print("[demo seg] stitching them two-way (SN-Netv2) with one shared head", flush=True)
    cfg = TrainConfig(
        mode="snnetv2",
        anchors=[SMALL, LARGE],
        anchor_weights=weights,
        head_weights=weights[1],
        out=str(out / "stitched"),
        epochs=stitch_epochs,
        rank=8,
        **{**common, "lr": 1e-3},
    )
    model, _ = load_trained(train(cfg, overwrite=True))
    val = GeneratedShapes(128, 32, seed=2 * seed + 1)
    table = eval_seg_stitches(
        model, torch.utils.data.DataLoader(val, batch_size=64), progress=progress
    )
    print(table.format())
    print(timing_note())
    plot_stitches(table, out / "stitches.png", title="SN-Netv2 segmentation on generated shapes")
    (out / "stitches.json").write_text(table.to_json())
    by_flops = sorted(table.rows, key=lambda r: r.flops)
    anchors = [r for r in by_flops if r.kind == "anchor"]
    halfway = (anchors[0].flops + anchors[1].flops) / 2
    middle = min((r for r in by_flops if r.kind != "anchor"), key=lambda r: abs(r.flops - halfway))
    shown = [
        ("small anchor", anchors[0].id),
        (f"stitch {middle.id} ({middle.kind})", middle.id),
        ("large anchor", anchors[1].id),
    ]
    plot_predictions(model, val, shown, out / "predictions.png")
    low, high = anchors
    between = [r for r in by_flops if r.kind != "anchor" and low.flops <= r.flops <= high.flops]
    summary = {
        "stitches": len(table.rows),
        "anchor_small": {"mflops": low.flops / 1e6, "miou": low.accuracy},
        "anchor_large": {"mflops": high.flops / 1e6, "miou": high.accuracy},
        "stitches_between_anchors_in_flops": len(between),
        "pareto_frontier": table.frontier,
        "seconds": round(time.time() - start, 1),
        "plots": [str(out / "stitches.png"), str(out / "predictions.png")],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"[demo seg] {len(table.rows)} networks: small anchor {low.flops / 1e6:.2f} MFLOPs "
        f"mIoU {100 * low.accuracy:.1f}%, large {high.flops / 1e6:.2f} MFLOPs "
        f"{100 * high.accuracy:.1f}%, {len(between)} stitches between them; plots "
        f"{out / 'stitches.png'}, {out / 'predictions.png'}; {summary['seconds']} s",
        flush=True,
    )
    return summary


@torch.no_grad()
def plot_predictions(model, dataset, shown, path, count: int = 4) -> None:
    """A grid: image, ground truth, then each (title, stitch id)'s prediction, per row."""
    from matplotlib.patches import Patch

    plt = pyplot()

    images, masks = zip(*(dataset[i] for i in range(count)), strict=True)
    images = torch.stack(images)
    predictions = []
    for _, sid in shown:
        model.backbone.select(sid)
        predictions.append(model.predict(images).argmax(1))
    pixels = (
        images * torch.tensor(IMAGENET_STD)[:, None, None]
        + torch.tensor(IMAGENET_MEAN)[:, None, None]
    )
    columns = ["image", "ground truth", *(title for title, _ in shown)]
    fig, axes = plt.subplots(
        count, len(columns), figsize=(2 * len(columns), 2 * count + 0.6), dpi=110
    )
    for row in range(count):
        panels = [
            pixels[row].clamp(0, 1).permute(1, 2, 0),
            COLOURS[masks[row]],
            *(COLOURS[p[row]] for p in predictions),
        ]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel.numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
    legend = [
        Patch(color=(COLOURS[i].numpy() / 255).tolist(), label=name)
        for i, name in enumerate(GeneratedShapes.classes)
    ]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)
