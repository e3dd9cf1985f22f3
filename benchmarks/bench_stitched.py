"""Overhead of StitchedViT on a pure anchor route against the plain anchor (target: at most
1.05× its time): one training step (forward, backward, AdamW step) and one inference forward.

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
import runner
from runner import Case, Impl, Target

from stitchops.models import StitchedViT, create_model

# The stitched route may cost at most 5% over the plain anchor, on a GPU, both passes.
TARGETS = tuple(
    Target(
        op="stitched_overhead",
        where={"device": "cuda", "pass": name},
        implementations=("stitched",),
        bounds=(("vs_baseline", "min", 1 / 1.05),),
        what=f"StitchedViT anchor route, {name}: at most 1.05x the plain anchor's time",
    )
    for name in ("train step", "forward")
)


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


def cases(device: str) -> list[Case]:
    """A training step and an inference forward, anchor alone against its stitched route,
    after checking that the route's logits equal the anchor's."""
    model, x, y, info = setup(device)
    anchor_id = len(model.anchors) - 1
    anchor = model.anchors[anchor_id]
    model.select(anchor_id)

    def check() -> float:
        model.eval()
        with torch.no_grad():
            if not torch.equal(model(x), anchor(x)):
                raise AssertionError("stitched anchor route differs from the plain anchor")
        return 0.0

    def inference(module):
        def forward():
            module.eval()
            with torch.no_grad():
                return module(x)

        return forward

    amp = device == "cuda"
    plain = step_fn(anchor, list(anchor.parameters()), x, y, amp)
    stitched = step_fn(model, list(model.parameters()), x, y, amp)

    def training(step):
        def run():
            model.train()
            step()

        return run

    params = {
        "anchors": "/".join(info["anchors"]),
        "img_size": info["img_size"],
        "batch": info["batch"],
        "device": device,
    }
    return [
        Case(
            {**params, "pass": "train step"},
            {"anchor": Impl(training(plain)), "stitched": Impl(training(stitched), check)},
            baseline="anchor",
        ),
        Case(
            {**params, "pass": "forward"},
            {"anchor": Impl(inference(anchor)), "stitched": Impl(inference(model), check)},
            baseline="anchor",
        ),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    budget = 3000.0 if args.device == "cpu" else 400.0
    runner.run(
        "stitched_overhead",
        [lambda: cases(args.device)],
        args.device,
        budget,
        save=not args.no_save,
    )
    return 0


def test_stitched_anchor_route_step(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, x, y, _ = setup(device)
    model.select(len(model.anchors) - 1)
    benchmark(step_fn(model, list(model.parameters()), x, y, device == "cuda"))


if __name__ == "__main__":
    sys.exit(main())
