"""Segmentation models on any backbone with ``forward_features(x, out_indices)``: ViT,
FlexiViT at any patch size, a stitch of ``StitchedViT(dense=True)``.

Heads (they read the backbone's levels, [B, D, h, w] maps):
* ``"linear"``: Segmenter's linear decoder (Strudel et al., ICCV 2021): per patch token of
  the last level, LayerNorm then a linear map to the classes.
* ``"mask"``: Segmenter's mask transformer: the last level's tokens, projected to d_model,
  join ``num_classes`` learned class embeddings in ``layers`` (2) transformer blocks; the
  masks are the products of the L2-normalised patch and class embeddings (each through a
  learned d_model × d_model projection), LayerNorm-ed over the classes.
* ``"setr"``: SETR's naive head, as SN-Netv2 uses it: 1×1 conv, BatchNorm, ReLU, 1×1 conv to
  the classes, on the last level.
* ``"faseg"``: FASeg's query decoder over four levels (stitchops.models.faseg), trained with
  Mask2Former's set loss (``Segmenter.loss``).
The backbone's tokens are normalised by the head (its own LayerNorm or BatchNorm): the
levels are block outputs, before any final norm of the backbone.

For heads that need a pyramid: ``MultiScaleNeck`` rescales four levels by 4, 2, 1 and 1/2 (two
stride-2 transposed convs, one, identity, 2×2 max-pool: SETR-MLA / BEiT's), and
``FPNDecoder`` merges them top-down into a 1/4-scale map (lateral 1×1 convs, upsampled sums,
3×3 output convs).

Inference (``Segmenter.predict``): whole image, or Segmenter's sliding window (``crop`` and
``stride``: windows cover the image, overlapping logits averaged); logits are upsampled
bilinearly to the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stitchops.models.vit import Block, ViTConfig, image_size

DECODERS = ("linear", "mask", "setr", "faseg")


def _tokens(level: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] → [B, h·w, D]."""
    return level.flatten(2).transpose(1, 2)


def _map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, h·w, C] → [B, C, h, w]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder on the last level: [B, D, h, w] → logits [B, K, h, w]."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        last = levels[-1]
        return _map(self.head(self.norm(_tokens(last))), last.shape[-2:])


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer (module docstring); logits [B, K, h, w]."""

    def __init__(self, dim: int, num_classes: int, d_model: int | None = None,
                 layers: int = 2, heads: int | None = None) -> None:  # fmt: skip
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

    def __init__(self, dim: int, num_classes: int, channels: int = 256) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.cls(F.relu(self.bn(self.conv(levels[-1]))))


class MultiScaleNeck(nn.Module):
    """Four same-scale levels [B, D, h, w] → [B, D, 4h, 4w], [2h, 2w], [h, w], [h/2, w/2]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim),
                                 nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2))  # fmt: skip
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
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                          nn.GroupNorm(32 if channels % 32 == 0 else 1, channels), nn.ReLU())
            for _ in range(levels)
        )  # fmt: skip

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


def _width(backbone: nn.Module) -> int:
    anchors = getattr(backbone, "anchors", None)
    return (anchors[-1] if anchors is not None else backbone).embed_dim


class Segmenter(nn.Module):
    """A backbone and a decoder; ``forward(images)`` → logits [B, K, H, W] at image size.

    Args:
        backbone: a ViT, a FlexiViT or a ``StitchedViT(dense=True)`` (its active stitch).
        num_classes: K.
        decoder: ``"linear"``, ``"mask"``, ``"setr"`` or ``"faseg"`` (module docstring).
        out_indices: the backbone's levels (default: its ``default_out_indices`` where it
            has them, else its last block, or four blocks for FASeg); the heads read the
            last one, FASeg all four.
        decoder_options: keyword arguments of the FASeg head (``FASegHead``).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, decoder: str = "linear",
                 out_indices=None, decoder_options: dict | None = None) -> None:  # fmt: skip
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone, self.num_classes = backbone, num_classes
        from stitchops.models import faseg  # it builds on this module's neck and FPN

        if out_indices is None:
            default = getattr(backbone, "default_out_indices", None)
            depth = len(backbone.blocks) if default is None else None
            out_indices = (default() if default else faseg.default_levels(depth)
                           if decoder == "faseg" else (depth - 1,))  # fmt: skip
        self.out_indices = tuple(out_indices)
        self.decoder_name = decoder
        dim = _width(backbone)
        if decoder == "faseg":
            self.decoder = faseg.FASegHead(dim, num_classes, **(decoder_options or {}))
        else:
            self.decoder = {"linear": LinearDecoder, "mask": MaskTransformer,
                            "setr": SETRNaiveHead}[decoder](dim, num_classes)  # fmt: skip

    def forward(self, images: torch.Tensor, patch_size=None) -> torch.Tensor:
        levels = self.backbone.forward_features(images, self.out_indices, patch_size=patch_size)
        logits = self.decoder(levels)
        to_image = getattr(self.decoder, "to_image", None)  # a head with its own upsampling
        if to_image is not None:
            return to_image(logits, image_size(images))
        return F.interpolate(logits, size=image_size(images), mode="bilinear", align_corners=False)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
             **options) -> torch.Tensor:  # fmt: skip
        """The training loss of the last forward: per-pixel cross-entropy of ``logits``, or
        for FASeg Mask2Former's set loss on every layer's prediction (``options``:
        ``mask_classification_loss``'s ``points`` and ``sampling``)."""
        if self.decoder_name != "faseg":
            return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
        from stitchops.models.mask_loss import mask_classification_loss

        return mask_classification_loss(self.decoder.predictions, labels, self.num_classes,
                                        ignore_index=ignore_index, **options)  # fmt: skip

    @torch.no_grad()
    def predict(self, images: torch.Tensor, mode: str = "whole", crop: int | None = None,
                stride: int | None = None, patch_size=None) -> torch.Tensor:  # fmt: skip
        """Logits [B, K, H, W]: the whole image at once, or ``mode="slide"``: crop × crop
        windows every ``stride`` pixels (the last flush with the border), logits averaged
        where windows overlap. The crop must fit the image and divide by the patch size."""
        if mode == "whole":
            return self(images, patch_size)
        if mode != "slide":
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        h, w = image_size(images)
        if crop is None or stride is None or crop < 1 or stride < 1:
            raise ValueError(f"sliding inference needs crop >= 1 and stride >= 1, got {crop}, "
                             f"{stride}")  # fmt: skip
        if crop > h or crop > w:
            raise ValueError(f"crop {crop} is larger than the image {h}x{w}")
        logits = images.new_zeros(images.shape[0], self.num_classes, h, w)
        count = images.new_zeros(1, 1, h, w)
        for top in _starts(h, crop, stride):
            for left in _starts(w, crop, stride):
                window = images[..., top : top + crop, left : left + crop]
                logits[..., top : top + crop, left : left + crop] += self(window, patch_size)
                count[..., top : top + crop, left : left + crop] += 1
        return logits / count


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window starts along one side: every ``stride``, the last one flush with the border."""
    steps = max(math.ceil((size - crop) / stride), 0) + 1
    return sorted({min(i * stride, size - crop) for i in range(steps)})
