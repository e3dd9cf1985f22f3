"""FASeg's cross-attention layer as a module: ``nn.MultiheadAttention``'s projections under its
parameter names, so Mask2Former / FASeg decoder weights load, around
``stitchops.focus_attention`` (masked, full or window attention, with DFPQ's A·K_pos and
HRCA's key scores from the same pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stitchops.ops.focus_attention import FocusOutput, check_windows, focus_attention
from stitchops.reference.focus_attention import window_keys


def _rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, N, X] at token ids [B, L] → [B, L, X]."""
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


class FocusCrossAttention(nn.Module):
    """Queries [B, Q, E] attend a memory map [B, N, E] (batch first).

    Parameters as ``nn.MultiheadAttention(embed_dim, num_heads)``: ``in_proj_weight``
    [3E, E], ``in_proj_bias`` [3E], ``out_proj`` (E → E). As Mask2Former's cross-attention:
    q = W_q(query + query_pos), k = W_k(memory + memory_pos), v = W_v(memory).

    ``forward(query, memory, query_pos=None, memory_pos=None, *, mask=None, windows=None,
    window_size=None, map_size=None, key_pos=None, return_scores=False)`` returns
    ``FocusOutput(out [B, Q, E], pos_out [B, Q, P] or None, scores [B, N] or None)``:
    ``key_pos`` [B, N, P] gives pos_out = head-averaged A·key_pos (DFPQ); ``mask`` and
    ``windows`` as ``stitchops.focus_attention``.

    Window mode with one set of windows for all queries ([B, K], HRCA) gathers the chosen
    windows' memory tokens and projects only those (K·ws² of the N tokens: 512 of 16,384 at
    the 1/4 level of 512², FASeg's way); per-query sets project the whole map once and let the
    op read each query's windows from it (their union can cover the map).
    """

    def __init__(
        self, embed_dim: int, num_heads: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """[B, T, E] through the q (0), k (1) or v (2) projection → [B, heads, T, D]."""
        e = self.embed_dim
        weight = self.in_proj_weight[which * e : (which + 1) * e]
        bias = self.in_proj_bias
        y = F.linear(x, weight, bias[which * e : (which + 1) * e] if bias is not None else None)
        return y.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor,
        query_pos=None,
        memory_pos=None,
        *,
        mask=None,
        windows=None,
        window_size=None,
        map_size=None,
        key_pos=None,
        return_scores: bool = False,
    ) -> FocusOutput:
        q = self._project(query if query_pos is None else query + query_pos, 0)
        if isinstance(windows, torch.Tensor) and windows.dim() == 2:
            if mask is not None:
                raise ValueError(
                    "mask and windows are exclusive: pass one (or neither, for full attention)"
                )
            result = self._attend_windows(
                q, memory, memory_pos, key_pos, windows, window_size, map_size, return_scores
            )
        else:
            keys_in = memory if memory_pos is None else memory + memory_pos
            k, v = self._project(keys_in, 1), self._project(memory, 2)
            result = focus_attention(
                q,
                k,
                v,
                mask=mask,
                windows=windows,
                window_size=window_size,
                map_size=map_size,
                pos=key_pos,
                return_scores=return_scores,
            )
        b, _, q_count, _ = result.out.shape
        out = self.out_proj(result.out.transpose(1, 2).reshape(b, q_count, self.embed_dim))
        return FocusOutput(out, result.pos_out, result.scores)

    def _attend_windows(
        self, q, memory, memory_pos, key_pos, windows, window_size, map_size, return_scores: bool
    ) -> FocusOutput:
        """One window set per batch element: gather its tokens, project only those, attend
        them all; the scores go back to their map positions. No window (K = 0) attends no
        key: the output is 0 before the projection (its bias after), as
        ``nn.MultiheadAttention`` over an empty memory."""
        if windows.shape[1] == 0:
            b, heads, q_count, d = q.shape
            pos = None if key_pos is None else q.new_zeros(b, q_count, key_pos.shape[-1])
            scores = q.new_zeros(memory.shape[:2]) if return_scores else None
            return FocusOutput(q.new_zeros(b, heads, q_count, d), pos, scores)
        windows, size, width = check_windows(windows, window_size, map_size, q, memory.shape[1])
        gathered = window_keys(windows, size, width)[:, 0]  # [B, K·ws²] memory token ids
        tokens = _rows(memory, gathered)
        keys_in = tokens if memory_pos is None else tokens + _rows(memory_pos, gathered)
        k, v = self._project(keys_in, 1), self._project(tokens, 2)
        pos = _rows(key_pos, gathered) if key_pos is not None else None
        result = focus_attention(q, k, v, pos=pos, return_scores=return_scores)
        scores = result.scores
        if scores is not None:
            scores = scores.new_zeros(memory.shape[:2]).scatter(1, gathered, scores)
        return FocusOutput(result.out, result.pos_out, scores)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
