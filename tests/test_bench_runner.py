"""benchmarks/runner.py and report.py: checks before timing, the same ratios for every op,
and one table format for any op's rows."""

from __future__ import annotations

import json
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
            "official": runner.Impl(
                impl("official"), lambda: runner.relative_error((impl("check")(),), want, 1e-5)
            ),
            "fast": runner.Impl(
                impl("fast", 1.5 if wrong else 1.0),
                lambda: runner.relative_error(
                    (impl("check")() * (1.5 if wrong else 1.0),), want, 1e-5
                ),
            ),
            "floor": runner.Impl(impl("floor")),
        },
        baseline="official",
        floor="floor",
        flops=2 * 64**3,
        min_bytes=3 * 64 * 64 * 4,
        dtype="float32",
    )


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
    rows = [
        {
            "n": 64,
            "dtype": "float32",
            "baseline_impl": "ref",
            "gflop": 1.0,
            "ref": {"ms": 2.0, "vs_baseline": 1.0},
            "fast": {"ms": 1.0, "vs_baseline": 2.0, "vs_floor": 1.25, "of_roofline": 0.5},
            "details": {"solve_ms": 0.5},
        }
    ]
    lines = report.table(rows)
    assert lines[0] == "| n | dtype | ref ms | fast ms | other figures |"
    assert lines[2] == (
        "| 64 | float32 | 2.000 (1.00x vs ref) | 1.000 (2.00x vs ref, 1.25x "
        "floor, 50% of roofline) | solve_ms 0.5 |"
    )


def test_quick_mode_measures_only_the_targets_rows_and_stops(monkeypatch):
    """STITCHOPS_BENCH_QUICK=1: setups are built in order, only the rows an acceptance target
    reads are timed, and nothing is built once every target has its row."""
    target = runner.Target(
        op="toy",
        where={"n": 2, "device": "cpu"},
        implementations=("fast",),
        bounds=(("vs_baseline", "min", 0.0),),
    )
    monkeypatch.setattr(runner, "targets_of", lambda name, device: [target])
    monkeypatch.setenv("STITCHOPS_BENCH_QUICK", "1")
    built = []

    def setup(n):
        def make():
            built.append(n)
            calls: list = []
            return [
                runner.Case(
                    {**_case(calls).params, "n": n, "device": "cpu", "work": w},
                    _case(calls).impls,
                    baseline="official",
                    floor="floor",
                )
                for w in ("fwd", "bwd")
            ]

        return make

    rows = runner.run("toy", [setup(1), setup(2), setup(3)], "cpu", 5.0, save=False)
    assert built == [1, 2]  # the third setup is never built
    assert [(r["n"], r["work"]) for r in rows] == [(2, "fwd"), (2, "bwd")]
    assert target.matches({"n": 2, "device": "cuda:0"}) is False
    assert target.matches({"n": 2, "device": "cpu", "extra": 1})


def test_every_target_names_the_op_its_benchmark_saves_under():
    """Quick mode finds a benchmark's targets by the name it passes to runner.run."""
    import re

    import acceptance

    saved = set()
    for script in acceptance.HERE.glob("bench_*.py"):
        saved |= set(re.findall(r'runner\.run\(\s*"(\w+)"', script.read_text()))
    ops = {target.op for target in acceptance.targets()}
    assert ops and ops <= saved, ops - saved


def test_headline_takes_one_target_row_per_op(tmp_path, monkeypatch):
    """The README's headline: one row per op from its first target with a measured row, and
    the GPU marked unmeasured while only the CPU file exists."""
    rows = [
        {
            "work": "delta_grad",
            "in": 768,
            "out": 3072,
            "nnz": 3000,
            "device": "cpu",
            "baseline_impl": "official",
            "official": {"ms": 1253.2, "vs_baseline": 1.0},
            "torch": {"ms": 45.49, "vs_baseline": 27.55, "memory_vs_baseline": 10.4},
        }
    ]
    (tmp_path / "cpu.json").write_text(
        json.dumps({"environment": {"device": "x86_64"}, "sparse_delta_linear": {"rows": rows}})
    )
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = report.headline()
    body = [line for line in text.splitlines() if line.startswith("| `")]
    assert body == [
        "| `sparse_delta_linear` | work delta_grad, in 768, out 3072, nnz 3000 | CPU "
        "| 1250 | 45.5 (torch) | 27.6x | 10.4x less |"
    ]
    assert "GPU rows: unmeasured" in text
    full = report.full_report()
    assert "### `sparse_delta_linear`" in full and "Acceptance: NOT every target met" in full


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_peak_counts_the_tensors_held_at_the_peak(threads):
    """Two 4 MB inputs and their 4 MB product live together (12 MB), one input is freed,
    then 4 MB and 12 MB more: 24 MB at the peak, whatever the thread count; tensors made
    before the measured call do not count."""
    held = torch.ones(2_000_000)

    def work():
        a, b = torch.ones(1000, 1000), torch.ones(1000, 1000)
        c = a @ b
        del a
        d = c + held[:1].sum()
        e = torch.empty(3000, 1000)
        del e
        return d[0, 0]

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert runner.peak_bytes(work, "cpu") == 24_000_000
    finally:
        torch.set_num_threads(before)
