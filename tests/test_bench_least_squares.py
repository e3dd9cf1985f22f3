"""benchmarks/bench_least_squares.py: checks the residual before it times, and says where the
time goes (normal equations against the eigh solve, on the device and on the CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from harness import DEVICE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_least_squares
import runner


def test_run_times_every_phase_after_checking_the_residual():
    (case,) = bench_least_squares.cases(3000, 48, 40, DEVICE, budget_ms=20)
    row = runner.measure(case, DEVICE, budget_ms=20)
    assert row["stitchops"]["error"] <= row["cpu_pinv"]["error"] * (1 + 1e-3)
    details = row["details"]
    phases = {"accumulate_ms", "solve_ms"} | ({"solve_on_cpu_ms"} if DEVICE != "cpu" else set())
    assert phases <= set(details) and all(details[k] > 0 for k in phases)
    assert details["residual_stitchops"] == row["stitchops"]["error"]
    speedup = row["cpu_pinv"]["ms"] / row["stitchops"]["ms"]
    assert row["stitchops"]["vs_baseline"] == pytest.approx(speedup)


def test_run_refuses_a_worse_residual(monkeypatch):
    def off(x, y, **kw):
        w, b = torch.zeros(y.shape[-1], x.shape[-1]), torch.zeros(y.shape[-1])
        return w.to(x.device), b.to(x.device)

    monkeypatch.setattr(bench_least_squares.stitchops, "least_squares_init", off)
    (case,) = bench_least_squares.cases(500, 16, 8, DEVICE, budget_ms=5)
    with pytest.raises(AssertionError, match="worse than pinv"):
        runner.measure(case, DEVICE, budget_ms=5)
