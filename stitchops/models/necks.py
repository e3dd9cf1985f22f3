"""Pyramids for segmentation heads from a plain ViT's same-scale levels.

``MultiScaleNeck`` rescales four levels by 4, 2, 1 and 1/2 (two stride-2 transposed convs,
one, identity, 2×2 max-pool: SETR-MLA / BEiT's), and ``FPNDecoder`` merges them top-down into
``channels`` maps at every scale (lateral 1×1 convs, upsampled sums, 3×3 output convs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiScaleNeck(nn.Module):
    """Four same-scale levels [B, D, h, w] → [B, D, 4h, 4w], [2h, 2w], [h, w], [h/2, w/2]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, 2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, 2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2, 2)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(levels) != 4:
            raise ValueError(f"MultiScaleNeck takes 4 levels, got {len(levels)}")
        return [self.up4(levels[0]), self.up2(levels[1]), levels[2], self.down2(levels[3])]


class FPNDecoder(nn.Module):
    """FPN pixel decoder over a fine-to-coarse pyramid → ``channels`` maps at every scale
    (``forward`` returns them fine to coarse; the first is the 1/4-scale mask feature)."""

    def __init__(self, dim: int, channels: int = 256, levels: int = 4) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(dim, channels, 1) for _ in range(levels))
        self.output = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.GroupNorm(32 if channels % 32 == 0 else 1, channels),
                nn.ReLU(),
            )
            for _ in range(levels)
        )

    def forward(self, pyramid: list[torch.Tensor], with_laterals: bool = False):
        """The output maps, fine to coarse (and with ``with_laterals`` the lateral 1×1
        projections of the inputs too, fine to coarse)."""
        if len(pyramid) != len(self.lateral):
            raise ValueError(f"FPNDecoder takes {len(self.lateral)} maps, got {len(pyramid)}")
        laterals = [conv(level) for conv, level in zip(self.lateral, pyramid, strict=True)]
        x = laterals[-1]
        outs = [self.output[-1](x)]
        for i in range(len(pyramid) - 2, -1, -1):
            x = laterals[i] + F.interpolate(x, size=laterals[i].shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](x))
        return (outs, laterals) if with_laterals else outs
