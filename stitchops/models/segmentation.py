"""Segmentation models on any backbone with ``forward_features(x, out_indices)``: ViT,
FlexiViT at any patch size, a stitch of ``StitchedViT(dense=True)``.

``Segmenter(backbone, num_classes, decoder)``: the decoders of ``stitchops.models.decoders``
("linear", "mask", "setr": ``stitchops.models.heads``; "faseg": FASeg's query decoder,
``stitchops.models.faseg``) read the backbone's levels, [B, D, h, w] maps (block outputs,
before any final norm: the heads normalise). A decoder may bring its own training loss
(``loss``) and its own way to the image's size (``to_image``): FASeg's set loss and its
masks upsampled before their sigmoid; the others are trained with per-pixel cross-entropy
and their logits upsampled bilinearly.

Inference (``Segmenter.predict``): whole images of any size (padded to the patch grid), or
Segmenter's sliding window (``crop`` and ``stride``: windows cover the image, overlapping
logits averaged).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stitchops.models.decoders import DECODERS, default_levels
from stitchops.models.vit import image_size


def _depth(backbone: nn.Module) -> int:
    anchors = getattr(backbone, "anchors", None)
    return len((anchors[-1] if anchors is not None else backbone).blocks)


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

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        decoder: str = "linear",
        out_indices=None,
        decoder_options: dict | None = None,
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {tuple(DECODERS)}, got {decoder!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone, self.num_classes = backbone, num_classes
        head = DECODERS[decoder]
        if out_indices is None:
            default = getattr(backbone, "default_out_indices", None)
            if default is not None:
                out_indices = default()
            else:
                out_indices = default_levels(_depth(backbone), head.levels)
        self.out_indices = tuple(out_indices)
        self.decoder_name = decoder
        self.decoder = head(_width(backbone), num_classes, **(decoder_options or {}))

    def forward(self, images: torch.Tensor, patch_size=None) -> torch.Tensor:
        levels = self.backbone.forward_features(images, self.out_indices, patch_size=patch_size)
        logits = self.decoder(levels)
        to_image = getattr(self.decoder, "to_image", None)  # a head with its own upsampling
        if to_image is not None:
            return to_image(logits, image_size(images))
        return F.interpolate(logits, size=image_size(images), mode="bilinear", align_corners=False)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, **options
    ) -> torch.Tensor:
        """The training loss of the last forward: the decoder's own (FASeg: Mask2Former's set
        loss on every layer's prediction; ``options`` are its), else the per-pixel
        cross-entropy of ``logits``."""
        own = getattr(self.decoder, "loss", None)
        if own is not None:
            return own(labels, self.num_classes, ignore_index=ignore_index, **options)
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)

    def patch_size(self, patch_size=None) -> tuple[int, int]:
        """The backbone's patch size (``patch_size`` for a FlexiViT at another one)."""
        vit = self.backbone.anchors[0] if hasattr(self.backbone, "anchors") else self.backbone
        return vit.resolve_patch_size(patch_size)

    def _padded(self, images: torch.Tensor, patch_size=None) -> torch.Tensor:
        """Logits of images of any size: zero-padded at the bottom and right to the patch
        grid (as a ViT's adaptive padding), cropped back after the forward."""
        h, w = image_size(images)
        ph, pw = self.patch_size(patch_size)
        pad_h, pad_w = -h % ph, -w % pw
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        return self(images, patch_size)[..., :h, :w]

    def check_sliding(self, crop: int | None, stride: int | None, patch_size=None) -> None:
        """ValueError unless ``crop`` and ``stride`` make sliding inference here: both >= 1,
        the crop a multiple of the patch size."""
        if crop is None or stride is None or crop < 1 or stride < 1:
            raise ValueError(
                f"sliding inference needs crop >= 1 and stride >= 1, got {crop}, {stride}"
            )
        ph, pw = self.patch_size(patch_size)
        if crop % ph or crop % pw:
            raise ValueError(f"crop {crop} is not a multiple of the patch size {ph}x{pw}")

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        mode: str = "whole",
        crop: int | None = None,
        stride: int | None = None,
        patch_size=None,
    ) -> torch.Tensor:
        """Logits [B, K, H, W] of images of any size: the whole image at once (padded to the
        patch grid), or ``mode="slide"``: crop × crop windows every ``stride`` pixels (the
        last flush with the border; an image smaller than the crop is padded to it, as
        mmseg's sliding inference), logits averaged where windows overlap. The crop must be
        a multiple of the patch size."""
        if mode == "whole":
            return self._padded(images, patch_size)
        if mode != "slide":
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        self.check_sliding(crop, stride, patch_size)
        h, w = image_size(images)
        padded = F.pad(images, (0, max(crop - w, 0), 0, max(crop - h, 0)))
        full_h, full_w = image_size(padded)
        logits = images.new_zeros(images.shape[0], self.num_classes, full_h, full_w)
        count = images.new_zeros(1, 1, full_h, full_w)
        for top in _starts(full_h, crop, stride):
            for left in _starts(full_w, crop, stride):
                window = padded[..., top : top + crop, left : left + crop]
                logits[..., top : top + crop, left : left + crop] += self(window, patch_size)
                count[..., top : top + crop, left : left + crop] += 1
        return (logits / count)[..., :h, :w]


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window starts along one side: every ``stride``, the last one flush with the border."""
    steps = max(math.ceil((size - crop) / stride), 0) + 1
    return sorted({min(i * stride, size - crop) for i in range(steps)})


class FASeg(Segmenter):
    """A ``Segmenter`` with the FASeg head: ``FASeg(backbone, num_classes, **options)``,
    options as ``FASegHead`` / ``FASegDecoder`` (hidden, key_pos, heads, queries, layers,
    ffn, dfpq, hrca, hrca_ratio, mask_threshold, first_pos, hrca_pos, hrca_windows);
    backbone as ``Segmenter``'s."""

    def __init__(self, backbone, num_classes: int, out_indices=None, **options) -> None:
        super().__init__(backbone, num_classes, "faseg", out_indices, decoder_options=options)
