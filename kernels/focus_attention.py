"""Triton kernels of FASeg's focus cross-attention (stitchops/reference/focus_attention.py has
the math): flash-style online softmax, no [B, heads, Q, N] tensor in memory, forward or
backward.

A query attends *slots*: every key (full and mask modes, slot = key), the K·ws² keys of
its batch element's window set (shared windows: slot j is key ``_window_key`` of window
windows[b, j // ws²]) or of its own set (per-query windows). Window keys are read straight
from k and v by their ids: no gathered copy.

Forward:
- ``_forward_kernel`` (program: b·H + h, query block): online softmax over slot blocks →
  out, lse. Mask mode skips a slot block that every query of the tile may not attend.
- ``_mean_kernel`` (program: b, query block), only for pos_out or scores: per slot block,
  Ā = (1/H) Σ_h exp(s_h − lse_h) recomputed from each head's logits, then pos_out += Ā·pos
  (the heads averaged before the product: one Q·L·P product, not H) and Ā's column sums
  per query block (shared slots) or Ā itself (per-query slots) for the scores.
Backward (dS = P ∘ (dP − Δ)·scale, dP = dout·vᵀ + dpos_out·posᵀ/H):
- ``_delta_kernel`` (b·H + h, query block), with pos: Δ's pos term dpos_out·(P_h·pos)/H
  (the rest, rowsum(dout ∘ out), is one torch reduction).
- shared slots, deterministic (each output element has one writer): ``_dkdv_kernel``
  (b·H + h, slot block) loops over the query blocks; ``_dq_kernel`` (b·H + h, query block)
  over the slot blocks; ``_dpos_kernel`` (b, slot block) over query blocks and heads.
- per-query slots: ``_query_sets_backward_kernel`` (b·H + h, query block) gives dq and adds
  dk, dv, dpos into fp32 buffers with atomics, since windows repeat across queries (the
  sums' order, hence their last bits, varies run to run there; shared slots do not).

Per head and query, FLOPs 4·L·D (logits, A·v) forward, 10·L·D backward (logits again, dP, dv,
dk, dq), plus 2·L·P for pos_out (per query, not per head) and again for dpos; minimum bytes
(no reuse lost): q, k, v, out read or written once, pos once, for window modes only the
chosen keys: (2·Q + 2·L)·D·H·s + L·P·s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from stitchops.kernels.tuning import dot_precision, launch_sizes

from stitchops._runtime import new_output, triton_interpreting
from stitchops.reference.focus_attention import window_keys

FULL, MASK, SHARED, PER_QUERY = 0, 1, 2, 3
GPU_BLOCKS = {"BLOCK_Q": 32, "BLOCK_N": 64, "QUERY_SET_BLOCK": 16}
INTERPRETED = {"BLOCK_Q": 32, "BLOCK_N": 64, "QUERY_SET_BLOCK": 16}
# The kernels that hold pos tiles, when P > 64: smaller tiles keep them within the 99 KB of
# shared memory the smallest GPU gives a block (tests/test_triton_compile.py checks P = 256).
WIDE_POS = {"BLOCK_Q": 16, "BLOCK_N": 32}
MAX_DIM, MAX_POS = 128, 256  # what the kernels take (ops/focus_attention.kernel_limits)


def blocks() -> dict[str, int]:
    return launch_sizes(GPU_BLOCKS, INTERPRETED)


@triton.jit
def _window_key(w, slot, ws, map_width):
    """The key id of slot ``slot`` of window ``w`` (the window's keys in row-major order)."""
    per_row = map_width // ws
    inner = slot % (ws * ws)
    return ((w // per_row) * ws + inner // ws) * map_width + (w % per_row) * ws + inner % ws


@triton.jit
def _shared_ids(win_ptr, batch, slot, mask_n, sets, ws, map_width, MODE: tl.constexpr):
    """[BLOCK_N] key ids of shared slots: the slot itself, or a key of the batch element's
    window set."""
    ids = slot
    if MODE == 2:
        w = tl.load(win_ptr + batch * sets + slot // (ws * ws), mask=mask_n, other=0)
        ids = _window_key(w, slot, ws, map_width)
    return ids


@triton.jit
def _query_ids(win_ptr, batch, offs_q, mask_q, slot, mask_n, queries, sets, ws, map_width):
    """[BLOCK_Q, BLOCK_N] key ids of per-query slots."""
    row = (batch * queries + offs_q).to(tl.int64) * sets
    w = tl.load(
        win_ptr + row[:, None] + (slot // (ws * ws))[None, :],
        mask=mask_q[:, None] & mask_n[None, :],
        other=0,
    )
    return _window_key(w, slot[None, :], ws, map_width)


@triton.jit
def _allowed(
    mask_ptr,
    reset_ptr,
    batch,
    head,
    mask_heads,
    offs_q,
    mask_q,
    ids,
    mask_n,
    queries,
    keys,
    MODE: tl.constexpr,
):
    """[BLOCK_Q, BLOCK_N] bool: the pairs a query may attend among shared slots."""
    ok = mask_q[:, None] & mask_n[None, :]
    if MODE == 1:
        row = ((batch * mask_heads + head % mask_heads) * queries + offs_q).to(tl.int64)
        blocked = tl.load(mask_ptr + row[:, None] * keys + ids[None, :], mask=ok, other=1)
        reset = tl.load(reset_ptr + row, mask=mask_q, other=0)
        ok = ok & ((blocked == 0) | (reset != 0)[:, None])
    return ok


@triton.jit
def _rows(ptr, base, ids, mask, offs_d, mask_d, width):
    """Rows ``ids`` ([BLOCK]) of a [*, width] matrix at ``base`` → [BLOCK, BLOCK_D]."""
    return tl.load(
        ptr + base + ids.to(tl.int64)[:, None] * width + offs_d[None, :],
        mask=mask[:, None] & mask_d[None, :],
        other=0.0,
    )


@triton.jit
def _gathered(ptr, base, ids, mask, offs_d, mask_d, width):
    """Rows at ids ([BLOCK_Q, BLOCK_N]) → [BLOCK_Q, BLOCK_N, BLOCK_D]."""
    return tl.load(
        ptr + base + ids.to(tl.int64)[:, :, None] * width + offs_d[None, None, :],
        mask=mask[:, :, None] & mask_d[None, None, :],
        other=0.0,
    )


@triton.jit
def _channels(dim, pos_dim, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Offsets and masks of a head's channels and of pos's."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    return offs_d, offs_d < dim, offs_p, offs_p < pos_dim


@triton.jit
def _row_stats(lse_ptr, delta_ptr, bh, queries, offs_q, mask_q):
    """The rows' log-sum-exp and Δ."""
    row = bh.to(tl.int64) * queries + offs_q
    return (
        tl.load(lse_ptr + row, mask=mask_q, other=0.0),
        tl.load(delta_ptr + row, mask=mask_q, other=0.0),
    )


@triton.jit
def _score_grads(
    p, dout, v, dpos, pos, delta, heads, scale, HAS_POS: tl.constexpr, DOT: tl.constexpr
):
    """dS·scale = P ∘ (dP − Δ)·scale on a tile, dP = dout·vᵀ + dpos_out·posᵀ / H."""
    dp = tl.dot(dout, tl.trans(v), input_precision=DOT)
    if HAS_POS:
        dp += tl.dot(dpos, tl.trans(pos), input_precision=DOT) / heads
    return p * (dp - delta[:, None]) * scale


@triton.jit
def _logits(
    q,
    k_ptr,
    kv_base,
    win_ptr,
    mask_ptr,
    reset_ptr,
    batch,
    head,
    mask_heads,
    offs_q,
    mask_q,
    slot,
    mask_n,
    offs_d,
    mask_d,
    queries,
    keys,
    dim,
    sets,
    ws,
    map_width,
    scale,
    MODE: tl.constexpr,
    DOT: tl.constexpr,
):
    """(scaled logits with −inf where not allowed, allowed, key ids, the key rows) of a
    [BLOCK_Q, BLOCK_N] tile; key rows [BLOCK_N, D] (shared) or [BLOCK_Q, BLOCK_N, D]."""
    if MODE == 3:
        ids = _query_ids(win_ptr, batch, offs_q, mask_q, slot, mask_n, queries, sets, ws, map_width)
        ok = mask_q[:, None] & mask_n[None, :]
        k = _gathered(k_ptr, kv_base, ids, ok, offs_d, mask_d, dim).to(tl.float32)
        s = tl.sum(q.to(tl.float32)[:, None, :] * k, axis=2) * scale
    else:
        ids = _shared_ids(win_ptr, batch, slot, mask_n, sets, ws, map_width, MODE)
        ok = _allowed(
            mask_ptr,
            reset_ptr,
            batch,
            head,
            mask_heads,
            offs_q,
            mask_q,
            ids,
            mask_n,
            queries,
            keys,
            MODE,
        )
        k = _rows(k_ptr, kv_base, ids, mask_n, offs_d, mask_d, dim)
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * scale
    return tl.where(ok, s, float("-inf")), ok, ids, k


@triton.jit
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    win_ptr,
    mask_ptr,
    reset_ptr,
    out_ptr,
    lse_ptr,
    heads,
    queries,
    keys,
    slots,
    dim,
    sets,
    ws,
    map_width,
    mask_heads,
    scale,
    MODE: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (b·H + h, query block): out = softmax(q·kᵀ·scale)·v over the allowed slots,
    lse = the rows' log-sum-exp."""
    bh = tl.program_id(0)
    batch, head = bh // heads, bh % heads
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < queries
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    q_base = bh.to(tl.int64) * queries * dim
    kv_base = bh.to(tl.int64) * keys * dim
    q = _rows(q_ptr, q_base, offs_q, mask_q, offs_d, mask_d, dim)
    scale_ = tl.cast(scale, tl.float32)
    row_max = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for start in range(0, slots, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        mask_n = slot < slots
        s, ok, ids, _ = _logits(
            q,
            k_ptr,
            kv_base,
            win_ptr,
            mask_ptr,
            reset_ptr,
            batch,
            head,
            mask_heads,
            offs_q,
            mask_q,
            slot,
            mask_n,
            offs_d,
            mask_d,
            queries,
            keys,
            dim,
            sets,
            ws,
            map_width,
            scale_,
            MODE,
            DOT,
        )
        if tl.max(ok.to(tl.int32)) > 0:  # mask mode: a block no query of the tile may attend
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(s - shift[:, None])
            decay = tl.exp(row_max - shift)
            row_sum = row_sum * decay + tl.sum(p, axis=1)
            if MODE == 3:
                v = _gathered(v_ptr, kv_base, ids, ok, offs_d, mask_d, dim).to(tl.float32)
                acc = acc * decay[:, None] + tl.sum(p[:, :, None] * v, axis=1)
            else:
                v = _rows(v_ptr, kv_base, ids, mask_n, offs_d, mask_d, dim)
                acc = acc * decay[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
            row_max = new_max
    row_sum = tl.where(mask_q, row_sum, 1.0)  # rows past Q: nothing to divide
    out = acc / row_sum[:, None]
    tl.store(
        out_ptr + q_base + offs_q.to(tl.int64)[:, None] * dim + offs_d[None, :],
        out,
        mask=mask_q[:, None] & mask_d[None, :],
    )
    tl.store(lse_ptr + bh.to(tl.int64) * queries + offs_q, row_max + tl.log(row_sum), mask=mask_q)


@triton.jit
def _mean_probabilities(
    q_ptr,
    k_ptr,
    lse_ptr,
    win_ptr,
    mask_ptr,
    reset_ptr,
    batch,
    heads,
    mask_heads,
    offs_q,
    mask_q,
    slot,
    mask_n,
    offs_d,
    mask_d,
    queries,
    keys,
    dim,
    sets,
    ws,
    map_width,
    scale,
    MODE: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Ā = (1/H) Σ_h A_h on a [BLOCK_Q, BLOCK_N] tile."""
    mean = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for head in range(0, heads):
        bh = (batch * heads + head).to(tl.int64)
        q = _rows(q_ptr, bh * queries * dim, offs_q, mask_q, offs_d, mask_d, dim)
        s, ok, _, _ = _logits(
            q,
            k_ptr,
            bh * keys * dim,
            win_ptr,
            mask_ptr,
            reset_ptr,
            batch,
            head,
            mask_heads,
            offs_q,
            mask_q,
            slot,
            mask_n,
            offs_d,
            mask_d,
            queries,
            keys,
            dim,
            sets,
            ws,
            map_width,
            scale,
            MODE,
            DOT,
        )
        lse = tl.load(lse_ptr + bh * queries + offs_q, mask=mask_q, other=0.0)
        mean += tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
    return mean / heads


@triton.jit
def _mean_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    lse_ptr,
    win_ptr,
    mask_ptr,
    reset_ptr,
    pos_out32_ptr,
    colsum_ptr,
    heads,
    queries,
    keys,
    slots,
    dim,
    pos_dim,
    sets,
    ws,
    map_width,
    mask_heads,
    scale,
    MODE: tl.constexpr,
    HAS_POS: tl.constexpr,
    SCORES: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program (b, query block): pos_out = Ā·pos and Ā's column sums over the block (shared
    slots: colsum [B, query blocks, slots]) or Ā itself (per-query slots: [B, Q, slots])."""
    batch = tl.program_id(0)
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < queries
    offs_d, mask_d, offs_p, mask_p = _channels(dim, pos_dim, BLOCK_D, BLOCK_P)
    pos_base = batch.to(tl.int64) * keys * pos_dim
    scale_ = tl.cast(scale, tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for start in range(0, slots, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        mask_n = slot < slots
        mean = _mean_probabilities(
            q_ptr,
            k_ptr,
            lse_ptr,
            win_ptr,
            mask_ptr,
            reset_ptr,
            batch,
            heads,
            mask_heads,
            offs_q,
            mask_q,
            slot,
            mask_n,
            offs_d,
            mask_d,
            queries,
            keys,
            dim,
            sets,
            ws,
            map_width,
            scale_,
            MODE,
            DOT,
            BLOCK_Q,
            BLOCK_N,
        )
        if HAS_POS:
            if MODE == 3:
                ok = mask_q[:, None] & mask_n[None, :]
                ids = _query_ids(
                    win_ptr, batch, offs_q, mask_q, slot, mask_n, queries, sets, ws, map_width
                )
                pos = _gathered(pos_ptr, pos_base, ids, ok, offs_p, mask_p, pos_dim)
                acc += tl.sum(mean[:, :, None] * pos.to(tl.float32), axis=1)
            else:
                ids = _shared_ids(win_ptr, batch, slot, mask_n, sets, ws, map_width, MODE)
                pos = _rows(pos_ptr, pos_base, ids, mask_n, offs_p, mask_p, pos_dim)
                acc += tl.dot(mean.to(pos.dtype), pos, input_precision=DOT)
        if SCORES:
            if MODE == 3:
                row = (batch * queries + offs_q).to(tl.int64) * slots
                tl.store(
                    colsum_ptr + row[:, None] + slot[None, :],
                    mean,
                    mask=mask_q[:, None] & mask_n[None, :],
                )
            else:
                part = (batch * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * slots
                tl.store(colsum_ptr + part + slot, tl.sum(mean, axis=0), mask=mask_n)
    if HAS_POS:
        row = (batch * queries + offs_q).to(tl.int64) * pos_dim
        tl.store(
            pos_out32_ptr + row[:, None] + offs_p[None, :],
            acc,
            mask=mask_q[:, None] & mask_p[None, :],
        )


@dataclass(frozen=True)
class Call:
    """One call's contiguous inputs, mode and the index tables its kernels read."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mode: int
    slots: int  # keys a query attends: N, or sets·ws²
    tables: tuple  # (window table int32, mask int8, all-blocked flags int8); dummies if unused
    geometry: tuple  # (sets, window_size, map_width, mask_heads, scale), as the kernels take it


def _prepare(q, k, v, mask, windows, window_size, map_width, scale) -> Call:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dummy = torch.zeros(1, device=q.device, dtype=torch.int8)
    if windows is not None:
        mode = PER_QUERY if windows.shape[1] > 1 else SHARED
        sets = windows.shape[2]
        return Call(
            q,
            k,
            v,
            mode,
            sets * window_size**2,
            (windows.to(torch.int32).contiguous(), dummy, dummy),
            (sets, window_size, map_width, 1, scale),
        )
    table = dummy.to(torch.int32)
    if mask is not None:
        flags = mask.all(-1).to(torch.int8).contiguous()
        return Call(
            q,
            k,
            v,
            MASK,
            k.shape[2],
            (table, mask.contiguous().view(torch.int8), flags),
            (1, window_size, map_width, mask.shape[1], scale),
        )
    return Call(
        q, k, v, FULL, k.shape[2], (table, dummy, dummy), (1, window_size, map_width, 1, scale)
    )


@triton.jit
def _delta_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    lse_ptr,
    dpos_out_ptr,
    win_ptr,
    mask_ptr,
    reset_ptr,
    delta_ptr,
    heads,
    queries,
    keys,
    slots,
    dim,
    pos_dim,
    sets,
    ws,
    map_width,
    mask_heads,
    scale,
    MODE: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program (b·H + h, query block): Δ += dpos_out·(A_h·pos) / H, the pos term of
    Δ = rowsum(A_h ∘ dP)."""
    bh = tl.program_id(0)
    batch, head = bh // heads, bh % heads
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < queries
    offs_d, mask_d, offs_p, mask_p = _channels(dim, pos_dim, BLOCK_D, BLOCK_P)
    q = _rows(q_ptr, bh.to(tl.int64) * queries * dim, offs_q, mask_q, offs_d, mask_d, dim)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * queries + offs_q, mask=mask_q, other=0.0)
    pos_base = batch.to(tl.int64) * keys * pos_dim
    acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for start in range(0, slots, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        mask_n = slot < slots
        s, ok, ids, _ = _logits(
            q,
            k_ptr,
            bh.to(tl.int64) * keys * dim,
            win_ptr,
            mask_ptr,
            reset_ptr,
            batch,
            head,
            mask_heads,
            offs_q,
            mask_q,
            slot,
            mask_n,
            offs_d,
            mask_d,
            queries,
            keys,
            dim,
            sets,
            ws,
            map_width,
            tl.cast(scale, tl.float32),
            MODE,
            DOT,
        )
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        if MODE == 3:
            pos = _gathered(pos_ptr, pos_base, ids, ok, offs_p, mask_p, pos_dim)
            acc += tl.sum(p[:, :, None] * pos.to(tl.float32), axis=1)
        else:
            pos = _rows(pos_ptr, pos_base, ids, mask_n, offs_p, mask_p, pos_dim)
            acc += tl.dot(p.to(pos.dtype), pos, input_precision=DOT)
    dpos = _rows(
        dpos_out_ptr,
        batch.to(tl.int64) * queries * pos_dim,
        offs_q,
        mask_q,
        offs_p,
        mask_p,
        pos_dim,
    ).to(tl.float32)
    row = bh.to(tl.int64) * queries + offs_q
    delta = tl.load(delta_ptr + row, mask=mask_q, other=0.0)
    tl.store(delta_ptr + row, delta + tl.sum(dpos * acc, axis=1) / heads, mask=mask_q)


@triton.jit
def _dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    dout_ptr,
    dpos_out_ptr,
    lse_ptr,
    delta_ptr,
    win_ptr,
    mask_ptr,
    reset_ptr,
    dk_ptr,
    dv_ptr,
    heads,
    queries,
    keys,
    slots,
    dim,
    pos_dim,
    sets,
    ws,
    map_width,
    mask_heads,
    scale,
    MODE: tl.constexpr,
    HAS_POS: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program (b·H + h, shared slot block): dv = Σ_q Pᵀ·dout, dk = Σ_q dSᵀ·q over every
    query block, stored at the slots' keys."""
    bh = tl.program_id(0)
    batch, head = bh // heads, bh % heads
    slot = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = slot < slots
    offs_d, mask_d, offs_p, mask_p = _channels(dim, pos_dim, BLOCK_D, BLOCK_P)
    kv_base = bh.to(tl.int64) * keys * dim
    q_base = bh.to(tl.int64) * queries * dim
    ids = _shared_ids(win_ptr, batch, slot, mask_n, sets, ws, map_width, MODE)
    k = _rows(k_ptr, kv_base, ids, mask_n, offs_d, mask_d, dim)
    v = _rows(v_ptr, kv_base, ids, mask_n, offs_d, mask_d, dim)
    pos = _rows(
        pos_ptr, batch.to(tl.int64) * keys * pos_dim, ids, mask_n & HAS_POS, offs_p, mask_p, pos_dim
    )
    scale_ = tl.cast(scale, tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for q0 in range(0, queries, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < queries
        q = _rows(q_ptr, q_base, offs_q, mask_q, offs_d, mask_d, dim)
        dout = _rows(dout_ptr, q_base, offs_q, mask_q, offs_d, mask_d, dim)
        ok = _allowed(
            mask_ptr,
            reset_ptr,
            batch,
            head,
            mask_heads,
            offs_q,
            mask_q,
            ids,
            mask_n,
            queries,
            keys,
            MODE,
        )
        lse, delta = _row_stats(lse_ptr, delta_ptr, bh, queries, offs_q, mask_q)
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * scale_
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(dout.dtype)), dout, input_precision=DOT)
        dpos = _rows(
            dpos_out_ptr,
            batch.to(tl.int64) * queries * pos_dim,
            offs_q,
            mask_q & HAS_POS,
            offs_p,
            mask_p,
            pos_dim,
        )
        ds = _score_grads(p, dout, v, dpos, pos, delta, heads, scale_, HAS_POS, DOT)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT)
    out = kv_base + ids.to(tl.int64)[:, None] * dim + offs_d[None, :]
    tl.store(dk_ptr + out, dk, mask=mask_n[:, None] & mask_d[None, :])
    tl.store(dv_ptr + out, dv, mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    dout_ptr,
    dpos_out_ptr,
    lse_ptr,
    delta_ptr,
    win_ptr,
    mask_ptr,
    reset_ptr,
    dq_ptr,
    heads,
    queries,
    keys,
    slots,
    dim,
    pos_dim,
    sets,
    ws,
    map_width,
    mask_heads,
    scale,
    MODE: tl.constexpr,
    HAS_POS: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program (b·H + h, query block): dq = Σ_slots dS·k."""
    bh = tl.program_id(0)
    batch, head = bh // heads, bh % heads
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < queries
    offs_d, mask_d, offs_p, mask_p = _channels(dim, pos_dim, BLOCK_D, BLOCK_P)
    kv_base = bh.to(tl.int64) * keys * dim
    q_base = bh.to(tl.int64) * queries * dim
    pos_base = batch.to(tl.int64) * keys * pos_dim
    q = _rows(q_ptr, q_base, offs_q, mask_q, offs_d, mask_d, dim)
    dout = _rows(dout_ptr, q_base, offs_q, mask_q, offs_d, mask_d, dim)
    dpos = _rows(
        dpos_out_ptr,
        batch.to(tl.int64) * queries * pos_dim,
        offs_q,
        mask_q & HAS_POS,
        offs_p,
        mask_p,
        pos_dim,
    )
    lse, delta = _row_stats(lse_ptr, delta_ptr, bh, queries, offs_q, mask_q)
    scale_ = tl.cast(scale, tl.float32)
    dq = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for start in range(0, slots, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        mask_n = slot < slots
        s, ok, ids, k = _logits(
            q,
            k_ptr,
            kv_base,
            win_ptr,
            mask_ptr,
            reset_ptr,
            batch,
            head,
            mask_heads,
            offs_q,
            mask_q,
            slot,
            mask_n,
            offs_d,
            mask_d,
            queries,
            keys,
            dim,
            sets,
            ws,
            map_width,
            scale_,
            MODE,
            DOT,
        )
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        v = _rows(v_ptr, kv_base, ids, mask_n, offs_d, mask_d, dim)
        pos = _rows(pos_ptr, pos_base, ids, mask_n & HAS_POS, offs_p, mask_p, pos_dim)
        ds = _score_grads(p, dout, v, dpos, pos, delta, heads, scale_, HAS_POS, DOT)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT)
    tl.store(
        dq_ptr + q_base + offs_q.to(tl.int64)[:, None] * dim + offs_d[None, :],
        dq,
        mask=mask_q[:, None] & mask_d[None, :],
    )


@triton.jit
def _dpos_kernel(
    q_ptr,
    k_ptr,
    dpos_out_ptr,
    lse_ptr,
    win_ptr,
    mask_ptr,
    reset_ptr,
    dpos_ptr,
    heads,
    queries,
    keys,
    slots,
    dim,
    pos_dim,
    sets,
    ws,
    map_width,
    mask_heads,
    scale,
    MODE: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program (b, shared slot block): dpos = Σ_q Āᵀ·dpos_out, stored at the slots' keys."""
    batch = tl.program_id(0)
    slot = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = slot < slots
    offs_d, mask_d, offs_p, mask_p = _channels(dim, pos_dim, BLOCK_D, BLOCK_P)
    scale_ = tl.cast(scale, tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, queries, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < queries
        mean = _mean_probabilities(
            q_ptr,
            k_ptr,
            lse_ptr,
            win_ptr,
            mask_ptr,
            reset_ptr,
            batch,
            heads,
            mask_heads,
            offs_q,
            mask_q,
            slot,
            mask_n,
            offs_d,
            mask_d,
            queries,
            keys,
            dim,
            sets,
            ws,
            map_width,
            scale_,
            MODE,
            DOT,
            BLOCK_Q,
            BLOCK_N,
        )
        dpos = _rows(
            dpos_out_ptr,
            batch.to(tl.int64) * queries * pos_dim,
            offs_q,
            mask_q,
            offs_p,
            mask_p,
            pos_dim,
        )
        acc += tl.dot(tl.trans(mean.to(dpos.dtype)), dpos, input_precision=DOT)
    ids = _shared_ids(win_ptr, batch, slot, mask_n, sets, ws, map_width, MODE)
    out = batch.to(tl.int64) * keys * pos_dim + ids.to(tl.int64)[:, None] * pos_dim
    tl.store(dpos_ptr + out + offs_p[None, :], acc, mask=mask_n[:, None] & mask_p[None, :])


@triton.jit
def _query_sets_backward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    dout_ptr,
    dpos_out_ptr,
    lse_ptr,
    delta_ptr,
    win_ptr,
    dq_ptr,
    dk32_ptr,
    dv32_ptr,
    dpos32_ptr,
    heads,
    queries,
    keys,
    slots,
    dim,
    pos_dim,
    sets,
    ws,
    map_width,
    scale,
    HAS_POS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program (b·H + h, query block) of per-query window sets: dq in registers; dk, dv and
    dpos (fp32 buffers) by atomic adds at the keys, which repeat across queries."""
    bh = tl.program_id(0)
    batch = bh // heads
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < queries
    offs_d, mask_d, offs_p, mask_p = _channels(dim, pos_dim, BLOCK_D, BLOCK_P)
    kv_base = bh.to(tl.int64) * keys * dim
    q_base = bh.to(tl.int64) * queries * dim
    pos_base = batch.to(tl.int64) * keys * pos_dim
    q = _rows(q_ptr, q_base, offs_q, mask_q, offs_d, mask_d, dim).to(tl.float32)
    dout = _rows(dout_ptr, q_base, offs_q, mask_q, offs_d, mask_d, dim).to(tl.float32)
    dpos = _rows(
        dpos_out_ptr,
        batch.to(tl.int64) * queries * pos_dim,
        offs_q,
        mask_q & HAS_POS,
        offs_p,
        mask_p,
        pos_dim,
    ).to(tl.float32)
    lse, delta = _row_stats(lse_ptr, delta_ptr, bh, queries, offs_q, mask_q)
    scale_ = tl.cast(scale, tl.float32)
    dq = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for start in range(0, slots, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        mask_n = slot < slots
        ids = _query_ids(win_ptr, batch, offs_q, mask_q, slot, mask_n, queries, sets, ws, map_width)
        ok = mask_q[:, None] & mask_n[None, :]
        k = _gathered(k_ptr, kv_base, ids, ok, offs_d, mask_d, dim).to(tl.float32)
        v = _gathered(v_ptr, kv_base, ids, ok, offs_d, mask_d, dim).to(tl.float32)
        s = tl.sum(q[:, None, :] * k, axis=2) * scale_
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.sum(dout[:, None, :] * v, axis=2)
        ok3 = ok[:, :, None]
        if HAS_POS:
            pos = _gathered(pos_ptr, pos_base, ids, ok, offs_p, mask_p, pos_dim).to(tl.float32)
            dp += tl.sum(dpos[:, None, :] * pos, axis=2) / heads
            tl.atomic_add(
                dpos32_ptr
                + pos_base
                + ids.to(tl.int64)[:, :, None] * pos_dim
                + offs_p[None, None, :],
                (p / heads)[:, :, None] * dpos[:, None, :],
                mask=ok3 & mask_p[None, None, :],
            )
        ds = p * (dp - delta[:, None]) * scale_
        dq += tl.sum(ds[:, :, None] * k, axis=1)
        at = kv_base + ids.to(tl.int64)[:, :, None] * dim + offs_d[None, None, :]
        mask3 = ok3 & mask_d[None, None, :]
        tl.atomic_add(dk32_ptr + at, ds[:, :, None] * q[:, None, :], mask=mask3)
        tl.atomic_add(dv32_ptr + at, p[:, :, None] * dout[:, None, :], mask=mask3)
    tl.store(
        dq_ptr + q_base + offs_q.to(tl.int64)[:, None] * dim + offs_d[None, :],
        dq,
        mask=mask_q[:, None] & mask_d[None, :],
    )


# Entry points (the torch backend's, stitchops/reference/focus_attention.py, take the same).


def _pow2(n: int) -> int:
    """The block a dimension of n needs: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(max(n, 1)))


def _sizes(mode: int, dim: int, pos_dim: int, with_pos: bool = False) -> dict:
    """Block sizes of a launch (per-query slots gather 3-D tiles: smaller ones; kernels
    holding wide pos tiles: ``WIDE_POS`` on a GPU)."""
    sizes = blocks()
    block = sizes["QUERY_SET_BLOCK"] if mode == PER_QUERY else None
    out = {
        "BLOCK_Q": block or sizes["BLOCK_Q"],
        "BLOCK_N": block or sizes["BLOCK_N"],
        "BLOCK_D": _pow2(dim),
        "BLOCK_P": _pow2(pos_dim),
    }
    if with_pos and pos_dim > 64 and mode != PER_QUERY and not triton_interpreting():
        out.update(WIDE_POS)
    return out


def focus_attention_forward(
    q, k, v, mask, windows, window_size, map_width, pos, scale, return_scores
):
    call = _prepare(q, k, v, mask, windows, window_size, map_width, scale)
    q, k, v, mode, slots, geometry = call.q, call.k, call.v, call.mode, call.slots, call.geometry
    b, heads, queries, dim = q.shape
    keys = k.shape[2]
    pos_dim = pos.shape[-1] if pos is not None else 0
    sizes = _sizes(mode, dim, pos_dim)
    dot = dot_precision(q.dtype)
    out = new_output(b, heads, queries, dim, device=q.device, dtype=q.dtype)
    lse = new_output(b, heads, queries, device=q.device, dtype=torch.float32)
    if out.numel():
        _forward_kernel[(b * heads, triton.cdiv(queries, sizes["BLOCK_Q"]))](
            q,
            k,
            v,
            *call.tables,
            out,
            lse,
            heads,
            queries,
            keys,
            slots,
            dim,
            *geometry,
            MODE=mode,
            DOT=dot,
            BLOCK_Q=sizes["BLOCK_Q"],
            BLOCK_N=sizes["BLOCK_N"],
            BLOCK_D=sizes["BLOCK_D"],
        )
    pos_out = q.new_zeros(b, queries, pos_dim)
    scores = q.new_zeros(b, keys if return_scores else 0)
    if (pos is not None or return_scores) and b * queries:
        pos = pos.contiguous() if pos is not None else q
        sizes = _sizes(mode, dim, pos_dim, with_pos=True)
        q_blocks = triton.cdiv(queries, sizes["BLOCK_Q"])
        f32 = {"device": q.device, "dtype": torch.float32}
        pos_out32 = new_output(b, queries, pos_dim, **f32)
        rows = q_blocks if mode != PER_QUERY else queries
        colsum = new_output(b, rows if return_scores else 0, slots, **f32)
        _mean_kernel[(b, q_blocks)](
            q,
            k,
            pos,
            lse,
            *call.tables,
            pos_out32,
            colsum,
            heads,
            queries,
            keys,
            slots,
            dim,
            pos_dim,
            *geometry,
            MODE=mode,
            HAS_POS=pos_dim > 0,
            SCORES=return_scores,
            DOT=dot,
            **sizes,
        )
        pos_out = pos_out32.to(q.dtype)
        if return_scores:
            scores = _scatter_scores(colsum, mode, windows, window_size, map_width, keys)
            scores = scores.to(q.dtype)
    return out, pos_out, scores, lse


def _scatter_scores(colsum, mode, windows, window_size, map_width, keys):
    """[B, N] scores from the slots' sums: the slots are the keys (full, mask), a permutation
    of some (shared windows: unique ids), or repeat across queries (per query: scatter_add,
    whose order on a GPU is not fixed)."""
    if mode in (FULL, MASK):
        return colsum.sum(1)
    ids = window_keys(windows, window_size, map_width)
    scores = colsum.new_zeros(colsum.shape[0], keys)
    if mode == SHARED:
        return scores.scatter_(1, ids[:, 0], colsum.sum(1))
    return scores.scatter_add_(1, ids.flatten(1), colsum.flatten(1))


def focus_attention_backward(
    dout, dpos_out, q, k, v, mask, windows, window_size, map_width, pos, scale, out, lse
):
    call = _prepare(q, k, v, mask, windows, window_size, map_width, scale)
    q, k, v, mode, slots, geometry = call.q, call.k, call.v, call.mode, call.slots, call.geometry
    b, heads, queries, dim = q.shape
    keys = k.shape[2]
    has_pos = pos is not None
    pos_dim = pos.shape[-1] if has_pos else 0
    if b * queries == 0:
        zeros = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
        return (*zeros, q.new_zeros(b, keys, pos_dim))
    pos = pos.contiguous() if has_pos else q
    dpos_out = dpos_out.contiguous() if has_pos else q
    dout, lse = dout.contiguous(), lse.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # rowsum(dout ∘ out)
    shape = (heads, queries, keys, slots, dim, pos_dim)
    grads = _Backward(call, (q, k, v, pos, dout, dpos_out, lse, delta), shape, has_pos)
    if has_pos:
        _delta_kernel[grads.wide_q_grid](
            q, k, pos, lse, dpos_out, *call.tables, delta, *shape, *geometry, **grads.flags
        )
    if mode == PER_QUERY:
        return grads.query_sets(scale)
    return grads.shared_slots()


class _Backward:
    """The backward launches after the delta pass: every kernel reads the same inputs
    (q, k, v, pos, dout, dpos_out, lse, delta), the call's tables, sizes and geometry."""

    def __init__(self, call, inputs, shape, has_pos: bool) -> None:
        self.call, self.inputs, self.shape, self.has_pos = call, inputs, shape, has_pos
        q = call.q
        heads, queries, _, _, dim, pos_dim = shape
        self.sizes = _sizes(call.mode, dim, pos_dim)
        self.wide = _sizes(call.mode, dim, pos_dim, with_pos=has_pos)  # kernels holding pos
        self.flags = {"MODE": call.mode, "DOT": dot_precision(q.dtype), **self.wide}
        self.q_grid = (q.shape[0] * heads, triton.cdiv(queries, self.sizes["BLOCK_Q"]))
        self.wide_q_grid = (q.shape[0] * heads, triton.cdiv(queries, self.wide["BLOCK_Q"]))

    def query_sets(self, scale: float):
        """Per-query window sets: one kernel, dk / dv / dpos accumulated in fp32 (atomics)."""
        call, (q, k, v) = self.call, (self.call.q, self.call.k, self.call.v)
        b, keys, pos_dim = q.shape[0], k.shape[2], self.shape[5]
        dq = new_output(*q.shape, device=q.device, dtype=q.dtype)
        dk32, dv32 = (torch.zeros(k.shape, device=k.device, dtype=torch.float32) for _ in "kv")
        dpos32 = torch.zeros(b, keys, pos_dim, device=q.device, dtype=torch.float32)
        _query_sets_backward_kernel[self.q_grid](
            *self.inputs, call.tables[0], dq, dk32, dv32, dpos32, *self.shape,
            *call.geometry[:3], scale, HAS_POS=self.has_pos, **self.sizes,
        )  # fmt: skip
        return dq, dk32.to(k.dtype), dv32.to(v.dtype), dpos32.to(q.dtype)

    def shared_slots(self):
        """Full, masked and shared-window modes: dk / dv per key slot, then dq, then dpos."""
        call, (q, k, v) = self.call, (self.call.q, self.call.k, self.call.v)
        b, keys, pos_dim, slots = q.shape[0], k.shape[2], self.shape[5], self.shape[3]
        fresh = _zeros if call.mode == SHARED else _uninitialised  # windows cover some keys
        dk, dv = fresh(k.shape, k), fresh(v.shape, v)
        dq = new_output(*q.shape, device=q.device, dtype=q.dtype)
        tail = (*self.shape, *call.geometry)
        flags = {**self.flags, "HAS_POS": self.has_pos}
        slot_grid = (b * self.shape[0], triton.cdiv(slots, self.wide["BLOCK_N"]))
        _dkdv_kernel[slot_grid](*self.inputs, *call.tables, dk, dv, *tail, **flags)
        _dq_kernel[self.wide_q_grid](*self.inputs, *call.tables, dq, *tail, **flags)
        if not self.has_pos:
            return dq, dk, dv, q.new_zeros(b, keys, pos_dim)
        dpos_out, lse = self.inputs[5], self.inputs[6]
        dpos = fresh((b, keys, pos_dim), q)
        _dpos_kernel[(b, triton.cdiv(slots, self.wide["BLOCK_N"]))](
            q, k, dpos_out, lse, *call.tables, dpos, *tail, **self.flags
        )
        return dq, dk, dv, dpos


def _zeros(shape, like):
    return torch.zeros(shape, device=like.device, dtype=like.dtype)


def _uninitialised(shape, like):
    return new_output(*shape, device=like.device, dtype=like.dtype)
