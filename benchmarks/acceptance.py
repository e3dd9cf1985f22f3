"""Issue 2's acceptance targets, read from a results file that the benchmarks wrote.

    python benchmarks/acceptance.py [benchmarks/results/gpu-<name>.json]

Targets (256×197 tokens, 384 → 1024, r = 16, bf16, forward + backward, W frozen):
  fused ≥ 1.8× faster than the unfused PyTorch code, and ≤ 1.10× the bare frozen GEMM's time;
  least_squares_init ≥ 10× faster than CPU torch.linalg.pinv on 19,700 × 385 data.
Prints one line per target and backend. Exits 0 only when one fused backend meets both
lora_linear targets and least_squares_init meets its own; a missing figure fails. Every figure
comes from the file (measured in one run, after the run's own correctness check); nothing is
extrapolated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = {"tokens": 256 * 197, "in": 384, "out": 1024, "rank": 16, "dtype": "bfloat16",
         "pass": "fwd+bwd"}  # fmt: skip
MIN_SPEEDUP_VS_UNFUSED = 1.8
MAX_TIME_VS_FLOOR = 1.10
MIN_LEAST_SQUARES_SPEEDUP = 10.0
FUSED = ("triton", "cuda")


def check(data: dict) -> tuple[list[str], bool]:
    """(report lines, whether every target holds for the best fused backend)."""
    lines, ok = [], True
    rows = [r for r in data.get("lora_linear", []) if all(r.get(k) == v for k, v in SHAPE.items())]
    backends = [b for b in FUSED if rows and b in rows[0]]
    if not backends:
        lines.append("lora_linear: no fused result at the acceptance shape (run bench_lora.py)")
        ok = False
    else:
        row = rows[0]
        for b in backends:
            r = row[b]
            lines.append(
                f"lora_linear {b}: {r['vs_unfused']:.2f}x vs unfused "
                f"(target >= {MIN_SPEEDUP_VS_UNFUSED}), {r['vs_floor']:.2f}x the bare GEMM "
                f"(target <= {MAX_TIME_VS_FLOOR}), {r.get('of_roofline', float('nan')):.0%} "
                f"of the roofline; {r['ms']:.3f} ms"
            )
        if "compiled" in row:  # not a target: how the fused kernels compare with Inductor
            best = min(row[b]["ms"] for b in backends)
            lines.append(
                f"(for reference) torch.compile of the unfused code: {row['compiled']['ms']:.3f} "
                f"ms, {row['compiled']['vs_floor']:.2f}x the bare GEMM; the best fused backend "
                f"is {row['compiled']['ms'] / best:.2f}x faster"
            )
        ok &= any(  # one backend has to meet both
            row[b]["vs_unfused"] >= MIN_SPEEDUP_VS_UNFUSED
            and row[b]["vs_floor"] <= MAX_TIME_VS_FLOOR
            for b in backends
        )
    ls = data.get("least_squares_init")
    if ls is None:
        lines.append("least_squares_init: no result (run bench_least_squares.py)")
        ok = False
    else:
        lines.append(
            f"least_squares_init: {ls['speedup']:.1f}x vs CPU pinv "
            f"(target >= {MIN_LEAST_SQUARES_SPEEDUP}) on {ls['n']} x {ls['in']} ({ls['device']})"
        )
        ok &= ls["speedup"] >= MIN_LEAST_SQUARES_SPEEDUP
    return lines, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="?", help="default: the newest results/gpu-*.json")
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
    lines, ok = check(data)
    print("\n".join(lines))
    print("acceptance: " + ("all targets met" if ok else "NOT met"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
