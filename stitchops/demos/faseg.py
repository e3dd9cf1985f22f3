"""``stitchops demo faseg``: FASeg's ablations (thesis Tables 5.4 and 5.6) in small, on CPU.

Train the same small ViT with six query decoders on the generated shapes (32×32 images,
patch 4: the neck's maps are 32², 16², 8² and 4², so the "1/4" map is 8× the "1/32" one and
HRCA's windows are 8×8), each for the same steps, and report mIoU on held-out images, the
training's peak memory and median step time (the training loop's ``usage.json``; each
variant trains in a fresh process on one thread, so a CPU's resident-set peak is its own,
and as many train side by side as there are cores):

- Table 5.4: Mask2Former's decoder (no DFPQ, no HRCA), + DFPQ, + HRCA, FASeg (both);
- Table 5.6: FASeg's HRCA against attending the whole high-resolution map and against as
  many windows picked at random.

Two cycles of decoder layers (6 without HRCA, 8 with), hidden 64, 20 queries. At this size
the official ω = 32 would keep ⌊16/32⌋ → 1 window of the 4×4 positions; the demo keeps
⌊16/4⌋ = 4 (``hrca_ratio=4``, a quarter of the map), and says so. Writes ``faseg.json`` and
``faseg.png``.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from stitchops.demos.common import miou, pyplot, table, timing_note
from stitchops.train import threads
from stitchops.train.loop import TrainConfig, load_trained, train
from stitchops.train.segdata import GeneratedShapes

DESCRIPTION = "FASeg's decoder ablations, thesis Tables 5.4 / 5.6 (runs/demo-faseg)"
OPTIONS = ("anchor_epochs",)

SPEC = (
    "vit_small_test:img_size=32,patch_size=4,in_chans=3,num_classes=6,num_heads=4,"
    "embed_dim=64,depth=6"
)
BASE = {"hidden": 64, "heads": 4, "queries": 20, "ffn": 256, "hrca_ratio": 4, "points": 1024}
VARIANTS = (  # (name, table, decoder options)
    ("Mask2Former", "5.4", {"dfpq": False, "hrca": None, "layers": 6}),
    ("+ DFPQ", "5.4", {"dfpq": True, "hrca": None, "layers": 6}),
    ("+ HRCA", "5.4", {"dfpq": False, "hrca": "topk", "layers": 8}),
    ("FASeg (DFPQ + HRCA)", "5.4 / 5.6", {"dfpq": True, "hrca": "topk", "layers": 8}),
    ("FASeg, whole 1/4 map", "5.6", {"dfpq": True, "hrca": "full", "layers": 8}),
    ("FASeg, random windows", "5.6", {"dfpq": True, "hrca": "random", "layers": 8}),
)


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    names = [r["variant"] for r in rows]
    colours = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:olive", "tab:purple"]
    left.barh(names, [100 * r["miou"] for r in rows], color=colours)
    left.set_xlabel("mIoU on held-out shapes (%)")
    left.invert_yaxis()
    right.barh(names, [r["step_ms"] for r in rows], color=colours)
    right.set_xlabel("median training step (ms, CPU)")
    right.invert_yaxis()
    right.set_yticklabels([])
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("FASeg ablations on generated shapes, same steps for each")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _train_logged(cfg: TrainConfig, log: Path) -> None:
    """``train(cfg)`` with its output in ``log``: variants that train side by side would
    interleave their lines."""
    with open(log, "w") as stream, redirect_stdout(stream), redirect_stderr(stream):
        train(cfg, overwrite=True)


def _config(out: Path, options: dict, anchor_epochs: int, progress: bool, seed, lr):
    """One variant's training: the same backbone, data, steps and seed for each."""
    return TrainConfig(
        mode="anchor",
        task="seg",
        decoder="faseg",
        data="shapes",
        anchors=[SPEC],
        decoder_options={**BASE, **options},
        epochs=anchor_epochs,
        batch_size=16,
        lr=lr,
        warmup_steps=20,
        progress=progress,
        seed=seed,
        threads=1,
        out=str(out),
    )


def train_variants(out: Path, variants, parallel: int, **settings) -> None:
    """Train every variant in a fresh process of its own (its peak resident memory is its
    alone), ``parallel`` at a time: each trains on one thread (the work of a step earns no
    more), so one per core keeps every core busy. Side by side, each writes its output to
    ``variant<i>/train.log``; alone, to the terminal."""
    spawn = multiprocessing.get_context("spawn")
    waiting, running = list(enumerate(variants)), {}
    while waiting or running:
        while waiting and len(running) < parallel:
            i, (name, _, options) = waiting.pop(0)
            run_dir = out / f"variant{i}"
            cfg = _config(run_dir, options, **settings)
            if parallel > 1:
                run_dir.mkdir(parents=True, exist_ok=True)
                worker = spawn.Process(target=_train_logged, args=(cfg, run_dir / "train.log"))
            else:
                worker = spawn.Process(target=train, args=(cfg,), kwargs={"overwrite": True})
            worker.start()
            running[worker.sentinel] = (i, name, worker, time.time())
            print(f"[demo faseg] {i + 1}/{len(variants)}: {name}: training", flush=True)
        ready = multiprocessing.connection.wait(list(running))
        for sentinel in ready:
            i, name, worker, began = running.pop(sentinel)
            worker.join()
            if worker.exitcode != 0:
                for _, _, other, _ in running.values():
                    other.terminate()
                where = f"; its output: {out / f'variant{i}' / 'train.log'}" if parallel > 1 else ""
                raise RuntimeError(f"training {name!r} failed (exit code {worker.exitcode}){where}")
            print(
                f"[demo faseg] {i + 1}/{len(variants)}: {name}: trained in "
                f"{time.time() - began:.0f} s",
                flush=True,
            )


def run(
    out="runs/demo-faseg",
    anchor_epochs=6,
    progress=True,
    seed=0,
    variants=VARIANTS,
    lr=5e-4,
    parallel: int | None = None,
) -> dict:
    """Train each of ``variants`` for ``anchor_epochs`` on 512 generated images, ``parallel``
    at a time (default: one per core); print, plot."""
    out, start = Path(out), time.time()
    parallel = max(1, min(len(variants), parallel or threads.cores()))
    print(
        f"[demo faseg] {len(variants)} variants, {parallel} at a time (one thread each)", flush=True
    )
    settings = {"anchor_epochs": anchor_epochs, "seed": seed, "lr": lr}
    train_variants(out, variants, parallel, progress=progress and parallel == 1, **settings)
    val = GeneratedShapes(128, 32, seed=2 * seed + 1)
    loader = torch.utils.data.DataLoader(val, batch_size=64)
    rows = []
    for i, (name, section, options) in enumerate(variants):
        run_dir = out / f"variant{i}"
        model, _ = load_trained(run_dir / "checkpoint.safetensors")
        usage = json.loads((run_dir / "usage.json").read_text())
        rows.append(
            {
                "variant": name,
                "table": section,
                "options": options,
                "miou": miou(model, loader),
                "peak_mb": usage["peak_mb"],
                "step_ms": usage["step_ms_median"],
            }
        )
    cells = [
        (
            r["variant"],
            r["table"],
            f"{100 * r['miou']:.1f}%",
            f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-",
            f"{r['step_ms']:.0f}",
        )
        for r in rows
    ]
    print(table(("variant", "table", "mIoU", "peak MB", "step ms"), cells, (24, 9, 6, 8, 8)))
    print(timing_note())
    _plot(rows, out / "faseg.png")
    summary = {
        "rows": rows,
        "backbone": SPEC,
        "decoder": BASE,
        "epochs": anchor_epochs,
        "parallel": parallel,
        "seconds": round(time.time() - start, 1),
    }
    (out / "faseg.json").write_text(json.dumps(summary, indent=1))
    print(
        f"[demo faseg] {summary['seconds']} s; wrote {out / 'faseg.json'} and {out / 'faseg.png'}",
        flush=True,
    )
    return summary
