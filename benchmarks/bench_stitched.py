"""Overhead of StitchedViT on a pure anchor route against the plain anchor (issue target
≤ 1.05×): one training step (forward, backward, AdamW step) and one inference forward.

Both run the same anchor module, so the only extra work is the route bookkeeping and an
optimizer that holds every anchor's parameters (those off the route have no gradient and are
skipped). Correctness first: the stitched route's logits must equal the anchor's.

    python benchmarks/bench_stitched.py            # CPU: DeiT-Ti/S at 112², batch 8
    python benchmarks/bench_stitched.py --device cuda   # GPU: DeiT-S/B at 224², batch 64, bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_ms, write_results

from stitchops.models import StitchedViT, create_model


def setup(device: str):
    if device == "cuda":
        names, img, batch = ("deit_small_patch16_224", "deit_base_patch16_224"), 224, 64
    else:
        names, img, batch = ("deit_tiny_patch16_224", "deit_small_patch16_224"), 112, 8
    torch.manual_seed(0)
    anchors = [create_model(n, img_size=img).to(device) for n in names]
    model = StitchedViT(anchors)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    return model, x, y, {"anchors": names, "img_size": img, "batch": batch}


def step_fn(module, params, x, y, amp, **kwargs):
    opt = torch.optim.AdamW(params, lr=1e-6)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(module(x, **kwargs).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(device: str, budget_ms: float) -> dict:
    model, x, y, info = setup(device)
    anchor_id = len(model.anchors) - 1
    anchor = model.anchors[anchor_id]
    model.select(anchor_id)
    model.eval()
    with torch.no_grad():
        if not torch.equal(model(x), anchor(x)):
            raise AssertionError("stitched anchor route differs from the plain anchor")
    model.train()
    amp = device == "cuda"
    rows = {}
    plain = step_fn(anchor, list(anchor.parameters()), x, y, amp)
    stitched = step_fn(model, list(model.parameters()), x, y, amp)
    rows["train_step"] = {
        "anchor_ms": median_ms(plain, device, budget_ms)["ms"],
        "stitched_ms": median_ms(stitched, device, budget_ms)["ms"],
    }
    model.eval()
    with torch.no_grad():
        rows["forward"] = {
            "anchor_ms": median_ms(lambda: anchor(x), device, budget_ms)["ms"],
            "stitched_ms": median_ms(lambda: model(x), device, budget_ms)["ms"],
        }
    for row in rows.values():
        row["ratio"] = row["stitched_ms"] / row["anchor_ms"]
    return {**info, "device": device, **rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    r = run(args.device, budget_ms=3000 if args.device == "cpu" else 400)
    for name in ("train_step", "forward"):
        row = r[name]
        print(
            f"{name:10s} anchor {row['anchor_ms']:8.2f} ms   stitched (anchor route) "
            f"{row['stitched_ms']:8.2f} ms   ratio {row['ratio']:.3f}"
        )
    if not args.no_save:
        print(f"wrote {write_results('stitched_overhead', args.device, r)}")
    return 0


def test_stitched_anchor_route_step(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, x, y, _ = setup(device)
    model.select(len(model.anchors) - 1)
    benchmark(step_fn(model, list(model.parameters()), x, y, device == "cuda"))


if __name__ == "__main__":
    sys.exit(main())
