"""stitchops.focus_attention (FASeg): the reference against a float64 dense implementation
(explicit masked softmax over an allowed-keys matrix) in every mode, out / pos_out / scores
and every gradient; the registered op; FocusCrossAttention against nn.MultiheadAttention;
bad inputs, empty inputs, compile."""

from __future__ import annotations

import harness
import pytest
import torch
from harness import rel_err
from op_tables import AotPlain, OpTests

import stitchops
from stitchops.nn import FocusCrossAttention
from stitchops.ops import focus_attention as focus_ops
from stitchops.reference import focus_attention as reference

# What the test machinery every op shares takes from this op (tests/op_tables.py).
_FOCUS_BLOCKS = {"BLOCK_Q": 32, "BLOCK_N": 64, "BLOCK_D": 32}
_FOCUS_SETS = {"BLOCK_Q": 16, "BLOCK_N": 16, "BLOCK_D": 32}
_POS = {"BLOCK_P": 256, "BLOCK_Q": 16, "BLOCK_N": 32}  # kernels.focus_attention.WIDE_POS
OP_TESTS = OpTests(
    name="focus_attention",
    kernels="focus_attention",
    # SIMT kernels: every cuda test under ASan and memcheck, a few under the others.
    asan_select="cuda",
    sanitizer_select={
        "memcheck": "cuda",
        "synccheck": "cuda and float64_reference and fp32",
        "racecheck": "cuda and (deterministic or float64_reference and fp32)",
    },
    # D 32 and P 256 (FASeg: hidden 256, 8 heads); the shared-slot kernels in mask mode (its
    # extra loads), the per-query ones with their 3-D gathers and atomics.
    aot_plain=(
        AotPlain("_forward_kernel", {"MODE": 1, "DOT": "tf32", **_FOCUS_BLOCKS}),
        AotPlain("_forward_kernel", {"MODE": 3, "DOT": "tf32", **_FOCUS_SETS}),
        AotPlain(
            "_mean_kernel",
            {"MODE": 2, "HAS_POS": True, "SCORES": True, "DOT": "tf32", **_FOCUS_BLOCKS, **_POS},
        ),
        AotPlain("_delta_kernel", {"MODE": 1, "DOT": "tf32", **_FOCUS_BLOCKS, **_POS}),
        AotPlain(
            "_dkdv_kernel", {"MODE": 1, "HAS_POS": True, "DOT": "tf32", **_FOCUS_BLOCKS, **_POS}
        ),
        AotPlain(
            "_dq_kernel", {"MODE": 2, "HAS_POS": True, "DOT": "tf32", **_FOCUS_BLOCKS, **_POS}
        ),
        AotPlain("_dpos_kernel", {"MODE": 1, "DOT": "tf32", **_FOCUS_BLOCKS, **_POS}),
        AotPlain("_query_sets_backward_kernel", {"HAS_POS": True, **_FOCUS_SETS, **_POS}),
    ),
    fp32_pointers=frozenset(
        {
            "lse_ptr",
            "delta_ptr",
            "pos_out32_ptr",
            "colsum_ptr",
            "dk32_ptr",
            "dv32_ptr",
            "dpos32_ptr",
        }
    ),
    arg_types={"win_ptr": "*i32", "mask_ptr": "*i8", "reset_ptr": "*i8"},
)

B, H, Q, D, P = 2, 3, 7, 16, 5
MAP, WS = (9, 12), 3
N = MAP[0] * MAP[1]
COUNT = (MAP[0] // WS) * (MAP[1] // WS)  # 12 windows
MODES = ["full", "mask", "head_mask", "shared_windows", "query_windows"]


def dense(q, k, v, pos, allowed, scale):
    """Explicit masked softmax over [B, H, Q, N]: (out, pos_out, scores)."""
    logits = (q @ k.transpose(-1, -2)) * scale
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    a = logits.softmax(-1)
    return a @ v, (a @ pos[:, None]).mean(1), a.mean(1).sum(1)


def dense_allowed(mode: str, keys: dict) -> torch.Tensor | None:
    """The allowed-keys matrix written out by loops over queries and windows."""
    if mode == "full":
        return None
    if mode in ("mask", "head_mask"):
        blocked = keys["mask"] if keys["mask"].dim() == 4 else keys["mask"][:, None]
        allowed = ~blocked
        return allowed | blocked.all(-1, keepdim=True)  # an all-blocked row sees every key
    windows = keys["windows"]
    allowed = torch.zeros(B, 1, Q, N, dtype=torch.bool)
    per_row = MAP[1] // WS
    for b in range(B):
        for q in range(Q):
            for j in (windows[b] if windows.dim() == 2 else windows[b, q]).tolist():
                for r in range(WS):
                    for c in range(WS):
                        y, x = (j // per_row) * WS + r, (j % per_row) * WS + c
                        allowed[b, 0, q, y * MAP[1] + x] = True
    return allowed


def mode_arguments(mode: str, seed: int = 3, device=harness.DEVICE) -> dict:
    """The mask or window arguments of a mode, on ``device``."""
    return {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in _mode_arguments(mode, seed).items()
    }


def _mode_arguments(mode: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    if mode in ("mask", "head_mask"):
        shape = (B, Q, N) if mode == "mask" else (B, H, Q, N)
        mask = torch.rand(*shape, generator=g) < 0.7
        mask[0, ..., 2, :] = True  # a fully blocked row: reset to every key
        mask[1, ..., 4, :] = True
        mask[1, ..., 4, 17] = False  # a row with a single key
        return {"mask": mask}
    if mode == "shared_windows":
        windows = torch.stack([torch.randperm(COUNT, generator=g)[:4] for _ in range(B)])
    elif mode == "query_windows":
        windows = torch.stack(
            [
                torch.stack([torch.randperm(COUNT, generator=g)[:3] for _ in range(Q)])
                for _ in range(B)
            ]
        )
    else:
        return {}
    return {"windows": windows, "window_size": WS, "map_size": MAP}


def masters(seed: int = 0, device=harness.DEVICE) -> dict:
    return harness.float64_masters(
        {
            "q": ((B, H, Q, D), 1.0),
            "k": ((B, H, N, D), 1.0),
            "v": ((B, H, N, D), 1.0),
            "pos": ((B, N, P), 1.0),
        },
        seed=seed,
        device=device,
    )


def combined(result) -> torch.Tensor:
    """out and pos_out as one differentiable tensor (one upstream gradient for both)."""
    return torch.cat([result.out.transpose(1, 2).flatten(2), result.pos_out], dim=-1)


@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_the_dense_formulation(mode):
    """out, pos_out, scores and the gradients of q, k, v, pos, to float64 rounding."""
    m = {name: t.requires_grad_() for name, t in masters(device="cpu").items()}
    keys = mode_arguments(mode, device="cpu")
    allowed = dense_allowed(mode, keys)
    out, pos_out, scores = dense(m["q"], m["k"], m["v"], m["pos"], allowed, D**-0.5)
    result = stitchops.focus_attention(
        m["q"], m["k"], m["v"], pos=m["pos"], return_scores=True, **keys
    )
    assert rel_err(result.out, out) < 1e-12
    assert rel_err(result.pos_out, pos_out) < 1e-12
    assert rel_err(result.scores, scores) < 1e-12
    assert torch.allclose(result.scores.sum(-1), torch.full((B,), float(Q), dtype=torch.float64))
    assert not result.scores.requires_grad
    g_out, g_pos = torch.randn_like(out), torch.randn_like(pos_out)
    expected = torch.autograd.grad([out, pos_out], list(m.values()), [g_out, g_pos])
    got = torch.autograd.grad([result.out, result.pos_out], list(m.values()), [g_out, g_pos])
    for name, e, o in zip(m, expected, got, strict=True):
        assert rel_err(o, e) < 1e-12, name


def test_per_query_windows_in_several_chunks(monkeypatch):
    """The reference's per-query chunks (a bounded slice of gathered keys each)."""
    m = masters(device="cpu")
    keys = mode_arguments("query_windows", device="cpu")
    whole = stitchops.focus_attention(
        m["q"], m["k"], m["v"], pos=m["pos"], return_scores=True, **keys
    )
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", B * H * 27 * D * 2)  # 2 queries a chunk
    chunked = stitchops.focus_attention(
        m["q"], m["k"], m["v"], pos=m["pos"], return_scores=True, **keys
    )
    for a, b in zip(whole, chunked, strict=True):
        assert rel_err(b, a) < 1e-14


def test_window_mode_equals_gather_then_dense_attention():
    m = masters(device="cpu")
    keys = mode_arguments("shared_windows", device="cpu")
    ids = reference.window_keys(keys["windows"][:, None], WS, MAP[1])[:, 0]  # [B, L]
    pick = ids[:, None, :, None].expand(-1, H, -1, D)
    k, v = torch.gather(m["k"], 2, pick), torch.gather(m["v"], 2, pick)
    pos = torch.gather(m["pos"], 1, ids[..., None].expand(-1, -1, P))
    out, pos_out, _ = dense(m["q"], k, v, pos, None, D**-0.5)
    result = stitchops.focus_attention(m["q"], m["k"], m["v"], pos=m["pos"], **keys)
    assert rel_err(result.out, out) < 1e-12 and rel_err(result.pos_out, pos_out) < 1e-12


# The kernels take fp32, fp16 and bf16 (bf16 skips under Triton's CPU interpreter, which
# computes it wrongly, and runs on the CUDA emulator).
RUNS = [
    ("torch", torch.float32),
    ("torch", torch.float16),
    *((b, d) for b in ("triton", "cuda") for d in (torch.float32, torch.float16, torch.bfloat16)),
]
KERNELS = ["triton", "cuda"]
BACKENDS = ["torch", *KERNELS]


def require(backend: str, dtype: torch.dtype, head_dim: int = D, pos_dim: int = P) -> None:
    probe = torch.empty(1, dtype=dtype, device=harness.DEVICE)
    harness.require_backend(
        focus_ops.FOCUS_ATTENTION, backend, probe, limits=focus_ops.kernel_limits(head_dim, pos_dim)
    )


@pytest.mark.parametrize(
    "backend, dtype", RUNS, ids=[f"{b}-{harness.DTYPE_IDS[d]}" for b, d in RUNS]
)
@pytest.mark.parametrize("mode", MODES)
def test_op_matches_float64_reference(mode, backend, dtype):
    """out and pos_out, and the gradients of q, k, v and pos, against float64."""
    require(backend, dtype)
    keys = mode_arguments(mode)
    grad = torch.randn(B, Q, H * D + P, dtype=torch.float64, device=harness.DEVICE)
    grads = harness.check_against_float64(
        lambda **a: combined(stitchops.focus_attention(**a, **keys)),
        lambda **a: combined(stitchops.focus_attention(**a, **keys)),
        masters(),
        dtype,
        lambda name: True,
        backend,
        grad,
    )
    assert set(grads) == {"q", "k", "v", "pos"}


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("mode", MODES)
def test_kernel_scores_match_float64(mode, backend):
    require(backend, torch.float32)
    m = masters()
    keys = mode_arguments(mode)
    want = stitchops.focus_attention(m["q"], m["k"], m["v"], return_scores=True, **keys).scores
    with harness.poisoned(backend):
        got = stitchops.focus_attention(
            m["q"].float(), m["k"].float(), m["v"].float(), return_scores=True, **keys
        ).scores
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("head_dim, pos_dim", [(64, 32), (24, 3), (128, 256)])
@pytest.mark.parametrize("mode", ["mask", "shared_windows", "query_windows"])
def test_kernel_head_and_pos_widths(mode, head_dim, pos_dim, backend):
    """Head dims 24 (not a power of two), 64 and 128, pos widths 3 to 256, Q = 33 (two query
    blocks and a ragged one), a 12×16 map in 4×4 windows."""
    require(backend, torch.float32, head_dim, pos_dim)
    g = torch.Generator().manual_seed(7)
    b, h, q_count, hw, ws = 2, 2, 33, (12, 16), 4
    n = hw[0] * hw[1]
    m = {
        "q": torch.randn(b, h, q_count, head_dim, generator=g, dtype=torch.float64),
        "k": torch.randn(b, h, n, head_dim, generator=g, dtype=torch.float64),
        "v": torch.randn(b, h, n, head_dim, generator=g, dtype=torch.float64),
        "pos": torch.randn(b, n, pos_dim, generator=g, dtype=torch.float64),
    }
    m = {name: t.to(harness.DEVICE) for name, t in m.items()}
    if mode == "mask":
        keys = {"mask": torch.rand(b, q_count, n, generator=g) < 0.8}
    else:
        sets = 1 if mode == "shared_windows" else q_count
        windows = torch.stack(
            [
                torch.stack([torch.randperm(12, generator=g)[:3] for _ in range(sets)])
                for _ in range(b)
            ]
        )
        keys = {
            "windows": windows[:, 0] if sets == 1 else windows,
            "window_size": ws,
            "map_size": hw,
        }
    keys = {k: v.to(harness.DEVICE) if isinstance(v, torch.Tensor) else v for k, v in keys.items()}
    grad = torch.randn(
        b, q_count, h * head_dim + pos_dim, dtype=torch.float64, device=harness.DEVICE
    )
    harness.check_against_float64(
        lambda **a: combined(stitchops.focus_attention(**a, **keys)),
        lambda **a: combined(stitchops.focus_attention(**a, **keys)),
        m,
        torch.float32,
        lambda name: True,
        backend,
        grad,
    )


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("mode", MODES)
def test_kernels_are_deterministic_where_promised(mode, backend):
    """Bitwise equal reruns; except Triton's per-query window sets, which add dk, dv, dpos
    with atomics whose order a GPU does not fix (equal to rounding there)."""
    require(backend, torch.float32)
    keys = mode_arguments(mode)
    grad = torch.randn(B, Q, H * D + P, device=harness.DEVICE)

    def run():
        args = {name: t.float().requires_grad_() for name, t in masters().items()}
        with stitchops.use_backend(backend):
            return harness.run_with_grads(
                lambda **a: combined(stitchops.focus_attention(**a, **keys)), args, grad
            )

    first, second = run(), run()
    if backend == "triton" and mode == "query_windows" and torch.cuda.is_available():
        assert all(
            rel_err(a, b) < 1e-6 for a, b in zip(first[1].values(), second[1].values(), strict=True)
        )
    else:
        harness.assert_same_bits(first, second)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_refuse_a_head_wider_than_their_blocks(backend):
    harness.require_backend(None, backend, torch.empty(1, device=harness.DEVICE))
    q = torch.randn(1, 1, 3, 160, device=harness.DEVICE)
    with (
        pytest.raises(stitchops.BackendUnavailableError, match="head dim D = 160 > 128"),
        stitchops.use_backend(backend),
    ):
        stitchops.focus_attention(q, q, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fully_blocked_row_attends_everything_and_is_never_nan(backend):
    require(backend, torch.float32)
    m = {name: t.float() for name, t in masters().items()}
    mask = torch.ones(B, Q, N, dtype=torch.bool, device=harness.DEVICE)
    with harness.poisoned(backend):
        result = stitchops.focus_attention(m["q"], m["k"], m["v"], mask=mask, return_scores=True)
        plain = stitchops.focus_attention(m["q"], m["k"], m["v"], return_scores=True)
    assert torch.isfinite(result.out).all()
    assert rel_err(result.out, plain.out) < 1e-6 and rel_err(result.scores, plain.scores) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_queries_and_empty_batch(backend):
    require(backend, torch.float32)
    m = {name: t.float() for name, t in masters().items()}
    for q, k, v, pos in (
        (m["q"][:, :, :0], m["k"], m["v"], m["pos"]),
        (m["q"][:0], m["k"][:0], m["v"][:0], m["pos"][:0]),
    ):
        q, k, v, pos = (t.clone().requires_grad_() for t in (q, k, v, pos))
        with harness.poisoned(backend):
            result = stitchops.focus_attention(q, k, v, pos=pos, return_scores=True)
        assert result.out.shape == q.shape and result.pos_out.shape == (
            *q.shape[::2][:1],
            q.shape[2],
            P,
        )
        assert result.scores.shape == (q.shape[0], N) and not result.scores.any()
        with harness.poisoned(backend):
            (result.out.sum() + result.pos_out.sum()).backward()
        assert not k.grad.any() and not pos.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_q_gives_nan_out(backend):
    require(backend, torch.float32)
    m = {name: t.float() for name, t in masters().items()}
    q = m["q"].clone()
    q[0, 1, 3, 5] = float("nan")
    with harness.poisoned(backend):
        result = stitchops.focus_attention(q, m["k"], m["v"])
    assert torch.isnan(result.out[0, 1, 3]).all() and torch.isfinite(result.out[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["mask", "query_windows"])
def test_non_contiguous_inputs(backend, mode):
    require(backend, torch.float32)
    m = {name: t.float() for name, t in masters().items()}
    keys = mode_arguments(mode)
    q, k, v, pos = (harness.non_contiguous(m[name]) for name in ("q", "k", "v", "pos"))
    assert not q.is_contiguous()
    with harness.poisoned(backend):
        result = stitchops.focus_attention(q, k, v, pos=pos, **keys)
    expected = stitchops.focus_attention(m["q"], m["k"], m["v"], pos=m["pos"], **keys)
    assert rel_err(result.out, expected.out) < 1e-5
    assert rel_err(result.pos_out, expected.pos_out) < 1e-5


def _bad(change: str) -> dict:
    m = {name: t.float() for name, t in masters(device="cpu").items()}
    args = {"q": m["q"], "k": m["k"], "v": m["v"]}
    windows = {"windows": torch.tensor([[0, 3], [5, 1]]), "window_size": WS, "map_size": MAP}
    mask = {"mask": torch.zeros(B, Q, N, dtype=torch.bool)}
    cases = {
        "q rank": {**args, "q": m["q"][0]},
        "heads": {**args, "k": m["k"][:, :2], "v": m["v"][:, :2]},
        "head dim": {**args, "k": m["k"][..., :8], "v": m["v"][..., :8]},
        "v length": {**args, "v": m["v"][:, :, :50]},
        "pos length": {**args, "pos": m["pos"][:, :50]},
        "both": {**args, **windows, **mask},
        "out of range": {**args, **windows, "windows": torch.tensor([[0, 12], [5, 1]])},
        "negative": {**args, **windows, "windows": torch.tensor([[0, -1], [5, 1]])},
        "repeated": {**args, **windows, "windows": torch.tensor([[3, 3], [5, 1]])},
        "map tokens": {**args, **windows, "map_size": (9, 9)},
        "map multiple": {**args, **windows, "window_size": 4, "map_size": (12, 9)},
        "no map": {**args, "windows": windows["windows"]},
        "int32 windows": {**args, **windows, "windows": windows["windows"].int()},
        "float mask": {**args, "mask": torch.zeros(B, Q, N)},
        "mask shape": {**args, "mask": torch.zeros(B, Q, N - 1, dtype=torch.bool)},
        "int q": {**args, "q": m["q"].long()},
        "mixed dtypes": {**args, "k": m["k"].double()},
        "pos dtype": {**args, "pos": m["pos"].double()},
        "scale": {**args, "scale": float("nan")},
    }
    return cases[change]


BAD = {
    "q rank": (ValueError, "q must be 4-D"),
    "heads": (ValueError, "k must have shape"),
    "head dim": (ValueError, "k must have shape"),
    "v length": (ValueError, "v must have shape"),
    "pos length": (ValueError, r"pos must be \[B, N, P\]"),
    "both": (ValueError, "mask and windows are exclusive"),
    "out of range": (ValueError, "the map has 12 windows"),
    "negative": (ValueError, "the map has 12 windows"),
    "repeated": (ValueError, "repeats an index"),
    "map tokens": (ValueError, "has 81 tokens but k has N = 108"),
    "map multiple": (ValueError, "must be a multiple of window_size 4"),
    "no map": (ValueError, "windows needs window_size and map_size"),
    "int32 windows": (TypeError, "windows must be int64"),
    "float mask": (TypeError, "mask must be a bool tensor"),
    "mask shape": (ValueError, r"mask must be \[B, Q, N\]"),
    "int q": (TypeError, "q must be a floating-point tensor"),
    "mixed dtypes": (TypeError, "k has dtype torch.float64 but q has torch.float32"),
    "pos dtype": (TypeError, "pos has dtype"),
    "scale": (ValueError, "scale must be"),
}


@pytest.mark.parametrize("change", list(BAD))
def test_bad_inputs_raise_clear_errors(change):
    error, message = BAD[change]
    harness.assert_rejected_untouched(stitchops.focus_attention, _bad(change), error, message)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    require(backend, torch.float32)
    m = {name: t.float() for name, t in masters().items()}
    windows = mode_arguments("query_windows")["windows"]
    mask = mode_arguments("head_mask")["mask"]
    op = torch.ops.stitchops.focus_attention.default
    q, k, v, pos = m["q"], m["k"], m["v"], m["pos"]
    for args in (
        (q, k, v, None, None, 0, 0, pos, 0.25, True),
        (q, k, v, mask, None, 0, 0, None, 0.25, False),
        (q, k, v, None, windows, WS, MAP[1], pos, 0.25, True),
    ):
        harness.opcheck(
            backend,
            op,
            *[
                a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args
            ],
        )


# ------------------------------------------------------------ FocusCrossAttention


def layers(seed: int = 0):
    torch.manual_seed(seed)
    ours = FocusCrossAttention(48, 3)
    torch.nn.init.normal_(ours.in_proj_bias)
    torch.nn.init.normal_(ours.out_proj.bias)
    mha = torch.nn.MultiheadAttention(48, 3, batch_first=True)
    mha.load_state_dict(ours.state_dict())  # the same parameter names
    return ours.eval(), mha.eval()


def test_module_equals_multihead_attention_in_full_and_masked_modes():
    ours, mha = layers()
    g = torch.Generator().manual_seed(4)
    query, query_pos = torch.randn(2, 7, 48, generator=g), torch.randn(2, 7, 48, generator=g)
    memory, memory_pos = torch.randn(2, N, 48, generator=g), torch.randn(2, N, 48, generator=g)
    mask = torch.rand(2, 7, N, generator=g) < 0.5
    for m in (None, mask):
        heads_mask = None if m is None else m.repeat_interleave(3, 0)
        expected, weights = mha(
            query + query_pos, memory + memory_pos, memory, need_weights=True, attn_mask=heads_mask
        )
        got = ours(
            query, memory, query_pos, memory_pos, mask=m, key_pos=memory_pos, return_scores=True
        )
        assert rel_err(got.out, expected) < 1e-5
        assert rel_err(got.pos_out, weights @ memory_pos) < 1e-5  # DFPQ as the official code
        assert rel_err(got.scores, weights.sum(1)) < 1e-5  # HRCA's score as the official code


@pytest.mark.parametrize("per_query", [False, True])
def test_module_window_mode_equals_attention_to_the_gathered_keys(per_query):
    ours, mha = layers()
    g = torch.Generator().manual_seed(5)
    query, memory = torch.randn(2, 7, 48, generator=g), torch.randn(2, N, 48, generator=g)
    keys = mode_arguments("query_windows" if per_query else "shared_windows", device="cpu")
    got = ours(query, memory, key_pos=memory, return_scores=True, **keys)
    allowed = dense_allowed("query_windows" if per_query else "shared_windows", keys)[:, 0]
    expected, weights = mha(
        query, memory, memory, need_weights=True, attn_mask=(~allowed).repeat_interleave(3, 0)
    )
    assert rel_err(got.out, expected) < 1e-5
    assert rel_err(got.pos_out, weights @ memory) < 1e-5
    assert rel_err(got.scores, weights.sum(1)) < 1e-5


def test_module_compiles_fullgraph(tmp_path, monkeypatch):
    ours, _ = layers()
    memory = torch.randn(2, N, 48)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = ours

        def forward(self, query):
            result = self.attention(query, memory, key_pos=memory, return_scores=False)
            return result.out + result.pos_out.mean()

    harness.assert_compiles_fullgraph(
        Wrapped(), torch.randn(2, 7, 48), "aot_eager", tmp_path, monkeypatch
    )
