"""stitchops.token_cluster / token_reconstruct (Expedit): the reference against a float64
dense formulation with explicit candidate lists, the registered ops against the reference
(forward and gradients), topk mode, affinity gradients, modules, bad inputs, compile."""

from __future__ import annotations

import harness
import pytest
import torch
import torch.nn.functional as F
from harness import rel_err

import stitchops
from stitchops.nn import TokenClustering, TokenReconstruction
from stitchops.ops import token_cluster as cluster_ops
from stitchops.reference import token_cluster as reference

# ------------------------------------------------------------ float64 dense formulation


def dense_candidates(size: tuple[int, int], grid: tuple[int, int], window: int) -> torch.Tensor:
    """[N, M] bool: pixel p may pick centre i. Cells from F.interpolate of a 2-D map of cell
    numbers (not the reference's per-axis indices), candidates listed by explicit loops."""
    (height, width), (h, w), r = size, grid, window // 2
    numbers = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    cell = F.interpolate(numbers, size=(height, width), mode="nearest").view(-1).long()
    allowed = torch.zeros(height * width, h * w, dtype=torch.bool)
    for p in range(height * width):
        cy, cx = divmod(int(cell[p]), w)
        for i in range(max(0, cy - r), min(h, cy + r + 1)):
            for j in range(max(0, cx - r), min(w, cx + r + 1)):
                allowed[p, i * w + j] = True
    return allowed


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
    return x + 0.01 * torch.randn(1, 4, 12, 1, generator=torch.Generator().manual_seed(2),
                                  dtype=torch.float64)  # fmt: skip


def test_a_centre_that_loses_every_pixel_keeps_its_value():
    x = losing_centre_map()
    s = reference.token_cluster(x, (1, 3), 3, 3, 1e-3)
    assert rel_err(s, dense_cluster(x, (1, 3), 3, 3, 1e-3)) < 1e-10
    first = reference.initial_centres(x, (1, 3))
    assert torch.equal(s[0, 0, 1], first[0, 0, 1])  # kept, where the official code zeroes it


# ------------------------------------------------------------ the registered ops


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
BACKENDS = pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])


def require(backend: str, dtype: torch.dtype, mode: str = "local") -> None:
    probe = torch.empty(1, dtype=dtype)
    harness.require_backend(cluster_ops.TOKEN_CLUSTER, backend, probe,
                            limits=cluster_ops.kernel_limits(mode))  # fmt: skip


def _case_id(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


# (map, grid, window, iterations): odd sizes, the paper's shape, the interpolation quirk.
CLUSTER_CASES = [((13, 17), (5, 7), 5, 5), ((13, 17), (5, 7), 3, 1), ((40, 40), (28, 28), 5, 1),
                 ((46, 46), (28, 28), 7, 1), ((9, 30), (2, 11), 11, 2)]  # fmt: skip


@BACKENDS
@DTYPES
@pytest.mark.parametrize("size, grid, window, iters", CLUSTER_CASES, ids=_case_id)
def test_cluster_op_matches_float64_reference(size, grid, window, iters, dtype, backend):
    require(backend, dtype)
    batch = 1 if size[0] * size[1] > 1000 else 2  # the interpreter runs programs one by one
    masters = {"x": tokens(size, scale=1.0, batch=batch)}
    grad = torch.randn(batch, *grid, 6, dtype=torch.float64)
    harness.check_against_float64(
        lambda x: stitchops.token_cluster(x, grid, window=window, iters=iters, temperature=5.0),
        lambda x: reference.token_cluster(x, grid, window, iters, 5.0),
        masters, dtype, lambda name: True, backend, grad,
    )  # fmt: skip


@DTYPES
@pytest.mark.parametrize("backend, mode", [("torch", "local"), ("torch", "topk"),
                                           ("triton", "local"), ("cuda", "local")])  # fmt: skip
def test_reconstruct_op_matches_float64_reference(mode, dtype, backend):
    """(The kernels refuse topk mode: test_kernels_refuse_topk_with_a_reason.)"""
    require(backend, dtype, mode)
    x = tokens((13, 17), scale=1.0)
    centres = reference.token_cluster(x, (5, 7), 5, 2, 5.0)
    masters = {"x": x, "centres": centres, "values": torch.randn(2, 5, 7, 4, dtype=torch.float64)}
    grad = torch.randn(2, 13, 17, 4, dtype=torch.float64)
    grads = harness.check_against_float64(
        lambda **a: stitchops.token_reconstruct(**a, temperature=5.0, mode=mode, k=6),
        lambda **a: reference.token_reconstruct(**a, window=5, temperature=5.0, mode=mode, k=6),
        masters, dtype, lambda name: name == "values", backend, grad,
    )  # fmt: skip
    assert set(grads) == {"values"}


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bf16_against_float64(backend):
    """bf16 tokens (fp32 math inside): a clustering and a reconstruction. Triton's CPU
    interpreter computes bf16 wrongly (skipped there); the CUDA emulator runs it."""
    require(backend, torch.bfloat16)
    x = tokens((13, 17), scale=1.0)
    harness.check_against_float64(
        lambda x: stitchops.token_cluster(x, (5, 7), window=5, iters=2, temperature=5.0),
        lambda x: reference.token_cluster(x, (5, 7), 5, 2, 5.0),
        {"x": x}, torch.bfloat16, lambda name: True, backend,
        torch.randn(2, 5, 7, 6, dtype=torch.float64),
    )  # fmt: skip
    masters = {"x": x, "centres": reference.token_cluster(x, (5, 7), 5, 2, 5.0),
               "values": torch.randn(2, 5, 7, 4, dtype=torch.float64)}  # fmt: skip
    harness.check_against_float64(
        lambda **a: stitchops.token_reconstruct(**a, temperature=5.0),
        lambda **a: reference.token_reconstruct(**a, window=5, temperature=5.0),
        masters, torch.bfloat16, lambda name: name == "values", backend,
        torch.randn(2, 13, 17, 4, dtype=torch.float64),
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernels_are_deterministic(backend):
    require(backend, torch.float32)
    x = tokens((13, 17), scale=1.0).float().requires_grad_()
    grad = torch.randn(2, 5, 7, 6)

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
    x = losing_centre_map().to(dtype).requires_grad_()
    g = torch.randn(1, 1, 3, 1, dtype=torch.float64).to(dtype)
    with stitchops.use_backend(backend):
        centres = stitchops.token_cluster(x, (1, 3), window=3, iters=3, temperature=1e-3)
        (got,) = torch.autograd.grad(centres, x, g, retain_graph=True)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.token_cluster(x64, (1, 3), 3, 3, 1e-3), x64,
                                  g.double())  # fmt: skip
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


def test_topk_mode_against_float64_including_where_the_official_formula_underflows():
    # Tokens far from every centre: the nearest squared distance is > 5,000, so exp(−d/50)
    # is 0 in float32 for every centre and the official code's rows are all zero.
    x = tokens((13, 17), channels=6, scale=1.0)
    centres = reference.token_cluster(x, (5, 7), 5, 2, 50.0)
    far = x + 60.0
    values = torch.randn(2, 5, 7, 3, dtype=torch.float64)
    want = dense_topk(far, centres, values, 20, 50.0)
    got = stitchops.token_reconstruct(far.float(), centres.float(), values.float(), mode="topk")
    assert rel_err(got, want) < 1e-4 and want.abs().min() > 0
    official = dense_topk(far.float(), centres.float(), values.float(), 20, 50.0, shift=False)
    assert (official == 0).all()  # what we avoid
    near = stitchops.token_reconstruct(x, centres, values, mode="topk")
    assert rel_err(near, dense_topk(x, centres, values, 20, 50.0)) < 1e-12


def test_affinity_gradients_by_gradcheck():
    x = tokens((6, 7), channels=3, batch=1, scale=0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: stitchops.token_cluster(t, (3, 4), window=3, iters=2, temperature=1.0,
                                          affinity_grad=True), (x,))  # fmt: skip
    centres = reference.token_cluster(x.detach(), (3, 4), 3, 2, 1.0).requires_grad_()
    values = torch.randn(1, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    for mode in ("local", "topk"):
        assert torch.autograd.gradcheck(
            lambda a, b, c, mode=mode: stitchops.token_reconstruct(
                a, b, c, window=3, temperature=1.0, mode=mode, k=5, affinity_grad=True),
            (x, centres, values))  # fmt: skip


def test_full_grid_with_tiny_temperature_is_the_identity():
    x = tokens((9, 11), scale=1.0)
    clustering, reconstruction = TokenClustering((9, 11), temperature=1e-6), TokenReconstruction(
        temperature=1e-6)  # fmt: skip
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
    x, centres = torch.randn(1, 8, 8, 4), torch.randn(1, 4, 4, 4)
    refused = pytest.raises(stitchops.BackendUnavailableError,
                            match="mode 'topk' runs on the torch backend")  # fmt: skip
    with stitchops.use_backend(backend), refused:
        stitchops.token_reconstruct(x, centres, centres, mode="topk", k=4)


@BACKENDS
def test_empty_batch(backend):
    require(backend, torch.float32)
    x = torch.randn(0, 8, 9, 4, requires_grad=True)
    with harness.poisoned(backend):
        centres = stitchops.token_cluster(x, (3, 4))
        y = stitchops.token_reconstruct(x, centres.detach(), centres)
        y.sum().backward()
    assert centres.shape == (0, 3, 4, 4) and y.shape == (0, 8, 9, 4) and x.grad.shape == x.shape


@BACKENDS
def test_nan_in_x_gives_nan_out(backend):
    require(backend, torch.float32)
    x = torch.randn(1, 8, 9, 4)
    x[0, 3, 3, 1] = float("nan")
    with stitchops.use_backend(backend):
        centres = stitchops.token_cluster(x, (3, 4))
        assert centres.isnan().any()
        assert stitchops.token_reconstruct(x, centres, centres).isnan().any()


@BACKENDS
def test_non_contiguous_inputs(backend):
    require(backend, torch.float32)
    x = harness.every_other_element(tokens((13, 17), scale=1.0).float())
    values = harness.every_other_element(torch.randn(2, 5, 7, 3))
    want = reference.token_cluster(x.contiguous(), (5, 7), 5, 3, 5.0)
    with harness.poisoned(backend):
        got = stitchops.token_cluster(x, (5, 7), iters=3, temperature=5.0)
        y = stitchops.token_reconstruct(x, got, values, temperature=5.0)
    assert rel_err(got, want) < 1e-5
    assert rel_err(y, reference.token_reconstruct(x.contiguous(), want, values.contiguous(), 5,
                                                  5.0)) < 1e-5  # fmt: skip


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
}  # fmt: skip

BAD_RECONSTRUCT = {
    "batch": (_args(centres=torch.randn(2, 3, 4, 4)), ValueError, r"\[1, h, w, 4\] like x"),
    "channels": (_args(centres=torch.randn(1, 3, 4, 5)), ValueError, r"\[1, h, w, 4\] like x"),
    "values_grid": (_args(values=torch.randn(1, 3, 5, 2)), ValueError, r"\[1, 3, 4\] of centres"),
    "dtype": (_args(values=torch.randn(1, 3, 4, 2, dtype=torch.float64)), TypeError,
              "values has dtype torch.float64"),
    "k_too_big": ({**_args(), "mode": "topk", "k": 13}, ValueError, "k = 13 is more than"),
    "k_zero": ({**_args(), "mode": "topk", "k": 0}, ValueError, "k must be >= 1"),
    "mode": ({**_args(), "mode": "nearest"}, ValueError, "mode must be one of"),
    "device": (_args(values=torch.randn(1, 3, 4, 2, device="meta")), ValueError, "is on meta"),
}  # fmt: skip


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
    harness.opcheck("torch", torch.ops.stitchops.token_cluster.default, x, 3, 4, 5, 2, 50.0)
    harness.opcheck("torch", torch.ops.stitchops.token_cluster_backward.default,
                    torch.randn(2, 3, 4, 4), x.detach(), 3, 4, 5, 2, 50.0)  # fmt: skip
    for mode in cluster_ops.MODES:
        harness.opcheck("torch", torch.ops.stitchops.token_reconstruct.default,
                        x.detach(), centres, values, 5, 50.0, mode, 6)  # fmt: skip
        harness.opcheck("torch", torch.ops.stitchops.token_reconstruct_backward.default,
                        torch.randn(2, 8, 9, 2), x.detach(), centres, values.detach(), 5, 50.0,
                        mode, 6)  # fmt: skip


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
    harness.assert_compiles_fullgraph(_Expedited(), torch.randn(2, 8, 9, 4), compiler,
                                      tmp_path, monkeypatch)  # fmt: skip
