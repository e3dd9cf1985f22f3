"""Shared benchmark plumbing: timing, environment metadata, result files."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_slug(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return "gpu-" + "-".join(name.lower().replace("nvidia", "").split())
    return "cpu"


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(git, capture_output=True, text=True, cwd=Path(__file__).parent)
        commit = out.stdout.strip() or None
        # Results measured on uncommitted changes say so.
        dirty = ["git", "status", "--porcelain", "--untracked-files=no", "--", "csrc", "kernels",
                 "stitchops", "benchmarks/*.py"]  # fmt: skip
        changes = subprocess.run(dirty, capture_output=True, text=True, cwd=Path(__file__).parent)
        if commit and changes.stdout.strip():
            commit += "+changes"
    except OSError:
        commit = None
    return {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "threads": torch.get_num_threads(),
    }


def median_ms(fn: Callable[[], object], device: str, budget_ms: float = 400.0) -> dict:
    """Median (and 20/80 % quantiles) of fn's time in ms after warm-up.

    GPU: triton.testing.do_bench (CUDA events, L2 flushed between runs). CPU: wall clock.
    """
    if device == "cuda":
        from triton.testing import do_bench

        q20, med, q80 = do_bench(fn, warmup=50, rep=budget_ms, quantiles=[0.2, 0.5, 0.8])
        return {"ms": med, "q20": q20, "q80": q80}
    fn()  # warm-up
    start, times = time.perf_counter(), []
    while len(times) < 5 or ((time.perf_counter() - start) * 1e3 < budget_ms and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=5)
    return {"ms": statistics.median(times), "q20": qs[0], "q80": qs[3]}


def _copy_ms(n_bytes: int, device: str) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), device, 200.0)["ms"]


def measured_ceilings(device: str, dtypes: tuple[torch.dtype, ...]) -> dict:
    """This device's memory bandwidth and dense matmul rate per dtype, measured now.

    They are the denominators of the rooflines (max(FLOPs / rate, bytes / bandwidth)) the
    benchmarks report against, so a fraction of the roofline compares with what this very
    device does in this run, not with a datasheet. Bandwidth counts bytes read + written by
    a large device copy; the rate is a square matmul (8192 on a GPU, 1024 on a CPU).
    """
    gpu = device == "cuda"
    n_bytes = (1 << 30) if gpu else (1 << 26)
    copy_ms = _copy_ms(n_bytes, device)
    n = 8192 if gpu else 1024
    rates = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        matmul_ms = median_ms(lambda a=a, b=b: a @ b, device, 300.0)["ms"]
        rates[str(dtype).removeprefix("torch.")] = 2 * n**3 / matmul_ms / 1e9
    return {"bandwidth_GBps": 2 * n_bytes / copy_ms / 1e6, "matmul_TFLOPs": rates,
            "matmul_n": n, "copy_bytes": n_bytes}  # fmt: skip


def write_results(name: str, device: str, payload: dict) -> Path:
    """Merge ``payload`` under key ``name`` into results/<device>.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{device_slug(device)}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["environment"] = environment(device)
    data[name] = payload
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
