"""Benchmark of stitchops.least_squares_init against SN-Net's CPU pinv.

SN-Net's official code solves each stitching layer with torch.linalg.pinv on the CPU over
~19,700 tokens × 385 features (384 + a bias column). Here: the same data (fp32 activations
with the mean offsets and outliers ViT activations have), stitchops on the chosen device
(streamed float64 normal equations + eigh) vs pinv([X, 1]) @ Y on the CPU, after checking
that stitchops' residual is no worse (benchmarks/runner.py). The roofline counts the float64
normal equations at the device's float64 matmul rate.

    python benchmarks/bench_least_squares.py
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runner
from runner import Case, Impl, Target

import stitchops
from stitchops.ops.least_squares import DEFAULT_RTOL, _NormalEquations

# SN-Net's stitching-layer solve on 19,700 tokens of 384 features (100 ImageNet images of
# DeiT-S), on the GPU, against its official CPU pinv.
TARGETS = (
    Target(
        op="least_squares_init",
        where={"n": 19_700, "in": 384, "out": 384, "device": "cuda"},
        implementations=("stitchops",),
        bounds=(("vs_baseline", "min", 10.0),),
        what="least_squares_init on the GPU >= 10x CPU torch.linalg.pinv",
    ),
)

# Where the time goes, so that a first GPU run also says what to change if the target is
# missed: the streamed float64 Gram sums (2·N·IN·(IN + OUT) FLOPs, cuBLAS DGEMM) against
# the one [IN, IN] eigh, timed on the device and, with its copies both ways, on the CPU.
# Small eigenproblems are latency-bound on a GPU (cuSOLVER's tridiagonalisation runs a
# sequence of small kernels), so the CPU may solve this one faster.


def phase_times(x: torch.Tensor, y: torch.Tensor, device: str, budget_ms: float) -> dict:
    """Median ms of the accumulation, the solve on ``device`` and the solve on the CPU."""

    def accumulate() -> _NormalEquations:
        eq = _NormalEquations()
        eq.add(x, y)
        return eq

    eq = accumulate()

    def solve_on_cpu():
        on_cpu = copy.copy(eq)  # the same sums, each tensor copied to the host
        vars(on_cpu).update({k: v.cpu() for k, v in vars(eq).items() if torch.is_tensor(v)})
        weight, bias = on_cpu.solve(0.0, DEFAULT_RTOL)
        return weight.to(device), bias.to(device)

    phases = {"accumulate_ms": accumulate, "solve_ms": lambda: eq.solve(0.0, DEFAULT_RTOL)}
    if device != "cpu":
        phases["solve_on_cpu_ms"] = solve_on_cpu
    return {
        name: runner.time_impl(Impl(fn, clock="wall"), device, budget_ms)["ms"]
        for name, fn in phases.items()
    }


def make_data(n: int, in_f: int, out_f: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, in_f, generator=g) + torch.randn(in_f, generator=g) * 2
    x[:, :4] *= 30  # a few outlier channels, as in ViT activations
    y = torch.tanh(x @ torch.randn(in_f, out_f, generator=g) / in_f**0.5) + 0.1 * torch.randn(
        n, out_f, generator=g
    )
    return x.to(device), y.to(device)


def pinv_solution(x: torch.Tensor, y: torch.Tensor):
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    sol = torch.linalg.pinv(xa) @ y
    return sol[:-1].t(), sol[-1]


def residual(x, y, w, b) -> float:
    return (
        (x.double() @ w.double().t() + b.double() - y.double()).norm() / y.double().norm()
    ).item()


def cases(n: int, in_f: int, out_f: int, device: str, budget_ms: float) -> list[Case]:
    """stitchops on ``device`` against SN-Net's pinv on the CPU, on the same data, after
    checking that stitchops' residual is no worse than pinv's."""
    x, y = make_data(n, in_f, out_f, device)
    x_cpu, y_cpu = x.cpu(), y.cpu()
    residuals = {}

    def check_pinv() -> float:
        residuals["pinv"] = residual(x_cpu, y_cpu, *pinv_solution(x_cpu, y_cpu))
        return residuals["pinv"]

    def check_stitchops() -> float:
        w, b = stitchops.least_squares_init(x, y)
        residuals["stitchops"] = residual(x_cpu, y_cpu, w.cpu(), b.cpu())
        if residuals["stitchops"] > residuals["pinv"] * (1 + 1e-3):
            raise AssertionError(
                f"residual {residuals['stitchops']:.6f} worse than pinv's "
                f"{residuals['pinv']:.6f}: refusing to time"
            )
        return residuals["stitchops"]

    # Both on the wall clock: pinv runs on the CPU, stitchops' eigh may too.
    impls = {
        "cpu_pinv": Impl(lambda: pinv_solution(x_cpu, y_cpu), check_pinv, clock="wall"),
        "stitchops": Impl(
            lambda: stitchops.least_squares_init(x, y), check_stitchops, clock="wall"
        ),
    }
    flops = 2 * n * in_f * (in_f + out_f)  # the float64 normal equations
    min_bytes = 4 * n * (in_f + out_f)  # x and y read once (fp32)

    def details() -> dict:
        residual_of = {f"residual_{k}": v for k, v in residuals.items()}
        return {**phase_times(x, y, device, budget_ms / 2), **residual_of}

    return [
        Case(
            {"n": n, "in": in_f, "out": out_f, "device": device},
            impls,
            baseline="cpu_pinv",
            flops=flops,
            min_bytes=min_bytes,
            dtype="float64",
            details=details,
        )
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=19_700)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    budget = 2000.0
    runner.run(
        "least_squares_init",
        [lambda: cases(args.tokens, 384, 384, args.device, budget)],
        args.device,
        budget,
        save=not args.no_save,
        ceilings_for=(torch.float64,),
    )
    return 0


def test_least_squares_init(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = make_data(19_700, 384, 384, device)
    benchmark(lambda: stitchops.least_squares_init(x, y))


if __name__ == "__main__":
    sys.exit(main())
