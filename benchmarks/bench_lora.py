"""Benchmark of stitchops.lora_linear at stitching-layer shapes (benchmarks/runner.py).

For each shape, dtype and backend: check correctness against an fp32 reference in this run,
then time forward and forward+backward (grad for x, A, B, bias; W frozen as in SN-Netv2):
  unfused   y = F.linear(x, W, b) + scale·lora_B(lora_A(x)), as peft and the official
            SN-Netv2 code do it (the baseline)
  triton    stitchops.lora_linear with the triton backend
  cuda      stitchops.lora_linear with the cuda backend
  floor     the bare frozen GEMM: x·Wᵀ forward, plus dY·W backward
  compiled  torch.compile of the unfused code (Inductor's own fusion), on a GPU at the
            acceptance shape only (compiling every shape would take minutes)
  cuda_1tile  the cuda backend with one output tile per forward block, where it would
            otherwise group several (csrc/lora.h: column_tiles), at 256×197 tokens,
            384→1024 in bf16: what reusing S costs or saves against lost occupancy
Reports median ms, TFLOP/s of the useful work, the speed-up over unfused, the time against
the floor and the fraction of the roofline.

    python benchmarks/bench_lora.py            # full table on a GPU; a small CPU table here
    pytest benchmarks/ --benchmark-only        # the same cases through pytest-benchmark
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runner
from runner import Case, Impl, Target

import stitchops

# SN-Netv2's stitching layer between DeiT3-S and DeiT3-L (384 → 1024, LoRA rank 16) on a
# batch of 256 images of 197 tokens, in bf16, forward + backward with W frozen.
ACCEPTANCE_SHAPE = {
    "tokens": 256 * 197,
    "in": 384,
    "out": 1024,
    "rank": 16,
    "dtype": "bfloat16",
    "pass": "fwd+bwd",
}
TARGETS = (
    Target(
        op="lora_linear",
        where=ACCEPTANCE_SHAPE,
        implementations=("triton", "cuda"),
        bounds=(("vs_baseline", "min", 1.8), ("vs_floor", "max", 1.10)),
        what="fused fwd+bwd: >= 1.8x the unfused code and <= 1.10x the bare frozen GEMM",
    ),
)

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


GRADIENTS = ("x", "bias", "lora_a", "lora_b")


def outputs(fn, case, grad) -> tuple[torch.Tensor, ...]:
    """y and the gradients of x, bias, A and B: what every implementation is checked on."""
    y = fn(**case)
    return (y, *torch.autograd.grad(y, [case[k] for k in GRADIENTS], grad))


def backends_for(device: str) -> list[str]:
    if device == "cpu":
        return ["torch"]
    avail = stitchops.available_backends(device)
    return [b for b in ("triton", "cuda") if avail[b] is None]


def shape_cases(tokens, in_f, out_f, rank, dtype, device, extra=None) -> list[Case]:
    """The cases (fwd, fwd+bwd) of one shape, every implementation checked first: output and
    every gradient against the fp32 unfused code. ``extra``: more implementations by name."""
    case = make_case(tokens, in_f, out_f, rank, dtype, device)
    grad = torch.randn(tokens, out_f, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ref32 = {
        k: v.float().detach().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v
        for k, v in case.items()
    }
    ref = outputs(unfused, ref32, grad.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    fns = {"unfused": unfused, **{b: fused(b) for b in backends_for(device)}, **(extra or {})}
    errors = {
        name: runner.relative_error(outputs(fn, case, grad), ref, tol) for name, fn in fns.items()
    }
    cases = []
    for backward in (False, True):
        impls = {
            name: Impl(step(fn, case, grad, backward), check=lambda n=name: errors[n])
            for name, fn in fns.items()
        }
        impls["floor"] = Impl(floor_step(case, grad, backward))
        params = {
            "tokens": tokens,
            "in": in_f,
            "out": out_f,
            "rank": rank,
            "dtype": str(dtype).removeprefix("torch."),
            "pass": "fwd+bwd" if backward else "fwd",
        }
        cases.append(
            Case(
                params,
                impls,
                baseline="unfused",
                floor="floor",
                flops=flops(tokens, in_f, out_f, rank, backward),
                min_bytes=min_bytes(tokens, in_f, out_f, rank, dtype.itemsize, backward),
                dtype=params["dtype"],
            )
        )
    return cases


def run_case(tokens, in_f, out_f, rank, dtype, device, budget_ms, ceilings, extra=None):
    """The measured rows (fwd, fwd+bwd) of one shape."""
    return [
        runner.measure(c, device, budget_ms, ceilings)
        for c in shape_cases(tokens, in_f, out_f, rank, dtype, device, extra)
    ]


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
    grid = list(
        itertools.product(
            GPU_TOKENS if gpu else CPU_TOKENS,
            GPU_FEATURES if gpu else CPU_FEATURES,
            GPU_RANKS if gpu else CPU_RANKS,
            GPU_DTYPES if gpu else CPU_DTYPES,
        )
    )
    grid.sort(key=lambda case: not _is_acceptance_case(*case))  # the headline shape first
    compiled = gpu if args.compiled is None else args.compiled
    backends = backends_for(args.device)

    def cases(tokens, features, rank, dtype):
        extra = {}
        if compiled and _is_acceptance_case(tokens, features, rank, dtype):
            extra["compiled"] = torch.compile(unfused, dynamic=False)
        if _compares_column_tiles(tokens, features, rank, dtype, backends):
            extra["cuda_1tile"] = cuda_with_column_tiles(1)
        return shape_cases(tokens, *features, rank, dtype, args.device, extra)

    runner.run(
        "lora_linear",
        [functools.partial(cases, *shape) for shape in grid],
        args.device,
        args.budget_ms or (200.0 if gpu else 300.0),
        save=not args.no_save,
        ceilings_for=tuple(dict.fromkeys(g[3] for g in grid)),
    )
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
        want["tokens"],
        (want["in"], want["out"]),
        want["dtype"],
    )


def _is_acceptance_case(tokens, features, rank, dtype) -> bool:
    return _is_acceptance_row(tokens, features, dtype) and rank == ACCEPTANCE_SHAPE["rank"]


# pytest-benchmark entry points (pytest benchmarks/ --benchmark-only)
def test_lora_forward_backward(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, in_f, out_f, rank, dtype = (
        (256 * 197, 384, 1024, 16, torch.bfloat16)
        if device == "cuda"
        else (8 * 197, 384, 1024, 16, torch.float32)
    )
    case = make_case(tokens, in_f, out_f, rank, dtype, device)
    grad = torch.randn(tokens, out_f, device=device, dtype=dtype)
    fn = step(stitchops.lora_linear, case, grad, backward=True)
    benchmark(lambda: (fn(), torch.cuda.synchronize() if device == "cuda" else None))


if __name__ == "__main__":
    sys.exit(main())
