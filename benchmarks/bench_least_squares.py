"""Benchmark of stitchops.least_squares_init against SN-Net's CPU pinv.

SN-Net's official code solves each stitching layer with torch.linalg.pinv on the CPU over
~19,700 tokens × 385 features (384 + a bias column). Here: the same data (fp32 activations
with the mean offsets and outliers ViT activations have), stitchops on the chosen device
(streamed float64 normal equations + eigh) vs pinv([X, 1]) @ Y on the CPU, after checking
that both give the same residual.

    python benchmarks/bench_least_squares.py
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_ms, write_results

import stitchops
from stitchops.ops.least_squares import DEFAULT_RTOL, _NormalEquations

# Where the time goes, so that a first GPU run also says what to change if the target is
# missed: the streamed float64 Gram sums (2·N·IN·(IN + OUT) FLOPs, cuBLAS DGEMM) against
# the one [IN, IN] eigh, timed on the device and, with its copies both ways, on the CPU.
# Small eigenproblems are latency-bound on a GPU (cuSOLVER's tridiagonalisation runs a
# sequence of small kernels), so the CPU may solve this one faster.


def synced(fn, device: str):
    """fn, then a wait for the GPU: wall-clock timing then includes the device's work."""

    def run():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


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
    return {name: median_ms(synced(fn, device), "cpu", budget_ms)["ms"]
            for name, fn in phases.items()}  # fmt: skip


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


def run(n: int, in_f: int, out_f: int, device: str, budget_ms: float) -> dict:
    x, y = make_data(n, in_f, out_f, device)
    x_cpu, y_cpu = x.cpu(), y.cpu()
    w, b = stitchops.least_squares_init(x, y)
    w_p, b_p = pinv_solution(x_cpu, y_cpu)
    res_ours, res_pinv = residual(x_cpu, y_cpu, w.cpu(), b.cpu()), residual(x_cpu, y_cpu, w_p, b_p)
    if res_ours > res_pinv * (1 + 1e-3):
        raise AssertionError(f"residual {res_ours:.6f} worse than pinv's {res_pinv:.6f}")

    ours = synced(lambda: stitchops.least_squares_init(x, y), device)
    t_ours = median_ms(ours, "cpu", budget_ms)  # wall clock includes the host sync
    t_pinv = median_ms(lambda: pinv_solution(x_cpu, y_cpu), "cpu", budget_ms)
    result = {"n": n, "in": in_f, "out": out_f, "device": device,
              "stitchops_ms": t_ours["ms"], "cpu_pinv_ms": t_pinv["ms"],
              "speedup": t_pinv["ms"] / t_ours["ms"],
              "relative_residual": {"stitchops": res_ours, "pinv": res_pinv},
              "phases": phase_times(x, y, device, budget_ms / 2)}  # fmt: skip
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=19_700)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    r = run(args.tokens, 384, 384, args.device, budget_ms=2000)
    print(f"least_squares_init on {r['device']}: {r['stitchops_ms']:.1f} ms   "
          f"CPU pinv: {r['cpu_pinv_ms']:.1f} ms   speedup {r['speedup']:.1f}x   "
          f"relative residual {r['relative_residual']['stitchops']:.6f} "
          f"(pinv {r['relative_residual']['pinv']:.6f})")  # fmt: skip
    print("  phases: " + ", ".join(f"{k[:-3]} {v:.1f} ms" for k, v in r["phases"].items()))
    if not args.no_save:
        print(f"wrote {write_results('least_squares_init', args.device, r)}")
    return 0


def test_least_squares_init(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = make_data(19_700, 384, 384, device)
    benchmark(lambda: stitchops.least_squares_init(x, y))


if __name__ == "__main__":
    sys.exit(main())
