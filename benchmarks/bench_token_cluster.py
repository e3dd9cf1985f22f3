"""Benchmark of stitchops.token_cluster / token_reconstruct (Expedit).

At Segmenter ViT-L/16 on 640² (H = W = 40 → 28×28 centres, C = 1024, window 5, 5
iterations; B = 1 and 8) and at a smaller shape (ViT-B/16 on 512²: 32×32 → 16×16, C = 768),
clustering and reconstruction, each checked against a float64 reference in the same run:

- ``official``: Expedit-Segmenter's algorithm as its code writes it (``cluster.py``,
  ``reconstruction.py``, commit 63f4066), re-implemented from a reading of it: tokens as
  [B, C, N], every pixel-to-centre distance per iteration by einsum ([B, M, N]), 1e16 added
  where a centre is not a candidate, a softmax over the centres, the M-step by bmm divided by
  the clamped totals; reconstruction: exp(−τ⁻¹·d) over all centres, the top-k values, their
  minimum repeated to [B, N, M], a ≥ mask, ``torch.where`` against zeros, ``F.normalize``,
  einsum with the values. The baseline.
- ``torch``: the stitchops torch backend with the official numerics, what CPU users of
  ``expedite`` run (clustering: banded GEMMs; reconstruction ``torch`` the local mode,
  ``torch_topk`` the official top-k mode: sparse top-k rows; reference/token_cluster.py).
- ``triton`` and ``cuda`` (on a GPU): kernels/token_cluster.py, csrc/token_cluster.cu.

On the CPU every shape runs at one and at two intra-op threads, with ``--busy N`` other
processes each spinning a core (the loaded machine of the CPU targets: 1).

Costs per clustering (FLOPs = 2 per multiply-add): local 5·N·K·C per iteration (K = 25),
the official dense 5·N·M·C; minimum bytes: x read and the centres written once per
iteration, (N + M)·C·s. Peak memory per implementation too (``peak_mb``).

    python benchmarks/bench_token_cluster.py [--device cpu|cuda] [--busy 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runner
from runner import Case, Impl, Target

import stitchops
from stitchops.ops.token_cluster import dense_flops, local_flops
from stitchops.reference import token_cluster as reference

WINDOW, ITERS, TEMPERATURE, K = 5, 5, 50.0, 20
SHAPES = (  # (batch, (H, W), (h, w), C)
    (1, (40, 40), (28, 28), 1024),
    (8, (40, 40), (28, 28), 1024),
    (1, (32, 32), (16, 16), 768),
)

TARGETS = (
    *(
        Target(
            op="token_cluster",
            where={
                "work": work,
                "batch": b,
                "map": f"{hw[0]}x{hw[1]}",
                "device": "cpu",
                "threads": threads,
                "busy": 1,
            },
            implementations=(impl,),
            bounds=(("vs_baseline", "min", speedup), ("memory_vs_baseline", "min", 1.0)),
            what=f"CPU with a busy neighbour, {threads} thread(s): {impl} {work} >= "
            f"{speedup}x the official algorithm, no more peak memory (B {b}, "
            f"{hw[0]}x{hw[1]} -> {grid[0]}x{grid[1]}, C {c})",
        )
        for b, hw, grid, c in SHAPES[:2]
        for threads in (1, 2)
        for work, impl, speedup in (("cluster", "torch", 1.5), ("reconstruct", "torch_topk", 1.0))
    ),
    *(
        Target(
            op="token_cluster",
            where={"work": "cluster", "batch": b, "map": "40x40", "device": "cuda"},
            implementations=("triton", "cuda"),
            bounds=(("vs_baseline", "min", 20.0), ("of_roofline", "min", 0.6)),
            what=f"GPU: clustering >= 20x the official dense algorithm and >= 60% of the "
            f"roofline (B {b}, 40x40 -> 28x28, C 1024)",
        )
        for b in (1, 8)
    ),
)


def official_mask(size, grid, window, device) -> torch.Tensor:
    """[1, M, N] mask distances of the official code: 1e16 where centre m is not a candidate
    of pixel n (from the interpolated label map, as its ``calc_init_centroid``), else 0."""
    h, w = grid
    labels = torch.arange(h * w, dtype=torch.float32, device=device).reshape(1, 1, h, w)
    label_map = F.interpolate(labels, size=size, mode="nearest").reshape(1, -1)
    numbers = torch.arange(h * w, device=device)[None, :, None]
    near_w = (label_map[:, None] % w - numbers % w).abs() <= window // 2
    near_h = (label_map[:, None] // w - numbers // w).abs() <= window // 2
    return (~(near_w & near_h)) * 1e16


def official_cluster(x, grid, mask, iters=ITERS, temperature=TEMPERATURE):
    """The official clustering as written (module docstring); x [B, H, W, C]."""
    b, c = x.shape[0], x.shape[-1]
    pixels = x.permute(0, 3, 1, 2)
    s = F.adaptive_avg_pool2d(pixels, grid).reshape(b, c, -1)  # [B, C, M]
    pixels = pixels.reshape(b, c, -1)  # [B, C, N]
    permuted = pixels.permute(0, 2, 1)
    t = 1.0 / temperature
    for _ in range(iters):
        d = (
            (pixels * pixels).sum(dim=1).unsqueeze(1)
            + (s * s).sum(dim=1).unsqueeze(2)
            - 2 * torch.einsum("bcm,bcn->bmn", s, pixels)
        )
        d += mask
        a = (-d * t).softmax(1)
        s = torch.bmm(a.detach(), permuted)
        s = s / a.detach().sum(2, keepdim=True).clamp_(min=1e-16)
        s = s.permute(0, 2, 1)
    return s.permute(0, 2, 1).reshape(b, *grid, c)


def official_reconstruct(x, centres, values, k=K, temperature=TEMPERATURE):
    """The official top-k reconstruction as written (module docstring)."""
    b, height, width, c = x.shape
    feat, sfeat = x.reshape(b, -1, c), centres.reshape(b, -1, c)
    ds = (
        (feat * feat).sum(dim=2).unsqueeze(2)
        + (sfeat * sfeat).sum(dim=2).unsqueeze(1)
        - 2 * torch.einsum("bnc,bmc->bnm", feat, sfeat)
    )
    weight = torch.exp(-(1.0 / temperature) * ds)
    topk, _ = torch.topk(weight, k=k, dim=2)
    mink = torch.min(topk, dim=-1).values.unsqueeze(-1).repeat(1, 1, weight.shape[-1])
    attention = torch.where(torch.ge(weight, mink), weight, torch.zeros_like(weight))
    attention = F.normalize(attention, dim=2)
    out = torch.einsum("bnm,bmc->bnc", attention, values.reshape(b, -1, values.shape[-1]))
    return out.reshape(b, height, width, -1)


def make_tokens(batch, size, channels, device, dtype):
    """ViT-like tokens: a smooth map (neighbours alike, as in a trained ViT) plus noise, scaled
    so that squared distances are in the hundreds (τ = 50 then matters)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(batch, channels, size[0] // 4, size[1] // 4, generator=g)
    smooth = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    x = (smooth + 0.3 * torch.randn(batch, channels, *size, generator=g)) * 0.5
    return x.permute(0, 2, 3, 1).contiguous().to(device=device, dtype=dtype)


def cases(batch, size, grid, channels, device, threads=None, busy=0) -> list[Case]:
    """The clustering row and the reconstruction row of one shape (checked in float64)."""
    if threads is not None:
        torch.set_num_threads(threads)
    setup = _Setup(batch, size, grid, channels, device)
    params = {
        "batch": batch,
        "map": f"{size[0]}x{size[1]}",
        "grid": f"{grid[0]}x{grid[1]}",
        "channels": channels,
        "device": device,
        **({"threads": threads, "busy": busy} if threads is not None else {}),
    }
    return [_cluster_case(setup, params), _reconstruct_case(setup, params)]


class _Setup:
    """One shape's float32 tokens, the official mask and the float64 truths."""

    def __init__(self, batch, size, grid, channels, device) -> None:
        self.batch, self.size, self.grid, self.channels = batch, size, grid, channels
        self.x = make_tokens(batch, size, channels, device, torch.float32)
        self.mask = official_mask(size, grid, WINDOW, device)
        self.x64 = self.x.double().cpu()
        self.truth = reference.token_cluster(
            self.x64, grid, WINDOW, ITERS, TEMPERATURE, numerics="official"
        )
        self.backends = ["torch", "triton", "cuda"] if device == "cuda" else ["torch"]
        self.n, self.m = size[0] * size[1], grid[0] * grid[1]

    @staticmethod
    def check(fn, want, tol=1e-3):
        return lambda: runner.relative_error([fn().cpu()], [want], tol)


def _cluster_case(setup: _Setup, params: dict) -> Case:
    x, grid, truth = setup.x, setup.grid, setup.truth

    options = {"window": WINDOW, "iters": ITERS, "temperature": TEMPERATURE}

    def ours(backend):
        def run():
            with stitchops.use_backend(backend):
                return stitchops.token_cluster(x, grid, **options, numerics="official")

        return Impl(run, setup.check(run, truth))

    official = lambda: official_cluster(x, grid, setup.mask)  # noqa: E731
    b, n, m, c = setup.batch, setup.n, setup.m, setup.channels
    return Case(
        {"work": "cluster", **params},
        {
            "official": Impl(official, setup.check(official, truth)),
            **{backend: ours(backend) for backend in setup.backends},
        },
        baseline="official",
        flops=b * local_flops(n, c, WINDOW, ITERS),
        min_bytes=b * ITERS * (n + m) * c * 4,
        dtype="float32",
        peak_memory=True,
        details=lambda: {"official_gflop": b * dense_flops(n, m, c, ITERS) / 1e9},
    )


def _reconstruct_case(setup: _Setup, params: dict) -> Case:
    x, device = setup.x, setup.x.device
    centres = setup.truth.to(device=device, dtype=torch.float32)
    values = make_tokens(setup.batch, setup.grid, setup.channels, device, torch.float32)
    values64 = values.double().cpu()
    want_local = reference.token_reconstruct(setup.x64, setup.truth, values64, WINDOW, TEMPERATURE)
    want_topk = reference.token_reconstruct(
        setup.x64, setup.truth, values64, WINDOW, TEMPERATURE, mode="topk", k=K, numerics="official"
    )

    def local(backend):
        def run():
            with stitchops.use_backend(backend):
                return stitchops.token_reconstruct(x, centres, values)

        return Impl(run, setup.check(run, want_local))

    def topk():
        return stitchops.token_reconstruct(
            x, centres, values, mode="topk", k=K, numerics="official"
        )

    official = lambda: official_reconstruct(x, centres, values)  # noqa: E731
    b, n, m, c = setup.batch, setup.n, setup.m, setup.channels
    return Case(
        {"work": "reconstruct", **params},
        {
            "official": Impl(official, setup.check(official, want_topk, 2e-3)),
            **{backend: local(backend) for backend in setup.backends},
            "torch_topk": Impl(topk, setup.check(topk, want_topk)),
        },
        baseline="official",
        flops=2 * b * n * WINDOW**2 * c * 2,
        min_bytes=b * (2 * n + 2 * m) * c * 4,
        dtype="float32",
        peak_memory=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="CPU: other processes spinning a core while the cases run (the CPU targets: 1)",
    )
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        factories = [
            lambda s=s, t=t: cases(*s, "cpu", t, args.busy) for s in SHAPES for t in (1, 2)
        ]
    else:
        factories = [lambda s=s: cases(*s, args.device) for s in SHAPES]
    with runner.busy_neighbours(args.busy if args.device == "cpu" else 0):
        runner.run(
            "token_cluster",
            factories,
            args.device,
            500.0,
            save=not args.no_save,
            ceilings_for=(torch.float32,),
        )
    return 0


def test_token_cluster(benchmark):
    x = make_tokens(1, (40, 40), 256, "cpu", torch.float32)
    benchmark(lambda: stitchops.token_cluster(x, (28, 28)))


if __name__ == "__main__":
    sys.exit(main())
