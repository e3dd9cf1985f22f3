"""benchmarks/runner.py and report.py: checks before timing, the same ratios for every op,
and one table format for any op's rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import report
import runner


def _case(calls: list, wrong: bool = False) -> runner.Case:
    a = torch.randn(64, 64)

    def impl(name, factor=1.0):
        def run():
            calls.append(name)
            return a @ a * factor

        return run

    want = (a @ a,)
    return runner.Case(
        {"n": 64, "dtype": "float32"},
        {
            "official": runner.Impl(impl("official"), lambda: runner.relative_error(
                (impl("check")(),), want, 1e-5)),
            "fast": runner.Impl(impl("fast", 1.5 if wrong else 1.0), lambda: runner.relative_error(
                (impl("check")() * (1.5 if wrong else 1.0),), want, 1e-5)),
            "floor": runner.Impl(impl("floor")),
        },
        baseline="official", floor="floor", flops=2 * 64**3, min_bytes=3 * 64 * 64 * 4,
        dtype="float32",
    )  # fmt: skip


def test_checks_come_first_and_a_wrong_result_times_nothing():
    calls: list = []
    with pytest.raises(AssertionError, match="refusing to time"):
        runner.measure(_case(calls, wrong=True), "cpu", budget_ms=1)
    assert set(calls) == {"check"}  # the checks ran, no timing


def test_row_ratios_and_roofline():
    calls: list = []
    ceilings = {"matmul_TFLOPs": {"float32": 1e-3}, "bandwidth_GBps": 1.0}
    row = runner.measure(_case(calls), "cpu", budget_ms=1, ceilings=ceilings)
    assert calls.index("official") > max(i for i, c in enumerate(calls) if c == "check")
    assert row["baseline_impl"] == "official" and row["n"] == 64
    for name in ("official", "fast", "floor"):
        t = row[name]
        assert t["q20"] <= t["ms"] <= t["q80"]
        assert t["vs_baseline"] == pytest.approx(row["official"]["ms"] / t["ms"])
        assert t["vs_floor"] == pytest.approx(t["ms"] / row["floor"]["ms"])
        assert t["of_roofline"] == pytest.approx(row["roofline_ms"] / t["ms"])
    assert row["roofline_ms"] == pytest.approx(max(row["gflop"] / 1e-3, row["mbytes"] / 1.0))
    assert "error" in row["fast"] and "error" not in row["floor"]


def test_report_renders_any_ops_rows():
    rows = [{"n": 64, "dtype": "float32", "baseline_impl": "ref", "gflop": 1.0,
             "ref": {"ms": 2.0, "vs_baseline": 1.0},
             "fast": {"ms": 1.0, "vs_baseline": 2.0, "vs_floor": 1.25, "of_roofline": 0.5},
             "details": {"solve_ms": 0.5}}]  # fmt: skip
    lines = report.table(rows)
    assert lines[0] == "| n | dtype | ref ms | fast ms | other figures |"
    assert lines[2] == ("| 64 | float32 | 2.000 (1.00x vs ref) | 1.000 (2.00x vs ref, 1.25x "
                        "floor, 50% of roofline) | solve_ms 0.5 |")  # fmt: skip
