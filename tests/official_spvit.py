"""The official SPViT code's formulations (ziplab/SPViT, SPViT_DeiT/models_pruning.py), written
out in float64 for the tests: what our op and modules must reproduce.

- ``conv3x3_index(side)``: the gather table of its 3×3 search path, built as it builds it:
  ConViT-style relative positions of a (side + 2)² padded map, an attention mask peaked on
  each 3×3 neighbourhood, the mask's support as (padded token, tap) pairs.
- ``official_conv3x3(v, mixed, side)``: its 3×3 path before bias, BN and projection: the
  head-mixed values ``v @ softmax`` as a [B, P, 9, D] tensor, zero-padded, gathered by the
  table and summed over the taps.
- ``official_attention(x, weights, indicators)``: its UnifiedAttention forward for given gates
  (the MSA, 3×3 and 1×1 branches, the class token passed through the conv branches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_indices(side: int) -> torch.Tensor:
    """[1, side², side², 3]: (dx, dy, dx² + dy²) between every pair of tokens of a square map."""
    n = side * side
    rel = torch.zeros(1, n, n, 3, dtype=torch.float64)
    ind = torch.arange(side).view(1, -1) - torch.arange(side).view(-1, 1)
    indx = ind.repeat(side, side)
    indy = ind.repeat_interleave(side, dim=0).repeat_interleave(side, dim=1)
    rel[..., 2] = (indx**2 + indy**2).unsqueeze(0)
    rel[..., 1] = indy.unsqueeze(0)
    rel[..., 0] = indx.unsqueeze(0)
    return rel


def conv_attmask(k: int, rel: torch.Tensor) -> torch.Tensor:
    """[1, k², n, n]: for each tap, a softmax over the keys peaked on that tap's neighbour."""
    centre = k // 2
    proj = torch.zeros(k * k, 3, dtype=torch.float64)
    for h1 in range(k):
        for h2 in range(k):
            position = h1 + k * h2
            proj[position, 2] = -1
            proj[position, 1] = 2 * (h1 - centre)
            proj[position, 0] = 2 * (h2 - centre)
    proj *= 46
    return torch.matmul(rel, proj.t()).permute(0, 3, 1, 2).softmax(dim=-1)


def conv3x3_index(side: int) -> torch.Tensor:
    """[(side + 2)² · 9, 2]: (padded token, tap) of each padded token's 9 taps, in order."""
    padded = side + 2
    mask = conv_attmask(3, rel_indices(padded))
    support = (mask > 1e-5).nonzero()  # (batch, tap, query, key)
    table = []
    for query in range(padded * padded):
        rows = torch.where(support[:, 2] == query)[0]
        table.append(torch.stack([support[rows][:, 3], support[rows][:, 1]], dim=1))
    return torch.stack(table, dim=0).view(-1, 2)


def official_conv3x3(v: torch.Tensor, mixed: torch.Tensor, side: int) -> torch.Tensor:
    """[B, P, D]: Σ over the 9 taps of the head-mixed values, by pad + gather + sum, for
    v [B, P, H, D] (patch tokens) and the softmax mixing ``mixed`` [H, 9]."""
    b, p, _, d = v.shape
    new_v = (v.permute(0, 1, 3, 2) @ mixed).permute(0, 1, 3, 2)  # [B, P, 9, D]
    padded = F.pad(new_v.view(b, side, side, 9, d), pad=(0, 0, 0, 0, 1, 1, 1, 1))
    index = conv3x3_index(side)
    gathered = padded.flatten(1, 2)[:, index[:, 0], index[:, 1]]
    gathered = gathered.view(b, side + 2, side + 2, 9, d)[:, 1:-1, 1:-1]
    return gathered.sum(3).reshape(b, p, d)


def official_attention(x, weights: dict, indicators, num_heads: int, alpha: float = 1e-2):
    """The search forward of its UnifiedAttention for fixed gates ``indicators`` (3 values:
    not skip, at least 3×3, MSA), BatchNorms in eval mode. ``weights``: qkv (fused, as ours),
    proj, head_probs [H, 9], bn_1x1 / bn_3x3 (weight, bias, running_mean, running_var)."""
    b, n, c = x.shape
    hd, patches = c // num_heads, n - 1
    side = round(patches**0.5)
    w_qkv, b_qkv = weights["qkv.weight"], weights["qkv.bias"]
    w_v, b_v = w_qkv[2 * c :], b_qkv[2 * c :]
    v_weight = F.linear(x, w_v)
    v = (v_weight + b_v).reshape(b, n, num_heads, hd).permute(0, 2, 1, 3)
    qk = F.linear(x, w_qkv[: 2 * c], b_qkv[: 2 * c]).reshape(b, n, 2, num_heads, hd)
    q, k = qk.permute(2, 0, 3, 1, 4)
    attn = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(-1)
    w_proj, b_proj = weights["proj.weight"], weights["proj.bias"]
    msa = F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), w_proj, b_proj)
    mixed = (weights["head_probs"] / alpha).softmax(0)
    new_v = (v_weight[:, 1:].view(b, patches, num_heads, hd).permute(0, 1, 3, 2) @ mixed).permute(
        0, 1, 3, 2
    )
    new_bias = b_v.view(num_heads, hd).t() @ mixed  # [hd, 9]
    new_proj = w_proj.view(c, num_heads, hd).permute(0, 2, 1) @ mixed  # [c, hd, 9]
    cls = x[:, :1]

    def branch(values, bias, bn, proj):
        y = (values + bias).view(b, side, side, hd).permute(0, 3, 1, 2)
        y = F.relu(F.batch_norm(y, *bn[2:], bn[0], bn[1], training=False, eps=1e-5))
        y = F.linear(y.permute(0, 2, 3, 1).reshape(b, patches, hd), proj)
        return torch.cat([cls, y + b_proj], dim=1)

    conv1 = branch(new_v[:, :, 4], new_bias[:, 4], weights["bn_1x1"], new_proj[..., 4])
    v3 = official_conv3x3(v_weight[:, 1:].view(b, patches, num_heads, hd), mixed, side)
    conv3 = branch(v3, new_bias.sum(-1), weights["bn_3x3"], new_proj.sum(-1))
    g0, g1, g2 = indicators
    return g2 * msa + g1 * (1 - g2) * conv3 + g0 * (1 - g1) * (1 - g2) * conv1
