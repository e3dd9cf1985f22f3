"""``stitchops demo spt``: sensitivity-aware sparse tuning, end to end on a laptop CPU.

The thesis's Tables 2.1 and 2.7 in small: a ViT pretrained on one bundled task (the digits)
is fine-tuned on another (``shapes-cls``: five generated shapes, the same 8×8 format) by

* full fine-tuning (every parameter),
* LoRA-8 on every attention and MLP matrix (the structured baseline),
* SPT at LoRA-8's trainable count, and at half of it (sensitivity on 16 batches, top-τ
  entries, LoRA-8 where a matrix has enough of them, unstructured deltas elsewhere),

each for the same epochs, with a new head. Printed: validation accuracy, trainable
parameters (the head's 245 and the class token's 48 apart: every method trains them),
peak training memory and median step time; written:
``spt.json`` and ``spt.png`` (accuracy against trainable parameters).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stitchops.demos.common import pyplot, table, timing_note
from stitchops.train.evaluate import validation_accuracy
from stitchops.train.loop import TrainConfig, load_trained, train

DESCRIPTION = "SPT against LoRA and full fine-tuning of a digits ViT (runs/demo-spt)"
OPTIONS = ("anchor_epochs", "stitch_epochs")

BACKBONE = "vit_small_test:embed_dim=48,depth=4,num_heads=3"
DOWNSTREAM = BACKBONE + ",num_classes=5"


def _run(name: str, out: Path, epochs: int, common: dict, **cfg) -> dict:
    path = train(
        TrainConfig(
            anchors=[DOWNSTREAM],
            data="shapes-cls",
            out=str(out / name),
            epochs=epochs,
            **common,
            **cfg,
        ),
        overwrite=True,
    )
    model, _ = load_trained(path)
    usage = json.loads((out / name / "usage.json").read_text())
    # Every method trains the head and the class token (SPT's official recipe): not counted.
    shared = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("head.") or n == "cls_token"
    )
    return {
        "method": name,
        "accuracy": validation_accuracy(model, "shapes-cls", "cpu"),
        "trainable": usage["trainable"] - shared,
        "peak_mb": usage["peak_mb"],
        "step_ms": usage["step_ms_median"],
    }


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(rows):  # labels alternately above and below: close points stay legible
        ax.scatter(r["trainable"], 100 * r["accuracy"], s=60)
        ax.annotate(
            r["method"],
            (r["trainable"], 100 * r["accuracy"]),
            textcoords="offset points",
            xytext=(6, 6 if i % 2 == 0 else -14),
            fontsize=9,
        )
    ax.set_xscale("log")
    counts = [r["trainable"] for r in rows]
    ax.set_xlim(min(counts) / 2, max(counts) * 3)  # room for the labels
    accs = [100 * r["accuracy"] for r in rows]
    ax.set_ylim(min(accs) - 5, max(accs) + 5)  # differences read against a fair scale
    ax.set_xlabel("trainable parameters (head and class token excluded, log scale)")
    ax.set_ylabel("validation accuracy on shapes-cls (%)")
    ax.set_title("Fine-tuning a digits-pretrained ViT: SPT vs LoRA vs full")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out="runs/demo-spt", anchor_epochs=30, stitch_epochs=12, progress=True, seed=0) -> dict:
    """Run the demo (``stitch_epochs``: the fine-tuning epochs); returns its rows."""
    out, start = Path(out), time.time()
    common = dict(batch_size=64, progress=progress, seed=seed, warmup_steps=10)
    print(f"[demo spt] pretraining {BACKBONE} on the digits", flush=True)
    pretrained = str(
        train(
            TrainConfig(
                mode="anchor",
                anchors=[BACKBONE],
                data="digits",
                out=str(out / "pretrained"),
                epochs=anchor_epochs,
                lr=2e-3,
                **common,
            ),
            overwrite=True,
        )
    )
    tune = dict(anchor_weights=[pretrained], **common)
    rows = []
    print("[demo spt] fine-tuning on shapes-cls: full", flush=True)
    rows.append(_run("full", out, stitch_epochs, tune, mode="anchor", lr=5e-4))
    print("[demo spt] fine-tuning: LoRA-8 on every matrix", flush=True)
    rows.append(
        _run(
            "lora-8", out, stitch_epochs, tune, mode="spt", spt_plan="lora-all", spt_rank=8, lr=3e-3
        )
    )
    for name, budget in (("spt", rows[-1]["trainable"]), ("spt-half", rows[-1]["trainable"] / 2)):
        # the budget counts what SPT adds; the LoRA row's count is its LoRAs plus nothing else
        print(f"[demo spt] fine-tuning: SPT at {budget:,.0f} parameters", flush=True)
        rows.append(
            _run(name, out, stitch_epochs, tune, mode="spt", budget=budget, spt_rank=8, lr=3e-3)
        )
    cells = [
        (
            r["method"],
            f"{100 * r['accuracy']:.1f}%",
            f"{r['trainable']:,}",
            f"{r['peak_mb']:.1f}" if r["peak_mb"] is not None else "n/a",
            f"{r['step_ms']:.1f}",
        )
        for r in rows
    ]
    print(
        table(("method", "accuracy", "trainable", "peak MB", "step ms"), cells, (10, 9, 10, 8, 8))
    )
    print(timing_note())
    _plot(rows, out / "spt.png")
    summary = {"rows": rows, "seconds": round(time.time() - start, 1), "plot": str(out / "spt.png")}
    (out / "spt.json").write_text(json.dumps(summary, indent=1))
    print(
        f"[demo spt] {summary['seconds']} s; wrote {out / 'spt.json'} and {out / 'spt.png'}",
        flush=True,
    )
    return summary
