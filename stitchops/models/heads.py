"""Segmentation heads on a backbone's last level ([B, D, h, w] maps → logits [B, K, h, w]).

* ``LinearDecoder``: Segmenter's linear decoder (Strudel et al., ICCV 2021): per patch token
  of the last level, LayerNorm then a linear map to the classes.
* ``MaskTransformer``: Segmenter's mask transformer: the last level's tokens, projected to
  d_model, join ``num_classes`` learned class embeddings in ``layers`` (2) transformer
  blocks; the masks are the products of the L2-normalised patch and class embeddings (each
  through a learned d_model × d_model projection), LayerNorm-ed over the classes.
* ``SETRNaiveHead``: SETR's naive head, as SN-Netv2 uses it: 1×1 conv, BatchNorm, ReLU, 1×1
  conv to the classes, on the last level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stitchops.models.vit import Block, ViTConfig


def _tokens(level: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] → [B, h·w, D]."""
    return level.flatten(2).transpose(1, 2)


def _map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, h·w, C] → [B, C, h, w]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder on the last level: [B, D, h, w] → logits [B, K, h, w]."""

    levels = 1  # the backbone levels it reads: the last

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        last = levels[-1]
        return _map(self.head(self.norm(_tokens(last))), last.shape[-2:])


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer (module docstring); logits [B, K, h, w]."""

    levels = 1  # the backbone levels it reads: the last

    def __init__(
        self,
        dim: int,
        num_classes: int,
        d_model: int | None = None,
        layers: int = 2,
        heads: int | None = None,
    ) -> None:
        super().__init__()
        d_model = d_model or dim
        heads = heads or max(1, d_model // 64)
        self.norm_in = nn.LayerNorm(dim, eps=1e-6)
        self.proj_dec = nn.Linear(dim, d_model)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, d_model) * 0.02)
        cfg = ViTConfig(embed_dim=d_model, num_heads=heads)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(layers)])
        scale = d_model**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.num_classes = num_classes

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        last = levels[-1]
        x = self.proj_dec(self.norm_in(_tokens(last)))
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        x = self.decoder_norm(self.blocks(x))
        patches, classes = x[:, : -self.num_classes], x[:, -self.num_classes :]
        patches = F.normalize(patches @ self.proj_patch, dim=-1)
        classes = F.normalize(classes @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # [B, h·w, K]
        return _map(masks, last.shape[-2:])


class SETRNaiveHead(nn.Module):
    """SETR-naive: 1×1 conv, BatchNorm, ReLU, 1×1 conv to the classes, on the last level."""

    levels = 1  # the backbone levels it reads: the last

    def __init__(self, dim: int, num_classes: int, channels: int = 256) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.cls(F.relu(self.bn(self.conv(levels[-1]))))
