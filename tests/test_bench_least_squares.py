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
import report


def test_run_times_every_phase_after_checking_the_residual():
    r = bench_least_squares.run(3000, 48, 40, DEVICE, budget_ms=20)
    res = r["relative_residual"]
    assert res["stitchops"] <= res["pinv"] * (1 + 1e-3)
    expected = {"accumulate_ms", "solve_ms"} | ({"solve_on_cpu_ms"} if DEVICE != "cpu" else set())
    assert set(r["phases"]) == expected
    assert all(ms > 0 for ms in r["phases"].values())
    assert r["speedup"] == pytest.approx(r["cpu_pinv_ms"] / r["stitchops_ms"])


def test_run_refuses_a_worse_residual(monkeypatch):
    def off(x, y, **kw):
        w, b = torch.zeros(y.shape[-1], x.shape[-1]), torch.zeros(y.shape[-1])
        return w.to(x.device), b.to(x.device)

    monkeypatch.setattr(bench_least_squares.stitchops, "least_squares_init", off)
    with pytest.raises(AssertionError, match="worse than pinv"):
        bench_least_squares.run(500, 16, 8, DEVICE, budget_ms=5)


def test_report_sentence_on_the_phases():
    assert report._least_squares_phases(None) == ""
    on_cpu = report._least_squares_phases({"accumulate_ms": 1.25, "solve_ms": 3.5})
    assert on_cpu == " Of which: normal equations 1.2 ms, eigh solve 3.5 ms."
    on_gpu = report._least_squares_phases(
        {"accumulate_ms": 0.2, "solve_ms": 9.0, "solve_on_cpu_ms": 4.0}
    )
    assert on_gpu.endswith("eigh solve 9.0 ms (on the CPU, with the copies: 4.0 ms).")
