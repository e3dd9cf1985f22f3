"""Benchmark of stitchops.token_cluster / token_reconstruct (Expedit).

At Segmenter ViT-L/16 on 640² (H = W = 40 → 28×28 centres, C = 1024, window 5, 5
iterations; B = 1 and 8) and at a smaller shape (ViT-B/16 on 512²: 32×32 → 16×16, C = 768),
clustering and reconstruction, each checked against a float64 reference in the same run:

- ``official``: the official code's dense algorithm, re-implemented from its description:
  every pixel-to-centre distance per iteration (B × N × M, as a GEMM), 1e16 added where a
  centre is not a candidate, softmax over all centres; reconstruction: exp(−d/τ) over all
  centres, the 20 largest kept, L2-normalised (without our shift of d by its row minimum,
  as written). The baseline.
- ``torch``: the stitchops torch backend (banded GEMMs, reference/token_cluster.py), what
  CPU users run.
- ``triton`` and ``cuda`` (on a GPU): kernels/token_cluster.py, csrc/token_cluster.cu.

Costs per clustering (FLOPs = 2 per multiply-add): local 5·N·K·C per iteration (K = 25),
the official dense 5·N·M·C; minimum bytes: x read and the centres written once per
iteration, (N + M)·C·s. Peak memory per implementation too (``peak_mb``).

    python benchmarks/bench_token_cluster.py [--device cpu|cuda]
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

WINDOW, ITERS, TEMPERATURE = 5, 5, 50.0
SHAPES = (  # (batch, (H, W), (h, w), C)
    (1, (40, 40), (28, 28), 1024),
    (8, (40, 40), (28, 28), 1024),
    (1, (32, 32), (16, 16), 768),
)

TARGETS = (*(
    Target(op="token_cluster",
           where={"work": work, "batch": b, "map": f"{hw[0]}x{hw[1]}", "device": "cpu"},
           implementations=("torch",),
           bounds=(("vs_baseline", "min", 1.0), ("memory_vs_baseline", "min", 1.0)),
           what=f"CPU: torch backend {work} not slower than the official dense algorithm, nor "
                f"more peak memory (B {b}, {hw[0]}x{hw[1]} -> {grid[0]}x{grid[1]}, C {c})")
    for b, hw, grid, c in SHAPES for work in ("cluster", "reconstruct")),
    *(Target(op="token_cluster",
             where={"work": "cluster", "batch": b, "map": "40x40", "device": "cuda"},
             implementations=("triton", "cuda"), bounds=(("vs_baseline", "min", 20.0),
                                                         ("of_roofline", "min", 0.6)),
             what=f"GPU: clustering >= 20x the official dense algorithm and >= 60% of the "
                  f"roofline (B {b}, 40x40 -> 28x28, C 1024)")
      for b in (1, 8)),
)  # fmt: skip


def dense_mask(size, grid, window, device) -> torch.Tensor:
    """[N, M]: 0 where centre i is a candidate of pixel p, 1e16 elsewhere (the official mask)."""
    allowed = torch.zeros(size[0] * size[1], grid[0] * grid[1], dtype=torch.bool, device=device)
    for band in reference.bands(size, grid, window, device):
        allowed[band.pixels, band.centres] = band.allowed
    return torch.where(allowed, 0.0, 1e16)


def official_cluster(x, grid, mask, iters=ITERS, temperature=TEMPERATURE):
    b, c = x.shape[0], x.shape[-1]
    flat = x.reshape(b, -1, c)
    s = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1).reshape(b, -1, c)
    for _ in range(iters):
        d = (flat.square().sum(-1, keepdim=True) - 2 * flat @ s.transpose(1, 2)
             + s.square().sum(-1)[:, None]) + mask  # fmt: skip
        a = torch.softmax(-d / temperature, dim=-1)
        s = (a.transpose(1, 2) @ flat) / a.sum(1)[..., None]
    return s.reshape(b, *grid, c)


def official_reconstruct(x, centres, values, k=20, temperature=TEMPERATURE):
    b, height, width, c = x.shape
    s = centres.reshape(b, -1, c)
    d = (x.reshape(b, -1, c).square().sum(-1, keepdim=True) - 2 * x.reshape(b, -1, c)
         @ s.transpose(1, 2) + s.square().sum(-1)[:, None])  # fmt: skip
    e = torch.exp(-d / temperature)
    kth = e.topk(k, dim=-1).values[..., -1:]
    e = torch.where(e >= kth, e, 0.0)
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (e @ values.reshape(b, -1, values.shape[-1])).reshape(b, height, width, -1)


def make_tokens(batch, size, channels, device, dtype):
    """ViT-like tokens: a smooth map (neighbours alike, as in a trained ViT) plus noise, scaled
    so that squared distances are in the hundreds (τ = 50 then matters)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(batch, channels, size[0] // 4, size[1] // 4, generator=g)
    smooth = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    x = (smooth + 0.3 * torch.randn(batch, channels, *size, generator=g)) * 0.5
    return x.permute(0, 2, 3, 1).contiguous().to(device=device, dtype=dtype)


def cases(batch, size, grid, channels, device) -> list[Case]:
    dtype = torch.float32
    x = make_tokens(batch, size, channels, device, dtype)
    mask = dense_mask(size, grid, WINDOW, device)
    x64 = x.double().cpu()
    truth = reference.token_cluster(x64, grid, WINDOW, ITERS, TEMPERATURE)
    n, m = size[0] * size[1], grid[0] * grid[1]
    size_b = 4
    params = {"batch": batch, "map": f"{size[0]}x{size[1]}", "grid": f"{grid[0]}x{grid[1]}",
              "channels": channels, "device": device}  # fmt: skip

    def check(fn, want, tol=1e-3):
        return lambda: runner.relative_error([fn().cpu()], [want], tol)

    def ours(backend):
        def run():
            with stitchops.use_backend(backend):
                return stitchops.token_cluster(x, grid, window=WINDOW, iters=ITERS,
                                               temperature=TEMPERATURE)  # fmt: skip

        return Impl(run, check(run, truth))

    official = lambda: official_cluster(x, grid, mask)  # noqa: E731
    backends = ["torch", "triton", "cuda"] if device == "cuda" else ["torch"]
    rows = [Case({"work": "cluster", **params},
                 {"official": Impl(official, check(official, truth)),
                  **{backend: ours(backend) for backend in backends}},
                 baseline="official", flops=batch * local_flops(n, channels, WINDOW, ITERS),
                 min_bytes=batch * ITERS * (n + m) * channels * size_b, dtype="float32",
                 peak_memory=True,
                 details=lambda: {"official_gflop": batch * dense_flops(n, m, channels, ITERS)
                                  / 1e9})]  # fmt: skip
    centres = truth.to(device=device, dtype=dtype)
    values = make_tokens(batch, grid, channels, device, dtype)
    want_local = reference.token_reconstruct(x64, truth, values.double().cpu(), WINDOW,
                                             TEMPERATURE)  # fmt: skip
    want_topk = reference.token_reconstruct(x64, truth, values.double().cpu(), WINDOW,
                                            TEMPERATURE, mode="topk")  # fmt: skip

    def local(backend):
        def run():
            with stitchops.use_backend(backend):
                return stitchops.token_reconstruct(x, centres, values)

        return Impl(run, check(run, want_local))

    topk = lambda: stitchops.token_reconstruct(x, centres, values, mode="topk")  # noqa: E731
    official_r = lambda: official_reconstruct(x, centres, values)  # noqa: E731
    rows.append(Case({"work": "reconstruct", **params},
                     {"official": Impl(official_r, check(official_r, want_topk, 2e-3)),
                      **{backend: local(backend) for backend in backends},
                      "torch_topk": Impl(topk, check(topk, want_topk))},
                     baseline="official", flops=2 * batch * n * WINDOW**2 * channels * 2,
                     min_bytes=batch * (2 * n + 2 * m) * channels * size_b, dtype="float32",
                     peak_memory=True))  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    factories = [lambda s=s: cases(*s, args.device) for s in SHAPES]
    runner.run("token_cluster", factories, args.device, 500.0, save=not args.no_save,
               ceilings_for=(torch.float32,))  # fmt: skip
    return 0


def test_token_cluster(benchmark):
    x = make_tokens(1, (40, 40), 256, "cpu", torch.float32)
    benchmark(lambda: stitchops.token_cluster(x, (28, 28)))


if __name__ == "__main__":
    sys.exit(main())
