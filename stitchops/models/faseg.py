"""FASeg (thesis ch. 5): a Mask2Former query decoder with dynamic focus-aware positional
queries (DFPQ, Eq. 5.2) and high-resolution cross-attention (HRCA, Eq. 5.3), as a
``Segmenter`` head (``decoder="faseg"``).

``FASegHead``: the backbone's four levels → ``MultiScaleNeck`` (1/4, 1/8, 1/16, 1/32 of the
image for a patch-16 ViT) → ``FPNDecoder`` (``hidden`` channels each; the 1/4 map is also
the mask feature) → ``FASegDecoder``.

``FASegDecoder`` (the official schedule): ``queries`` learned content queries, hidden 256, 8
heads, post-norm layers of cross-attention, self-attention and FFN. Layer i attends level
i % 4 of (1/32, 1/16, 1/8, 1/4) — i % 3 of the first three without HRCA (Mask2Former):
- 1/32 to 1/8: Mask2Former's masked attention, blocked where the previous prediction's
  mask, resized to the level, has sigmoid < ``mask_threshold`` (FASeg 0.15, Mask2Former 0.5);
- 1/4 (HRCA): only the ws × ws windows (ws = side at 1/4 / side at 1/32, 8 for a ViT) under
  the top ⌊n/ω⌋ (ω = ``hrca_ratio`` 32) of the latest 1/32 layer's key scores (the
  attention averaged over heads, summed over queries); ``hrca="full"`` attends the whole
  1/4 map and ``"random"`` picks as many windows at random (the thesis's Table 5.6).
Keys carry conditional positional encodings: a depthwise 3×3 convolution of each level.
DFPQ: the query positions of layer t are MLP(A_{t−1}·K_pos + B) (one two-layer MLP for all
layers, B the learned positional queries), A_{t−1}·K_pos the previous layer's head-averaged
attention times its keys' positions (``focus_attention``'s ``pos_out``), not updated by an
HRCA layer; before the first layer A_0 is the average over the initial prediction's
foreground (sigmoid ≥ 0.5, the thesis; ``first_pos="code"``: over sigmoid < 0.5, as the
official code pools). Without DFPQ the positions are B (Mask2Former).

Predictions (``Prediction``: class logits [B, Q, K+1], mask logits [B, Q, H/4, W/4]) come
before the first layer and after every layer (deep supervision); semantic inference
combines the last one's class probabilities (no-object dropped) and mask sigmoids.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stitchops.models.segmentation import FPNDecoder, MultiScaleNeck, Segmenter
from stitchops.nn.focus import FocusCrossAttention

HRCA_MODES = ("topk", "full", "random")
FIRST_POS = ("thesis", "code")


@dataclass
class Prediction:
    classes: torch.Tensor  # [B, Q, K + 1] logits, the last is "no object"
    masks: torch.Tensor  # [B, Q, H/4, W/4] logits


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, dim: int, hidden: int, out: int, layers: int) -> None:
        super().__init__()
        sizes = [dim] + [hidden] * (layers - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DecoderLayer(nn.Module):
    """Cross-attention (``FocusCrossAttention``), self-attention and FFN, each followed by a
    residual and LayerNorm (post-norm, as Mask2Former)."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.cross = FocusCrossAttention(hidden, heads)
        self.cross_norm = nn.LayerNorm(hidden)
        self.self_attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.self_norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.ReLU(), nn.Linear(ffn, hidden))
        self.ffn_norm = nn.LayerNorm(hidden)

    def forward(self, tgt, query_pos, memory, memory_pos, **attend):
        result = self.cross(tgt, memory, query_pos, memory_pos, **attend)
        tgt = self.cross_norm(tgt + result.out)
        q = tgt + query_pos
        tgt = self.self_norm(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        return self.ffn_norm(tgt + self.ffn(tgt)), result


def _tokens(feature: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] → [B, h·w, C]."""
    return feature.flatten(2).transpose(1, 2)


class FASegDecoder(nn.Module):
    """The query decoder (module docstring). ``forward(levels, hires, mask_features)``:
    ``levels`` the 1/32, 1/16 and 1/8 maps, ``hires`` the 1/4 map, ``mask_features`` the
    1/4 map the masks are read from, all [B, hidden, h, w]; returns the predictions, first
    the one before any layer."""

    def __init__(self, num_classes: int, hidden: int = 256, heads: int = 8, queries: int = 100,
                 layers: int | None = None, ffn: int = 2048, dfpq: bool = True,
                 hrca: str | None = "topk", hrca_ratio: int = 32, mask_threshold: float = 0.15,
                 first_pos: str = "thesis") -> None:  # fmt: skip
        super().__init__()
        if hrca is not None and hrca not in HRCA_MODES:
            raise ValueError(f"hrca must be one of {HRCA_MODES} or None, got {hrca!r}")
        if first_pos not in FIRST_POS:
            raise ValueError(f"first_pos must be one of {FIRST_POS}, got {first_pos!r}")
        self.cycle = 4 if hrca else 3
        layers = layers if layers is not None else (13 if hrca else 9)
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.dfpq, self.hrca, self.hrca_ratio = dfpq, hrca, hrca_ratio
        self.mask_threshold, self.first_pos = mask_threshold, first_pos
        self.query_feat = nn.Embedding(queries, hidden)
        self.query_embed = nn.Embedding(queries, hidden)  # B of Eq. 5.2 (Mask2Former's queries)
        self.level_embed = nn.Embedding(self.cycle, hidden)
        self.cpe = nn.ModuleList(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
                                 for _ in range(self.cycle))  # fmt: skip
        self.pos_mlp = MLP(hidden, hidden, hidden, 2) if dfpq else None
        self.layers = nn.ModuleList(DecoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(hidden)
        self.class_embed = nn.Linear(hidden, num_classes + 1)
        self.mask_embed = MLP(hidden, hidden, hidden, 3)

    def predict(self, tgt: torch.Tensor, mask_features: torch.Tensor) -> Prediction:
        x = self.decoder_norm(tgt)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        return Prediction(self.class_embed(x), masks)

    def _memories(self, maps: list[torch.Tensor]):
        """Per level: (tokens + level embedding, conditional positions, (h, w))."""
        return [(_tokens(m) + self.level_embed.weight[i], _tokens(self.cpe[i](m)), m.shape[-2:])
                for i, m in enumerate(maps)]  # fmt: skip

    def _blocked(self, masks: torch.Tensor, size) -> torch.Tensor:
        """Mask2Former's attention mask [B, Q, h·w]: True where the resized prediction has
        sigmoid < threshold."""
        resized = F.interpolate(masks.detach(), size=tuple(size), mode="bilinear",
                                align_corners=False)  # fmt: skip
        return (resized.sigmoid() < self.mask_threshold).flatten(2)

    def _first_positions(self, masks: torch.Tensor, memory_pos: torch.Tensor, size):
        """A_0·K_pos: each query's average of the level's key positions over its predicted
        foreground (the thesis) or background (the official code); uniform if empty."""
        resized = F.interpolate(masks.detach(), size=tuple(size), mode="bilinear",
                                align_corners=False).flatten(2).sigmoid()  # fmt: skip
        chosen = (resized >= 0.5) if self.first_pos == "thesis" else (resized < 0.5)
        weights = chosen.to(memory_pos.dtype)
        weights = torch.where(weights.sum(-1, keepdim=True) > 0, weights, 1.0)
        return (weights / weights.sum(-1, keepdim=True)) @ memory_pos

    def _hrca(self, scores: torch.Tensor | None, hires_size, coarse_size, batch: int) -> dict:
        """The 1/4 layer's attention arguments: the windows under the top 1/32 positions (or
        as many at random; none: the whole map)."""
        if self.hrca == "full" or (scores is None and self.hrca == "topk"):
            return {}
        ws = hires_size[0] // coarse_size[0]
        if ws < 1 or tuple(s * ws for s in coarse_size) != tuple(hires_size):
            raise ValueError(f"HRCA needs the 1/4 map {tuple(hires_size)} to be a whole "
                             f"multiple of the 1/32 map {tuple(coarse_size)}")  # fmt: skip
        count = coarse_size[0] * coarse_size[1]
        k = max(1, count // self.hrca_ratio)
        if self.hrca == "random":
            device = self.level_embed.weight.device
            windows = torch.stack([torch.randperm(count, device=device)[:k]
                                   for _ in range(batch)])  # fmt: skip
        else:
            windows = scores.topk(k, dim=-1).indices
        return {"windows": windows, "window_size": ws, "map_size": tuple(hires_size)}

    def forward(self, levels: list[torch.Tensor], hires: torch.Tensor,
                mask_features: torch.Tensor) -> list[Prediction]:  # fmt: skip
        memories = self._memories([*levels, hires][: self.cycle])
        batch = mask_features.shape[0]
        tgt = self.query_feat.weight[None].repeat(batch, 1, 1)  # copies: a view of a
        learned_pos = self.query_embed.weight[None].repeat(batch, 1, 1)  # leaf keeps its grad
        predictions = [self.predict(tgt, mask_features)]
        source = None  # A_{t−1}·K_pos
        if self.dfpq:
            source = self._first_positions(predictions[0].masks, memories[0][1], memories[0][2])
        scores = None  # the latest 1/32 layer's key scores
        for i, layer in enumerate(self.layers):
            level = i % self.cycle
            memory, memory_pos, size = memories[level]
            query_pos = self.pos_mlp(source + learned_pos) if self.dfpq else learned_pos
            if level == 3:
                attend = self._hrca(scores, size, memories[0][2], batch)
            else:
                attend = {"mask": self._blocked(predictions[-1].masks, size)}
            wants_pos = self.dfpq and level != 3
            tgt, result = layer(tgt, query_pos, memory, memory_pos,
                                key_pos=memory_pos if wants_pos else None,
                                return_scores=level == 0 and self.hrca == "topk",
                                **attend)  # fmt: skip
            if level == 0:
                scores = result.scores
            if self.dfpq and level != 3:
                source = result.pos_out
            predictions.append(self.predict(tgt, mask_features))
        return predictions


class FASegHead(nn.Module):
    """A ``Segmenter`` decoder: four backbone levels [B, D, h, w] → semantic scores
    [B, K, 4h, 4w] (Mask2Former's inference on the last prediction). After each forward,
    ``self.predictions`` holds every layer's ``Prediction`` for the training loss
    (``stitchops.models.mask_loss``)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 256, **decoder) -> None:
        super().__init__()
        self.neck = MultiScaleNeck(dim)
        self.pixel_decoder = FPNDecoder(dim, hidden)
        self.decoder = FASegDecoder(num_classes, hidden, **decoder)
        self.predictions: list[Prediction] = []

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        if len(levels) != 4:
            raise ValueError(f"the FASeg head takes 4 backbone levels, got {len(levels)}")
        fine_to_coarse = self.pixel_decoder(self.neck(levels))
        mask_features = fine_to_coarse[0]
        self.predictions = self.decoder(fine_to_coarse[1:][::-1], fine_to_coarse[0],
                                        mask_features)  # fmt: skip
        return semantic_scores(self.predictions[-1])


def semantic_scores(prediction: Prediction) -> torch.Tensor:
    """Mask2Former's semantic inference: Σ_q p(class | q)·sigmoid(mask_q), [B, K, h, w]."""
    probabilities = prediction.classes.softmax(-1)[..., :-1]
    return torch.einsum("bqk,bqhw->bkhw", probabilities, prediction.masks.sigmoid())


def default_levels(depth: int) -> tuple[int, ...]:
    """Four blocks ending at the last: the fractions (5/12, 5/8, 5/6, 1) of the depth, as
    StitchedViT.default_out_indices (SN-Netv2's choice at depth 24: 9, 14, 19, 23)."""
    return tuple(max(0, math.ceil(depth * f) - 1) for f in (5 / 12, 5 / 8, 5 / 6, 1))


class FASeg(Segmenter):
    """A ``Segmenter`` with the FASeg head: ``FASeg(backbone, num_classes, **options)``,
    options as ``FASegHead`` / ``FASegDecoder`` (hidden, heads, queries, layers, ffn, dfpq,
    hrca, hrca_ratio, mask_threshold, first_pos); backbone as ``Segmenter``'s."""

    def __init__(self, backbone, num_classes: int, out_indices=None, **options) -> None:
        super().__init__(backbone, num_classes, "faseg", out_indices, decoder_options=options)
