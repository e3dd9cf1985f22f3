"""FASeg (thesis ch. 5): a Mask2Former query decoder with dynamic focus-aware positional
queries (DFPQ, Eq. 5.2) and high-resolution cross-attention (HRCA, Eq. 5.3), as a
``Segmenter`` head (``decoder="faseg"``).

``FASegHead``: the backbone's four levels → ``MultiScaleNeck`` (1/4, 1/8, 1/16, 1/32 of the
image for a patch-16 ViT) → ``FPNDecoder`` (``hidden`` channels each) → ``FASegDecoder``;
the mask features are a 1×1 convolution of its 1/4 map, and the keys' positions are
conditional positional encodings: a depthwise 3×3 convolution of each level's projected
input (the FPN's lateral), as the official pixel decoder's ``pos_linear`` (Mask2Former's
setting, no DFPQ and no HRCA: its sine encoding of each map instead).

``FASegDecoder`` (the official schedule): ``queries`` learned content queries, hidden 256, 8
heads, post-norm layers of cross-attention, self-attention and FFN. Layer i attends level
i % 4 of (1/32, 1/16, 1/8, 1/4) — i % 3 of the first three without HRCA (Mask2Former):
- 1/32 to 1/8: Mask2Former's masked attention, blocked where the previous prediction's
  mask, resized to the level, has sigmoid < ``mask_threshold`` (FASeg 0.15, Mask2Former 0.5);
- 1/4 (HRCA): only the ws × ws windows (ws = side at 1/4 / side at 1/32, 8 for a ViT) under
  the top ⌊n/ω⌋ (ω = ``hrca_ratio`` 32) of the latest 1/32 layer's key scores (the
  attention averaged over heads, summed over queries); ``hrca="full"`` attends the whole
  1/4 map and ``"random"`` picks as many windows at random (the thesis's Table 5.6).
DFPQ: the query positions of layer t are MLP(A_{t−1}·K_pos + B) (one two-layer MLP for all
layers, B the learned positional queries), A_{t−1}·K_pos the previous layer's head-averaged
attention times its keys' positions (``focus_attention``'s ``pos_out``), not updated by an
HRCA layer, whose cross-attention takes B itself (the official code: "we do not use the
dynamic positional queries in the sparse high-resolution branch"); before the first layer
A_0·K_pos is Σ_p m_p K_pos,p / (Σ_p m_p + 1e−6) over the initial prediction's foreground
m (sigmoid ≥ 0.5, the thesis; ``first_pos="code"``: sigmoid < 0.5, as the official code
pools), so a query with no such pixel starts at 0. Without DFPQ the positions are B.

Where we differ from ziplab/FASeg, and the switch to its behaviour:
- the pixel decoder is an FPN over the ViT's rescaled levels, not the multi-scale deformable
  attention encoder over a CNN's (the official weights of the pixel decoder do not load);
- ``first_pos="thesis"`` pools the foreground the thesis describes; ``"code"`` the official
  code's background;
- the HRCA window count is max(1, ⌊n/ω⌋) (``hrca_windows="at_least_one"``): the official
  ⌊n/ω⌋ (``"floor"``) is 0 on a 1/32 map under 32 positions, where its HRCA layer attends
  no key and outputs the projection's bias;
- ``hrca_pos="dfpq"`` gives the HRCA layers the dynamic positions too (the official code
  does not; default ``"learned"``).

Predictions (``Prediction``: class logits [B, Q, K+1], mask logits [B, Q, H/4, W/4]) come
before the first layer and after every layer (deep supervision); semantic inference
combines the last one's class probabilities (no-object dropped) and mask sigmoids, the masks
upsampled to the image first (the official order, ``FASegHead.to_image``).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from stitchops.models.mask_loss import Prediction, mask_classification_loss
from stitchops.models.necks import FPNDecoder, MultiScaleNeck
from stitchops.nn.focus import FocusCrossAttention

HRCA_MODES = ("topk", "full", "random")
FIRST_POS = ("thesis", "code")
HRCA_POS = ("learned", "dfpq")
HRCA_WINDOWS = ("at_least_one", "floor")
KEY_POS = ("auto", "conv", "sine")


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

    def forward(self, tgt, query_pos, memory, memory_pos, cross_pos=None, **attend):
        """``cross_pos``: the cross-attention's query positions where they differ from the
        self-attention's ``query_pos`` (HRCA's learned ones)."""
        cross_pos = query_pos if cross_pos is None else cross_pos
        result = self.cross(tgt, memory, cross_pos, memory_pos, **attend)
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

    def __init__(
        self,
        num_classes: int,
        hidden: int = 256,
        heads: int = 8,
        queries: int = 100,
        layers: int | None = None,
        ffn: int = 2048,
        dfpq: bool = True,
        hrca: str | None = "topk",
        hrca_ratio: int = 32,
        mask_threshold: float = 0.15,
        first_pos: str = "thesis",
        hrca_pos: str = "learned",
        hrca_windows: str = "at_least_one",
    ) -> None:
        super().__init__()
        if hrca is not None and hrca not in HRCA_MODES:
            raise ValueError(f"hrca must be one of {HRCA_MODES} or None, got {hrca!r}")
        for name, value, allowed in (
            ("first_pos", first_pos, FIRST_POS),
            ("hrca_pos", hrca_pos, HRCA_POS),
            ("hrca_windows", hrca_windows, HRCA_WINDOWS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise ValueError(f"queries must be an int >= 1, got {queries!r}")
        if isinstance(hrca_ratio, bool) or not isinstance(hrca_ratio, int) or hrca_ratio < 1:
            raise ValueError(f"hrca_ratio must be an int >= 1, got {hrca_ratio!r}")
        self.cycle = 4 if hrca else 3
        layers = layers if layers is not None else (13 if hrca else 9)
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.dfpq, self.hrca, self.hrca_ratio = dfpq, hrca, hrca_ratio
        self.mask_threshold, self.first_pos = mask_threshold, first_pos
        self.hrca_pos, self.hrca_windows = hrca_pos, hrca_windows
        self.query_feat = nn.Embedding(queries, hidden)
        self.query_embed = nn.Embedding(queries, hidden)  # B of Eq. 5.2 (Mask2Former's queries)
        self.level_embed = nn.Embedding(self.cycle, hidden)
        self.pos_mlp = MLP(hidden, hidden, hidden, 2) if dfpq else None
        self.layers = nn.ModuleList(DecoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(hidden)
        self.class_embed = nn.Linear(hidden, num_classes + 1)
        self.mask_embed = MLP(hidden, hidden, hidden, 3)

    def predict(self, tgt: torch.Tensor, mask_features: torch.Tensor) -> Prediction:
        x = self.decoder_norm(tgt)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        return Prediction(self.class_embed(x), masks)

    def _memories(self, maps: list[torch.Tensor], positions: list[torch.Tensor]):
        """Per level: (tokens + level embedding, their positions, (h, w))."""
        return [
            (_tokens(m) + self.level_embed.weight[i], _tokens(p), m.shape[-2:])
            for i, (m, p) in enumerate(zip(maps, positions, strict=False))
        ]

    def _blocked(self, masks: torch.Tensor, size) -> torch.Tensor:
        """Mask2Former's attention mask [B, Q, h·w]: True where the resized prediction has
        sigmoid < threshold."""
        resized = F.interpolate(
            masks.detach(), size=tuple(size), mode="bilinear", align_corners=False
        )
        return (resized.sigmoid() < self.mask_threshold).flatten(2)

    def _first_positions(self, masks: torch.Tensor, memory_pos: torch.Tensor, size):
        """A_0·K_pos: each query's Σ m·K_pos / (Σ m + 1e−6) over its predicted foreground m
        (the thesis) or background (the official code); 0 where that is empty."""
        resized = (
            F.interpolate(masks.detach(), size=tuple(size), mode="bilinear", align_corners=False)
            .flatten(2)
            .sigmoid()
        )
        chosen = (resized >= 0.5) if self.first_pos == "thesis" else (resized < 0.5)
        # The guard is added in float32, as the official code's int count + 1e-6 promotes.
        guarded = chosen.sum(-1, keepdim=True, dtype=torch.float32) + 1e-6
        return (chosen.to(memory_pos.dtype) @ memory_pos) / guarded.to(memory_pos.dtype)

    def _hrca(self, scores: torch.Tensor | None, hires_size, coarse_size, batch: int) -> dict:
        """The 1/4 layer's attention arguments: the windows under the top 1/32 positions (or
        as many at random; none: the whole map)."""
        if self.hrca == "full" or (scores is None and self.hrca == "topk"):
            return {}
        ws = hires_size[0] // coarse_size[0]
        if ws < 1 or tuple(s * ws for s in coarse_size) != tuple(hires_size):
            raise ValueError(
                f"HRCA needs the 1/4 map {tuple(hires_size)} to be a whole "
                f"multiple of the 1/32 map {tuple(coarse_size)}"
            )
        count = coarse_size[0] * coarse_size[1]
        k = count // self.hrca_ratio
        k = max(1, k) if self.hrca_windows == "at_least_one" else k
        if self.hrca == "random":
            device = self.level_embed.weight.device
            windows = torch.stack([torch.randperm(count, device=device)[:k] for _ in range(batch)])
        else:
            windows = scores.topk(k, dim=-1).indices
        return {"windows": windows, "window_size": ws, "map_size": tuple(hires_size)}

    def forward(
        self,
        levels: list[torch.Tensor],
        hires: torch.Tensor,
        mask_features: torch.Tensor,
        positions: list[torch.Tensor],
    ) -> list[Prediction]:
        """``positions``: the keys' positions of the 1/32, 1/16, 1/8 and 1/4 maps (each as
        its map)."""
        memories = self._memories([*levels, hires][: self.cycle], positions)
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
            cross_pos = None
            if level == 3:
                attend = self._hrca(scores, size, memories[0][2], batch)
                cross_pos = learned_pos if self.hrca_pos == "learned" else None
            else:
                attend = {"mask": self._blocked(predictions[-1].masks, size)}
            wants_pos = self.dfpq and level != 3
            tgt, result = layer(
                tgt,
                query_pos,
                memory,
                memory_pos,
                cross_pos,
                key_pos=memory_pos if wants_pos else None,
                return_scores=level == 0 and self.hrca == "topk",
                **attend,
            )
            if level == 0:
                scores = result.scores
            if self.dfpq and level != 3:
                source = result.pos_out
            predictions.append(self.predict(tgt, mask_features))
        return predictions


def sine_positions(like: torch.Tensor, channels: int) -> torch.Tensor:
    """Mask2Former's key positions for a map like [B, *, h, w]: [1, channels, h, w] of
    DETR's normalised sine encoding (``PositionEmbeddingSine(channels / 2, normalize=True)``):
    y = 2π·(i + 1)/(h + 1e−6), x likewise, each over F = channels/2 frequencies
    10000^(2⌊j/2⌋/F), sine at even j and cosine at odd, y's then x's."""
    h, w = like.shape[-2:]
    f = channels // 2
    kw = {"device": like.device, "dtype": torch.float32}
    y = torch.arange(1, h + 1, **kw)[:, None].expand(h, w) / (h + 1e-6) * 2 * math.pi
    x = torch.arange(1, w + 1, **kw)[None, :].expand(h, w) / (w + 1e-6) * 2 * math.pi
    freq = 10000 ** (2 * (torch.arange(f, **kw) // 2) / f)

    def encode(t):
        angles = t[..., None] / freq
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(2)

    pos = torch.cat((encode(y), encode(x)), dim=-1).permute(2, 0, 1)[None]
    return pos.to(like.dtype)


class FASegHead(nn.Module):
    """A ``Segmenter`` decoder: four backbone levels [B, D, h, w] → semantic scores
    [B, K, 4h, 4w] (Mask2Former's inference on the last prediction; ``to_image`` gives them
    at the image's size, the masks upsampled before their sigmoid). After each forward,
    ``self.predictions`` holds every layer's ``Prediction`` for the training loss
    (``stitchops.models.mask_loss``).

    ``key_pos``: ``"conv"`` (FASeg's conditional encodings of the pixel decoder's inputs),
    ``"sine"`` (Mask2Former's), ``"auto"``: sine for Mask2Former's setting (``dfpq=False``,
    ``hrca=None``), else conv."""

    levels = 4  # the backbone levels it reads (Segmenter's out_indices)

    def __init__(
        self, dim: int, num_classes: int, hidden: int = 256, key_pos: str = "auto", **decoder
    ) -> None:
        super().__init__()
        if key_pos not in KEY_POS:
            raise ValueError(f"key_pos must be one of {KEY_POS}, got {key_pos!r}")
        self.neck = MultiScaleNeck(dim)
        self.pixel_decoder = FPNDecoder(dim, hidden)
        self.mask_features = nn.Conv2d(hidden, hidden, 1)
        self.decoder = FASegDecoder(num_classes, hidden, **decoder)
        mask2former = not self.decoder.dfpq and self.decoder.hrca is None
        self.key_pos = ("sine" if mask2former else "conv") if key_pos == "auto" else key_pos
        self.positions = (
            nn.ModuleList(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) for _ in range(4))
            if self.key_pos == "conv"
            else None
        )
        self.hidden = hidden
        self.predictions: list[Prediction] = []

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        if len(levels) != 4:
            raise ValueError(f"the FASeg head takes 4 backbone levels, got {len(levels)}")
        fine_to_coarse, laterals = self.pixel_decoder(self.neck(levels), with_laterals=True)
        coarse_to_fine = fine_to_coarse[::-1]
        if self.positions is not None:  # the inputs' encodings, 1/32 first
            positions = [conv(m) for conv, m in zip(self.positions, laterals[::-1], strict=True)]
        else:
            positions = [
                sine_positions(m, self.hidden).expand(m.shape[0], -1, -1, -1)
                for m in coarse_to_fine
            ]
        mask_features = self.mask_features(fine_to_coarse[0])
        self.predictions = self.decoder(
            coarse_to_fine[:3], coarse_to_fine[3], mask_features, positions
        )
        return semantic_scores(self.predictions[-1])

    def loss(
        self, labels: torch.Tensor, num_classes: int, ignore_index: int = 255, **options
    ) -> torch.Tensor:
        """Mask2Former's set loss on every prediction of the last forward (``options``:
        ``mask_classification_loss``'s ``points``, ``sampling``, ``generator``)."""
        return mask_classification_loss(
            self.predictions, labels, num_classes, ignore_index=ignore_index, **options
        )

    def to_image(self, scores: torch.Tensor, size) -> torch.Tensor:
        """The last prediction's semantic scores at ``size``: its mask logits upsampled
        (bilinear) before the sigmoid, as the official inference. ``scores`` (this head's
        output) only fixes the batch it was computed for."""
        last = self.predictions[-1]
        masks = F.interpolate(last.masks, size=tuple(size), mode="bilinear", align_corners=False)
        return semantic_scores(Prediction(last.classes, masks))


def semantic_scores(prediction: Prediction) -> torch.Tensor:
    """Mask2Former's semantic inference: Σ_q p(class | q)·sigmoid(mask_q), [B, K, h, w]."""
    probabilities = prediction.classes.softmax(-1)[..., :-1]
    return torch.einsum("bqk,bqhw->bkhw", probabilities, prediction.masks.sigmoid())
