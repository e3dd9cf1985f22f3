"""stitchops.head_mixed_conv (SPViT's head-mixed stencil): every runnable backend against a
float64 loop formulation written here, forward and both gradients; the F.conv2d identity and
the official pad + gather formulation; odd k up to 7, rectangular grids, prefixes, heads,
channels; empty, non-contiguous and bad inputs; determinism, opcheck, compile."""

from __future__ import annotations

import harness
import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, rel_err
from official_spvit import official_conv3x3
from op_tables import AotPlain, OpTests

import stitchops
from stitchops.ops import head_mixed_conv as hmc_ops
from stitchops.reference import head_mixed_conv as reference

# What the test machinery every op shares takes from this op (tests/op_tables.py).
OP_TESTS = OpTests(
    name="head_mixed_conv",
    kernels="head_mixed_conv",
    # Small SIMT kernels: every cuda test under ASan and memcheck, a few under the others.
    asan_select="cuda",
    sanitizer_select={
        "memcheck": "cuda",
        "synccheck": "cuda and float64_loop",
        "racecheck": "cuda and (float64_loop or deterministic)",
    },
    aot_plain=(
        AotPlain("_forward_kernel", {"K": 3, "BLOCK_Q": 64, "BLOCK_D": 32}),
        AotPlain("_grad_v_kernel", {"K": 3, "BLOCK_Q": 64, "BLOCK_D": 32}),
        AotPlain("_grad_mix_kernel", {"K": 3, "BLOCK_Q": 64, "BLOCK_D": 32}),
    ),
)

BACKENDS = ["torch", "triton", "cuda"]
KERNELS = ["triton", "cuda"]
# (batch, heads, channels, grid, prefix, k)
CASES = [
    (2, 3, 16, (4, 6), 1, 3),
    (1, 6, 64, (7, 7), 1, 1),
    (2, 1, 5, (3, 8), 0, 5),
    (1, 12, 8, (5, 3), 4, 7),
    (3, 2, 33, (2, 2), 1, 3),
    (1, 2, 128, (3, 4), 1, 3),
]
IDS = [
    harness.case_id([("B", b), ("H", h), ("D", d), ("G", g), ("P", p), ("K", k)])
    for b, h, d, g, p, k in CASES
]
DTYPES = [(torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")]


def loop_formulation(v: torch.Tensor, mix: torch.Tensor, grid, prefix: int) -> torch.Tensor:
    """The definition, element by element over positions and taps (float64, differentiable)."""
    b, dim = v.shape[0], v.shape[3]
    k = round(mix.shape[1] ** 0.5)
    gh, gw = grid
    rows = [v.new_zeros(b, dim) for _ in range(prefix)]
    for i in range(gh):
        for j in range(gw):
            acc = v.new_zeros(b, dim)
            for c in range(k):
                for a in range(k):
                    y, x = i + a - k // 2, j + c - k // 2
                    if 0 <= y < gh and 0 <= x < gw:
                        token = v[:, prefix + y * gw + x]  # [B, H, D]
                        acc = acc + (mix[:, a + k * c, None] * token).sum(1)
            rows.append(acc)
    return torch.stack(rows, dim=1)


def masters(case, seed=7):
    b, heads, dim, grid, prefix, k = case
    n = prefix + grid[0] * grid[1]
    return harness.float64_masters(
        {"v": ((b, n, heads, dim), 1.0), "mix": ((heads, k * k), 0.5)}, seed=seed
    )


def require(backend: str, dtype: torch.dtype) -> None:
    harness.require_backend(
        hmc_ops.HEAD_MIXED_CONV, backend, torch.empty(1, dtype=dtype, device=DEVICE)
    )


def _op(v, mix, grid, prefix):
    return stitchops.head_mixed_conv(v, mix, grid, prefix=prefix)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_loop_formulation(backend, case):
    """The loop formulation in float64: output, dv and dmix (fp32 on the kernels)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    require(backend, dtype)
    m = masters(case)
    grid, prefix = case[3], case[4]
    want = loop_formulation(m["v"], m["mix"], grid, prefix)
    leaves = harness.leaves(m, dtype, lambda name: True)
    with harness.poisoned(backend):
        got = _op(leaves["v"], leaves["mix"], grid, prefix)
    assert rel_err(got, want) < (1e-12 if dtype == torch.float64 else 2e-6)
    assert torch.equal(got[:, :prefix], torch.zeros_like(got[:, :prefix]))
    g = torch.randn_like(want)
    v64, mix64 = m["v"].clone().requires_grad_(), m["mix"].clone().requires_grad_()
    dv64, dmix64 = torch.autograd.grad(loop_formulation(v64, mix64, grid, prefix), [v64, mix64], g)
    with harness.poisoned(backend):
        dv, dmix = torch.autograd.grad(got, [leaves["v"], leaves["mix"]], g.to(dtype))
    tol = 1e-12 if dtype == torch.float64 else 5e-6
    assert rel_err(dv, dv64) < tol and rel_err(dmix, dmix64) < tol


@pytest.mark.parametrize("dtype, dname", DTYPES, ids=[n for _, n in DTYPES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, dtype, dname):
    """The accuracy rule against float64 in every dtype, output and both gradients."""
    require(backend, dtype)
    case = CASES[0]
    m = masters(case, seed=3)
    grad64 = torch.randn(case[0], m["v"].shape[1], case[2], dtype=torch.float64).to(DEVICE)
    kwargs = {"grid": case[3], "prefix": case[4]}
    harness.check_against_float64(
        _op, reference.head_mixed_conv, m, dtype, lambda name: True, backend, grad64, **kwargs
    )


def test_is_the_conv2d_of_the_value_weights():
    """With v = x·W_vᵀ: F.conv2d of the token map with K[o, ch, a, c] = Σ_h mix[h, a+k·c]·W_v."""
    g = torch.Generator().manual_seed(0)
    b, heads, dim, ch, (gh, gw), k = 2, 3, 4, 5, (4, 7), 5
    x = torch.randn(b, 1 + gh * gw, ch, generator=g, dtype=torch.float64)
    w_v = torch.randn(heads * dim, ch, generator=g, dtype=torch.float64)
    mix = torch.randn(heads, k * k, generator=g, dtype=torch.float64)
    out = stitchops.head_mixed_conv((x @ w_v.t()).view(b, -1, heads, dim), mix, (gh, gw))
    kernel = torch.einsum("hp,hoc->ocp", mix, w_v.view(heads, dim, ch)).view(dim, ch, k, k)
    kernel = kernel.transpose(2, 3)  # tap p = a + k·c: a the row, c the column
    grid = x[:, 1:].reshape(b, gh, gw, ch).permute(0, 3, 1, 2)
    want = F.conv2d(grid, kernel, padding=k // 2).permute(0, 2, 3, 1).reshape(b, gh * gw, dim)
    assert rel_err(out[:, 1:], want) < 1e-13


def test_is_the_official_pad_and_gather():
    """The official 3×3 search path (v @ softmax, zero pad, gather, sum), square map."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 1 + 36, 4, 8, generator=g, dtype=torch.float64)
    mixed = (torch.randn(4, 9, generator=g, dtype=torch.float64) / 1e-2).softmax(0)
    want = official_conv3x3(v[:, 1:], mixed, 6)
    assert rel_err(stitchops.head_mixed_conv(v, mixed, (6, 6))[:, 1:], want) < 1e-14


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_non_contiguous_v(backend):
    require(backend, torch.float32)
    with torch.device(DEVICE):  # every tensor where the kernels run
        mix = torch.randn(3, 9)
        empty = torch.randn(0, 1 + 12, 3, 4, requires_grad=True)
        with harness.poisoned(backend):
            out = stitchops.head_mixed_conv(empty, mix, (3, 4))
            out.sum().backward()
        assert out.shape == (0, 13, 4) and empty.grad.shape == empty.shape
        base = torch.randn(2, 13, 4, 3)  # [B, N, D, H]: v as a transposed view
        v = base.transpose(2, 3)
        assert not v.is_contiguous()
        with harness.poisoned(backend):
            got = stitchops.head_mixed_conv(v, mix, (3, 4))
        want = reference.head_mixed_conv_forward(v.contiguous().double(), mix.double(), 3, 4, 1)
        assert rel_err(got, want) < 2e-6


@pytest.mark.parametrize("backend", KERNELS)
def test_deterministic(backend):
    """Two runs give the same bits, output and gradients."""
    require(backend, torch.float32)
    m = masters(CASES[1], seed=5)
    g = torch.randn(1, m["v"].shape[1], CASES[1][2], dtype=torch.float64).to(DEVICE)
    runs = []
    for _ in range(2):
        args = harness.leaves(m, torch.float32, lambda name: True)
        with stitchops.use_backend(backend):
            runs.append(harness.run_with_grads(_op, args, g.float(), grid=(7, 7), prefix=1))
    harness.assert_same_bits(*runs)


def test_bad_input_names_the_argument():
    v, mix = torch.randn(1, 13, 3, 4), torch.randn(3, 9)
    cases = [
        ({"v": v[0], "mix": mix, "grid": (3, 4)}, ValueError, "v must be 4-D"),
        ({"v": v, "mix": torch.randn(2, 9), "grid": (3, 4)}, ValueError, "H = 3 heads"),
        ({"v": v, "mix": torch.randn(3, 4), "grid": (3, 4)}, ValueError, "k one of"),
        ({"v": v, "mix": torch.randn(3, 81), "grid": (3, 4)}, ValueError, "k one of"),
        ({"v": v, "mix": mix, "grid": (4, 4)}, ValueError, "prefix \\+ gh·gw"),
        ({"v": v, "mix": mix, "grid": 12}, TypeError, "grid must be"),
        ({"v": v, "mix": mix, "grid": (0, 4)}, ValueError, "grid\\[0\\] must be >= 1"),
        ({"v": v, "mix": mix.double(), "grid": (3, 4)}, TypeError, "mix has dtype"),
        ({"v": v.long(), "mix": mix, "grid": (3, 4)}, TypeError, "v must be a floating"),
    ]
    for args, error, message in cases:
        harness.assert_rejected_untouched(
            lambda **a: stitchops.head_mixed_conv(**a), args, error, message
        )
    with pytest.raises(ValueError, match="prefix must be >= 0"):
        stitchops.head_mixed_conv(v, mix, (3, 4), prefix=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    require(backend, torch.float32)
    with torch.device(DEVICE):
        v, mix = torch.randn(2, 13, 3, 4, requires_grad=True), torch.randn(3, 9, requires_grad=True)
        harness.opcheck(backend, torch.ops.stitchops.head_mixed_conv.default, v, mix, 3, 4, 1)
        harness.opcheck(
            backend,
            torch.ops.stitchops.head_mixed_conv_backward.default,
            torch.randn(2, 13, 4),
            v.detach(),
            mix.detach(),
            3,
            4,
            1,
            [True, True],
        )


class _Stencil(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.randn(2, 9))

    def forward(self, v):
        return stitchops.head_mixed_conv(v, self.mix, (3, 3))


@pytest.mark.slow
def test_compiles_fullgraph(tmp_path, monkeypatch):
    harness.assert_compiles_fullgraph(
        _Stencil(), torch.randn(2, 10, 2, 4), "aot_eager", tmp_path, monkeypatch
    )
