"""The GPU round (benchmarks/gpu_round.py) on a CPU machine: its plan in a dry run, and a run
of stand-in steps under a tiny deadline: the caps, the order, the summary, the files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUND = ROOT / "benchmarks" / "gpu_round.py"


def test_dry_run_prints_the_plan_with_caps_quickly():
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(ROUND), "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - start < 5
    names = [line.split()[0] for line in out.stdout.splitlines()[1:]]
    assert names == ["versions", "build", "info", "kernels", "bench", "acceptance"]
    caps = [int(line.split("cap")[1].split()[0]) for line in out.stdout.splitlines()[1:]]
    assert sum(caps) <= 560 - 15 and all(c > 0 for c in caps)  # each step keeps its budget
    second = subprocess.run(
        [sys.executable, str(ROUND), "--dry-run", "--part", "second"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "sanitizers" in second.stdout and "suite" in second.stdout
    caps = [int(line.split("cap")[1].split()[0]) for line in second.stdout.splitlines()[1:]]
    assert sum(caps) <= 560 - 15 and all(c > 0 for c in caps)


def test_stand_in_round_caps_each_step_and_always_summarises(tmp_path):
    """A deadline of 24 s: the slow step is cut at its own 3 s budget, a failing step is
    reported, a step after the time is gone is skipped, and the summary comes last."""
    sleep = [sys.executable, "-c", "import time, sys; time.sleep(float(sys.argv[1]))"]
    plan = [
        {"name": "slow", "budget": 3, "command": [*sleep, "30"]},
        {"name": "fine", "budget": 10, "command": [sys.executable, "-c", "print('hello')"]},
        {"name": "broken", "budget": 10, "command": [sys.executable, "-c", "raise SystemExit(3)"]},
        {"name": "greedy", "budget": 600, "command": [*sleep, "30"], "background": [*sleep, "1"]},
        {"name": "late", "budget": 10, "command": [sys.executable, "-c", "print('late')"]},
    ]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    out_dir = tmp_path / "out"
    env = {**os.environ, "STITCHOPS_ROUND_PLAN": str(plan_file), "OUT": str(out_dir)}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROUND), "--deadline", "24"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - start
    assert result.returncode == 1  # some step did not pass
    assert took < 24 + 5, took
    summary = (out_dir / "summary.txt").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip())  # printed last
    rows = {line.split()[0]: line for line in summary.splitlines()[2:] if line.strip()}
    assert list(rows)[:5] == ["slow", "fine", "broken", "greedy", "late"]
    assert "timed out" in rows["slow"] and rows["slow"].split()[-1] == "3"
    assert " ok " in rows["fine"]
    assert "failed (exit 3)" in rows["broken"]
    assert "timed out" in rows["greedy"]
    greedy_cap = float(rows["greedy"].split()[-1])
    assert greedy_cap <= 24 - 15 - 3 + 1  # what was left of the deadline, not its 600 s
    assert "skipped: no time left" in rows["late"]
    assert "hello" in (out_dir / "round.log").read_text()
    assert len(list(out_dir.iterdir())) <= 5


def test_the_round_tests_every_declared_op_and_runs_every_benchmark():
    """The kernels step's files are the op declarations' (op_tables.ops()), the bench step's
    every bench_*.py: nothing listed by hand."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_round
    from op_tables import ops

    assert gpu_round.kernel_test_files() == sorted(f"tests/{op.test_file}" for op in ops())
    plan = {step.name: step for step in gpu_round.first_part(ROOT / "unused")}
    benches = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
    assert [Path(c[1]).name for c in plan["bench"].commands] == benches
    assert plan["bench"].env["STITCHOPS_BENCH_QUICK"] == "1"
