"""A float64 formulation of ziplab/FASeg's transformer decoder
(``MultiScaleMaskedTransformerDecoderFASeg.forward`` and ``forward_prediction_heads``),
written from a reading of its code, not copied: sequence-first tensors, Mask2Former's
post-norm layers through ``nn.MultiheadAttention``, the first DFPQ pooled over the initial
prediction's sigmoid < 0.5 with a 1e−6 guard, masked attention (sigmoid < 0.15, a fully
blocked row unblocked) at 1/32-1/8, and at 1/4 the windows of ``window_partition`` under
the top ⌊n/32⌋ of the latest 1/32 attention's column sums, attended with the learned
positional queries. It runs on the weights of a stitchops ``FASegDecoder``, so the tests
compare the two decoders on the same parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def multihead(cross) -> nn.MultiheadAttention:
    """An ``nn.MultiheadAttention`` (sequence first) with a ``FocusCrossAttention``'s
    weights (they share parameter names)."""
    mha = nn.MultiheadAttention(cross.embed_dim, cross.num_heads).to(cross.in_proj_weight)
    mha.load_state_dict(cross.state_dict())
    return mha


def window_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] → [B·n, size, size, C], windows row-major."""
    b, c, height, width = x.shape
    x = x.view(b, c, height // size, size, width // size, size)
    return x.permute(0, 2, 4, 3, 5, 1).contiguous().view(-1, size, size, c)


def prediction_heads(decoder, output, mask_features, size):
    """(class logits, mask logits, attention mask [B·heads, Q, h·w], pooling mask)."""
    normed = decoder.decoder_norm(output).transpose(0, 1)
    classes = decoder.class_embed(normed)
    masks = torch.einsum("bqc,bchw->bqhw", decoder.mask_embed(normed), mask_features)
    attn = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    attn = attn.sigmoid().flatten(2)
    pooling = (attn < 0.5).int()
    heads = decoder.layers[0].cross.num_heads
    blocked = (attn.unsqueeze(1).repeat(1, heads, 1, 1).flatten(0, 1) < 0.15).bool().detach()
    return classes, masks, blocked, pooling


def cross(layer, mha, tgt, memory, mask, pos, query_pos):
    """CrossAttentionLayerFASeg.forward_post: (tgt, head-averaged attention [B, Q, N])."""
    out, attn = mha(tgt + query_pos, memory + pos, memory, attn_mask=mask)
    return layer.cross_norm(tgt + out), attn


def self_attention(layer, tgt, query_pos):
    q = (tgt + query_pos).transpose(0, 1)
    out = layer.self_attn(q, q, tgt.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
    return layer.self_norm(tgt + out)


def ffn(layer, tgt):
    return layer.ffn_norm(tgt + layer.ffn(tgt))


def official_decoder(decoder, maps, mask_features, positions, omega=32):
    """The official forward on ``decoder``'s weights: maps and positions [B, C, h, w] of the
    1/32, 1/16, 1/8 and 1/4 levels; returns [(class logits, mask logits)], first the one
    before any layer."""
    src, pos, sizes = [], [], []
    for i, (m, p) in enumerate(zip(maps, positions, strict=True)):
        sizes.append(m.shape[-2:])
        pos.append(p.flatten(2).permute(2, 0, 1))
        src.append((m.flatten(2) + decoder.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
    fg_src = maps[-1] + decoder.level_embed.weight[-1][None, :, None, None]
    fg_pos = positions[-1]
    n, bs, c = src[0].shape
    query_embed_params = decoder.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
    output = decoder.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
    classes, masks, attn_mask, pooling = prediction_heads(decoder, output, mask_features, sizes[0])
    predictions = [(classes, masks)]
    query_embed = (pooling.permute(1, 2, 0).unsqueeze(-1) * pos[0].unsqueeze(0)).sum(1) / (
        pooling.sum(-1).permute(1, 0)[..., None] + 1e-6
    )
    query_embed = decoder.pos_mlp(query_embed + query_embed_params)
    cg_attn = attn = None
    for i, layer in enumerate(decoder.layers):
        level = i % 4
        attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
        mha = multihead(layer.cross)
        if level == 3:
            _, indexes = cg_attn.sum(1).sort(dim=-1, descending=True)
            ws = int((fg_src.shape[-1] * fg_src.shape[-2] // n) ** 0.5)
            windows = window_partition(fg_src, ws).view(bs, -1, ws**2, c)
            window_pos = window_partition(fg_pos, ws).view(bs, -1, ws**2, c)
            pick = indexes[..., : n // omega][..., None, None].expand(-1, -1, ws**2, c)
            windows = torch.gather(windows, 1, pick).view(bs, -1, c).permute(1, 0, 2)
            window_pos = torch.gather(window_pos, 1, pick).view(bs, -1, c).permute(1, 0, 2)
            output, _ = cross(layer, mha, output, windows, None, window_pos, query_embed_params)
        else:
            output, attn = cross(layer, mha, output, src[level], attn_mask, pos[level], query_embed)
            if level == 0:
                cg_attn = attn
        output = ffn(layer, self_attention(layer, output, query_embed))
        classes, masks, attn_mask, _ = prediction_heads(
            decoder, output, mask_features, sizes[(i + 1) % 4]
        )
        predictions.append((classes, masks))
        if level != 3:
            query_embed = (
                attn.flatten(2).permute(1, 2, 0).unsqueeze(-1) * pos[level].unsqueeze(0)
            ).sum(1)
            query_embed = decoder.pos_mlp(query_embed + query_embed_params)
    return predictions
