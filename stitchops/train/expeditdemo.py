"""``stitchops demo expedit``: Expedit's evaluation (its Tables 1, 4 and 5) in small, on CPU.

Train a Segmenter (ViT, linear head) on the generated shapes (32×32 images, patch 2: a
16×16 token map), then, without any fine-tuning, expedite it at several clustering points
α and grids h×w (β: to the end, as the paper's Segmenter setting) and report for each the
GFLOPs per image (clustering counted at its local cost), the latency, the mIoU and the
cosine similarity of the final features to the plain model's (Table 1); beside each, the
same α and grid with adaptive average pooling and bilinear upsampling (Tables 4-5).
Writes ``expedit.json`` and ``expedit.png`` (mIoU against GFLOPs for both).

τ depends on the tokens' scale: the paper's 50 suits ViT-L, whose squared token norms run
to thousands. The demo sets τ to 5% of the mean squared norm of the tokens entering block α
(measured on the first validation batch), and prints it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from stitchops.models.expedit import expedited
from stitchops.train.loop import TrainConfig, load_trained, train
from stitchops.train.segdata import GeneratedShapes
from stitchops.train.segmetrics import ConfusionMatrix

SPEC = ("vit_small_test:img_size=32,patch_size=2,in_chans=3,num_classes=6,num_heads=4,"
        "embed_dim=64,depth=6")  # fmt: skip
SETTINGS = ((2, (8, 8)), (2, (11, 11)), (3, (8, 8)), (3, (11, 11)), (4, (11, 11)))


@torch.no_grad()
def measure(model, loader, features_of) -> dict:
    """mIoU over the loader, GFLOPs and median latency per image, final features of batch 0."""
    matrix = ConfusionMatrix(model.num_classes)
    for images, masks in loader:
        matrix.update(model(images).argmax(1), masks)
    images = next(iter(loader))[0]
    with FlopCounterMode(display=False) as counter:
        model(images[:1])
    times = []
    for _ in range(5):
        start = time.perf_counter()
        model(images)
        times.append((time.perf_counter() - start) / len(images))
    return {"miou": matrix.scores()["mIoU"], "gflops": counter.get_total_flops() / 1e9,
            "ms_per_image": 1e3 * statistics.median(times),
            "features": features_of(images)}  # fmt: skip


def temperature_at(model, images, alpha: int) -> float:
    """5% of the mean squared norm of the patch tokens entering block ``alpha``."""
    with torch.no_grad():
        tokens = model.backbone.forward_embed(images)
        for block in model.backbone.blocks[:alpha]:
            tokens = block(tokens)
    return 0.05 * tokens[:, 1:].square().sum(-1).mean().item()


def _plot(plain: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([plain["gflops"]], [100 * plain["miou"]], marker="*", s=160, color="black",
               label="plain Segmenter", zorder=3)  # fmt: skip
    for method, colour in (("cluster", "tab:blue"), ("pool", "tab:orange")):
        mine = [r for r in rows if r["method"] == method]
        ax.scatter([r["gflops"] for r in mine], [100 * r["miou"] for r in mine], color=colour,
                   label="clustering + reconstruction (Expedit)" if method == "cluster"
                   else "average pooling + bilinear")  # fmt: skip
        for r in mine:
            ax.annotate(f"a{r['alpha']} {r['grid']}", (r["gflops"], 100 * r["miou"]),
                        textcoords="offset points", xytext=(4, -10 if method == "pool" else 4),
                        fontsize=7, color=colour)  # fmt: skip
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("mIoU on generated shapes (%)")
    ax.set_title("Expediting a trained Segmenter without fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_expedit_demo(out="runs/demo-expedit", epochs=20, progress=True, seed=0,
                     settings=SETTINGS) -> dict:  # fmt: skip
    """Train (``epochs``), expedite at ``settings`` ((α, (h, w)), ...), print, plot."""
    out, start = Path(out), time.time()
    print(f"[demo expedit] training a Segmenter: {SPEC}", flush=True)
    cfg = TrainConfig(mode="anchor", task="seg", data="shapes", anchors=[SPEC], epochs=epochs,
                      batch_size=32, lr=2e-3, warmup_steps=20, progress=progress, seed=seed,
                      out=str(out / "segmenter"))  # fmt: skip
    model, _ = load_trained(train(cfg))
    val = GeneratedShapes(128, 32, seed=2 * seed + 1)
    loader = torch.utils.data.DataLoader(val, batch_size=64)

    def features_of(images):
        return model.backbone.forward_features(images)[:, 1:]

    plain = measure(model, loader, features_of)
    rows = []
    for alpha, grid in settings:
        tau = temperature_at(model, next(iter(loader))[0], alpha)
        for method in ("cluster", "pool"):
            with expedited(model, alpha, grid, temperature=tau, method=method):
                result = measure(model, loader, features_of)
            similarity = F.cosine_similarity(result.pop("features"), plain["features"], dim=-1)
            rows.append({"alpha": alpha, "grid": f"{grid[0]}x{grid[1]}", "method": method,
                         "temperature": round(tau, 3), **result,
                         "cosine": similarity.mean().item()})  # fmt: skip
    plain.pop("features")
    lines = [f"{'setting':<26} {'method':<8} {'GFLOPs':>7} {'ms/img':>7} {'mIoU':>6} "
             f"{'cos':>6}",
             f"{'plain':<26} {'':<8} {plain['gflops']:>7.4f} {plain['ms_per_image']:>7.2f} "
             f"{100 * plain['miou']:>5.1f}% {1:>6.3f}"]  # fmt: skip
    for r in rows:
        setting = f"alpha={r['alpha']} {r['grid']} tau={r['temperature']:g}"
        lines.append(f"{setting:<26} {r['method']:<8} {r['gflops']:>7.4f} "
                     f"{r['ms_per_image']:>7.2f} {100 * r['miou']:>5.1f}% "
                     f"{r['cosine']:>6.3f}")  # fmt: skip
    print("\n".join(lines))
    _plot(plain, rows, out / "expedit.png")
    summary = {"plain": plain, "rows": rows, "seconds": round(time.time() - start, 1),
               "plot": str(out / "expedit.png")}  # fmt: skip
    (out / "expedit.json").write_text(json.dumps(summary, indent=1))
    print(f"[demo expedit] {summary['seconds']} s; wrote {out / 'expedit.json'} and "
          f"{out / 'expedit.png'}", flush=True)  # fmt: skip
    return summary
