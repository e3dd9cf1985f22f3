"""stitchops.lora_linear: every runnable backend vs a float64 reference, forward and gradients."""

from __future__ import annotations

from dataclasses import dataclass

import harness
import pytest
import torch
from harness import DEVICE, assert_accurate, poisoned, rel_err, run_with_grads
from op_tables import AotKernel, AotVariant, OpTests

import stitchops
from stitchops.ops import lora as lora_ops
from stitchops.reference import lora as reference

# What the test machinery every op shares takes from this op (tests/op_tables.py).
OP_TESTS = OpTests(
    name="lora_linear",
    kernels="lora",
    # A few shapes cover every kernel instantiation kind (odd sizes, several K steps, the
    # widest rank) in fp32 and bf16, and the forward's column groups (fp32 and fp16).
    # Under ASan: every cuda test but the float16 / bfloat16 runs of the main case table (the
    # tensor-core kernels keep their edge shapes, column groups and strided inputs there).
    asan_select="cuda and not (test_matches_float64_reference and (fp16 or bf16))",
    sanitizer_select={
        "memcheck": "cuda",
        "synccheck": "cuda and (fp32 or bf16 or column_groups)",
        "racecheck": "cuda and ((T77-IN50 or IN96 or R70) and (fp32 or bf16) or column_groups)",
    },
    aot_kernels=(
        AotKernel(
            "LOWRANK_MATMUL",
            dict(
                HAS_LORA=True,
                HAS_BIAS=True,
                HAS_BIAS2=True,
                STORE_S=True,
                SPLIT_K=False,
                BLOCK_R=16,
            ),
            ("stride_xk", "stride_wk", "stride_l1k", "stride_l2r", "stride_on"),
        ),
        AotKernel(
            "LORA_BACKWARD",
            dict(
                HAS_LORA=True, NEED_DX=True, NEED_DA=True, NEED_DB=True, NEED_BIAS=True, BLOCK_R=16
            ),
            ("stride_dyo", "stride_wi", "stride_ai", "stride_br", "stride_xi", "stride_dxi"),
        ),
    ),
    aot_variants=(
        AotVariant("forward no LoRA", "LOWRANK_MATMUL", dict(HAS_LORA=False, STORE_S=False)),
        AotVariant("forward rank 64", "LOWRANK_MATMUL", dict(BLOCK_R=64)),
        AotVariant("forward rank 128", "LOWRANK_MATMUL", dict(BLOCK_R=128)),
        AotVariant(
            "dW split-K",
            "LOWRANK_MATMUL",
            dict(HAS_LORA=False, HAS_BIAS=False, HAS_BIAS2=False, STORE_S=False, SPLIT_K=True),
            ("stride_xm", "stride_wn", "stride_on"),
        ),
        AotVariant(
            "backward no LoRA", "LORA_BACKWARD", dict(HAS_LORA=False, NEED_DA=False, NEED_DB=False)
        ),
        AotVariant("backward rank 128", "LORA_BACKWARD", dict(BLOCK_R=128)),
        AotVariant(
            "backward dx only", "LORA_BACKWARD", dict(NEED_DA=False, NEED_DB=False, NEED_BIAS=False)
        ),
        AotVariant("backward no dx", "LORA_BACKWARD", dict(NEED_DX=False)),
    ),
    aot_fallback_flags={"BLOCK_R": 128},  # the most shared memory: rank 128
    fp32_pointers=frozenset({"s_ptr", "da_part_ptr", "db_part_ptr", "dbias_part_ptr"}),
)


@dataclass(frozen=True)
class Case:
    lead: tuple[int, ...]
    in_f: int
    out_f: int
    rank: int
    bias: bool = True
    extra_bias: bool = False
    train_weight: bool = False
    frozen: tuple[str, ...] = ()  # arguments that need no gradient
    # W = 0 and no biases: y and dx are the low-rank term alone. Elsewhere that term is ~2%
    # of y (scale 2/r, B ~ r^-1/2), so an error in S = x·Aᵀ moves y 50× less than itself
    # and can hide inside bf16's tolerance.
    low_rank_only: bool = False

    @property
    def id(self) -> str:
        sizes = [("T", self.lead), ("IN", self.in_f), ("OUT", self.out_f)]
        sizes.append(("R", self.rank) if self.rank else ("noLoRA", ""))
        flags = {
            "bias": self.bias,
            "sbias": self.extra_bias,
            "trainW": self.train_weight,
            **{f"frozen_{name}": True for name in self.frozen},
            "lowrankonly": self.low_rank_only,
        }
        return harness.case_id(sizes, flags)

    def trains(self, name: str) -> bool:
        """Whether argument ``name`` needs a gradient in this case."""
        return (name != "weight" or self.train_weight) and name not in self.frozen


CASES = [
    Case((77,), 50, 130, 3, extra_bias=True),  # odd everything, two token ranges
    Case((2, 37), 40, 24, 5),  # 3-D input
    Case((64,), 32, 48, 16, bias=False, train_weight=True),
    Case((33,), 20, 70, 1, extra_bias=True, train_weight=True),  # rank 1
    Case((45,), 24, 40, 70),  # rank > 64: the widest rank block
    Case((150,), 40, 36, 8, extra_bias=True),  # several row blocks per token range
    Case((77,), 50, 130, 0, extra_bias=True, train_weight=True),  # SN-Net v1: no LoRA
    # Several K steps and column tiles, 16-byte-aligned rows (vector loads): ranks 32 and 40.
    Case((66,), 72, 64, 32, train_weight=True),
    Case((130,), 96, 200, 40, extra_bias=True),
    # Subsets of gradients: each flag of the backward on its own.
    Case((41,), 30, 50, 4, frozen=("lora_b",)),
    Case((41,), 30, 50, 4, extra_bias=True, frozen=("lora_a", "x")),
    Case((41,), 30, 50, 4, frozen=("x", "bias", "lora_a")),
    Case((41,), 30, 50, 4, frozen=("lora_a", "lora_b", "bias")),
    # The low-rank term on its own (every tile of x·Wᵀ a zero): odd sizes, then several K
    # steps, column tiles and row blocks.
    Case((77,), 50, 130, 3, bias=False, low_rank_only=True),
    Case((130,), 96, 200, 40, bias=False, low_rank_only=True),
]


def make_params(case: Case, dtype: torch.dtype, device: str = DEVICE) -> dict[str, torch.Tensor]:
    """Float64 masters of every argument (B non-zero so the low-rank path is exercised)."""
    shapes = {
        "x": ((*case.lead, case.in_f), 1.0),
        "weight": ((case.out_f, case.in_f), case.in_f**-0.5),
    }
    if case.bias:
        shapes["bias"] = ((case.out_f,), 1.0)
    if case.extra_bias:
        shapes["extra_bias"] = ((case.out_f,), 1.0)
    if case.rank:
        shapes["lora_a"] = ((case.rank, case.in_f), case.in_f**-0.5)
        shapes["lora_b"] = ((case.out_f, case.rank), case.rank**-0.5)
    p = harness.float64_masters(shapes, device=device)
    if case.low_rank_only:
        assert case.rank and not (case.bias or case.extra_bias or case.train_weight), case
        p["weight"].zero_()
    return p


def leaves(masters: dict, dtype: torch.dtype, case: Case) -> dict[str, torch.Tensor]:
    return harness.leaves(masters, dtype, case.trains)


def require_backend(backend: str, x: torch.Tensor, rank: int = 0) -> None:
    """Skip when ``backend`` cannot run lora_linear on ``x`` at ``rank`` here."""
    harness.require_backend(lora_ops.LORA, backend, x, limits=lora_ops.kernel_limits(rank))


def runnable_params(case: Case, backend: str) -> dict[str, torch.Tensor]:
    """Float64 masters of ``case``; skips when ``backend`` cannot run float32 here."""
    masters = make_params(case, torch.float32)
    require_backend(backend, masters["x"].float(), case.rank)
    return masters


def run(fn, args: dict, scale: float, grad: torch.Tensor):
    return run_with_grads(fn, args, grad, scale=scale)


# Extremes: single token / feature / output, the largest rank with a tiny IN, rank above IN,
# sizes one past a tile (16, 32, 64) and 8-element rows whose vector loads are partial.
EDGE_CASES = [
    Case((1,), 1, 1, 1, extra_bias=True, train_weight=True),
    Case((1,), 8, 1, 128),
    Case((5,), 1, 33, 2, train_weight=True),
    Case((17,), 130, 9, 17, extra_bias=True),
    Case((65,), 8, 16, 128, train_weight=True),
    Case((129,), 24, 72, 31),
    Case((3,), 200, 5, 64, extra_bias=True),
    Case((64,), 16, 65, 1, bias=False, train_weight=True),
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c.id)
def test_edge_shapes_match_float64_reference(case: Case, dtype: torch.dtype, backend: str):
    check_against_float64(case, dtype, backend)


try:
    from stitchops.kernels.lora import TILINGS
except ImportError:  # no triton: nothing to parametrise (the triton backend's reason says why)
    TILINGS = ()

# Sizes that straddle every block size of the autotune space: two row blocks of 128, partial
# column tiles of 128 and 256, column groups with tiles past the last column (forward 300
# and dW 150 columns), several K steps of 32 and 64, and the widest rank block.
TILING_CASES = [
    Case((200,), 150, 300, 24, extra_bias=True, train_weight=True),
    Case((130,), 72, 40, 128),
    Case((200,), 150, 300, 24, bias=False, low_rank_only=True),  # S reused across columns
]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: "{}x{}x{}-w{}-s{}-c{}".format(*t))
def test_every_triton_tiling_matches_float64_reference(tiling, dtype: torch.dtype):
    """Each tiling the autotuner may pick, pinned in turn, is exact at edge-straddling sizes.

    Elsewhere the Triton kernels run one tiling: the interpreter's small one on CPU, the
    GPU's fallback on a GPU (tests/conftest.py sets STITCHOPS_AUTOTUNE=0 there, to keep
    compile time down).
    """
    from stitchops.kernels import lora as kernels
    from triton.runtime.errors import OutOfResources, PTXASError

    too_big = []
    with kernels.SPACE.pinned(tiling):
        for case in TILING_CASES:
            try:
                check_against_float64(case, dtype, "triton")
            # Too much shared memory or registers for this GPU (never the interpreter): the
            # autotuner skips such a tiling the same way.
            except (OutOfResources, PTXASError) as err:
                too_big.append(f"{case.id}: {type(err).__name__}: {str(err)[:300]}")
    if too_big and tiling == kernels.SPACE.fallback(torch.cuda.current_device()):
        pytest.fail(f"this GPU's fallback tiling must compile and fit at every rank: {too_big}")
    if len(too_big) == len(TILING_CASES):
        pytest.skip(f"this tiling fits this GPU in neither case: {too_big}")


def test_autotune_switch_and_pinned_tiling(monkeypatch):
    """Which tiling a launch runs: pinned > STITCHOPS_AUTOTUNE=0's fallback > autotuner."""
    pytest.importorskip("triton")
    from stitchops.kernels import lora as kernels
    from stitchops.kernels import tuning

    space = kernels.SPACE
    assert {kernels.UNTUNED, kernels.SMALL} <= set(kernels.TILINGS)  # autotune space
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(tuning, "_FALLBACK_ONLY", False)
    assert space.launch_tiling(gpu) is None and space.launch_tiling(cpu) is None
    monkeypatch.setattr(tuning, "_FALLBACK_ONLY", True)
    assert space.launch_tiling(cpu) is None  # the interpreter: its one small tiling
    for shared_kb, picked in ((227, kernels.UNTUNED), (163, kernels.UNTUNED), (99, kernels.SMALL)):
        monkeypatch.setattr(tuning, "_max_shared_memory", lambda index, kb=shared_kb: kb * 1024)
        assert space.launch_tiling(gpu) == picked, shared_kb

    pinned = tuning.Tiling(64, 64, 32, 4, 2, column_tiles=1)
    with pytest.raises(RuntimeError), kernels.pinned_tiling((64, 64, 32, 4, 2)):  # a plain tuple
        assert space.launch_tiling(gpu) == space.launch_tiling(cpu) == pinned
        with kernels.pinned_tiling(kernels.SMALL):
            assert space.launch_tiling(cpu) == kernels.SMALL
        assert space.launch_tiling(cpu) == pinned
        raise RuntimeError("a failing call inside the block")
    assert space.launch_tiling(cpu) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert space.search() == (kernels.INTERPRETED,)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert space.search() == kernels.TILINGS
    # column_tiles is the forward's alone: the backward tries each other tiling once.
    backward = kernels.LORA_BACKWARD.tilings()
    assert len(backward) == len({t[:5] for t in kernels.TILINGS}) < len(kernels.TILINGS)
    assert all(t.column_tiles == 1 for t in backward)
    assert kernels.LOWRANK_MATMUL.tilings() == kernels.TILINGS
    wide = max(kernels.TILINGS, key=lambda t: t.column_tiles)
    forward_config = kernels.LOWRANK_MATMUL.config(wide)
    assert forward_config.kwargs["COLUMN_TILES"] == wide.column_tiles > 1
    assert "COLUMN_TILES" not in kernels.LORA_BACKWARD.config(wide).kwargs


# The CUDA forward's column groups (csrc/lora.h, column_tiles), pinned: OUT 200 is four
# 64-wide tiles (the last partial), so 3 tiles per block leave a group of one; IN 72 takes
# three K steps. Ranks 24 and 64 are grouped in both kernels; rank 100 only in fp32 (the
# tensor-core kernel has no room to keep S there and ignores the pin).
COLUMN_GROUP_CASES = [
    Case((40,), 72, 200, 24, extra_bias=True, train_weight=True),
    Case((40,), 40, 200, 64),
    Case((40,), 40, 200, 100),
]


# fp32 runs lora.cu's SIMT kernel, fp16 lora_tc.cu's (bf16 is the same template).
@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tiles", [2, 3])
def test_cuda_column_groups_match_float64_reference(tiles: int, dtype: torch.dtype, backend):
    """Exact, and bit for bit the output and gradients of one tile per block.

    (S is computed in the same order either way. The bitwise check also sees errors in the
    low-rank term, 2% of y here, that bf16's tolerance would let through.)
    """
    require_backend(backend, torch.zeros(1, dtype=dtype, device=DEVICE), 16)
    for case in COLUMN_GROUP_CASES:
        with lora_ops.pinned_column_tiles(tiles):
            check_against_float64(case, dtype, backend)
        masters = make_params(case, dtype)
        grad = torch.randn(*case.lead, case.out_f, dtype=dtype, device=DEVICE)
        results = []
        for pinned in (1, tiles):
            with lora_ops.pinned_column_tiles(pinned), stitchops.use_backend(backend):
                results.append(run(stitchops.lora_linear, leaves(masters, dtype, case), 0.5, grad))
        harness.assert_same_bits(*results)


@pytest.mark.parametrize("backend", ["cuda"])
def test_cuda_column_tiles_choice(backend: str):
    """Grouped where the grid stays large (8 blocks per SM: written for 132-148 SMs)."""
    require_backend(backend, torch.zeros(1, device=DEVICE), 16)
    from stitchops import _cuda

    choose = _cuda._C.forward_column_tiles
    pinned_column_tiles = lora_ops.pinned_column_tiles
    assert choose(256 * 197, 1024, 16) == 4  # the acceptance shape: 3,152 blocks
    assert choose(64 * 197, 1024, 16) == 2
    assert choose(256 * 197, 1024, 0) == 1  # no low-rank term: nothing to reuse
    assert choose(77, 130, 3) == 1 and choose(256 * 197, 64, 16) == 1
    with pinned_column_tiles(3):
        assert choose(77, 130, 3) == choose(256 * 197, 1024, 0) == 3
        with pinned_column_tiles(2):  # pins nest: the inner block's exit restores 3
            assert choose(77, 130, 3) == 2
        assert choose(77, 130, 3) == 3
        with pytest.raises(ValueError, match=r"column tiles must be in 0\.\.64, got -1"):
            _cuda._C.pin_column_tiles(-1)
        assert choose(77, 130, 3) == 3  # a rejected pin leaves the current one
    assert choose(77, 130, 3) == 1
    assert choose(256 * 197, 1024, 16) == 4


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_float64_reference(case: Case, dtype: torch.dtype, backend: str):
    check_against_float64(case, dtype, backend)


def check_against_float64(case: Case, dtype: torch.dtype, backend: str) -> None:
    """Output and every gradient within the accuracy rule of harness.assert_accurate."""
    masters = make_params(case, dtype)
    require_backend(backend, masters["x"].to(dtype), case.rank)
    scale = 2.0 / max(case.rank, 1)
    grad64 = torch.randn(*case.lead, case.out_f, dtype=torch.float64).to(DEVICE)
    harness.check_against_float64(
        stitchops.lora_linear,
        reference.lora_linear,
        masters,
        dtype,
        case.trains,
        backend,
        grad64,
        scale=scale,
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_explicit_backward_is_autograd_of_the_definition(case: Case):
    """The torch backend's hand-written gradients equal autograd's in float64."""
    masters = make_params(case, torch.float64)
    grad = torch.randn(*case.lead, case.out_f, dtype=torch.float64).to(DEVICE)
    ref, ref_grads = run(reference.lora_linear, leaves(masters, torch.float64, case), 0.7, grad)
    with stitchops.use_backend("torch"):
        y, grads = run(stitchops.lora_linear, leaves(masters, torch.float64, case), 0.7, grad)
    assert rel_err(y, ref) < 1e-12
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-12, name


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_x(backend: str, layout: str):
    case = Case((37,), 40, 52, 4, extra_bias=True)
    masters = runnable_params(case, backend)
    x = masters["x"].float()
    if layout == "transposed":
        x_nc = x.t().contiguous().t()  # strides (1, T)
    else:
        x_nc = torch.zeros(37, 80, device=DEVICE)[:, ::2]
        x_nc.copy_(x)
    assert not x_nc.is_contiguous()
    args = leaves(masters, torch.float32, case)
    grad = torch.randn(37, 52, device=DEVICE)
    expected, expected_grads = run(reference.lora_linear, args, 0.5, grad)
    args["x"] = x_nc.requires_grad_()
    with poisoned(backend):
        y, grads = run(stitchops.lora_linear, args, 0.5, grad)
    assert rel_err(y, expected) < 1e-5
    for name in expected_grads:
        assert rel_err(grads[name], expected_grads[name]) < 1e-5, name


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_non_contiguous_everything_in_half_precision(backend: str):
    """fp16 with every tensor strided (no 16-byte vector copies anywhere), every gradient."""
    case = Case((37,), 40, 52, 4, extra_bias=True, train_weight=True)
    dtype = torch.float16
    masters = make_params(case, dtype)
    require_backend(backend, masters["x"].to(dtype), case.rank)
    grad64 = torch.randn(37, 52, dtype=torch.float64).to(DEVICE)
    ref64, grads64 = run(reference.lora_linear, leaves(masters, torch.float64, case), 0.5, grad64)
    ref_dt, grads_dt = run(
        reference.lora_linear, leaves(masters, dtype, case), 0.5, grad64.to(dtype)
    )
    args = {name: harness.non_contiguous(t) for name, t in leaves(masters, dtype, case).items()}
    with poisoned(backend):
        y, grads = run(stitchops.lora_linear, args, 0.5, grad64.to(dtype))
    assert_accurate("y", y, ref_dt, ref64)
    assert set(grads) == set(grads64)
    for name in grads64:
        assert_accurate(f"d{name}", grads[name], grads_dt[name], grads64[name])


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_strided_biases_and_factors(backend: str):
    case = Case((21,), 24, 30, 3, extra_bias=True)
    masters = runnable_params(case, backend)
    args = {k: v.float() for k, v in masters.items()}
    strided = {
        "bias": torch.zeros(60, device=DEVICE)[::2],
        "extra_bias": torch.zeros(30, 2, device=DEVICE)[:, 1],
        "lora_a": torch.zeros(24, 3, device=DEVICE).t(),
        "lora_b": torch.zeros(3, 30, device=DEVICE).t(),
    }
    for name, view in strided.items():
        view.copy_(args[name])
        assert not view.is_contiguous()
    expected = reference.lora_linear(**args, scale=0.5)
    with poisoned(backend):
        y = stitchops.lora_linear(**{**args, **strided}, scale=0.5)
    assert rel_err(y, expected) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=["T0", "3x0"])
def test_empty_batch(backend: str, lead: tuple[int, ...]):
    case = Case(lead, 20, 30, 4, extra_bias=True, train_weight=True)
    masters = runnable_params(case, backend)
    args = leaves(masters, torch.float32, case)
    with poisoned(backend):
        y = stitchops.lora_linear(**args, scale=0.5)
        assert y.shape == (*lead, 30)
        y.sum().backward()
    assert args["x"].grad.shape == args["x"].shape
    for name in ("weight", "bias", "extra_bias", "lora_a", "lora_b"):
        grad = args[name].grad
        assert grad is not None and grad.shape == args[name].shape, name
        assert torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_inference_saves_nothing_and_matches(backend: str):
    case = Case((19,), 24, 40, 4, extra_bias=True)
    masters = runnable_params(case, backend)
    args = {k: v.float() for k, v in masters.items()}
    expected = reference.lora_linear(**args, scale=0.5)
    with torch.no_grad(), poisoned(backend):
        y, s = torch.ops.stitchops.lora_linear(
            args["x"],
            args["weight"],
            args["bias"],
            args["lora_a"],
            args["lora_b"],
            0.5,
            args["extra_bias"],
            False,
        )
    assert s.numel() == 0
    assert rel_err(y, expected) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernels_are_deterministic(backend: str, dtype: torch.dtype):
    """No atomics: two runs give the same bits (on the emulator, in different block orders)."""
    case = Case((150,), 40, 36, 8, extra_bias=True, train_weight=True)  # several token ranges
    masters = make_params(case, dtype)
    require_backend(backend, masters["x"].to(dtype), case.rank)
    grad = torch.randn(*case.lead, case.out_f, dtype=torch.float64).to(DEVICE, dtype)
    runs = []
    for _ in range(2):
        with stitchops.use_backend(backend):
            runs.append(run(stitchops.lora_linear, leaves(masters, dtype, case), 0.5, grad))
    assert len(runs[0][1]) == 6
    harness.assert_same_bits(*runs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend: str):
    case = Case((13,), 20, 24, 3, extra_bias=True, train_weight=True)
    masters = runnable_params(case, backend)
    a = leaves(masters, torch.float32, case)
    fwd_args = (
        a["x"],
        a["weight"],
        a["bias"],
        a["lora_a"],
        a["lora_b"],
        0.5,
        a["extra_bias"],
        True,
    )
    harness.opcheck(backend, torch.ops.stitchops.lora_linear.default, *fwd_args)
    with stitchops.use_backend(backend):
        _, s = torch.ops.stitchops.lora_linear(*fwd_args)
    bwd_args = (
        torch.randn(13, 24, device=DEVICE),
        a["x"].detach(),
        a["weight"].detach(),
        a["lora_a"].detach(),
        a["lora_b"].detach(),
        s.detach(),
        0.5,
        [True] * 5,
    )
    harness.opcheck(backend, torch.ops.stitchops.lora_linear_backward.default, *bwd_args)
    # Each gradient on its own: the others come back empty.
    for i, name in enumerate(reference.GRADIENTS):
        needs = [j == i for j in range(len(reference.GRADIENTS))]
        harness.opcheck(
            backend, torch.ops.stitchops.lora_linear_backward.default, *bwd_args[:-1], needs
        )
        with stitchops.use_backend(backend):
            grads = torch.ops.stitchops.lora_linear_backward(*bwd_args[:-1], needs)
        assert [g.numel() > 0 for g in grads] == needs, name


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.front = torch.nn.Linear(20, 24)
        self.stitch = stitchops.nn.StitchingLayer(24, 36, rank=4, num_stitch_biases=3)
        self.stitch.active_stitch = 1
        with torch.no_grad():
            self.stitch.lora_B.normal_()
            self.stitch.stitch_bias.normal_()

    def forward(self, x):
        return torch.nn.functional.gelu(self.stitch(self.front(x)))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler: str, tmp_path, monkeypatch):
    """No graph break (fullgraph=True) and the same values and gradients as eager."""
    model = _Block().to(DEVICE)
    assert not model.stitch.weight.requires_grad  # frozen by rank > 0
    x = torch.randn(2, 9, 20, device=DEVICE)
    harness.assert_compiles_fullgraph(model, x, compiler, tmp_path / "inductor", monkeypatch)


def _good_args():
    return {
        "x": torch.randn(5, 8),
        "weight": torch.randn(6, 8),
        "bias": torch.randn(6),
        "lora_a": torch.randn(2, 8),
        "lora_b": torch.randn(6, 2),
        "scale": 0.5,
        "extra_bias": torch.randn(6),
    }


BAD_INPUTS = {
    "x-not-tensor": ({"x": [[1.0] * 8]}, TypeError, "x must be a torch.Tensor"),
    "x-int": ({"x": torch.ones(5, 8, dtype=torch.int64)}, TypeError, "x must be a floating"),
    "weight-1d": ({"weight": torch.randn(8)}, ValueError, "weight must be 2-D"),
    "zero-out": (
        {
            "weight": torch.randn(0, 8),
            "bias": None,
            "extra_bias": None,
            "lora_b": torch.randn(0, 2),
        },
        ValueError,
        "must have OUT, IN >= 1",
    ),
    "in-mismatch": ({"x": torch.randn(5, 7)}, ValueError, "weight .OUT, IN. has IN = 8"),
    "bias-shape": ({"bias": torch.randn(5)}, ValueError, "bias must have shape"),
    "extra-bias-shape": ({"extra_bias": torch.randn(6, 1)}, ValueError, "extra_bias must be 1-D"),
    "a-without-b": ({"lora_b": None}, ValueError, "lora_a and lora_b must be given together"),
    "rank-mismatch": ({"lora_b": torch.randn(6, 3)}, ValueError, "lora_b has rank 3"),
    "lora-a-in": ({"lora_a": torch.randn(2, 7)}, ValueError, "lora_a must have shape"),
    "lora-b-out": ({"lora_b": torch.randn(5, 2)}, ValueError, "lora_b must have shape"),
    "mixed-dtype": (
        {"weight": torch.randn(6, 8, dtype=torch.float64)},
        TypeError,
        "weight has dtype torch.float64 but x has torch.float32",
    ),
    "int-lora": (
        {"lora_a": torch.ones(2, 8, dtype=torch.int32)},
        TypeError,
        "lora_a must be a floating",
    ),
    "mixed-device": ({"bias": torch.randn(6, device="meta")}, ValueError, "bias is on meta"),
    "scale-bool": ({"scale": True}, TypeError, "scale must be a Python float"),
    "scale-nan": ({"scale": float("nan")}, ValueError, "scale must be finite"),
}


@pytest.mark.parametrize("change", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_clear_errors(change):
    updates, error, message = change
    harness.assert_rejected_untouched(
        stitchops.lora_linear, {**_good_args(), **updates}, error, message
    )


def test_integer_scale_is_accepted():
    args = {**_good_args(), "scale": 2}
    expected = reference.lora_linear(**{**args, "scale": 2.0})
    assert rel_err(stitchops.lora_linear(**args), expected) < 1e-6


def test_flop_counter_sees_the_op_like_the_unfused_code():
    """FlopCounterMode counts stitchops::lora_linear (forward and backward) exactly as the
    unfused PyTorch code it replaces, so model FLOP counts stay right."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 7, 12, requires_grad=True)
    w = torch.randn(20, 12)
    a = torch.randn(3, 12, requires_grad=True)
    b = torch.randn(20, 3, requires_grad=True)
    counts = []
    for fn in (
        lambda: stitchops.lora_linear(x, w, None, a, b, 0.5),
        lambda: x @ w.t() + 0.5 * ((x @ a.t()) @ b.t()),
    ):
        with FlopCounterMode(display=False) as counter:
            fn().sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
