"""Acceptance targets, read from a results file that the benchmarks wrote.

    python benchmarks/acceptance.py [benchmarks/results/gpu-<name>.json]

Each bench_<op>.py declares its targets as data (``TARGETS``, runner.Target): the row they
apply to, the implementations that may meet them and the bounds. Prints one line per target
and implementation; exits 0 only when every target is met by one of its implementations. A
missing figure fails. Every figure comes from the file (measured in one run, after the run's
own correctness check); nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def targets() -> list:
    """Every bench_<op>.py's TARGETS, in file order."""
    sys.path.insert(0, str(HERE))
    found = []
    for script in sorted(HERE.glob("bench_*.py")):
        found += getattr(importlib.import_module(script.stem), "TARGETS", ())
    return found


def check(data: dict, wanted=None, cpu: bool = False) -> tuple[list[str], bool]:
    """(report lines, whether every target holds) for one results file's data: the GPU's
    targets, or with ``cpu`` those read off results/cpu.json."""
    lines, ok = [], True
    chosen = [t for t in targets() if t.on_cpu == cpu] if wanted is None else wanted
    for target in chosen:
        found, met = target.check(data)
        lines += [f"[{'met' if met else 'NOT met'}] {target.what}", *(f"  {x}" for x in found)]
        ok &= met
    return lines, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "results",
        nargs="?",
        help="default: the newest results/gpu-*.json; results/cpu.json checks the CPU targets",
    )
    args = parser.parse_args(argv)
    if args.results:
        path = Path(args.results)
    else:
        found = sorted(RESULTS.glob("gpu-*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            print("no benchmarks/results/gpu-*.json: run the benchmarks on a GPU first")
            return 1
        path = found[-1]
    data = json.loads(path.read_text())
    env = data.get("environment", {})
    print(f"{path.name}: {env.get('device')}, commit {env.get('commit')}, {env.get('date')}")
    lines, ok = check(data, cpu=path.name == "cpu.json")
    print("\n".join(lines))
    print("acceptance: " + ("all targets met" if ok else "NOT met"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
