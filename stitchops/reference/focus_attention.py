"""FASeg's focus cross-attention in plain PyTorch (thesis ch. 5: DFPQ, Eq. 5.2; HRCA,
Eq. 5.3): the spec the kernels follow and the CPU path.

Shapes: q [B, H, Q, D] (H heads); k, v [B, H, N, D], the N = Hm·Wm tokens of a feature map in
row-major order; pos [B, N, P] key positional encodings shared by the heads.

Keys a query may attend (one of):
- every key (full attention);
- ``mask`` [B, 1 or H, Q, N] bool, True = blocked (nn.MultiheadAttention's and Mask2Former's
  convention); a query whose row is all True attends to every key (Mask2Former's reset);
- ``windows`` [B, S, K] int64 (S = 1: one set for every query, as FASeg; S = Q: a set per
  query): window j of the ws × ws windows of the map covers rows (j // (Wm/ws))·ws + [0, ws)
  and columns (j % (Wm/ws))·ws + [0, ws); the query attends the K·ws² keys of its set.

Per head h: A_h = softmax over the allowed keys of q_h·k_hᵀ·scale;
    out_h     = A_h · v_h                                  [B, H, Q, D]
    pos_out   = Ā · pos, Ā = (1/H) Σ_h A_h (DFPQ's A·K_pos)  [B, Q, P]
    scores[n] = Σ_q Ā[q, n]               (HRCA's score)    [B, N]
    lse_h     = log Σ_allowed exp(q_h·k_hᵀ·scale)          [B, H, Q] (for the backward)
The heads are averaged before the product with pos (one Q·N·P product, not one per head).

Backward (explicit adjoint, per head, P = A_h on the allowed keys):
    dP = dout_h·v_hᵀ + dpos_out·posᵀ / H,   Δ = rowsum(P ∘ dP),   dS = P ∘ (dP − Δ)
    dq = scale·dS·k,   dk = scale·dSᵀ·q,   dv = Pᵀ·dout,   dpos = Āᵀ·dpos_out
(dk, dv and dpos of window mode summed where windows repeat across queries).

Memory: full and mask modes hold one [B, H, Q, N] logits tensor (as the official code); window
modes hold only the chosen keys: [B, H, K·ws², D] for a shared set, and for per-query sets
chunks of queries whose gathered keys stay under ``_CHUNK_ELEMENTS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CHUNK_ELEMENTS = 1 << 22  # gathered per-query keys per chunk (elements)


def window_keys(windows: torch.Tensor, window_size: int, map_width: int) -> torch.Tensor:
    """[B, S, K] window ids → [B, S, K·ws²] key ids (each window's keys in row-major order)."""
    per_row = map_width // window_size
    offsets = torch.arange(window_size, device=windows.device)
    rows = (windows // per_row)[..., None, None] * window_size + offsets[:, None]
    cols = (windows % per_row)[..., None, None] * window_size + offsets[None, :]
    return (rows * map_width + cols).flatten(-3)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@dataclass
class Keys:
    """The keys one chunk of queries attends: gathered k, v, pos and their ids."""

    k: torch.Tensor  # [B, H, L, D] (shared) or [B, H, Qc, L, D] (per query)
    v: torch.Tensor
    pos: torch.Tensor | None  # [B, L, P] or [B, Qc, L, P]
    ids: torch.Tensor | None  # [B, L] or [B, Qc, L]; None: every key, in order
    blocked: torch.Tensor | None  # [B, 1 or H, Qc, N] bool (mask mode)


def _gather(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """t [B, H, N, D] at ids [B, L] → [B, H, L, D]; at ids [B, Qc, L] → [B, H, Qc, L, D]."""
    b, h, _, d = t.shape
    flat = ids.reshape(b, 1, -1, 1).expand(b, h, -1, d)
    return torch.gather(t, 2, flat).view(b, h, *ids.shape[1:], d)


def _gather_pos(pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """pos [B, N, P] at ids [B, ...] → [B, ..., P]."""
    b, _, p = pos.shape
    flat = ids.reshape(b, -1, 1).expand(b, -1, p)
    return torch.gather(pos, 1, flat).view(*ids.shape, p)


def _chunks(q, k, v, pos, mask, windows, window_size, map_width):
    """(q0, q1, Keys) over chunks of the queries (one chunk unless sets are per query)."""
    b, h, q_count, d = q.shape
    f = _compute_dtype(q.dtype)
    k, v = k.to(f), v.to(f)
    pos = pos.to(f) if pos is not None else None
    if windows is None:
        blocked = None
        if mask is not None:
            blocked = mask & ~mask.all(-1, keepdim=True)
        yield 0, q_count, Keys(k, v, pos, None, blocked)
        return
    ids = window_keys(windows, window_size, map_width)
    if windows.shape[1] == 1:
        ids = ids[:, 0]
        gathered_pos = _gather_pos(pos, ids) if pos is not None else None
        yield 0, q_count, Keys(_gather(k, ids), _gather(v, ids), gathered_pos, ids, None)
        return
    step = max(1, _CHUNK_ELEMENTS // max(1, b * h * ids.shape[-1] * d))
    for q0 in range(0, q_count, step):
        part = ids[:, q0 : q0 + step]
        gathered_pos = _gather_pos(pos, part) if pos is not None else None
        yield (
            q0,
            q0 + part.shape[1],
            Keys(_gather(k, part), _gather(v, part), gathered_pos, part, None),
        )


def _probabilities(q: torch.Tensor, keys: Keys, scale: float):
    """(A [B, H, Qc, L], lse [B, H, Qc]) for q [B, H, Qc, D] of one chunk."""
    if keys.k.dim() == 5:
        logits = torch.einsum("bhqd,bhqld->bhql", q, keys.k)
    else:
        logits = q @ keys.k.transpose(-1, -2)
    logits.mul_(scale)  # in place: one [B, H, Qc, L] buffer (no autograd inside the op)
    if keys.blocked is not None:
        logits.masked_fill_(keys.blocked, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    return logits.sub_(lse[..., None]).exp_(), lse


def _times_keys(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A [B, H, Qc, L] times per-key rows t: [B, H|1, L, X] or per query [B, H|1, Qc, L, X]."""
    if t.dim() == 5:
        return torch.einsum("bhql,bhqlx->bhqx", a, t.expand(-1, a.shape[1], -1, -1, -1))
    return a @ t


def _scatter_keys(total: torch.Tensor, ids: torch.Tensor | None, rows: torch.Tensor) -> None:
    """total [..., N, X] += rows [..., L, X] at key ids (ids [B, L] or [B, Qc, L], rows with
    the same leading axes as total after the batch: heads and/or nothing)."""
    if ids is None:
        total += rows
        return
    b, x = total.shape[0], total.shape[-1]
    lead = total.shape[1:-2]
    flat = ids.reshape(b, *([1] * len(lead)), -1, 1).expand(b, *lead, -1, x)
    total.scatter_add_(-2, flat, rows.reshape(b, *lead, -1, x))


def focus_attention_forward(
    q, k, v, mask, windows, window_size, map_width, pos, scale, return_scores
):
    """(out [B, H, Q, D], pos_out [B, Q, P] (P = 0 without pos), scores [B, N] (or [B, 0]),
    lse [B, H, Q] fp32)."""
    b, h, q_count, d = q.shape
    n = k.shape[2]
    f = _compute_dtype(q.dtype)
    out = q.new_empty(b, h, q_count, d, dtype=f)
    pos_out = q.new_zeros(b, q_count, pos.shape[-1] if pos is not None else 0, dtype=f)
    scores = q.new_zeros(b, n if return_scores else 0, 1, dtype=f)
    lse = q.new_empty(b, h, q_count, dtype=torch.float32)
    for q0, q1, keys in _chunks(q, k, v, pos, mask, windows, window_size, map_width):
        a, lse[:, :, q0:q1] = _probabilities(q[:, :, q0:q1].to(f), keys, scale)
        out[:, :, q0:q1] = _times_keys(a, keys.v)
        if pos is None and not return_scores:
            continue
        mean = a.mean(1, keepdim=True)  # Ā [B, 1, Qc, L]: the heads' average
        if pos is not None:
            pos_out[:, q0:q1] = _times_keys(mean, keys.pos[:, None])[:, 0]
        if return_scores:
            per_query = keys.k.dim() == 5
            _scatter_keys(
                scores, keys.ids, (mean[:, 0] if per_query else mean[:, 0].sum(1))[..., None]
            )
    return out.to(q.dtype), pos_out.to(q.dtype), scores[..., 0].to(q.dtype), lse


def focus_attention_backward(
    dout, dpos_out, q, k, v, mask, windows, window_size, map_width, pos, scale, out, lse
):
    """(dq, dk, dv, dpos (or [B, N, 0] without pos)) by the adjoint in the module docstring,
    the pos term shared by the heads: dP_h += dpos_out·posᵀ / H. ``out`` and ``lse`` are the
    forward's; this reference recomputes A and takes Δ = rowsum(A ∘ dP) directly."""
    del out, lse
    f = _compute_dtype(q.dtype)
    heads = q.shape[1]
    dq = torch.zeros_like(q, dtype=f)
    dk = torch.zeros_like(k, dtype=f)
    dv = torch.zeros_like(v, dtype=f)
    dpos = (
        torch.zeros_like(pos, dtype=f)
        if pos is not None
        else q.new_zeros(k.shape[0], k.shape[2], 0, dtype=f)
    )
    for q0, q1, keys in _chunks(q, k, v, pos, mask, windows, window_size, map_width):
        qc, g = q[:, :, q0:q1].to(f), dout[:, :, q0:q1].to(f)
        a, _ = _probabilities(qc, keys, scale)
        per_query = keys.k.dim() == 5
        d_a = _times_keys_t(g, keys.v)
        if pos is not None:
            g_pos = dpos_out[:, None, q0:q1].to(f)  # [B, 1, Qc, P]
            d_a += _times_keys_t(g_pos, keys.pos[:, None]) / heads
            mean = a.mean(1, keepdim=True)
            _scatter_keys(dpos, keys.ids, _outer(mean, g_pos, per_query)[:, 0])
        delta = (a.unsqueeze(-2) @ d_a.unsqueeze(-1)).squeeze(-1)  # Δ = rowsum(A ∘ dP)
        ds = d_a.sub_(delta).mul_(a).mul_(scale)  # dS·scale, in place: [B, H, Qc, L]
        dq[:, :, q0:q1] = _times_keys(ds, keys.k)
        _scatter_keys(dk, keys.ids, _outer(ds, qc, per_query))
        _scatter_keys(dv, keys.ids, _outer(a, g, per_query))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpos.to(q.dtype)


def _times_keys_t(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """g [B, H, Qc, X] against per-key rows t ([B, H|1, L, X] or [B, H|1, Qc, L, X]):
    [B, H, Qc, L] = g·tᵀ."""
    if t.dim() == 5:
        return torch.einsum("bhqx,bhqlx->bhql", g, t.expand(-1, g.shape[1], -1, -1, -1))
    return g @ t.transpose(-1, -2)


def _outer(a: torch.Tensor, g: torch.Tensor, per_query: bool) -> torch.Tensor:
    """Per key, Σ_q a[q, l]·g[q]: [B, H, L, X] for keys shared by the queries; for per-query
    keys each (q, l) pair's a·g apart, [B, H, Qc·L, X] in the order of ids [B, Qc, L]."""
    if not per_query:
        return a.transpose(-1, -2) @ g
    return (a[..., None] * g[:, :, :, None, :]).flatten(2, 3)
