"""Command line: ``stitchops info`` and ``stitchops bench`` (also ``python -m stitchops``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def _benchmarks_dir() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "benchmarks" / "_common.py").exists():
            return root / "benchmarks"
    return None


def info(_args) -> int:
    import torch

    import stitchops

    print(
        f"stitchops {stitchops.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"backends on {device}:")
        for name, reason in stitchops.available_backends(device).items():
            print(f"  {name:7s} {'ready' if reason is None else 'unavailable: ' + reason}")
    return 0


def bench(args) -> int:
    folder = _benchmarks_dir()
    if folder is None:
        msg = ("stitchops bench runs the scripts in a source checkout's benchmarks/ folder: run "
               "it from the repository root (git clone, then pip install -e .)")  # fmt: skip
        print(msg, file=sys.stderr)
        return 2
    scripts = sorted(folder.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if args.only in s.stem]
    extra = ["--no-save"] if args.no_save else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for script in scripts:
        print(f"== {script.name}", flush=True)
        code = subprocess.call([sys.executable, str(script), *extra], env=env)
        if code != 0:
            print(f"{script.name} failed with exit code {code}", file=sys.stderr)
            return code
    if not args.no_save:
        return subprocess.call([sys.executable, str(folder / "report.py")], env=env)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stitchops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and which backends can run here").set_defaults(fn=info)
    p = sub.add_parser("bench", help="run every benchmark (correctness first), save, report")
    p.add_argument("--only", help="run only the benchmarks whose name contains this")
    p.add_argument("--no-save", action="store_true", help="print only; leave results/ alone")
    p.set_defaults(fn=bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
