"""Benchmark of stitchops.sparse_delta_linear (SPT's unstructured tuning).

At 64×197 tokens (ViT-B/16, batch 64), 768 → 3072 and 3072 → 768, the delta gradient (the
SDDMM) alone and the layer's forward + backward (y, dx, dδ with W frozen), each
implementation checked against a float64 reference in the same run:

- ``official``: SPT's official unstructured linear: dδ = diag(G[:, r]ᵀ · x[:, c]), an
  nnz × nnz matrix (2·T·nnz² FLOPs), W + S(δ) built densely. Run up to nnz = 4,000 (at
  1% of 768×3072 its matrix alone would take 2.2 GB and ~10^13 FLOPs); the baseline where run.
- ``dense_gather``: the peft (SHiRA) / SpIEL style: autograd through W + dense S(δ), so the
  backward computes the whole dW = Gᵀx and gathers dδ from it. The baseline elsewhere.
- ``spmm_correction``: the alternative to our scratch W', y = x·Wᵀ + (S·xᵀ)ᵀ and dx = G·W +
  (Sᵀ·Gᵀ)ᵀ with S a CSR matrix (what an SpMM epilogue computes), dδ as ours.
- ``torch`` (the stitchops reference: sampled_addmm on a CPU), ``triton``, ``cuda``.
- floor: ``frozen_gemm``, a bare frozen nn.Linear's forward + dx (no sparse part at all).

Costs, per call (s bytes per element): the SDDMM 2·T·nnz FLOPs and at least
T·(IN + OUT)·s + 8·nnz bytes; forward + backward two GEMMs, 4·T·IN·OUT FLOPs, plus the SDDMM,
and at least (2·T·(IN + OUT) + 2·IN·OUT)·s bytes. Peak memory per implementation is measured
too (``peak_mb``: the tensor bytes held at the peak, from the profiler's trace of every
allocation on the CPU, the allocator's counter on a GPU).

    python benchmarks/bench_sparse_delta.py [--device cpu|cuda] [--tokens N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runner
from runner import Case, Impl, Target

import stitchops
from stitchops.ops import sparse_delta as sparse_ops
from stitchops.reference import sparse_delta as reference

TOKENS = 64 * 197
SHAPES = ((768, 3072), (3072, 768))  # (IN, OUT)
FRACTIONS = (0.001, 0.01, 0.05)
OFFICIAL_MAX_NNZ = 4_000

TARGETS = (
    Target(
        op="sparse_delta_linear",
        where={"work": "delta_grad", "in": 768, "out": 3072, "nnz": 3000, "device": "cpu"},
        implementations=("torch",),
        bounds=(("vs_baseline", "min", 10.0), ("memory_vs_baseline", "min", 1.0)),
        what="CPU: delta gradient >= 10x the official nnz x nnz formulation at nnz 3,000, "
        "with less peak memory",
    ),
    *(
        Target(
            op="sparse_delta_linear",
            where={"work": "fwd_bwd", "in": i, "out": o, "density": d, "device": "cpu"},
            implementations=("torch",),
            bounds=(("vs_dense_gather", "min", 1.0),),
            what=f"CPU: forward+backward faster than dense-then-gather, {i}->{o} at {d:.1%}",
        )
        for i, o in SHAPES
        for d in (0.001, 0.01)
    ),
    *(
        Target(
            op="sparse_delta_linear",
            where={"work": "fwd_bwd", "in": i, "out": o, "density": 0.01, "device": "cuda"},
            implementations=("triton", "cuda"),
            bounds=(("vs_dense_gather", "min", 1.5),),
            what=f"GPU: forward+backward >= 1.5x dense-then-gather, {i}->{o} at 1%",
        )
        for i, o in SHAPES
    ),
    *(
        Target(
            op="sparse_delta_linear",
            where={"work": "fwd_bwd", "in": i, "out": o, "density": 0.001, "device": "cuda"},
            implementations=("triton", "cuda"),
            bounds=(("vs_floor", "max", 1.1),),
            what=f"GPU: forward+backward within 1.1x a frozen GEMM's forward + dx, {i}->{o} "
            "at 0.1%",
        )
        for i, o in SHAPES
    ),
)


def make_data(tokens: int, in_f: int, out_f: int, nnz: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    grad = torch.randn(tokens, out_f, generator=g)
    index = torch.randperm(in_f * out_f, generator=g)[:nnz].sort().values
    delta = torch.randn(nnz, generator=g) * 0.01
    bias = torch.randn(out_f, generator=g)
    cast = {"device": device, "dtype": dtype}
    return (
        x.to(**cast),
        w.to(**cast),
        delta.to(**cast),
        index.to(device),
        bias.to(**cast),
        grad.to(**cast),
    )


def official_delta_grad(grad, x, index):
    """SPT's official formula: the diagonal of G[:, r]ᵀ · x[:, c] (an nnz × nnz product)."""
    rows, cols = index // x.shape[1], index % x.shape[1]
    return torch.diagonal(grad[:, rows].t() @ x[:, cols])


def official_fwd_bwd(x, w, delta, index, bias, grad):
    """The official unstructured linear: dense W + S(δ) for y and dx (kept for the backward),
    the nnz × nnz diagonal for dδ."""
    w_full = w + reference.dense_delta(delta, index, w.shape)
    y = F.linear(x, w_full, bias)
    return y, grad @ w_full, official_delta_grad(grad, x, index)


def dense_gather_fwd_bwd(x, w, delta, index, bias, grad):
    xg, dg = x.detach().requires_grad_(), delta.detach().requires_grad_()
    y = reference.sparse_delta_linear(xg, w, dg, index, bias)
    dx, dd = torch.autograd.grad(y, (xg, dg), grad)
    return y, dx, dd


def spmm_fwd_bwd(x, w, delta, index, bias, grad):
    """The sparse part as an SpMM beside the frozen GEMM instead of a scratch W'."""
    out_f, in_f = w.shape
    crow = torch._convert_indices_from_coo_to_csr(index // in_f, out_f)
    s = torch.sparse_csr_tensor(crow, index % in_f, delta, (out_f, in_f), check_invariants=False)
    y = F.linear(x, w, bias) + (s @ x.t()).t()
    dx = grad @ w + (s.t() @ grad.t()).t()
    return y, dx, reference.sparse_delta_grad(grad, x, index)


def stitchops_fwd_bwd(backend):
    def run(x, w, delta, index, bias, grad):
        xg, dg = x.detach().requires_grad_(), delta.detach().requires_grad_()
        with stitchops.use_backend(backend):
            y = stitchops.sparse_delta_linear(xg, w, dg, index, bias, validate_index=False)
            dx, dd = torch.autograd.grad(y, (xg, dg), grad)
        return y, dx, dd

    return run


def frozen_gemm_fwd_bwd(x, w, delta, index, bias, grad):
    xg = x.detach().requires_grad_()
    y = F.linear(xg, w, bias)
    (dx,) = torch.autograd.grad(y, (xg,), grad)
    return y, dx


def backends(device: str) -> list[str]:
    if device != "cuda":
        return ["torch"]  # the Triton interpreter and the host emulator are not for timing
    probe = [torch.empty(1, device=device, dtype=torch.bfloat16)]
    return [b for b in ("torch", "triton", "cuda") if not sparse_ops.SPARSE_DELTA.reasons(b, probe)]


def _checked(fn, args, want, tol):
    """``fn(*args)`` timed, its result (a tensor or a tuple of them) checked against ``want``."""

    def check() -> float:
        out = fn(*args)
        return runner.relative_error([out] if isinstance(out, torch.Tensor) else out, want, tol)

    return Impl(lambda: fn(*args), check)


def cases(tokens: int, in_f: int, out_f: int, nnz: int, device: str, fwd_bwd: bool) -> list:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-3
    x, w, delta, index, bias, grad = make_data(tokens, in_f, out_f, nnz, device, dtype)
    size = 2 if dtype == torch.bfloat16 else 4
    official = nnz <= OFFICIAL_MAX_NNZ
    params = {
        "in": in_f,
        "out": out_f,
        "nnz": nnz,
        "density": round(nnz / (in_f * out_f), 4),
        "tokens": tokens,
        "device": device,
    }
    rows = []
    # float64 truths, computed on the CPU from the same values.
    x64, w64, d64, b64, g64 = (t.double().cpu() for t in (x, w, delta, bias, grad))
    i64 = index.cpu()
    dd_truth = reference.sparse_delta_grad(g64, x64, i64)
    impls = {}
    if official:
        impls["official"] = _checked(official_delta_grad, (grad, x, index), [dd_truth], tol)
    impls["dense_gather"] = _checked(
        lambda g, xx, ii: (g.t() @ xx).flatten()[ii], (grad, x, index), [dd_truth], tol
    )
    for backend in backends(device):
        grad_fn = sparse_ops.SPARSE_DELTA.entry(backend, "sparse_delta_grad")
        impls[backend] = _checked(grad_fn, (grad, x, index), [dd_truth], tol)
    rows.append(
        Case(
            {"work": "delta_grad", **params},
            impls,
            baseline="official" if official else "dense_gather",
            flops=2 * tokens * nnz,
            min_bytes=tokens * (in_f + out_f) * size + 8 * nnz,
            dtype=str(dtype).removeprefix("torch."),
            peak_memory=True,
        )
    )
    if not fwd_bwd:
        return rows
    y_truth = F.linear(x64, reference.sparse_delta_weight(w64, d64, i64), b64)
    dx_truth = g64 @ reference.sparse_delta_weight(w64, d64, i64)
    truth = [y_truth, dx_truth, dd_truth]
    args = (x, w, delta, index, bias, grad)
    impls = {}
    if official:
        impls["official"] = _checked(official_fwd_bwd, args, truth, tol)
    impls["dense_gather"] = _checked(dense_gather_fwd_bwd, args, truth, tol)
    if device != "cuda":  # torch's CSR SpMM in bf16 on a GPU is not offered
        impls["spmm_correction"] = _checked(spmm_fwd_bwd, args, truth, tol)
    for backend in backends(device):
        impls[backend] = _checked(stitchops_fwd_bwd(backend), args, truth, tol)
    impls["frozen_gemm"] = Impl(lambda: frozen_gemm_fwd_bwd(*args))
    flops = 4 * tokens * in_f * out_f + 2 * tokens * nnz
    min_bytes = (2 * tokens * (in_f + out_f) + 2 * in_f * out_f) * size
    rows.append(
        Case(
            {"work": "fwd_bwd", **params},
            impls,
            baseline="official" if official else "dense_gather",
            floor="frozen_gemm",
            flops=flops,
            min_bytes=min_bytes,
            dtype=str(dtype).removeprefix("torch."),
            peak_memory=True,
            compare_to=("dense_gather",),
        )
    )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    setups = [(i, o, 3000, False) for i, o in SHAPES[:1]]
    setups += [(i, o, round(f * i * o), True) for i, o in SHAPES for f in FRACTIONS]
    factories = [
        lambda s=s: cases(args.tokens, s[0], s[1], s[2], args.device, s[3]) for s in setups
    ]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    runner.run(
        "sparse_delta_linear",
        factories,
        args.device,
        300.0,
        save=not args.no_save,
        ceilings_for=(dtype,),
    )
    return 0


def test_sparse_delta_fwd_bwd(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = make_data(2048, 768, 3072, 2359, device, torch.float32)
    benchmark(lambda: stitchops_fwd_bwd("torch")(*args))


if __name__ == "__main__":
    sys.exit(main())
