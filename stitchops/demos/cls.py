"""``stitchops demo``: SN-Netv2 end to end on scikit-learn's digits, on a laptop CPU.

1. pretrain two ViT anchors of different width and depth (16 wide × 4 blocks, 64 × 8);
2. stitch them two-way (FS, SF, FSF, SFS) with LoRA stitching layers, least-squares
   initialised, and train them with resource-constrained sampling (ROS);
3. evaluate every stitch (accuracy, FLOPs, params, latency), print the table with the Pareto
   frontier, and write ``stitches.png`` and ``stitches.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from stitchops.demos.common import require, timing_note
from stitchops.train.data import load_digits
from stitchops.train.evaluate import eval_stitches, plot_stitches
from stitchops.train.loop import TrainConfig, load_trained, train

DESCRIPTION = "SN-Netv2 end to end on the bundled digits: two anchors, every stitch (runs/demo)"
OPTIONS = ("anchor_epochs", "stitch_epochs")

SMALL = "vit_small_test:embed_dim=16,depth=4,num_heads=2"
LARGE = "vit_small_test:embed_dim=64,depth=8,num_heads=4"


def run(out="runs/demo", anchor_epochs=30, stitch_epochs=10, progress=True, seed=0) -> dict:
    """Run the demo; returns the summary it prints (also saved as ``summary.json``)."""
    require("sklearn", "matplotlib")  # a broken environment: said before any training
    out = Path(out)
    start = time.time()
    common = dict(data="digits", batch_size=64, progress=progress, seed=seed, warmup_steps=20)
    weights = []
    for name, spec in (("anchor_small", SMALL), ("anchor_large", LARGE)):
        print(f"[demo] pretraining {name}: {spec}", flush=True)
        cfg = TrainConfig(
            mode="anchor",
            anchors=[spec],
            out=str(out / name),
            epochs=anchor_epochs,
            lr=2e-3,
            **common,
        )
        weights.append(str(train(cfg, overwrite=True)))
    print("[demo] stitching them two-way with LoRA stitching layers and ROS", flush=True)
    cfg = TrainConfig(
        mode="snnetv2",
        anchors=[SMALL, LARGE],
        anchor_weights=weights,
        out=str(out / "stitched"),
        epochs=stitch_epochs,
        lr=1e-3,
        rank=8,
        **common,
    )
    ckpt = train(cfg, overwrite=True)
    model, _ = load_trained(ckpt)
    val = torch.utils.data.DataLoader(load_digits("val"), batch_size=360)
    table = eval_stitches(model, val, progress=progress)
    print(table.format())
    print(timing_note())
    plot_stitches(table, out / "stitches.png", title="SN-Netv2 on digits: two anchors, stitched")
    (out / "stitches.json").write_text(table.to_json())
    anchors = [r for r in table.rows if r.kind == "anchor"]
    inner = [r for r in table.rows if r.kind != "anchor"]
    low, high = sorted(anchors, key=lambda r: r.flops)
    between = [r for r in inner if low.flops <= r.flops <= high.flops]
    summary = {
        "stitches": len(table.rows),
        "anchor_small": {"mflops": low.flops / 1e6, "accuracy": low.accuracy},
        "anchor_large": {"mflops": high.flops / 1e6, "accuracy": high.accuracy},
        "stitches_between_anchors_in_flops": len(between),
        "stitch_accuracy_range": [min(r.accuracy for r in inner), max(r.accuracy for r in inner)],
        "pareto_frontier": table.frontier,
        "seconds": round(time.time() - start, 1),
        "plot": str(out / "stitches.png"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"[demo] {len(table.rows)} networks from 2 anchors: small {low.flops / 1e6:.2f} MFLOPs "
        f"{100 * low.accuracy:.1f}%, large {high.flops / 1e6:.2f} MFLOPs "
        f"{100 * high.accuracy:.1f}%; {len(between)} stitches lie between them in FLOPs, "
        f"accuracy {100 * summary['stitch_accuracy_range'][0]:.1f}-"
        f"{100 * summary['stitch_accuracy_range'][1]:.1f}%; Pareto frontier {table.frontier}; "
        f"plot {out / 'stitches.png'}; {summary['seconds']} s",
        flush=True,
    )
    return summary
