"""stitchops.sparse_delta_linear: every runnable backend vs a float64 dense formulation,
forward and every gradient; indices, splits, determinism, bad inputs, opcheck, compile."""

from __future__ import annotations

from dataclasses import dataclass

import harness
import pytest
import torch
from harness import DEVICE, rel_err
from op_tables import AotPlain, OpTests

import stitchops
from stitchops.ops import sparse_delta as sparse_ops
from stitchops.reference import sparse_delta as reference

# What the test machinery every op shares takes from this op (tests/op_tables.py).
OP_TESTS = OpTests(
    name="sparse_delta_linear",
    kernels="sparse_delta",
    # Small kernels: every cuda test under ASan and memcheck; the split runs for the others.
    asan_select="cuda",
    sanitizer_select={
        "memcheck": "cuda",
        "synccheck": "cuda and token_splits",
        "racecheck": "cuda and (token_splits or deterministic)",
    },
    aot_plain=(
        AotPlain("_scatter_delta_kernel", {"BLOCK": 256}),
        AotPlain(
            "_sddmm_kernel", {"BLOCK_J": 64, "BLOCK_T": 32}, unit_strides=("stride_go", "stride_xi")
        ),
    ),
    fp32_pointers=frozenset({"part_ptr"}),
    arg_types={"index_ptr": "*i64"},
)

BACKENDS = ["torch", "triton", "cuda"]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])


@dataclass(frozen=True)
class Case:
    lead: tuple[int, ...]
    in_f: int
    out_f: int
    nnz: int | str  # a count, or "all"
    layout: str = "uniform"  # "uniform", "rows" (clustered in a few rows) or "cols"
    bias: bool = True
    train_weight: bool = False
    frozen_x: bool = False

    @property
    def id(self) -> str:
        sizes = [("T", self.lead), ("IN", self.in_f), ("OUT", self.out_f), ("nnz", self.nnz)]
        flags = {
            self.layout: self.layout != "uniform",
            "nobias": not self.bias,
            "trainW": self.train_weight,
            "frozenx": self.frozen_x,
        }
        return harness.case_id(sizes, flags)

    def trains(self, name: str) -> bool:
        if name == "weight":
            return self.train_weight
        return not (name == "x" and self.frozen_x)

    def index(self, device: str = DEVICE) -> torch.Tensor:
        size = self.in_f * self.out_f
        g = torch.Generator().manual_seed(99)
        if self.nnz == "all":
            return torch.arange(size, device=device)
        if self.layout == "rows":  # entries in the first few rows only
            pool = torch.arange(min(size, 3 * self.in_f))
        elif self.layout == "cols":  # one column, every row
            pool = torch.arange(self.out_f) * self.in_f + 1
        else:
            pool = torch.arange(size)
        pick = torch.randperm(pool.numel(), generator=g)[: self.nnz]
        return pool[pick].sort().values.to(device)


CASES = [
    Case((77,), 50, 130, 37),  # the odd shape
    Case((77,), 50, 130, 1),
    Case((77,), 50, 130, "all"),
    Case((2, 37), 50, 130, 37, layout="rows", bias=False),
    Case((77,), 50, 130, 40, layout="cols", frozen_x=True),
    Case((77,), 50, 130, 37, train_weight=True),
    Case((300,), 33, 17, 100),  # several token blocks, entries spanning several blocks
    Case((5,), 1, 1, 1),
]


def masters(case: Case) -> dict[str, torch.Tensor]:
    index = case.index()
    shapes = {
        "x": ((*case.lead, case.in_f), 1.0),
        "weight": ((case.out_f, case.in_f), case.in_f**-0.5),
        "delta": ((index.numel(),), 0.5),
    }
    if case.bias:
        shapes["bias"] = ((case.out_f,), 1.0)
    return harness.float64_masters(shapes)


def run(case: Case, backend: str, dtype: torch.dtype) -> None:
    index = case.index()
    m = masters(case)
    harness.require_backend(sparse_ops.SPARSE_DELTA, backend, m["x"].to(dtype))
    grad = harness.float64_masters({"g": ((*case.lead, case.out_f), 1.0)}, seed=5)["g"]
    grads = harness.check_against_float64(
        lambda **a: stitchops.sparse_delta_linear(index=index, **a),
        lambda **a: reference.sparse_delta_linear(index=index, **a),
        m,
        dtype,
        case.trains,
        backend,
        grad,
    )
    assert "delta" in grads and ("weight" in grads) == case.train_weight


# float64 on the torch backend; the kernels take fp32, fp16 and bf16 (bf16 skips under
# Triton's CPU interpreter, which computes it wrongly, and runs on the CUDA emulator).
RUNS = [
    ("torch", torch.float64),
    *((b, d) for b in BACKENDS for d in (torch.float32, torch.float16, torch.bfloat16)),
]


@pytest.mark.parametrize(
    "backend, dtype", RUNS, ids=[f"{b}-{harness.DTYPE_IDS[d]}" for b, d in RUNS]
)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_float64_reference(case: Case, dtype: torch.dtype, backend: str):
    run(case, backend, dtype)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@DTYPES
def test_token_splits_match_float64_reference(backend: str, dtype: torch.dtype):
    """Several token splits (their partials summed in order), ragged last split."""
    with sparse_ops.pinned_tokens_per_split(16):
        run(Case((77,), 50, 130, 37), backend, dtype)
        run(Case((150,), 24, 40, 300, layout="rows"), backend, dtype)


@pytest.mark.parametrize(
    "case",
    [Case((77,), 50, 130, 37), Case((77,), 50, 130, 300), Case((77,), 50, 130, "all")],
    ids=["SDDMM", "dense-GEMM", "every-entry"],
)
def test_reference_is_the_dense_definition_in_float64(case: Case):
    """The backward's dδ (the SDDMM below 1/32 of W, the dense GEMM from there) and rebuilt
    W' equal autograd of the dense definition and a loop over the entries."""
    m, index = masters(case), case.index()
    dense = index.numel() * reference._DENSE_FRACTION >= 50 * 130
    assert dense == (case.nnz != 37)  # each case takes the path its id names
    grad = torch.randn(77, 130, dtype=torch.float64)
    args = harness.leaves(m, torch.float64, lambda n: True)
    y = reference.sparse_delta_linear(index=index, **args)
    want = torch.autograd.grad(y, list(args.values()), grad)
    dx, dw, ddelta, dbias = reference.sparse_delta_backward(
        grad, m["x"], m["weight"], m["delta"], index, [True, True, True, True]
    )
    _, _, ddelta_sddmm, _ = reference.sparse_delta_backward(
        grad, m["x"], m["weight"], m["delta"], index, [False, False, True, False]
    )
    for got, ref in zip((dx, dw, ddelta, dbias), want, strict=True):
        assert rel_err(got, ref) < 1e-12
    assert rel_err(ddelta_sddmm, want[2]) < 1e-12
    # An explicit loop over the entries, as the spec writes it.
    rows, cols = index // 50, index % 50
    loop = torch.stack([(grad[:, r] * m["x"][:, c]).sum() for r, c in zip(rows, cols, strict=True)])
    assert rel_err(ddelta_sddmm, loop) < 1e-12


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@DTYPES
def test_kernels_are_deterministic(backend: str, dtype: torch.dtype):
    case = Case((300,), 33, 17, 100)
    m, index = masters(case), case.index()
    harness.require_backend(sparse_ops.SPARSE_DELTA, backend, m["x"].to(dtype))
    grad = torch.randn(300, 17, dtype=dtype)

    def once():
        args = harness.leaves(m, dtype, case.trains)
        with stitchops.use_backend(backend), sparse_ops.pinned_tokens_per_split(32):
            return harness.run_with_grads(
                lambda **a: stitchops.sparse_delta_linear(index=index, **a), args, grad
            )

    harness.assert_same_bits(once(), once())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend: str):
    case = Case((40,), 24, 30, 50)
    m, index = masters(case), case.index()
    harness.require_backend(sparse_ops.SPARSE_DELTA, backend, m["x"].float())
    grad = torch.randn(40, 30, dtype=torch.float64)
    args = harness.leaves(m, torch.float32, case.trains)
    strided = {k: harness.non_contiguous(v) for k, v in args.items()}
    want, want_grads = harness.run_with_grads(
        lambda **a: reference.sparse_delta_linear(index=index, **a), args, grad.float()
    )
    with harness.poisoned(backend):
        got, got_grads = harness.run_with_grads(
            lambda **a: stitchops.sparse_delta_linear(index=index, **a), strided, grad.float()
        )
    assert rel_err(got, want) < 1e-5
    for name in want_grads:
        assert rel_err(got_grads[name], want_grads[name]) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_index_and_delta(backend: str):
    """index and delta as every-other-element views (the kernels read them contiguously)."""
    harness.require_backend(sparse_ops.SPARSE_DELTA, backend, torch.empty(0, device=DEVICE))
    with torch.device(DEVICE):  # every tensor where the kernels run
        x, w = torch.randn(20, 6), torch.randn(5, 6)
        index = torch.tensor([0, 99, 7, 99, 29, 99])[::2]
        delta = harness.every_other_element(torch.randn(3)).requires_grad_()
        want = reference.sparse_delta_linear(x, w, delta.detach().clone(), index.clone())
        with harness.poisoned(backend):
            got = stitchops.sparse_delta_linear(x, w, delta, index)
            got.square().sum().backward()
        assert rel_err(got, want) < 1e-5 and torch.isfinite(delta.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_a_million_tokens(backend: str):
    """T = 2^19 tokens: the SDDMM's token splits and int64 token offsets, against float64."""
    harness.require_backend(sparse_ops.SPARSE_DELTA, backend, torch.empty(0, device=DEVICE))
    with torch.device(DEVICE):  # every tensor where the kernels run
        g = torch.Generator(DEVICE).manual_seed(4)
        x = torch.randn(1 << 19, 3, generator=g, dtype=torch.float64)
        w = torch.randn(2, 3, generator=g, dtype=torch.float64)
        grad = torch.randn(1 << 19, 2, generator=g, dtype=torch.float64)
        index = torch.tensor([0, 2, 4, 5])
        delta = torch.randn(4, generator=g, dtype=torch.float64)
        want = reference.sparse_delta_grad(grad, x, index)
        d32 = delta.float().requires_grad_()
        with harness.poisoned(backend):
            y = stitchops.sparse_delta_linear(x.float(), w.float(), d32, index)
            y.backward(grad.float())
        assert rel_err(d32.grad, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=["T0", "3x0"])
def test_empty_batch_and_no_entries(backend: str, lead):
    harness.require_backend(sparse_ops.SPARSE_DELTA, backend, torch.empty(0, device=DEVICE))
    with torch.device(DEVICE):  # every tensor where the kernels run
        w = torch.randn(7, 5)
        for index in (torch.tensor([3, 9]), torch.empty(0, dtype=torch.int64)):
            delta = torch.zeros(index.numel(), requires_grad=True)
            x = torch.randn(*lead, 5, requires_grad=True)
            with harness.poisoned(backend):
                y = stitchops.sparse_delta_linear(x, w, delta, index)
                y.sum().backward()
            assert y.shape == (*lead, 7)
            assert torch.equal(delta.grad, torch.zeros_like(delta))
        # nnz = 0 with tokens: the plain linear layer, a zero-length delta gradient.
        x = torch.randn(4, 5, requires_grad=True)
        delta = torch.zeros(0, requires_grad=True)
        with harness.poisoned(backend):
            y = stitchops.sparse_delta_linear(x, w, delta, torch.empty(0, dtype=torch.int64))
            y.sum().backward()
        assert rel_err(y, x @ w.t()) < 1e-6 and delta.grad.shape == (0,)


def test_frozen_weight_gets_no_dense_gradient(monkeypatch):
    """With W frozen the backward asks for no dW and builds none (no [OUT, IN] gradient)."""
    seen = []
    original = reference.sparse_delta_backward

    def spy(grad_y, x, weight, delta, index, needs, *rest):
        seen.append(list(needs))
        return original(grad_y, x, weight, delta, index, needs, *rest)

    monkeypatch.setattr(reference, "sparse_delta_backward", spy)
    w = torch.randn(8, 6)
    delta = torch.zeros(3, requires_grad=True)
    x = torch.randn(4, 6)
    stitchops.sparse_delta_linear(x, w, delta, torch.tensor([1, 7, 30])).sum().backward()
    assert seen == [[False, False, True, False]]


def test_nan_in_x_reaches_the_output_and_delta_gradient():
    x = torch.randn(4, 6)
    x[2, 1] = float("nan")
    delta = torch.zeros(2, requires_grad=True)
    y = stitchops.sparse_delta_linear(x, torch.randn(5, 6), delta, torch.tensor([1, 7]))
    y.sum().backward()
    assert y[2].isnan().all() and delta.grad[0].isnan() and delta.grad[1].isnan()


W_SHAPE = (5, 6)


def _args(**change):
    args = {
        "x": torch.randn(4, 6),
        "weight": torch.randn(*W_SHAPE),
        "delta": torch.randn(3),
        "index": torch.tensor([0, 7, 29]),
        "bias": None,
    }
    args.update(change)
    return args


BAD_INPUTS = {
    "unsorted": (
        _args(index=torch.tensor([7, 0, 29])),
        ValueError,
        r"strictly increasing.*index\[0\] = 7, index\[1\] = 0",
    ),
    "repeated": (_args(index=torch.tensor([0, 7, 7])), ValueError, "strictly increasing"),
    "negative": (_args(index=torch.tensor([-1, 7, 29])), ValueError, r"\[0, 30\).*from -1"),
    "past_end": (_args(index=torch.tensor([0, 7, 30])), ValueError, r"\[0, OUT·IN\) = \[0, 30\)"),
    "float_index": (_args(index=torch.tensor([0.0, 7.0, 29.0])), TypeError, "int64"),
    "int32_index": (_args(index=torch.tensor([0, 7, 29], dtype=torch.int32)), TypeError, "int64"),
    "list_index": (_args(index=[0, 7, 29]), TypeError, "index must be a torch.Tensor"),
    "length": (_args(delta=torch.randn(2)), ValueError, "index has 3 entries but delta has 2"),
    "2d_index": (_args(index=torch.tensor([[0, 7, 29]])), ValueError, r"index must be 1-D"),
    "in_features": (_args(x=torch.randn(4, 5)), ValueError, "IN = 6"),
    "bias_shape": (_args(bias=torch.randn(4)), ValueError, r"bias must have shape \(5,\)"),
    "dtype": (
        _args(delta=torch.randn(3, dtype=torch.float64)),
        TypeError,
        "delta has dtype torch.float64 but x has torch.float32",
    ),
    "int_x": (_args(x=torch.ones(4, 6, dtype=torch.int64)), TypeError, "x must be a floating"),
    "2d_delta": (_args(delta=torch.randn(3, 1)), ValueError, "delta must be 1-D"),
    "weight_1d": (_args(weight=torch.randn(30)), ValueError, "weight must be 2-D"),
    "index_device": (
        _args(index=torch.tensor([0, 7, 29], device="meta")),
        ValueError,
        "index is on meta",
    ),
}


@pytest.mark.parametrize("change", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_clear_errors(change):
    args, error, message = change
    harness.assert_rejected_untouched(stitchops.sparse_delta_linear, args, error, message)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend: str):
    harness.require_backend(sparse_ops.SPARSE_DELTA, backend, torch.empty(0, device=DEVICE))
    with torch.device(DEVICE):  # every tensor where the kernels run
        x, w = torch.randn(9, 6, requires_grad=True), torch.randn(5, 6)
        delta, bias = torch.randn(3, requires_grad=True), torch.randn(5, requires_grad=True)
        index = torch.tensor([0, 7, 29])
        harness.opcheck(
            backend, torch.ops.stitchops.sparse_delta_linear.default, x, w, delta, index, bias
        )
        harness.opcheck(
            backend,
            torch.ops.stitchops.sparse_delta_linear_backward.default,
            torch.randn(9, 5),
            x.detach(),
            w,
            delta.detach(),
            index,
            [True, False, True, True],
        )


class _Tuned(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from stitchops.nn import SparseDeltaLinear

        first, second = torch.nn.Linear(12, 20), torch.nn.Linear(20, 7)
        self.first = SparseDeltaLinear.from_linear(first, torch.tensor([0, 5, 100, 239]))
        self.second = SparseDeltaLinear.from_linear(second, torch.tensor([3, 44, 139]))
        with torch.no_grad():
            self.first.delta.normal_()
            self.second.delta.normal_()

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler: str, tmp_path, monkeypatch):
    harness.assert_compiles_fullgraph(
        _Tuned(), torch.randn(2, 9, 12), compiler, tmp_path, monkeypatch
    )


def test_flop_counter_counts_the_gemms_and_the_sddmm():
    from torch.utils.flop_counter import FlopCounterMode

    model, x = _Tuned(), torch.randn(10, 12)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    gemms = 2 * 10 * (12 * 20 + 20 * 7)
    # forward GEMMs, dx of the second layer (the first's x needs none), and both SDDMMs.
    assert counter.get_total_flops() == gemms + 2 * 10 * 20 * 7 + 2 * 10 * (4 + 3)
