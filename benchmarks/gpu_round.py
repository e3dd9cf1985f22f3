"""The GPU round: one command that fits one lent-GPU call and always ends with its summary.

    python benchmarks/gpu_round.py [--deadline 560] [--part first|second] [--dry-run]

(``bash benchmarks/run_gpu.sh`` runs the same.) Steps run in order, each capped at the
smaller of its own budget and what is left before the global deadline (less a reserve for
the summary), so a slow step cuts the steps after it, never the summary:

first part (the headline: do the kernels build, are they right and clean, how fast):
  versions   python, torch, triton, CUDA, the GPU
  build      stitchops._C for the visible GPU's architecture only (one nvcc target per file:
             the build's time halves against sm_80 + sm_90a)
  info       ``stitchops info``: which backends run
  kernels    every op's kernel tests (``-k "triton or cuda"``) spread over the cores by
             pytest-xdist (``--dist load``), with compute-sanitizer memcheck of every op's
             selection running alongside
  bench      every ``benchmarks/bench_*.py`` in quick mode (``STITCHOPS_BENCH_QUICK=1``:
             the headline rows, fewer repeats, one tiling), each writing its results after
             every case
  acceptance the targets read off the results (``benchmarks/acceptance.py``)
second part (what does not fit the first): compute-sanitizer synccheck and racecheck, the
rest of the suite, the benchmarks' full sweeps.

What it writes to ``$OUT`` (default benchmarks/results/round/): ``summary.txt`` (also printed
last: per step its status and time, the failed tests by name, the acceptance table),
``round.log`` (every step's output), ``junit.xml`` (the tests), ``results.json`` (the GPU's
benchmark results): four files. ``--dry-run`` prints the plan of steps with their caps.
``STITCHOPS_ROUND_PLAN``: a JSON file of stand-in steps ([{"name", "budget", "command"}]),
for the round's own test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RESERVE_S = 15  # kept for the summary after the last step


@dataclass
class Step:
    """One step: a name, its own time budget (s), the commands it runs (a list of argument
    lists; ``background`` ones run alongside the first), and its environment."""

    name: str
    budget: float
    commands: list[list[str]]
    background: list[list[str]] = field(default_factory=list)
    env: dict = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    status: str  # "ok", "failed (exit N)", "timed out", "skipped: no time left"
    seconds: float
    cap: float


def gpu_arch() -> str:
    """The visible GPU's architecture for STITCHOPS_CUDA_ARCHS ("90a" on an H100; "90a" too
    where no GPU answers, as for a dry run on a CPU machine)."""
    code = (
        "import torch; print('%d%d' % torch.cuda.get_device_capability() "
        "if torch.cuda.is_available() else '90')"
    )
    try:
        out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
        arch = out.stdout.strip() or "90"
    except (OSError, subprocess.TimeoutExpired):
        arch = "90"
    return arch + "a" if arch == "90" else arch


def _bench_scripts() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in sorted((ROOT / "benchmarks").glob("bench_*.py"))]


def kernel_test_files() -> list[str]:
    """Every op's test module: those declaring ``OP_TESTS`` (tests/op_tables.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from op_tables import declares_op  # reads the modules without importing them

    return [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "tests").glob("test_*.py"))
        if declares_op(p)
    ]


def parallel_pytest(*args: str) -> list[str]:
    """pytest over the machine's cores less two (pytest-xdist, ``--dist load``)."""
    workers = str(max(1, (os.cpu_count() or 2) - 2))
    return [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-n", workers,
            "--dist", "load", *args]  # fmt: skip


def sanitizer_commands(tools: tuple[str, ...]) -> list[list[str]]:
    """compute-sanitizer over every op's cuda tests (tests/test_cuda_sanitizer.py)."""
    selection = " or ".join(tools)
    return [
        [
            PY,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/test_cuda_sanitizer.py",
            "-k",
            selection,
        ]
    ]


def first_part(out: Path) -> list[Step]:
    junit = str(out / "junit.xml")
    versions = (
        "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', "
        "torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, "
        "'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    )
    build_env = {"STITCHOPS_CUDA_ARCHS": gpu_arch(), "MAX_JOBS": str(os.cpu_count() or 8)}
    return [
        Step("versions", 15, [[PY, "-c", versions]]),
        Step(
            "build",
            150,
            [[PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]],
            env=build_env,
        ),
        Step("info", 15, [[PY, "-m", "stitchops", "info"]]),
        Step(
            "kernels",
            180,
            [parallel_pytest("-k", "triton or cuda", f"--junitxml={junit}", *kernel_test_files())],
            background=sanitizer_commands(("memcheck",)),
        ),
        Step(
            "bench",
            160,
            [[PY, s, "--device", "cuda"] for s in _bench_scripts()],
            env={"STITCHOPS_BENCH_QUICK": "1", "STITCHOPS_AUTOTUNE": "0"},
        ),
        Step("acceptance", 20, [[PY, "benchmarks/acceptance.py"]]),
    ]


def second_part(out: Path) -> list[Step]:
    junit = str(out / "junit.xml")
    return [
        Step("sanitizers", 180, sanitizer_commands(("synccheck", "racecheck"))),
        Step(
            "suite",
            200,
            [parallel_pytest("--ignore=tests/test_cuda_sanitizer.py", f"--junitxml={junit}")],
        ),
        Step("bench", 145, [[PY, s, "--device", "cuda"] for s in _bench_scripts()]),
        Step("acceptance", 20, [[PY, "benchmarks/acceptance.py"]]),
    ]


def stand_in_plan(path: str) -> list[Step]:
    entries = json.loads(Path(path).read_text())
    return [
        Step(
            e["name"],
            float(e["budget"]),
            [e["command"]],
            [e["background"]] if e.get("background") else [],
        )
        for e in entries
    ]


class Round:
    """Runs steps under one deadline, logging to round.log; ``summary()`` says what ran."""

    def __init__(self, steps: list[Step], deadline: float, out: Path) -> None:
        self.steps, self.deadline, self.out = steps, deadline, out
        self.start = time.monotonic()
        self.outcomes: list[Outcome] = []
        out.mkdir(parents=True, exist_ok=True)
        self.log = (out / "round.log").open("w")

    def left(self) -> float:
        return self.deadline - RESERVE_S - (time.monotonic() - self.start)

    def cap(self, step: Step) -> float:
        return max(0.0, min(step.budget, self.left()))

    def run(self) -> None:
        for step in self.steps:
            cap = self.cap(step)
            if cap < 1:
                self.outcomes.append(Outcome(step.name, "skipped: no time left", 0.0, 0.0))
                continue
            began = time.monotonic()
            status = self._run_step(step, cap)
            self.outcomes.append(Outcome(step.name, status, time.monotonic() - began, cap))
            print(
                f"=== {step.name}: {status} ({time.monotonic() - began:.0f} s of {cap:.0f})",
                flush=True,
            )

    def _run_step(self, step: Step, cap: float) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
        end = time.monotonic() + cap
        self.log.write(f"\n=== {step.name} (cap {cap:.0f} s)\n")
        self.log.flush()
        helpers = [
            subprocess.Popen(c, cwd=ROOT, env=env, stdout=self.log, stderr=self.log)
            for c in step.background
        ]
        status = "ok"
        for command in step.commands:
            remaining = end - time.monotonic()
            if remaining < 1:
                status = "timed out"
                break
            self.log.write(f"$ {' '.join(command)}\n")
            self.log.flush()
            try:
                code = subprocess.run(
                    command, cwd=ROOT, env=env, stdout=self.log, stderr=self.log, timeout=remaining
                ).returncode
            except subprocess.TimeoutExpired:
                status = "timed out"
                break
            if code != 0 and status == "ok":
                status = f"failed (exit {code})"
        for helper in helpers:
            try:
                code = helper.wait(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
                code = "timed out"
            if code != 0 and status == "ok":
                status = f"failed (background: {code})"
        return status

    def summary(self) -> str:
        lines = [
            f"GPU round: {time.monotonic() - self.start:.0f} s of a {self.deadline:.0f} s deadline",
            f"{'step':<12} {'status':<28} {'seconds':>8} {'cap':>6}",
        ]
        lines += [
            f"{o.name:<12} {o.status:<28} {o.seconds:>8.0f} {o.cap:>6.0f}" for o in self.outcomes
        ]
        failed = failed_tests(self.out / "junit.xml")
        if failed:
            lines += [f"failed tests ({len(failed)}):", *(f"  {t}" for t in failed[:40])]
        verdict = acceptance_lines(self.out / "round.log")
        if verdict:
            lines += ["acceptance:", *verdict]
        return "\n".join(lines)

    def close(self) -> str:
        self.log.close()
        text = self.summary()
        (self.out / "summary.txt").write_text(text + "\n")
        results = sorted(
            (ROOT / "benchmarks" / "results").glob("gpu-*.json"), key=lambda p: p.stat().st_mtime
        )
        if results:
            shutil.copy(results[-1], self.out / "results.json")
        return text


def failed_tests(junit: Path) -> list[str]:
    """Names of the failed or erroring tests in a JUnit XML file (none if it is missing)."""
    if not junit.exists():
        return []
    try:
        tree = ElementTree.parse(junit)
    except ElementTree.ParseError:
        return ["(junit.xml unreadable: the test step was cut short)"]
    return [
        f"{case.get('classname')}::{case.get('name')}"
        for case in tree.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]


def acceptance_lines(log: Path) -> list[str]:
    """The last acceptance verdict in the round's log: its target lines."""
    if not log.exists():
        return []
    text = log.read_text(errors="replace").split("=== acceptance")
    if len(text) < 2:
        return []
    return [x for x in text[-1].splitlines() if x.startswith(("[met]", "[NOT met]", "acceptance:"))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--deadline",
        type=float,
        default=560.0,
        help="seconds for the whole round, summary included (default: 560)",
    )
    parser.add_argument("--part", choices=["first", "second"], default="first")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its caps")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "round")
    plan_file = os.environ.get("STITCHOPS_ROUND_PLAN")
    if plan_file:
        steps = stand_in_plan(plan_file)
    else:
        steps = (first_part if args.part == "first" else second_part)(out)
    if args.dry_run:
        elapsed = 0.0
        print(
            f"GPU round, part {args.part}: deadline {args.deadline:.0f} s, summary reserve "
            f"{RESERVE_S} s"
        )
        for step in steps:
            cap = max(0.0, min(step.budget, args.deadline - RESERVE_S - elapsed))
            elapsed += cap
            print(
                f"  {step.name:<12} cap {cap:>4.0f} s  ({len(step.commands)} command(s)"
                + (f", {len(step.background)} alongside" if step.background else "")
                + ")"
            )
        return 0
    runner = Round(steps, args.deadline, out)
    try:
        runner.run()
    finally:
        print(runner.close(), flush=True)
    ok = all(o.status == "ok" for o in runner.outcomes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
