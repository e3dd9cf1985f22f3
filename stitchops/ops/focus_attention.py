"""``stitchops.focus_attention``: FASeg's focus cross-attention (thesis ch. 5) — masked, full
or window attention of queries to a feature map's keys, with DFPQ's A·K_pos (``pos_out``)
and HRCA's column sums of A (``scores``) from the same pass.

Registered as ``stitchops::focus_attention`` and ``stitchops::focus_attention_backward``, with
fake implementations for torch.compile, tied together by ``torch.library.register_autograd``.
``scores`` and the row log-sum-exp (saved for the backward) carry no gradient. The math,
shapes and memory are in ``stitchops.reference.focus_attention``.

Declared to the shared dispatch as ``FOCUS_ATTENTION``. Backend choice for CUDA tensors:
triton (kernels/focus_attention.py: flash-style online softmax, window keys read in place,
Ā·pos from a second pass), then cuda (csrc/focus_attention.cu: SIMT, a thread per query row
or per key, deterministic in every mode), then torch; both kernels take D <= 128, P <= 256.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils.flop_counter import register_flop_formula

from stitchops import _dispatch
from stitchops.ops import _checks

FOCUS_ATTENTION = _dispatch.register(
    _dispatch.Op(
        name="focus_attention",
        entries=("focus_attention_forward", "focus_attention_backward"),
        reference="stitchops.reference.focus_attention",
        triton="stitchops.kernels.focus_attention",
        kernel_dtypes=(torch.float16, torch.bfloat16, torch.float32),
    )
)


class FocusOutput(NamedTuple):
    """``out`` [B, H, Q, D]; ``pos_out`` [B, Q, P] (None without ``pos``); ``scores`` [B, N]
    (None unless ``return_scores``)."""

    out: torch.Tensor
    pos_out: torch.Tensor | None
    scores: torch.Tensor | None


Tensors4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def kernel_limits(head_dim: int, pos_dim: int) -> list[str]:
    """Why the kernels refuse a call: their blocks hold a whole head (D <= 128) and a whole
    pos row (P <= 256)."""
    reasons = []
    if head_dim > 128:
        reasons.append(f"head dim D = {head_dim} > 128 (the kernels hold a head in one block)")
    if pos_dim > 256:
        reasons.append(f"pos width P = {pos_dim} > 256 (the kernels hold a pos row in one block)")
    return reasons


def _entry(tensors: list[torch.Tensor], function: str, q: torch.Tensor, pos: torch.Tensor | None):
    limits = kernel_limits(q.shape[-1], pos.shape[-1] if pos is not None else 0)
    return FOCUS_ATTENTION.entry(FOCUS_ATTENTION.choose(tensors, limits=limits), function)


@torch.library.custom_op("stitchops::focus_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    windows: torch.Tensor | None,
    window_size: int,
    map_width: int,
    pos: torch.Tensor | None,
    scale: float,
    return_scores: bool,
) -> Tensors4:
    forward = _entry([q, k, v], "focus_attention_forward", q, pos)
    out, pos_out, scores, lse = forward(
        q, k, v, mask, windows, window_size, map_width, pos, scale, return_scores
    )
    return out, pos_out, scores, lse


@_attention_op.register_fake
def _(q, k, v, mask, windows, window_size, map_width, pos, scale, return_scores):
    b, h, q_count, d = q.shape
    p_dim = pos.shape[-1] if pos is not None else 0
    return (
        q.new_empty(b, h, q_count, d),
        q.new_empty(b, q_count, p_dim),
        q.new_empty(b, k.shape[2] if return_scores else 0),
        q.new_empty(b, h, q_count, dtype=torch.float32),
    )


@torch.library.custom_op("stitchops::focus_attention_backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor,
    dpos_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    windows: torch.Tensor | None,
    window_size: int,
    map_width: int,
    pos: torch.Tensor | None,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> Tensors4:
    backward = _entry([dout, q, k, v], "focus_attention_backward", q, pos)
    dq, dk, dv, dpos = backward(
        dout.contiguous(),
        dpos_out.contiguous(),
        q,
        k,
        v,
        mask,
        windows,
        window_size,
        map_width,
        pos,
        scale,
        out,
        lse,
    )
    return dq, dk, dv, dpos


@_backward_op.register_fake
def _(dout, dpos_out, q, k, v, mask, windows, window_size, map_width, pos, scale, out, lse):
    dpos = torch.empty_like(pos) if pos is not None else q.new_empty(k.shape[0], k.shape[2], 0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dpos


def _setup(ctx, inputs, output):
    q, k, v, mask, windows, window_size, map_width, pos, scale, _ = inputs
    out, _, scores, lse = output
    ctx.save_for_backward(q, k, v, mask, windows, pos, out, lse)
    ctx.args = (window_size, map_width, scale)
    ctx.mark_non_differentiable(scores, lse)


def _backward(ctx, dout, dpos_out, _dscores, _dlse):
    q, k, v, mask, windows, pos, out, lse = ctx.saved_tensors
    window_size, map_width, scale = ctx.args
    dq, dk, dv, dpos = torch.ops.stitchops.focus_attention_backward(
        dout, dpos_out, q, k, v, mask, windows, window_size, map_width, pos, scale, out, lse
    )
    return (dq, dk, dv, None, None, None, None, dpos if pos is not None else None, None, None)


torch.library.register_autograd("stitchops::focus_attention", _backward, setup_context=_setup)


def attention_flops(
    batch: int, heads: int, queries: int, keys: int, head_dim: int, pos_dim: int
) -> int:
    """FLOPs (2 per multiply-add) of one forward attending ``keys`` keys per query: logits
    and A·v per head, plus Ā·pos once (the heads averaged first)."""
    return 2 * batch * queries * keys * (2 * heads * head_dim + pos_dim)


@register_flop_formula(torch.ops.stitchops.focus_attention)
def _flops(
    q_shape,
    k_shape,
    v_shape,
    mask_shape,
    windows_shape,
    window_size,
    map_width,
    pos_shape,
    scale,
    return_scores,
    **kwargs,
):
    """For torch.utils.flop_counter: the keys a query attends (every key, or K·ws²), whatever
    the backend executes."""
    b, h, q_count, d = q_shape
    keys = windows_shape[-1] * window_size**2 if windows_shape is not None else k_shape[2]
    return attention_flops(b, h, q_count, keys, d, pos_shape[-1] if pos_shape else 0)


# ---------------------------------------------------------------- checks


def _check_qkv(q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, ndim=4)
    _checks.same_dtype_and_device("q", {"q": q, "k": k, "v": v})
    b, h, _, d = q.shape
    _checks.shape("k", k, (b, h, k.shape[2], d), "[B, heads, N, D] with q's B, heads and D")
    _checks.shape("v", v, k.shape, "k's shape [B, heads, N, D]")


def _check_mask(mask: object, q: torch.Tensor, n: int) -> torch.Tensor:
    """[B, 1 or heads, Q, N] bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (True = may not attend), got {mask.dtype}; "
            "a float mask is not taken"
        )
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    b, h, q_count, _ = q.shape
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or tuple(mask.shape) not in ((b, 1, q_count, n), (b, h, q_count, n)):
        raise ValueError(
            f"mask must be [B, Q, N] = {(b, q_count, n)} or [B, heads, Q, N] = "
            f"{(b, h, q_count, n)}, got {tuple(mask.shape)}"
        )
    return mask


def _check_map(window_size: object, map_size: object, n: int) -> tuple[int, int, int]:
    """(window_size, Hm, Wm)."""
    ws = _checks.int_at_least("window_size", window_size, 1)
    if not isinstance(map_size, (tuple, list)) or len(map_size) != 2:
        raise TypeError(f"map_size must be a pair (Hm, Wm) of ints, got {map_size!r}")
    hm, wm = (_checks.int_at_least(f"map_size[{i}]", s, 1) for i, s in enumerate(map_size))
    if hm * wm != n:
        raise ValueError(f"map_size {(hm, wm)} has {hm * wm} tokens but k has N = {n}")
    if hm % ws or wm % ws:
        raise ValueError(f"map_size {(hm, wm)} must be a multiple of window_size {ws}")
    return ws, hm, wm


def _check_windows(windows: object, q: torch.Tensor, count: int, validate: bool) -> torch.Tensor:
    """[B, 1 or Q, K] int64, in range and unique within each set (``validate``)."""
    if not isinstance(windows, torch.Tensor):
        raise TypeError(f"windows must be an int64 torch.Tensor, got {type(windows).__name__}")
    if windows.dtype != torch.int64:
        raise TypeError(f"windows must be int64 window indices, got {windows.dtype}")
    if windows.device != q.device:
        raise ValueError(f"windows is on {windows.device} but q is on {q.device}")
    b, _, q_count, _ = q.shape
    if windows.dim() == 2:
        windows = windows[:, None]
    if windows.dim() != 3 or windows.shape[0] != b or windows.shape[1] not in (1, q_count):
        raise ValueError(
            f"windows must be [B, K] (one set for all queries) or [B, Q, K] with "
            f"B = {b}, Q = {q_count}, got {tuple(windows.shape)}"
        )
    if windows.shape[2] == 0:
        raise ValueError("windows must name at least one window per set (K >= 1)")
    if validate and windows.numel() and not torch.compiler.is_compiling():
        low, high = int(windows.min()), int(windows.max())
        if low < 0 or high >= count:
            raise ValueError(
                f"windows holds indices in [{low}, {high}]; the map has {count} "
                f"windows (0 ... {count - 1})"
            )
        ordered = windows.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError("windows repeats an index within a set; each set must be unique")
    return windows


def check_windows(
    windows: object,
    window_size: object,
    map_size: object,
    q: torch.Tensor,
    n: int,
    validate: bool = True,
) -> tuple[torch.Tensor, int, int]:
    """Window mode's arguments for queries q [B, heads, Q, D] and a map of n tokens:
    (windows [B, 1 or Q, K], window_size, the map's width Wm), or a clear error."""
    if window_size is None or map_size is None:
        raise ValueError("windows needs window_size and map_size (the map's (Hm, Wm))")
    ws, hm, wm = _check_map(window_size, map_size, n)
    windows = _check_windows(windows, q, (hm // ws) * (wm // ws), validate)
    return windows, ws, wm


def _check_pos(pos: object, q: torch.Tensor, n: int) -> None:
    _checks.tensor("pos", pos, ndim=3)
    _checks.same_dtype_and_device("q", {"q": q, "pos": pos})
    if pos.shape[:2] != (q.shape[0], n):
        raise ValueError(
            f"pos must be [B, N, P] with B = {q.shape[0]} and N = {n} (k's), got {tuple(pos.shape)}"
        )


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    return _checks.finite_float("scale", scale)


def focus_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    windows: torch.Tensor | None = None,
    window_size: int | None = None,
    map_size: tuple[int, int] | None = None,
    pos: torch.Tensor | None = None,
    return_scores: bool = False,
    scale: float | None = None,
    validate: bool = True,
) -> FocusOutput:
    """Cross-attention of queries to a map's keys with FASeg's side outputs.

    Args:
        q: [B, heads, Q, D] queries; k, v: [B, heads, N, D], the map's N = Hm·Wm tokens in
            row-major order, already projected per head.
        mask: bool [B, Q, N] or [B, heads, Q, N], True = may not attend; a query whose row
            is all True attends to every key (Mask2Former).
        windows: int64 [B, K] (one set for every query and head, as FASeg's HRCA) or
            [B, Q, K] (a set per query): indices of the window_size² windows of the
            ``map_size`` map (row-major over windows); only their keys are attended.
            Exclusive with ``mask``; neither means full attention.
        pos: [B, N, P] key positional encodings shared by the heads: gives
            pos_out[b, q] = (1/heads) Σ_h Σ_n A[b, h, q, n]·pos[b, n] (DFPQ, Eq. 5.2),
            differentiable in q, k and pos.
        return_scores: also scores[b, n] = Σ_q (1/heads) Σ_h A[b, h, q, n] (HRCA's window
            score, Eq. 5.3), no gradient.
        scale: the logits' factor, 1/√D by default.
        validate: check window indices (range, uniqueness; a device sync). Callers whose
            windows come from a top-k may pass False.

    Returns:
        ``FocusOutput(out, pos_out, scores)``.
    """
    _check_qkv(q, k, v)
    n = k.shape[2]
    if mask is not None and windows is not None:
        raise ValueError(
            "mask and windows are exclusive: pass one (or neither, for full attention)"
        )
    window_size_, map_width = 0, 0
    if mask is not None:
        mask = _check_mask(mask, q, n)
    if windows is not None:
        windows, window_size_, map_width = check_windows(
            windows, window_size, map_size, q, n, validate
        )
    elif window_size is not None or map_size is not None:
        raise ValueError("window_size and map_size are for window mode: pass windows too")
    if pos is not None:
        _check_pos(pos, q, n)
    if not isinstance(return_scores, bool):
        raise TypeError(f"return_scores must be a bool, got {type(return_scores).__name__}")
    scale = _check_scale(scale, q.shape[-1])
    out, pos_out, scores, _ = torch.ops.stitchops.focus_attention(
        q, k, v, mask, windows, window_size_, map_width, pos, scale, return_scores
    )
    return FocusOutput(out, pos_out if pos is not None else None, scores if return_scores else None)
