"""Benchmark of stitchops.lora_linear at stitching-layer shapes (issue: fused LoRA SL).

For each shape, dtype and backend: check correctness against an fp32 reference in this run,
then time forward and forward+backward (grad for x, A, B, bias; W frozen as in SN-Netv2):
  unfused   y = F.linear(x, W, b) + scale·lora_B(lora_A(x)), as peft does it
  triton    stitchops.lora_linear with the triton backend
  cuda      stitchops.lora_linear with the cuda backend
  floor     the bare frozen GEMM: x·Wᵀ forward, plus dY·W backward
  compiled  torch.compile of the unfused code (Inductor's own fusion), on a GPU at the
            acceptance shape only (compiling every shape would take minutes)
  cuda_1tile  the cuda backend with one output tile per forward block, where it would
            otherwise group several (csrc/lora.h: column_tiles), at 256×197 tokens,
            384→1024 in bf16: what reusing S costs or saves against lost occupancy
Reports median ms, TFLOP/s of the useful work, and the ratios vs unfused and vs the floor.

    python benchmarks/bench_lora.py            # full table on a GPU; a small CPU table here
    pytest benchmarks/ --benchmark-only        # the same cases through pytest-benchmark
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measured_ceilings, median_ms, write_results
from acceptance import SHAPE as ACCEPTANCE_SHAPE

import stitchops

GPU_TOKENS = (64 * 197, 256 * 197)
GPU_FEATURES = ((192, 384), (384, 768), (384, 1024), (768, 1024))
GPU_RANKS = (16, 64)
GPU_DTYPES = (torch.bfloat16, torch.float16)
# On a CPU only the torch backend runs at speed (triton there is an interpreter): the table
# shows the op's overhead over the unfused code it replaces, at smaller sizes.
CPU_TOKENS = (8 * 197,)
CPU_FEATURES = ((192, 384), (384, 1024))
CPU_RANKS = (16,)
CPU_DTYPES = (torch.float32,)


def flops(tokens: int, in_f: int, out_f: int, rank: int, backward: bool) -> int:
    """Useful FLOPs: main GEMM(s) plus the rank-R products (see kernels/lora.py)."""
    fwd = 2 * tokens * in_f * out_f + 2 * tokens * rank * (in_f + out_f)
    bwd = 2 * tokens * in_f * out_f + 4 * tokens * rank * (in_f + out_f)
    return fwd + (bwd if backward else 0)


def min_bytes(tokens: int, in_f: int, out_f: int, rank: int, elem: int, backward: bool) -> int:
    """Bytes that must move at least (kernels/lora.py's cost model): every input read once,
    every output written once; S = x·Aᵀ (fp32) is written by the forward (the inputs require
    grad) and read back by the backward, which also reads x again for dA."""
    weights = elem * (out_f * in_f + rank * (in_f + out_f))
    fwd = elem * tokens * (in_f + out_f) + weights + 4 * tokens * rank
    bwd = elem * tokens * (out_f + 2 * in_f) + weights + 4 * tokens * rank
    return fwd + (bwd + elem * rank * (in_f + out_f) if backward else 0)


def make_case(tokens, in_f, out_f, rank, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device, dtype)

    return {
        "x": rnd(tokens, in_f).requires_grad_(),
        "weight": rnd(out_f, in_f, s=in_f**-0.5),
        "bias": rnd(out_f).requires_grad_(),
        "lora_a": rnd(rank, in_f, s=in_f**-0.5).requires_grad_(),
        "lora_b": rnd(out_f, rank, s=rank**-0.5).requires_grad_(),
        "scale": 1.0 / rank,
    }


def unfused(x, weight, bias, lora_a, lora_b, scale):
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scale


def fused(backend):
    def run(**kw):
        with stitchops.use_backend(backend):
            return stitchops.lora_linear(**kw)

    return run


def cuda_with_column_tiles(tiles: int):
    """The cuda backend with every forward block covering ``tiles`` output tiles."""
    from stitchops.ops.lora import pinned_column_tiles

    def run(**kw):
        with pinned_column_tiles(tiles), stitchops.use_backend("cuda"):
            return stitchops.lora_linear(**kw)

    return run


def step(fn, case, grad, backward: bool):
    def run():
        y = fn(**case)
        if backward:
            trainable = [case[k] for k in ("x", "bias", "lora_a", "lora_b")]
            torch.autograd.grad(y, trainable, grad)
        return y

    return run


def floor_step(case, grad, backward: bool):
    x, w = case["x"].detach(), case["weight"]

    def run():
        y = x @ w.t()
        if backward:
            grad @ w
        return y

    return run


def check(fn, case, grad, ref, tol) -> float:
    """Relative error of output and every gradient vs the fp32 reference; raises if too big."""
    y = fn(**case)
    names = ("x", "bias", "lora_a", "lora_b")
    grads = torch.autograd.grad(y, [case[k] for k in names], grad)
    worst = 0.0
    for got, want in zip((y, *grads), ref, strict=True):
        err = ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, err)
    if not worst <= tol:
        raise AssertionError(f"relative error {worst:.2e} > {tol:.0e}: refusing to time")
    return worst


def backends_for(device: str) -> list[str]:
    if device == "cpu":
        return ["torch"]
    avail = stitchops.available_backends(device)
    return [b for b in ("triton", "cuda") if avail[b] is None]


def run_case(tokens, in_f, out_f, rank, dtype, device, budget_ms, ceilings, extra=None):
    """Rows (fwd, fwd+bwd) for one shape; ``extra``: more implementations by name."""
    case = make_case(tokens, in_f, out_f, rank, dtype, device)
    grad = torch.randn(tokens, out_f, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ref32 = {k: v.float().detach().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v
             for k, v in case.items()}  # fmt: skip
    y32 = unfused(**ref32)
    ref = (y32, *torch.autograd.grad(y32, [ref32[k] for k in ("x", "bias", "lora_a", "lora_b")],
                                     grad.float()))  # fmt: skip
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    rows = []
    for backward in (False, True):
        row = {
            "tokens": tokens,
            "in": in_f,
            "out": out_f,
            "rank": rank,
            "dtype": str(dtype).removeprefix("torch."),
            "pass": "fwd+bwd" if backward else "fwd",
            "gflop": flops(tokens, in_f, out_f, rank, backward) / 1e9,
            "mbytes": min_bytes(tokens, in_f, out_f, rank, dtype.itemsize, backward) / 1e6,
        }
        # The roofline of this row's work on this device, from ceilings measured in this run.
        rate = ceilings["matmul_TFLOPs"][row["dtype"]]
        row["roofline_ms"] = max(row["gflop"] / rate, row["mbytes"] / ceilings["bandwidth_GBps"])
        timings = {"unfused": step(unfused, case, grad, backward),
                   "floor": floor_step(case, grad, backward)}  # fmt: skip
        errors = {"unfused": check(unfused, case, grad, ref, tol)}
        impls = {backend: fused(backend) for backend in backends_for(device)}
        for name, fn in {**impls, **(extra or {})}.items():
            errors[name] = check(fn, case, grad, ref, tol)
            timings[name] = step(fn, case, grad, backward)
        for name, fn in timings.items():
            t = median_ms(fn, device, budget_ms)
            row[name] = {**t, "tflops": row["gflop"] / t["ms"]}
            if name in errors:
                row[name]["max_rel_err"] = errors[name]
        for name in timings:
            row[name]["vs_unfused"] = row["unfused"]["ms"] / row[name]["ms"]
            row[name]["vs_floor"] = row[name]["ms"] / row["floor"]["ms"]
            row[name]["of_roofline"] = row["roofline_ms"] / row[name]["ms"]
        rows.append(row)
    return rows


def implementations(rows) -> list[str]:
    """Every implementation timed in any row, in first-seen order (some rows lack some)."""
    return list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, dict)))


def print_table(rows) -> None:
    impls = implementations(rows)
    head = f"{'tokens':>7} {'in→out':>10} {'r':>3} {'dtype':>8} {'pass':>8} " + " ".join(
        f"{name + ' ms':>12}" for name in impls
    )
    print(head + "   speedup vs unfused / time vs floor / fraction of the roofline")
    for r in rows:
        cells = " ".join(f"{r[n]['ms']:12.3f}" if n in r else f"{'-':>12}" for n in impls)
        ratios = ", ".join(
            f"{n}: {r[n]['vs_unfused']:.2f}x / {r[n]['vs_floor']:.2f}x / {r[n]['of_roofline']:.0%}"
            for n in impls
            if n not in ("unfused", "floor") and n in r
        )
        print(f"{r['tokens']:>7} {r['in']:>4}→{r['out']:<5} {r['rank']:>3} {r['dtype']:>8} "
              f"{r['pass']:>8} {cells}   {ratios}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-ms", type=float, default=None, help="timing budget per cell")
    parser.add_argument("--no-save", action="store_true", help="do not write results/")
    parser.add_argument(
        "--compiled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torch.compile(unfused) at the acceptance shape (GPU default)",
    )
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    grid = list(itertools.product(
        GPU_TOKENS if gpu else CPU_TOKENS, GPU_FEATURES if gpu else CPU_FEATURES,
        GPU_RANKS if gpu else CPU_RANKS, GPU_DTYPES if gpu else CPU_DTYPES,
    ))  # fmt: skip
    budget = args.budget_ms or (200.0 if gpu else 300.0)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    grid.sort(key=lambda case: not _is_acceptance_case(*case))  # the shape first
    ceilings = measured_ceilings(args.device, tuple(dict.fromkeys(g[3] for g in grid)))
    print(f"measured ceilings: {ceilings['bandwidth_GBps']:.0f} GB/s, matmul TFLOP/s "
          f"{ceilings['matmul_TFLOPs']}")  # fmt: skip
    if not args.no_save:
        write_results("ceilings", args.device, ceilings)
    rows = []
    compiled = gpu if args.compiled is None else args.compiled
    for tokens, (in_f, out_f), rank, dtype in tqdm(grid, desc="lora_linear") if tqdm else grid:
        extra = {}
        if compiled and _is_acceptance_case(tokens, (in_f, out_f), rank, dtype):
            extra["compiled"] = torch.compile(unfused, dynamic=False)
        if _compares_column_tiles(tokens, (in_f, out_f), rank, dtype, backends_for(args.device)):
            extra["cuda_1tile"] = cuda_with_column_tiles(1)
        rows += run_case(tokens, in_f, out_f, rank, dtype, args.device, budget, ceilings, extra)
        if not args.no_save:  # after every case: a run cut short keeps what it measured
            path = write_results("lora_linear", args.device, rows)
    print_table(rows)
    if not args.no_save:
        print(f"wrote {path}")
    return 0


def _compares_column_tiles(tokens, features, rank, dtype, backends) -> bool:
    """Where to time the cuda forward ungrouped as well (both ranks of the acceptance row)."""
    if "cuda" not in backends or not _is_acceptance_row(tokens, features, dtype):
        return False
    from stitchops import _cuda

    return _cuda._C.forward_column_tiles(tokens, features[1], rank) > 1


def _is_acceptance_row(tokens, features, dtype) -> bool:
    """The acceptance shape's tokens, IN → OUT and dtype, at any rank."""
    want = ACCEPTANCE_SHAPE
    return (tokens, features, str(dtype).removeprefix("torch.")) == (
        want["tokens"], (want["in"], want["out"]), want["dtype"]
    )  # fmt: skip


def _is_acceptance_case(tokens, features, rank, dtype) -> bool:
    return _is_acceptance_row(tokens, features, dtype) and rank == ACCEPTANCE_SHAPE["rank"]


# pytest-benchmark entry points (pytest benchmarks/ --benchmark-only)
def test_lora_forward_backward(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, in_f, out_f, rank, dtype = (
        (256 * 197, 384, 1024, 16, torch.bfloat16) if device == "cuda"
        else (8 * 197, 384, 1024, 16, torch.float32)
    )  # fmt: skip
    case = make_case(tokens, in_f, out_f, rank, dtype, device)
    grad = torch.randn(tokens, out_f, device=device, dtype=dtype)
    fn = step(stitchops.lora_linear, case, grad, backward=True)
    benchmark(lambda: (fn(), torch.cuda.synchronize() if device == "cuda" else None))


if __name__ == "__main__":
    sys.exit(main())
