"""stitchops.token_cluster / token_reconstruct (Expedit): the reference against a float64
dense formulation with explicit candidate lists, the official numerics against a float64
formulation of the official code at realistic token scales, the registered ops against the
reference (forward and every gradient, weights included), float32 accuracy against the
official float32, topk mode, affinity gradients, modules, bad inputs, compile."""

from __future__ import annotations

import harness
import pytest
import torch
import torch.nn.functional as F
from harness import rel_err
from official_expedit import dense_candidates, official_cluster, official_topk, realistic_tokens
from op_tables import AotPlain, OpTests

import stitchops
from stitchops.nn import TokenClustering, TokenReconstruction
from stitchops.ops import token_cluster as cluster_ops
from stitchops.reference import token_cluster as reference

# What the test machinery every op shares takes from this op (tests/op_tables.py).
_BANDS = {
    name: "*i32"
    for name in (
        "pixel_start_ptr",
        "pixel_count_ptr",
        "centre_start_ptr",
        "centre_count_ptr",
        "cell_column_ptr",
        "column_start_ptr",
    )
}
OP_TESTS = OpTests(
    name="token_cluster",
    kernels="token_cluster",
    # Small band kernels: every cuda test under ASan and memcheck, a few under the others.
    asan_select="cuda",
    sanitizer_select={
        "memcheck": "cuda",
        "synccheck": "cuda and 13x17",
        "racecheck": "cuda and (13x17-5x7-5-5 or deterministic)",
    },
    aot_plain=(
        AotPlain("_affinity_kernel", {"BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_C": 32}),
        AotPlain(
            "_apply_kernel", {"ACCUMULATE": True, "BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_D": 32}
        ),
        AotPlain("_gather_kernel", {"M_STEP": True, "BLOCK_W": 1, "BLOCK_P": 32, "BLOCK_C": 32}),
        AotPlain("_band_dot_kernel", {"BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_D": 32}),
    ),
    fp32_pointers=frozenset(
        {
            "s_ptr",
            "mean_ptr",
            "a_ptr",
            "y_ptr",
            "prev_ptr",
            "out_ptr",
            "totals_ptr",
            "dy_ptr",
            "v_ptr",
            "g_ptr",
        }
    ),
    arg_types={**_BANDS, "inv_temperature": "fp32", "total_floor": "fp32"},
)

# ------------------------------------------------------------ float64 dense formulation


def dense_cluster(x, grid, window, iters, temperature):
    """The spec on [N, M] matrices in float64: softmax over the allowed centres, then
    s = (Aᵀx) / (Aᵀ1), a centre with zero total keeping its value."""
    b, height, width, c = x.shape
    allowed = dense_candidates((height, width), grid, window)
    flat = x.reshape(b, -1, c)
    s = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1).reshape(b, -1, c)
    for _ in range(iters):
        d = (flat[:, :, None] - s[:, None]).square().sum(-1)
        a = torch.softmax((-d / temperature).masked_fill(~allowed, float("-inf")), dim=-1)
        totals = a.sum(1)
        new = (a.transpose(1, 2) @ flat) / totals.clamp_min(1e-300)[..., None]
        s = torch.where((totals == 0)[..., None], s, new)
    return s.reshape(b, *grid, c)


def dense_reconstruct(x, centres, values, window, temperature):
    b, height, width, c = x.shape
    grid = centres.shape[1:3]
    allowed = dense_candidates((height, width), tuple(grid), window)
    s, v = centres.reshape(b, -1, c), values.reshape(b, -1, values.shape[-1])
    d = (x.reshape(b, -1, c)[:, :, None] - s[:, None]).square().sum(-1)
    weights = torch.softmax((-d / temperature).masked_fill(~allowed, float("-inf")), dim=-1)
    return (weights @ v).reshape(b, height, width, -1)


def dense_topk(x, centres, values, k, temperature, shift=True):
    """The official reconstruction in float64 (``shift=False``: exp(−d/τ) as it writes it)."""
    b, height, width, c = x.shape
    s, v = centres.reshape(b, -1, c), values.reshape(b, -1, values.shape[-1])
    d = (x.reshape(b, -1, c)[:, :, None] - s[:, None]).square().sum(-1)
    e = torch.exp(
        -(d - d.min(-1, keepdim=True).values) / temperature if shift else -d / temperature
    )
    kth = e.topk(k, dim=-1).values[..., -1:]
    e = torch.where(e >= kth, e, 0.0)
    return ((e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ v).reshape(b, height, width, -1)


SHAPES = [((13, 17), (5, 7)), ((40, 40), (28, 28)), ((46, 46), (28, 28))]


def tokens(size, channels=6, batch=2, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *size, channels, generator=g, dtype=torch.float64) * scale


def test_cells_follow_pytorchs_nearest_rule():
    cells = reference.cell_index(46, 28)
    assert int(cells[23]) == 13 != (23 * 28) // 46  # where floor(y·h/H) differs


@pytest.mark.parametrize("window", [3, 5, 7])
@pytest.mark.parametrize("iters", [1, 5])
@pytest.mark.parametrize("size, grid", SHAPES, ids=lambda v: "x".join(map(str, v)))
def test_reference_matches_the_dense_formulation(size, grid, window, iters):
    x = tokens(size)
    s = reference.token_cluster(x, grid, window, iters, 50.0)
    assert rel_err(s, dense_cluster(x, grid, window, iters, 50.0)) < 1e-10
    v = torch.randn(2, *grid, 3, dtype=torch.float64)
    y = reference.token_reconstruct(x, s, v, window, 50.0)
    assert rel_err(y, dense_reconstruct(x, s, v, window, 50.0)) < 1e-10


def losing_centre_map() -> torch.Tensor:
    """[1, 4, 12, 1] in three 4×4 cells: +10, then a ±10 checkerboard (pooled to 0), then
    −10. At a tiny τ the middle cell's pixels all pick a neighbour's centre (0 away, not
    100), so the middle centre is left with no affinity at all."""
    x = torch.full((1, 4, 12, 1), 10.0, dtype=torch.float64)
    x[0, :, 8:] = -10.0
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2 - 1
    x[0, :, 4:8, 0] = 10.0 * checker
    return x + 0.01 * torch.randn(
        1, 4, 12, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )


def test_a_centre_that_loses_every_pixel_keeps_its_value():
    x = losing_centre_map()
    s = reference.token_cluster(x, (1, 3), 3, 3, 1e-3)
    assert rel_err(s, dense_cluster(x, (1, 3), 3, 3, 1e-3)) < 1e-10
    first = reference.initial_centres(x, (1, 3))
    assert torch.equal(s[0, 0, 1], first[0, 0, 1])  # kept, where the official code zeroes it


def test_official_numerics_zero_a_centre_that_loses_every_pixel():
    x = losing_centre_map()
    s = reference.token_cluster(x, (1, 3), 3, 3, 1e-3, numerics="official")
    assert rel_err(s, official_cluster(x, (1, 3), 3, 3, 1e-3)) < 1e-10
    assert torch.equal(s[0, 0, 1], torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("squared_norm", [1.0, 1e2, 1e3, 1e4])
def test_official_numerics_match_the_official_code_at_realistic_scales(squared_norm):
    """Centres and top-k reconstruction at ViT-like token scales (Expedit-Segmenter's grid
    28×28 of 40×40, window 5, 5 iterations, τ 50, k 20): our official numerics against the
    float64 formulation of the official code; at 10⁴ its clamp and floor act, and the exact
    numerics differ from it there."""
    x = realistic_tokens((40, 40), 32, squared_norm)
    want = official_cluster(x, (28, 28), 5, 5, 50.0)
    got = stitchops.token_cluster(x, (28, 28), numerics="official")
    assert rel_err(got, want) < 1e-10
    values = torch.randn(1, 28, 28, 5, dtype=torch.float64)
    y = stitchops.token_reconstruct(x, got, values, mode="topk", k=20, numerics="official")
    assert rel_err(y, official_topk(x, want, values, 20, 50.0)) < 1e-10
    if squared_norm < 1e4:
        return
    flat = x.reshape(1, -1, 32)
    _, history = reference._iterate(
        flat, (28, 28), 40, reference.bands((40, 40), (28, 28), 5), 50.0, 5, True, "official"
    )
    assert any(((t > 0) & (t < 1e-16)).any() for _, t in history)  # the clamp acts
    floored = [
        f for _, _, f in reference.topk_chunks(flat, got.reshape(1, -1, 32), 20, 50.0, "official")
    ]
    assert torch.cat(floored, 1).any()  # and the floor
    exact = stitchops.token_cluster(x, (28, 28))
    assert rel_err(exact, want) > 1e-3
    y_exact = stitchops.token_reconstruct(x, got, values, mode="topk", k=20)
    assert rel_err(y_exact, y) > 1e-3


def test_official_topk_in_float32_underflows_as_the_official_code():
    """Tokens far from every centre: exp(−d/50) is 0 in float32 for every centre, and the
    official float32 rows are zero; the exact numerics normalise them."""
    x = tokens((13, 17), channels=6, scale=1.0)
    centres = reference.token_cluster(x, (5, 7), 5, 2, 50.0)
    far = (x + 60.0).float()
    values = torch.randn(2, 5, 7, 3)
    official = stitchops.token_reconstruct(
        far, centres.float(), values, mode="topk", numerics="official"
    )
    want = official_topk(far, centres.float(), values, 20, 50.0)
    assert (want == 0).all() and torch.equal(official, want)
    exact = stitchops.token_reconstruct(far, centres.float(), values, mode="topk")
    assert rel_err(exact, dense_topk(x + 60.0, centres, values.double(), 20, 50.0)) < 1e-4


# ------------------------------------------------------------ the registered ops


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
BACKENDS = pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])


def require(backend: str, dtype: torch.dtype, mode: str = "local") -> None:
    probe = torch.empty(1, dtype=dtype, device=harness.DEVICE)
    harness.require_backend(
        cluster_ops.TOKEN_CLUSTER, backend, probe, limits=cluster_ops.kernel_limits(mode)
    )


def _case_id(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


# (map, grid, window, iterations): odd sizes, the paper's shape, the interpolation quirk.
CLUSTER_CASES = [
    ((13, 17), (5, 7), 5, 5),
    ((13, 17), (5, 7), 3, 1),
    ((40, 40), (28, 28), 5, 1),
    ((46, 46), (28, 28), 7, 1),
    ((9, 30), (2, 11), 11, 2),
]


@BACKENDS
@DTYPES
@pytest.mark.parametrize("size, grid, window, iters", CLUSTER_CASES, ids=_case_id)
def test_cluster_op_matches_float64_reference(size, grid, window, iters, dtype, backend):
    require(backend, dtype)
    batch = 1 if size[0] * size[1] > 1000 else 2  # the interpreter runs programs one by one
    masters = {"x": tokens(size, scale=1.0, batch=batch).to(harness.DEVICE)}
    grad = torch.randn(batch, *grid, 6, dtype=torch.float64, device=harness.DEVICE)
    harness.check_against_float64(
        lambda x: stitchops.token_cluster(x, grid, window=window, iters=iters, temperature=5.0),
        lambda x: reference.token_cluster(x, grid, window, iters, 5.0),
        masters,
        dtype,
        lambda name: True,
        backend,
        grad,
    )


RECONSTRUCT_CASES = [
    ("torch", "local", "exact"),
    ("torch", "topk", "exact"),
    ("torch", "topk", "official"),
    ("triton", "local", "exact"),
    ("cuda", "local", "exact"),
]


@DTYPES
@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight_grad", "values_only"])
@pytest.mark.parametrize(
    "backend, mode, numerics", RECONSTRUCT_CASES, ids=["-".join(case) for case in RECONSTRUCT_CASES]
)
def test_reconstruct_op_matches_float64_reference(mode, numerics, weight_grad, dtype, backend):
    """Output and the gradients of values, x and the centres (through the weights, as the
    official code) or of values only. (The kernels refuse topk mode:
    test_kernels_refuse_topk_with_a_reason.)"""
    require(backend, dtype, mode)
    x = tokens((13, 17), scale=1.0).to(harness.DEVICE)
    centres = reference.token_cluster(x, (5, 7), 5, 2, 5.0)
    values = torch.randn(2, 5, 7, 4, dtype=torch.float64, device=harness.DEVICE)
    masters = {"x": x, "centres": centres, "values": values}
    grad = torch.randn(2, 13, 17, 4, dtype=torch.float64, device=harness.DEVICE)

    def reference_fn(x, centres, values):
        if not weight_grad:
            x, centres = x.detach(), centres.detach()
        return reference.token_reconstruct(x, centres, values, 5, 5.0, mode, 6, numerics)

    grads = harness.check_against_float64(
        lambda **a: stitchops.token_reconstruct(
            **a, temperature=5.0, mode=mode, k=6, numerics=numerics, weight_grad=weight_grad
        ),
        reference_fn,
        masters,
        dtype,
        lambda name: weight_grad or name == "values",
        backend,
        grad,
    )
    assert set(grads) == ({"x", "centres", "values"} if weight_grad else {"values"})


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bf16_against_float64(backend):
    """bf16 tokens (fp32 math inside): a clustering and a reconstruction. Triton's CPU
    interpreter computes bf16 wrongly (skipped there); the CUDA emulator runs it."""
    require(backend, torch.bfloat16)
    x = tokens((13, 17), scale=1.0).to(harness.DEVICE)
    f64 = {"dtype": torch.float64, "device": harness.DEVICE}
    harness.check_against_float64(
        lambda x: stitchops.token_cluster(x, (5, 7), window=5, iters=2, temperature=5.0),
        lambda x: reference.token_cluster(x, (5, 7), 5, 2, 5.0),
        {"x": x},
        torch.bfloat16,
        lambda name: True,
        backend,
        torch.randn(2, 5, 7, 6, **f64),
    )
    masters = {
        "x": x,
        "centres": reference.token_cluster(x, (5, 7), 5, 2, 5.0),
        "values": torch.randn(2, 5, 7, 4, **f64),
    }
    harness.check_against_float64(
        lambda **a: stitchops.token_reconstruct(**a, temperature=5.0, weight_grad=False),
        lambda **a: reference.token_reconstruct(**a, window=5, temperature=5.0),
        masters,
        torch.bfloat16,
        lambda name: name == "values",
        backend,
        torch.randn(2, 13, 17, 4, **f64),
    )


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernels_are_deterministic(backend):
    require(backend, torch.float32)
    x = tokens((13, 17), scale=1.0).float().to(harness.DEVICE).requires_grad_()
    grad = torch.randn(2, 5, 7, 6, device=harness.DEVICE)

    def once():
        with stitchops.use_backend(backend):
            return harness.run_with_grads(
                lambda x: stitchops.token_cluster(x, (5, 7), temperature=5.0), {"x": x}, grad
            )

    harness.assert_same_bits(once(), once())


@BACKENDS
def test_cluster_backward_walks_back_through_kept_centres(backend):
    """Near-hard assignments leave centres with no pixels: their gradient goes to the
    previous iteration, and at the start to the pooling; against autograd of the reference."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    require(backend, dtype)
    x = losing_centre_map().to(dtype=dtype, device=harness.DEVICE).requires_grad_()
    g = torch.randn(1, 1, 3, 1, dtype=torch.float64).to(dtype=dtype, device=harness.DEVICE)
    with stitchops.use_backend(backend):
        centres = stitchops.token_cluster(x, (1, 3), window=3, iters=3, temperature=1e-3)
        (got,) = torch.autograd.grad(centres, x, g, retain_graph=True)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.token_cluster(x64, (1, 3), 3, 3, 1e-3), x64, g.double())
    assert rel_err(got, want) < (1e-12 if backend == "torch" else 1e-5)
    # The kept centre's gradient alone reaches its own cell through the pooling, g / 16 a
    # pixel, and nothing else.
    only_middle = torch.zeros_like(g)
    only_middle[0, 0, 1] = 0.8
    with stitchops.use_backend(backend):
        (middle,) = torch.autograd.grad(centres, x, only_middle)
    expected = torch.zeros_like(middle)
    expected[0, :, 4:8] = 0.8 / 16
    assert torch.allclose(middle, expected, atol=1e-7)


def test_affinity_gradients_by_gradcheck():
    x = tokens((6, 7), channels=3, batch=1, scale=0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: stitchops.token_cluster(
            t, (3, 4), window=3, iters=2, temperature=1.0, affinity_grad=True
        ),
        (x,),
    )
    centres = reference.token_cluster(x.detach(), (3, 4), 3, 2, 1.0).requires_grad_()
    values = torch.randn(1, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    for mode, numerics in (("local", "exact"), ("topk", "exact"), ("topk", "official")):
        assert torch.autograd.gradcheck(
            lambda a, b, c, mode=mode, numerics=numerics: stitchops.token_reconstruct(
                a, b, c, window=3, temperature=1.0, mode=mode, k=5, numerics=numerics
            ),
            (x, centres, values),
        )


def test_weight_gradients_where_the_official_norm_floor_acts():
    """Rows whose official norm is below 1e−12 are e / 1e−12: their weight gradient drops
    the normalisation term; against autograd of the official formulation."""
    x = (tokens((6, 7), channels=3, batch=1, scale=0.5) + 6.0).requires_grad_()
    centres = reference.token_cluster(x.detach() - 6.0, (3, 4), 3, 2, 1.0).requires_grad_()
    values = torch.randn(1, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    y = stitchops.token_reconstruct(
        x, centres, values, window=3, temperature=1.0, mode="topk", k=5, numerics="official"
    )
    want = official_topk(x, centres, values, 5, 1.0)
    assert rel_err(y, want) < 1e-10
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, centres, values), g)
    expected = torch.autograd.grad(want, (x, centres, values), g)
    for a, b in zip(got, expected, strict=True):
        assert rel_err(a, b) < 1e-9


def test_full_grid_with_tiny_temperature_is_the_identity():
    x = tokens((9, 11), scale=1.0)
    clustering, reconstruction = (
        TokenClustering((9, 11), temperature=1e-6),
        TokenReconstruction(temperature=1e-6),
    )
    centres = clustering(x)
    assert rel_err(centres, x) < 1e-12
    assert rel_err(reconstruction(centres, clustering), x) < 1e-12


def test_modules_pass_the_state_and_refuse_without_one():
    x = tokens((13, 17), scale=1.0)
    clustering = TokenClustering((5, 7), window=3)
    centres = clustering(x)
    y = TokenReconstruction(window=3)(centres * 2, clustering.state)
    assert y.shape == (2, 13, 17, 6)
    with pytest.raises(ValueError, match="needs the state of a TokenClustering"):
        TokenReconstruction()(centres, None)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernels_refuse_topk_with_a_reason(backend):
    require(backend, torch.float32)
    x = torch.randn(1, 8, 8, 4, device=harness.DEVICE)
    centres = torch.randn(1, 4, 4, 4, device=harness.DEVICE)
    refused = pytest.raises(
        stitchops.BackendUnavailableError, match="mode 'topk' runs on the torch backend"
    )
    with stitchops.use_backend(backend), refused:
        stitchops.token_reconstruct(x, centres, centres, mode="topk", k=4)


@BACKENDS
def test_empty_batch(backend):
    require(backend, torch.float32)
    x = torch.randn(0, 8, 9, 4, device=harness.DEVICE, requires_grad=True)
    with harness.poisoned(backend):
        centres = stitchops.token_cluster(x, (3, 4))
        y = stitchops.token_reconstruct(x, centres.detach(), centres)
        y.sum().backward()
    assert centres.shape == (0, 3, 4, 4) and y.shape == (0, 8, 9, 4) and x.grad.shape == x.shape


@BACKENDS
def test_nan_in_x_gives_nan_out(backend):
    require(backend, torch.float32)
    x = torch.randn(1, 8, 9, 4, device=harness.DEVICE)
    x[0, 3, 3, 1] = float("nan")
    with stitchops.use_backend(backend):
        centres = stitchops.token_cluster(x, (3, 4))
        assert centres.isnan().any()
        assert stitchops.token_reconstruct(x, centres, centres).isnan().any()


@BACKENDS
def test_non_contiguous_inputs(backend):
    require(backend, torch.float32)
    x = harness.every_other_element(tokens((13, 17), scale=1.0).float().to(harness.DEVICE))
    values = harness.every_other_element(torch.randn(2, 5, 7, 3, device=harness.DEVICE))
    want = reference.token_cluster(x.contiguous(), (5, 7), 5, 3, 5.0)
    with harness.poisoned(backend):
        got = stitchops.token_cluster(x, (5, 7), iters=3, temperature=5.0)
        y = stitchops.token_reconstruct(x, got, values, temperature=5.0)
    assert rel_err(got, want) < 1e-5
    assert (
        rel_err(y, reference.token_reconstruct(x.contiguous(), want, values.contiguous(), 5, 5.0))
        < 1e-5
    )


def _args(**change):
    x = torch.randn(1, 8, 9, 4)
    args = {"x": x, "centres": torch.randn(1, 3, 4, 4), "values": torch.randn(1, 3, 4, 2)}
    args.update(change)
    return args


BAD_CLUSTER = {
    "even_window": (dict(window=4), ValueError, "window must be odd"),
    "zero_window": (dict(window=0), ValueError, "window must be >= 1"),
    "grid_too_big": (dict(grid=(9, 4)), ValueError, r"grid \(9, 4\) is larger than the map"),
    "grid_zero": (dict(grid=(0, 4)), ValueError, r"grid\[0\] must be >= 1"),
    "grid_type": (dict(grid=3), TypeError, "grid must be a pair"),
    "temperature": (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    "temperature_nan": (dict(temperature=float("nan")), ValueError, "must be finite"),
    "int_x": (dict(x=torch.ones(1, 8, 9, 4, dtype=torch.int64)), TypeError, "floating-point"),
    "x_3d": (dict(x=torch.randn(8, 9, 4)), ValueError, "x must be 4-D"),
    "iters": (dict(iters=-1), ValueError, "iters must be >= 0"),
    "numerics": (dict(numerics="approximate"), ValueError, "numerics must be one of"),
}

BAD_RECONSTRUCT = {
    "batch": (_args(centres=torch.randn(2, 3, 4, 4)), ValueError, r"\[1, h, w, 4\] like x"),
    "channels": (_args(centres=torch.randn(1, 3, 4, 5)), ValueError, r"\[1, h, w, 4\] like x"),
    "values_grid": (_args(values=torch.randn(1, 3, 5, 2)), ValueError, r"\[1, 3, 4\] of centres"),
    "dtype": (
        _args(values=torch.randn(1, 3, 4, 2, dtype=torch.float64)),
        TypeError,
        "values has dtype torch.float64",
    ),
    "k_too_big": ({**_args(), "mode": "topk", "k": 13}, ValueError, "k = 13 is more than"),
    "k_zero": ({**_args(), "mode": "topk", "k": 0}, ValueError, "k must be >= 1"),
    "mode": ({**_args(), "mode": "nearest"}, ValueError, "mode must be one of"),
    "numerics": (
        {**_args(), "mode": "topk", "k": 4, "numerics": "fast"},
        ValueError,
        "numerics must be one of",
    ),
    "official_local": (
        {**_args(), "numerics": "official"},
        ValueError,
        "numerics='official' is the official code's reconstruction",
    ),
    "device": (_args(values=torch.randn(1, 3, 4, 2, device="meta")), ValueError, "is on meta"),
}


@pytest.mark.parametrize("change", BAD_CLUSTER.values(), ids=BAD_CLUSTER.keys())
def test_bad_cluster_inputs_raise_clear_errors(change):
    args, error, message = change
    call = {"x": torch.randn(1, 8, 9, 4), "grid": (3, 4), **args}
    harness.assert_rejected_untouched(stitchops.token_cluster, call, error, message)


@pytest.mark.parametrize("change", BAD_RECONSTRUCT.values(), ids=BAD_RECONSTRUCT.keys())
def test_bad_reconstruct_inputs_raise_clear_errors(change):
    args, error, message = change
    harness.assert_rejected_untouched(stitchops.token_reconstruct, args, error, message)


def test_opcheck():
    x = torch.randn(2, 8, 9, 4, requires_grad=True)
    centres = torch.randn(2, 3, 4, 4)
    values = torch.randn(2, 3, 4, 2, requires_grad=True)
    for numerics in cluster_ops.NUMERICS:
        harness.opcheck(
            "torch", torch.ops.stitchops.token_cluster.default, x, 3, 4, 5, 2, 50.0, numerics
        )
        harness.opcheck(
            "torch",
            torch.ops.stitchops.token_cluster_backward.default,
            torch.randn(2, 3, 4, 4),
            x.detach(),
            3,
            4,
            5,
            2,
            50.0,
            numerics,
        )
    for mode, numerics in (("local", "exact"), ("topk", "exact"), ("topk", "official")):
        args = (x, centres.requires_grad_(), values, 5, 50.0, mode, 6, numerics)
        harness.opcheck("torch", torch.ops.stitchops.token_reconstruct.default, *args)
        backward_args = (torch.randn(2, 8, 9, 2), *(t.detach() for t in args[:3]), *args[3:])
        harness.opcheck(
            "torch", torch.ops.stitchops.token_reconstruct_backward.default, *backward_args
        )
        harness.opcheck(
            "torch", torch.ops.stitchops.token_reconstruct_weight_backward.default, *backward_args
        )


class _Expedited(torch.nn.Module):
    """Cluster, refine the centres with a linear layer, reconstruct."""

    def __init__(self):
        super().__init__()
        self.clustering = TokenClustering((3, 4), window=3, iters=2)
        self.refine = torch.nn.Linear(4, 4)
        self.reconstruction = TokenReconstruction(window=3)

    def forward(self, x):
        return self.reconstruction(self.refine(self.clustering(x)), self.clustering)


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler: str, tmp_path, monkeypatch):
    harness.assert_compiles_fullgraph(
        _Expedited(), torch.randn(2, 8, 9, 4), compiler, tmp_path, monkeypatch
    )


@BACKENDS
def test_float32_centres_no_worse_than_the_official_float32(backend):
    """Tokens far from the origin, as ViT features (mean 30, spread 0.5, C 128): the
    official ‖x‖² + ‖s‖² − 2x·s cancels in float32; our backends centre the tokens first,
    so their float32 centres are far closer to float64 (median over centres)."""
    require(backend, torch.float32)
    g = torch.Generator().manual_seed(3)
    offset = 30.0 * torch.rand(128, generator=g, dtype=torch.float64)
    x = torch.randn(1, 16, 16, 128, generator=g, dtype=torch.float64) * 0.5 + offset
    want = official_cluster(x, (8, 8), 5, 5, 50.0)

    def error(centres):
        return ((centres.double() - want).norm(dim=-1) / want.norm(dim=-1)).median().item()

    official = error(official_cluster(x.float(), (8, 8), 5, 5, 50.0))
    with stitchops.use_backend(backend):
        ours = error(
            stitchops.token_cluster(x.float().to(harness.DEVICE), (8, 8), numerics="official").cpu()
        )
    assert ours <= official / 3, (ours, official)
