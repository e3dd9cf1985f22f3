"""The benchmark runner every ``bench_<op>.py`` uses, and its plumbing.

A benchmark supplies cases: the parameters a row shows, the implementations (one unit of
the same work each: the official code's algorithm as the baseline, the stitchops backends,
a physical floor such as the bare GEMM), a correctness check per implementation, and the
work's FLOPs and minimum bytes. ``measure`` runs every check first (a wrong result raises,
nothing is timed), then times each implementation (median and 20/80 % quantiles: CUDA
events via triton.testing.do_bench on a GPU, the wall clock otherwise) and reports, per
implementation, its speed-up over the baseline, its time against the floor, and the
fraction of the row's roofline max(FLOPs / matmul rate, bytes / bandwidth) it reaches, with
the rate and bandwidth measured on this device in the same run (``measured_ceilings``).
``run`` measures a list of cases with a progress bar, saves the rows (and the ceilings they
were measured against) after each case under the op's name in ``results/<device>.json``
(with the device, versions and commit) and prints the table;
benchmarks/report.py renders any op's rows into the README.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stitchops import _memory

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
        dirty = [
            "git",
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "csrc",
            "kernels",
            "stitchops",
            "benchmarks/*.py",
        ]
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
        "cores": os.cpu_count(),
        "load_average": load_average(),
    }


@contextlib.contextmanager
def busy_neighbours(count: int) -> Iterator[None]:
    """Inside the block, ``count`` other processes each keep a CPU core busy (a spinning
    Python loop): the loaded machine the CPU targets are measured on."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0.0)
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


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
    return {
        "bandwidth_GBps": 2 * n_bytes / copy_ms / 1e6,
        "matmul_TFLOPs": rates,
        "matmul_n": n,
        "copy_bytes": n_bytes,
    }


def write_results(name: str, device: str, payload: dict) -> Path:
    """Merge ``payload`` under key ``name`` into results/<device>.json, with the environment
    it was measured in (also the file's, as of its latest write: ops run at other times)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{device_slug(device)}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["environment"] = environment(device)
    data[name] = {**payload, "environment": data["environment"]}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


@dataclass
class Impl:
    """One implementation of a case's work.

    ``run`` does the whole unit of work once. ``check`` returns its error figure against the
    reference (the benchmark says which: a relative error, a residual), raising
    ``AssertionError`` when it is too large; None for a floor, which computes something else
    on purpose. ``clock="wall"`` times with the host clock after a
    device synchronisation, for work that is partly on the CPU (a CPU baseline of a GPU op).
    """

    run: Callable[[], object]
    check: Callable[[], float] | None = None
    clock: str = "device"


@dataclass
class Case:
    """One row: ``params`` as shown, implementations by name, which one is the baseline (the
    official code's algorithm) and which the floor, and the work's cost model."""

    params: dict
    impls: dict[str, Impl]
    baseline: str
    floor: str | None = None
    flops: float | None = None  # useful FLOPs of one unit of work
    min_bytes: float | None = None  # bytes that must move at least
    dtype: str | None = None  # the matmul rate the roofline uses ("bfloat16", ...)
    details: Callable[[], dict] = field(default=dict)  # more figures for the row, measured
    peak_memory: bool = False  # also measure each implementation's peak memory (peak_mb)
    compare_to: tuple[str, ...] = ()  # more implementations to give speed-ups over (vs_<name>)


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], tol: float) -> float:
    """The largest max|got - want| / max|want| over pairs; raises above ``tol`` (and on NaN)."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        w = w.double()
        err = ((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, err if err == err else float("inf"))
    if not worst <= tol:
        raise AssertionError(f"relative error {worst:.2e} > {tol:.0e}: refusing to time")
    return worst


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Bytes of tensors ``fn`` holds at its peak beyond what was held before: on a GPU torch's
    peak allocation counter (stitchops._memory), on a CPU the same figure from the profiler's
    trace of every allocation and free (``cpu_tensor_peak``)."""
    if torch.device(device).type == "cpu":
        return cpu_tensor_peak(fn)
    baseline = _memory.start_peak(device)
    fn()
    return _memory.peak_since(device, baseline)


def cpu_tensor_peak(fn: Callable[[], object]) -> int:
    """The largest sum of CPU tensor bytes allocated and not yet freed at any point of ``fn``
    (the prefix sums of the profiler's ``[memory]`` events, +bytes per allocation, −bytes per
    free, in time order): what the GPU's ``max_memory_allocated`` counts, free of the noise of
    the resident set (heap arenas per thread, pages freed but kept by malloc)."""
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    )
    with _native_stderr_silenced():  # kineto prints a line at each start and stop
        prof.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 on /dev/null inside the block (C++ code writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    def run():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def time_impl(impl: Impl, device: str, budget_ms: float) -> dict:
    if impl.clock == "wall":
        return median_ms(_synced(impl.run, device), "cpu", budget_ms)
    return median_ms(impl.run, device, budget_ms)


def measure(case: Case, device: str, budget_ms: float, ceilings: dict | None = None) -> dict:
    """The row of ``case``: every check first, then the timings and their ratios."""
    errors = {name: impl.check() for name, impl in case.impls.items() if impl.check}
    row: dict = {**case.params, "baseline_impl": case.baseline}
    if case.floor:
        row["floor_impl"] = case.floor
    if case.flops is not None:
        row["gflop"] = case.flops / 1e9
    if case.min_bytes is not None:
        row["mbytes"] = case.min_bytes / 1e6
    if ceilings and case.flops is not None and case.min_bytes is not None:
        rate = ceilings["matmul_TFLOPs"][case.dtype]
        row["roofline_ms"] = max(row["gflop"] / rate, row["mbytes"] / ceilings["bandwidth_GBps"])
    for name, impl in case.impls.items():
        row[name] = time_impl(impl, device, budget_ms)
        if case.peak_memory:
            row[name]["peak_mb"] = peak_bytes(impl.run, device) / 1e6
        if name in errors:
            row[name]["error"] = errors[name]
        if "gflop" in row:
            row[name]["tflops"] = row["gflop"] / row[name]["ms"]
    for name in case.impls:
        row[name]["vs_baseline"] = row[case.baseline]["ms"] / row[name]["ms"]
        if case.floor:
            row[name]["vs_floor"] = row[name]["ms"] / row[case.floor]["ms"]
        if "roofline_ms" in row:
            row[name]["of_roofline"] = row["roofline_ms"] / row[name]["ms"]
        for other in case.compare_to:
            row[name][f"vs_{other}"] = row[other]["ms"] / row[name]["ms"]
        if case.peak_memory:
            row[name]["memory_vs_baseline"] = row[case.baseline]["peak_mb"] / max(
                row[name]["peak_mb"], 1e-6
            )
    details = case.details()
    if details:
        row["details"] = details
    return row


def implementations(rows: Sequence[dict]) -> list[str]:
    """Every implementation timed in any row, in first-seen order (some rows lack some)."""
    return list(
        dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, dict) and "ms" in v)
    )


def params_of(row: dict) -> dict:
    """The row's parameters: what it shows before the timings."""
    derived = {"baseline_impl", "floor_impl", "gflop", "mbytes", "roofline_ms", "details"}
    return {k: v for k, v in row.items() if not isinstance(v, dict) and k not in derived}


def print_table(rows: Sequence[dict]) -> None:
    impls = implementations(rows)
    for r in rows:
        where = " ".join(f"{k}={v}" for k, v in params_of(r).items())
        cells = ", ".join(
            f"{n} {r[n]['ms']:.3f} ms ({r[n]['vs_baseline']:.2f}x"
            + (f", {r[n]['vs_floor']:.2f}x floor" if "vs_floor" in r[n] else "")
            + (f", {r[n]['of_roofline']:.0%} roofline" if "of_roofline" in r[n] else "")
            + (f", peak {r[n]['peak_mb']:.0f} MB" if "peak_mb" in r[n] else "")
            + ")"
            for n in impls
            if n in r
        )
        print(f"{where}: {cells}")


def quick() -> bool:
    """The GPU round's quick mode (``STITCHOPS_BENCH_QUICK=1``): only the rows that the
    acceptance targets read, at a quarter of the time budget."""
    return os.environ.get("STITCHOPS_BENCH_QUICK") == "1"


def targets_of(name: str, device: str) -> list[Target]:
    """The acceptance targets of op ``name`` that a run on ``device`` measures (every
    bench_<op>.py's TARGETS, found by acceptance.targets)."""
    import acceptance  # a sibling script: imports the benches, which import this module

    on_cpu = torch.device(device).type == "cpu"
    return [t for t in acceptance.targets() if t.op == name and t.on_cpu == on_cpu]


def run(
    name: str,
    cases: Sequence[Callable[[], Sequence[Case]]],
    device: str,
    budget_ms: float,
    save: bool = True,
    ceilings_for: Sequence[torch.dtype] = (),
) -> list[dict]:
    """Measure the cases, built lazily a few at a time (each callable gives the rows of one
    setup, e.g. a shape's forward and forward+backward), saving after each; print the table.

    ``ceilings_for``: the dtypes whose matmul rate the rooflines need (measured first).
    In quick mode (``quick()``) only the rows some acceptance target reads are measured, at a
    quarter of ``budget_ms``, and the run stops once every target has its row.
    """
    pending = targets_of(name, device) if quick() else None
    if pending is not None:
        budget_ms /= 4
    ceilings = None
    if ceilings_for:
        ceilings = measured_ceilings(device, tuple(ceilings_for))
        print(
            f"measured ceilings: {ceilings['bandwidth_GBps']:.0f} GB/s, matmul TFLOP/s "
            f"{ceilings['matmul_TFLOPs']}"
        )
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    rows: list[dict] = []
    for make in tqdm(cases, desc=name) if tqdm else cases:
        if pending is not None and not pending:
            break
        built = make()
        if pending is not None:
            built = [c for c in built if any(t.matches(c.params) for t in pending)]
        rows += [measure(case, device, budget_ms, ceilings) for case in built]
        if pending is not None:
            pending = [t for t in pending if not any(t.matches(row) for row in rows)]
        if save:  # after every case: a run cut short keeps what it measured
            result = {"rows": rows, **({"ceilings": ceilings} if ceilings else {})}
            path = write_results(name, device, result)
    print_table(rows)
    if save and rows:
        print(f"wrote {path}")
    return rows


@dataclass(frozen=True)
class Target:
    """An acceptance target, as data: in the results of ``op``, the row whose parameters
    include ``where``; some implementation of ``implementations`` must meet every bound of
    ``bounds`` ((metric, "min" or "max", value), metric one of an implementation's figures:
    vs_baseline, vs_floor, of_roofline, memory_vs_baseline, vs_<name> of Case.compare_to).
    ``where["device"]`` says which results file the target is read from: "cpu" for
    results/cpu.json, anything else (or absent) for a GPU's."""

    op: str
    where: dict
    implementations: tuple[str, ...]
    bounds: tuple[tuple[str, str, float], ...]
    what: str = ""

    @property
    def on_cpu(self) -> bool:
        return self.where.get("device") == "cpu"

    def matches(self, params: dict) -> bool:
        """Whether a row (or a case's parameters) is the one this target reads ("cuda:0"
        counts as "cuda")."""
        device = str(params.get("device", "")).split(":")[0]
        return all((device if k == "device" else params.get(k)) == v for k, v in self.where.items())

    def check(self, data: dict) -> tuple[list[str], bool]:
        rows = [r for r in data.get(self.op, {}).get("rows", []) if self.matches(r)]
        if not rows:
            return [f"{self.op}: no result at {self.where} (run its benchmark)"], False
        row, lines, met = rows[0], [], False
        for impl in self.implementations:
            if impl not in row:
                continue
            figures, ok = [], True
            for metric, kind, bound in self.bounds:
                value = row[impl].get(metric, float("nan"))
                ok &= value >= bound if kind == "min" else value <= bound
                figures.append(f"{metric} {value:.2f} ({kind} {bound})")
            met |= ok
            lines.append(f"{self.op} {impl}: " + ", ".join(figures) + f"; {row[impl]['ms']:.3f} ms")
        if not lines:
            return [f"{self.op}: none of {self.implementations} was timed"], False
        return lines, met
