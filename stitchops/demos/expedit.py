"""``stitchops demo expedit``: Expedit's evaluation (its Tables 1, 4 and 5) in small, on CPU.

Train a Segmenter (ViT, linear head) on the generated shapes (32×32 images, patch 2: a
16×16 token map), then, without any fine-tuning, expedite it at several clustering points
α and grids h×w (β: to the end, the head reading the clustered map, as Expedit-Segmenter)
and report, for each, the variants side by side:

* ``official``: ``expedite``'s defaults, the official code's insertion (top-k
  reconstruction with k 20, the official clamp and normalisation floor);
* ``exact``: the same with exact numerics;
* ``local``: the paper's local reconstruction (exact numerics);
* ``pool``: adaptive average pooling and bilinear upsampling (the paper's baseline).

Columns: GFLOPs per image (clustering counted at its local cost), median latency per image
(after a warm-up), mIoU, and the agreement of the predicted labels with the plain model's.
Writes ``expedit.json`` and ``expedit.png`` (mIoU against GFLOPs).

τ depends on the tokens' scale: the paper's 50 suits ViT-L, whose squared token norms run
to thousands. The demo runs each setting at τ = 50 and at 5% of the mean squared norm of
the tokens entering block α (measured on the first validation batch): at τ = 50 this small
model's tokens sit far closer than 27.6·τ to their centres, so the official numerics give
the exact ones' result; the variants differ by their reconstruction.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from stitchops.demos.common import pyplot, table, timing_note
from stitchops.models.expedit import expedited
from stitchops.train.evaluate import median_latency_ms
from stitchops.train.loop import TrainConfig, load_trained, train
from stitchops.train.segdata import GeneratedShapes
from stitchops.train.segmetrics import ConfusionMatrix

DESCRIPTION = "a trained Segmenter expedited without fine-tuning (runs/demo-expedit)"
OPTIONS = ("anchor_epochs",)

SPEC = (
    "vit_small_test:img_size=32,patch_size=2,in_chans=3,num_classes=6,num_heads=4,"
    "embed_dim=64,depth=6"
)
SETTINGS = ((2, (8, 8)), (2, (11, 11)), (3, (8, 8)), (3, (11, 11)), (4, (11, 11)))


VARIANTS = {
    "official": {},
    "exact": {"numerics": "exact"},
    "local": {"reconstruct": "local", "numerics": "exact"},
    "pool": {"method": "pool"},
}


@torch.no_grad()
def measure(model, loader, plain_labels=None) -> dict:
    """mIoU over the loader, agreement of the labels with ``plain_labels``, GFLOPs and
    median latency per image (after a warm-up)."""
    matrix = ConfusionMatrix(model.num_classes)
    labels = []
    for images, masks in loader:
        predicted = model(images).argmax(1)
        matrix.update(predicted, masks)
        labels.append(predicted)
    labels = torch.cat(labels)
    images = next(iter(loader))[0]
    with FlopCounterMode(display=False) as counter:
        model(images[:1])
    latency = median_latency_ms(lambda x, patch_size=None: model(x), images) / len(images)
    agree = 1.0 if plain_labels is None else (labels == plain_labels).float().mean().item()
    return {
        "miou": matrix.scores()["mIoU"],
        "gflops": counter.get_total_flops() / 1e9,
        "ms_per_image": latency,
        "agreement": agree,
        "labels": labels,
    }


def temperature_at(model, images, alpha: int) -> float:
    """5% of the mean squared norm of the patch tokens entering block ``alpha``."""
    with torch.no_grad():
        tokens = model.backbone.forward_embed(images)
        for block in model.backbone.blocks[:alpha]:
            tokens = block(tokens)
    return 0.05 * tokens[:, 1:].square().sum(-1).mean().item()


def _plot(plain: dict, rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter(
        [plain["gflops"]],
        [100 * plain["miou"]],
        marker="*",
        s=160,
        color="black",
        label="plain Segmenter",
        zorder=3,
    )
    colours = {
        "official": "tab:blue",
        "exact": "tab:cyan",
        "local": "tab:green",
        "pool": "tab:orange",
    }
    for variant, colour in colours.items():
        mine = [r for r in rows if r["variant"] == variant and r["tau_rule"] == "scaled"]
        ax.scatter(
            [r["gflops"] for r in mine],
            [100 * r["miou"] for r in mine],
            color=colour,
            label=variant,
            marker="o" if variant != "pool" else "s",
        )
        if variant in ("official", "pool"):
            for r in mine:
                ax.annotate(
                    f"a{r['alpha']} {r['grid']}",
                    (r["gflops"], 100 * r["miou"]),
                    textcoords="offset points",
                    fontsize=7,
                    color=colour,
                    xytext=(4, -10 if variant == "pool" else 4),
                )
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("mIoU on generated shapes (%)")
    ax.set_title("Expediting a trained Segmenter without fine-tuning (scaled τ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(plain: dict, rows: list[dict]) -> str:
    def cells(setting, variant, r):
        return (
            setting,
            variant,
            f"{r['gflops']:.4f}",
            f"{r['ms_per_image']:.2f}",
            f"{100 * r['miou']:.1f}%",
            f"{100 * r['agreement']:.1f}%",
        )

    lines = [cells("plain", "", plain)]
    lines += [
        cells(f"a={r['alpha']} {r['grid']} tau={r['temperature']:g}", r["variant"], r) for r in rows
    ]
    header = ("setting", "variant", "GFLOPs", "ms/img", "mIoU", "agree")
    return table(header, lines, (22, 9, 7, 7, 6, 6)) + "\n" + timing_note()


def run(
    out="runs/demo-expedit", anchor_epochs=20, progress=True, seed=0, settings=SETTINGS
) -> dict:
    """Train (``epochs``), expedite at ``settings`` ((α, (h, w)), ...) in every variant at
    both τ, print, plot."""
    out, start = Path(out), time.time()
    print(f"[demo expedit] training a Segmenter: {SPEC}", flush=True)
    cfg = TrainConfig(
        mode="anchor",
        task="seg",
        data="shapes",
        anchors=[SPEC],
        epochs=anchor_epochs,
        batch_size=32,
        lr=2e-3,
        warmup_steps=20,
        progress=progress,
        seed=seed,
        out=str(out / "segmenter"),
    )
    model, _ = load_trained(train(cfg, overwrite=True))
    val = GeneratedShapes(128, 32, seed=2 * seed + 1)
    loader = torch.utils.data.DataLoader(val, batch_size=64)
    plain = measure(model, loader)
    rows = []
    for alpha, grid in settings:
        scaled = temperature_at(model, next(iter(loader))[0], alpha)
        for rule, tau in (("paper", 50.0), ("scaled", scaled)):
            for variant, options in VARIANTS.items():
                if variant == "pool" and rule == "paper":
                    continue  # pooling has no τ
                with expedited(model, alpha, grid, temperature=tau, **options):
                    result = measure(model, loader, plain["labels"])
                result.pop("labels")
                rows.append(
                    {
                        "alpha": alpha,
                        "grid": f"{grid[0]}x{grid[1]}",
                        "variant": variant,
                        "tau_rule": rule,
                        "temperature": round(tau, 3),
                        **result,
                    }
                )
    plain.pop("labels")
    print(_table(plain, rows))
    _plot(plain, rows, out / "expedit.png")
    summary = {
        "plain": plain,
        "rows": rows,
        "seconds": round(time.time() - start, 1),
        "plot": str(out / "expedit.png"),
    }
    (out / "expedit.json").write_text(json.dumps(summary, indent=1))
    print(
        f"[demo expedit] {summary['seconds']} s; wrote {out / 'expedit.json'} and "
        f"{out / 'expedit.png'}",
        flush=True,
    )
    return summary
