"""``StitchedViT``: one network holding every stitch of a family of ViT anchors.

SN-Net (``two_way=False``): Fast-to-Slow sliding-window stitching, Sec. 3.2-3.3 of SN-Net.
SN-Netv2 (``two_way=True``): FS, SF, FSF and SFS routes, Sec. 4.1 of SN-Netv2; ``rank > 0``
gives its LoRA stitching layers (Sec. 4.3). ``stitch_biases=True`` gives every stitching
layer a per-stitch bias table (ESTA); ``enable_pst`` adds ESTA's LoRA and per-stitch biases
to the anchors' attention projections.

A stitch's route is a list of segments (anchor, blocks [start, stop)); the forward pass is

    x = embed_{a0}(img);  x = blocks_{a0}[0:f0+1](x);  x = SL_0(x);  x = blocks_{a1}[e0:f1+1](x)
    ... ;  logits = head_{ak}(norm_{ak}(x))

``model.select(id)`` switches the active stitch instantly (no weights move).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from stitchops.models import flops as _flops
from stitchops.models.official import StitchNumbering, official_ids
from stitchops.models.space import (
    RawStitch,
    Segment,
    StitchPoint,
    layer_counts,
    snnet_space,
    two_way_space,
)
from stitchops.models.token_grid import clustered_grid
from stitchops.models.vit import VisionTransformer, image_size, patch_token_map
from stitchops.nn.stitching import StitchingLayer
from stitchops.ops.least_squares import _NormalEquations


@dataclass(frozen=True)
class Stitch:
    """One network of the space: ``route`` segments joined by ``points`` (stitching layers)."""

    id: int
    kind: str
    anchors: tuple[int, ...]
    route: tuple[Segment, ...]
    points: tuple[StitchPoint, ...]
    flops: int
    params: int

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the stitching layers used, ``stitch_layers.<key>.<index>``."""
        return tuple(f"stitch_layers.{p.key}.{p.index}" for p in self.points)

    def describe(self) -> str:
        parts = [f"a{s.anchor}[{s.start}:{s.stop}]" for s in self.route]
        return " → ".join(parts)


def _check_anchors(anchors) -> list[VisionTransformer]:
    anchors = list(anchors)
    if len(anchors) < 2:
        raise ValueError(f"StitchedViT needs at least 2 anchors, got {len(anchors)}")
    for i, anchor in enumerate(anchors):
        if not isinstance(anchor, VisionTransformer):
            raise TypeError(
                f"anchors[{i}] must be a stitchops.models.VisionTransformer (load timm weights "
                f"into one with load_state_dict), got {type(anchor).__name__}"
            )
    first = anchors[0].cfg
    for i, anchor in enumerate(anchors[1:], start=1):
        for field in ("img_size", "patch_size", "in_chans", "num_classes"):
            if getattr(anchor.cfg, field) != getattr(first, field):
                raise ValueError(
                    f"anchors must share {field}: anchors[0] has {getattr(first, field)}, "
                    f"anchors[{i}] has {getattr(anchor.cfg, field)}"
                )
    costs = [_flops.model_flops(a) for a in anchors]
    for i in range(1, len(costs)):
        if costs[i] < costs[i - 1]:
            raise ValueError(
                "give the anchors from cheapest to most expensive (Fast-to-Slow): anchors"
                f"[{i - 1}] costs {costs[i - 1] / 1e9:.3g} GFLOPs, anchors[{i}] "
                f"{costs[i] / 1e9:.3g}"
            )
    return anchors


class StitchedViT(nn.Module):
    """A family of ViT anchors and their stitching layers; every stitch is one route.

    Args:
        anchors: ``VisionTransformer``s from cheapest to most expensive, same image size,
            patch size, input channels and classes.
        kernel_size, stride: SN-Net's sliding window over block ids (paired depths).
        partial_windows: also stitch the pairs of the partial windows at the end, as SN-Net's
            official code does (``space.paired_points``; different only when the window
            does not end on the last block, e.g. k 3, s 2: 44 points instead of 41).
        stitch_ids: ``"ours"`` (0 .. len(stitches) − 1 in the order of ``stitches``) or
            ``"official"``: the official code's ids (``stitchops.models.official``), which
            ``select``, ``flops``, ``route_parameters``, ``Stitch.id`` and ``eval_stitches``
            then use; ``official_id`` / ``our_id`` map between the two either way.
        final_norm_on_stitches: the anchors' final LayerNorm on stitched routes too (the
            papers; SN-Netv2's code). SN-Net's code skips it on stitched routes, and its
            released weights were trained so: False reproduces that.
        dense: build what ``forward_features(x, out_indices)`` needs for dense prediction:
            a projection to the largest anchor's width for every block of the other anchors
            (``_projection_table``). SN-Netv2's two-way space adds the FS stitching layer after the
            small anchor's last block for it; SN-Net's space needs every anchor stitched to
            the largest (two anchors, or nearest=False).
        nearest: only neighbouring anchors stitch (SN-Net's nearest stitching).
        two_way: SN-Netv2's FS / SF / FSF / SFS space instead of SN-Net's.
        rank, alpha: LoRA rank of the stitching layers (0: fully trainable, SN-Net).
        stitch_biases: a per-stitch bias table in every stitching layer (ESTA).
    """

    def __init__(
        self,
        anchors,
        kernel_size: int = 2,
        stride: int = 1,
        nearest: bool = True,
        two_way: bool = False,
        rank: int = 0,
        alpha: float = 1.0,
        stitch_biases: bool = False,
        partial_windows: bool = False,
        stitch_ids: str = "ours",
        final_norm_on_stitches: bool = True,
        dense: bool = False,
    ) -> None:
        super().__init__()
        anchors = _check_anchors(anchors)
        self.anchors = nn.ModuleList(anchors)
        self.options = dict(
            kernel_size=kernel_size,
            stride=stride,
            nearest=nearest,
            two_way=two_way,
            rank=rank,
            alpha=alpha,
            stitch_biases=stitch_biases,
            partial_windows=partial_windows,
        )
        if stitch_ids not in ("ours", "official"):
            raise ValueError(f"stitch_ids must be 'ours' or 'official', got {stitch_ids!r}")
        self.stitch_ids = stitch_ids
        self.final_norm_on_stitches = final_norm_on_stitches
        depths = [len(a.blocks) for a in anchors]
        if dense and two_way and len(anchors) != 2:
            raise ValueError(
                f"dense=True with two_way=True needs SN-Netv2's space of two anchors, got "
                f"{len(anchors)}"
            )
        self.options["dense"] = dense
        if two_way:
            raw = two_way_space(depths, nearest=nearest)
        else:
            raw = snnet_space(depths, kernel_size, stride, nearest, partial_windows)
        self._raw: list[RawStitch] = raw
        param = next(anchors[0].parameters())
        factory = {"device": param.device, "dtype": param.dtype}
        self.stitch_layers = nn.ModuleDict()
        counts = layer_counts(raw)
        if dense and two_way:  # the FS layer after the small anchor's last block (unused
            counts["0to1"] = depths[0]  # by every stitch, the projection of its last level)
        for key, count in counts.items():
            a, b = (int(s) for s in key.split("to"))
            self.stitch_layers[key] = nn.ModuleList(
                StitchingLayer(
                    anchors[a].embed_dim,
                    anchors[b].embed_dim,
                    rank=rank,
                    alpha=alpha,
                    num_stitch_biases=len(raw) if stitch_biases else 0,
                    **factory,
                )
                for _ in range(count)
            )
        self._numbering = None
        if stitch_ids == "official":
            self._numbering = StitchNumbering(official_ids(raw, depths, self.options))
        self.stitches: list[Stitch] = [self._make_stitch(i) for i in range(len(raw))]
        self._projections = self._projection_table() if dense else {}
        self.active = len(anchors) - 1  # a position in ``stitches``: the largest anchor
        self.select(self.stitches[self.active].id)

    # ---------------------------------------------------------------- description
    def _make_stitch(self, i: int) -> Stitch:
        raw = self._raw[i]
        depths = [len(a.blocks) for a in self.anchors]
        route = raw.route(depths)
        return Stitch(
            self._numbering.official_id(i) if self._numbering else i,
            raw.kind,
            raw.anchors,
            route,
            raw.points,
            self._flops(i),
            _flops.route_params(self.anchors, self.stitch_layers, route, raw.points),
        )

    @property
    def numbering(self) -> StitchNumbering:
        """Our stitch positions and the official code's ids (``stitchops.models.official``)."""
        if self._numbering is None:
            depths = [len(a.blocks) for a in self.anchors]
            self._numbering = StitchNumbering(official_ids(self._raw, depths, self.options))
        return self._numbering

    def official_id(self, position: int) -> int:
        """The official code's id of ``stitches[position]``."""
        return self.numbering.official_id(self._position(position, "ours"))

    def our_id(self, official: int) -> int:
        """The position in ``stitches`` of the official code's stitch ``official``."""
        return self.numbering.position(official)

    def flops(self, stitch_id: int, img_size=None, patch_size=None) -> int:
        """fvcore-style FLOPs of one image through a stitch, at any image and patch size."""
        return self._flops(self._check_id(stitch_id), img_size, patch_size)

    def _flops(self, position: int, img_size=None, patch_size=None) -> int:
        return _flops.route_flops(self.anchors, self._raw[position], img_size, patch_size)

    def route_parameters(self, stitch_id: int) -> list[str]:
        """Names of the parameters a stitch's forward pass uses."""
        stitch = self.stitches[self._check_id(stitch_id)]
        first, last = stitch.route[0].anchor, stitch.route[-1].anchor
        prefixes = [
            f"anchors.{first}.patch_embed.",
            f"anchors.{first}.cls_token",
            f"anchors.{first}.pos_embed",
            f"anchors.{last}.norm.",
            f"anchors.{last}.head.",
        ]
        for seg in stitch.route:
            prefixes += [f"anchors.{seg.anchor}.blocks.{b}." for b in range(seg.start, seg.stop)]
        prefixes += [name + "." for name in stitch.layers]
        return [n for n, _ in self.named_parameters() if n.startswith(tuple(prefixes))]

    # ---------------------------------------------------------------- selection
    def _check_id(self, stitch_id) -> int:
        """The position in ``stitches`` of ``stitch_id`` in the model's numbering."""
        return self._position(stitch_id, self.stitch_ids)

    def _position(self, stitch_id, numbering: str) -> int:
        if isinstance(stitch_id, bool) or not isinstance(stitch_id, int):
            raise TypeError(f"stitch_id must be an int, got {type(stitch_id).__name__}")
        if numbering == "official":
            if stitch_id not in self.numbering.official:
                raise ValueError(
                    f"unknown stitch id {stitch_id} (official numbering): this model's ids are "
                    f"{[s.id for s in self.stitches][:6]}... (see model.stitches)"
                )
            return self.numbering.position(stitch_id)
        if not 0 <= stitch_id < len(self._raw):
            raise ValueError(
                f"unknown stitch id {stitch_id}: this model has {len(self._raw)} stitches, ids "
                f"0..{len(self._raw) - 1} (see model.stitches)"
            )
        return stitch_id

    def select(self, stitch_id: int) -> Stitch:
        """Make ``stitch_id`` the network that ``forward`` runs (and whose biases apply)."""
        self.active = self._check_id(stitch_id)
        for module in self.modules():
            if isinstance(module, StitchingLayer) and module.stitch_bias is not None:
                module.active_stitch = self.active
        return self.stitches[self.active]

    def select_by_flops(self, budget: float, accuracy: dict[int, float] | None = None) -> Stitch:
        """Select the best stitch within ``budget`` FLOPs per image.

        Best = highest accuracy when ``accuracy`` ({stitch id: accuracy}, e.g. from
        ``eval_stitches``) is given, else the most expensive stitch that fits.
        """
        fits = [s for s in self.stitches if s.flops <= budget]
        if accuracy is not None:
            fits = [s for s in fits if s.id in accuracy]
        if not fits:
            cheapest = min(self.stitches, key=lambda s: s.flops)
            raise ValueError(
                f"no stitch fits a budget of {budget / 1e9:.4g} GFLOPs: the cheapest is stitch "
                f"{cheapest.id} at {cheapest.flops / 1e9:.4g} GFLOPs"
            )
        key = (lambda s: (accuracy[s.id], -s.flops)) if accuracy else (lambda s: s.flops)
        return self.select(max(fits, key=key).id)

    # ---------------------------------------------------------------- forward
    def _projection_table(self) -> dict[tuple[int, int], tuple[str, int]]:
        """(anchor, block) → the stitching layer (key, index) that projects that block's
        output to the largest anchor's width: SN-Netv2's FS layer at the block (its code's
        reading); in SN-Net's space, the layer of the stitch from that block into the
        largest anchor that enters it latest (for equal depths and k 2: (b, b + 1))."""
        last = len(self.anchors) - 1
        table = {}
        for a in range(last):
            key = f"{a}to{last}"
            if key not in self.stitch_layers:
                raise ValueError(
                    f"dense=True needs anchor {a} stitched to the largest anchor {last} (its "
                    "levels are projected to that width): use two anchors or nearest=False"
                )
            for b in range(len(self.anchors[a].blocks)):
                if self.options["two_way"]:
                    table[(a, b)] = (key, b)
                    continue
                ends = [
                    (p.end, p.index)
                    for raw in self._raw
                    for p in raw.points
                    if p.key == key and p.front == b
                ]
                if not ends:
                    raise ValueError(
                        f"dense=True: block {b} of anchor {a} starts no stitch into anchor "
                        f"{last}, so nothing projects its output"
                    )
                table[(a, b)] = (key, max(ends)[1])
        return table

    def level_projections(self, out_indices=None) -> list[tuple[str, int]]:
        """The stitching layers (key, index) that project the active route's levels taken on
        smaller anchors (``forward_features``), each once."""
        levels = self.out_indices_of(out_indices)
        last = len(self.anchors) - 1
        used = {}
        for seg in self.stitches[self.active].route:
            for b in range(seg.start, seg.stop):
                if seg.anchor != last and b in levels[seg.anchor]:
                    used[self._projections[(seg.anchor, b)]] = None
        return list(used)

    def default_out_indices(self) -> tuple[int, ...]:
        """Four blocks of the largest anchor ending at its last: (9, 14, 19, 23) at depth 24,
        SN-Netv2's choice, the same fractions (5/12, 5/8, 5/6, 1) of any other depth."""
        depth = len(self.anchors[-1].blocks)
        return tuple(math.ceil(depth * f) - 1 for f in (5 / 12, 5 / 8, 5 / 6, 1))

    def out_indices_of(self, out_indices=None) -> list[tuple[int, ...]]:
        """Each anchor's levels: the largest anchor's ``out_indices`` (default
        ``default_out_indices``), mapped onto the others' block ids by nearest interpolation
        (⌊i·d_a/d_l⌋, as SN-Netv2's code maps them)."""
        depth = len(self.anchors[-1].blocks)
        wanted = self.default_out_indices() if out_indices is None else tuple(out_indices)
        if not wanted or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth for i in wanted
        ):
            raise ValueError(
                f"out_indices must be block ids of the largest anchor, 0..{depth - 1}, got "
                f"{out_indices!r}"
            )
        return [tuple(i * len(a.blocks) // depth for i in wanted) for a in self.anchors]

    def forward_features(self, x: torch.Tensor, out_indices=None, patch_size=None):
        """Token maps [B, D, H/p, W/p] of the active stitch for dense prediction (SN-Netv2).

        The route's blocks run in order; each segment contributes its anchor's levels
        (``out_indices_of``) among the blocks it runs, in route order. A level produced on a
        smaller anchor is projected to the largest anchor's width D by the stitching layer
        ``_projection_table`` names (SN-Netv2: the FS layer at that block), so every level
        has width D. Needs ``dense=True``.
        """
        if not self.options.get("dense"):
            raise ValueError("forward_features needs a StitchedViT built with dense=True")
        levels = self.out_indices_of(out_indices)
        stitch = self.stitches[self.active]
        first = self.anchors[stitch.route[0].anchor]
        grid = first.grid_size(image_size(x), patch_size)
        tokens = first.forward_embed(x, patch_size)
        maps = []
        for k, seg in enumerate(stitch.route):
            anchor = self.anchors[seg.anchor]
            for b in range(seg.start, seg.stop):
                tokens = anchor.blocks[b](tokens)
                for _ in range(levels[seg.anchor].count(b)):
                    level = tokens
                    if seg.anchor != len(self.anchors) - 1:
                        key, index = self._projections[(seg.anchor, b)]
                        level = self.stitch_layers[key][index](level)
                    maps.append(
                        patch_token_map(level, anchor.num_prefix_tokens, grid, clustered_grid(self))
                    )
            if k < len(stitch.points):
                point = stitch.points[k]
                tokens = self.stitch_layers[point.key][point.index](tokens)
        return maps

    def forward(self, x: torch.Tensor, patch_size=None) -> torch.Tensor:
        """Logits [B, classes] of the active stitch for images [B, C, H, W]."""
        stitch = self.stitches[self.active]
        tokens = self.anchors[stitch.route[0].anchor].forward_embed(x, patch_size)
        for k, seg in enumerate(stitch.route):
            for block in self.anchors[seg.anchor].blocks[seg.start : seg.stop]:
                tokens = block(tokens)
            if k < len(stitch.points):
                point = stitch.points[k]
                tokens = self.stitch_layers[point.key][point.index](tokens)
        last = self.anchors[stitch.route[-1].anchor]
        if stitch.points and not self.final_norm_on_stitches:
            return last.forward_head(tokens)  # SN-Net's official stitched forward
        return last.forward_head(last.norm(tokens))

    # ---------------------------------------------------------------- least squares
    @torch.no_grad()
    def init_stitching_layers(self, images, patch_size=None, ridge: float = 0.0) -> None:
        """SN-Net's least-squares init of every stitching layer (SN-Net Eq. 4-5).

        ``images``: a tensor [B, C, H, W] or an iterable of image batches (or of
        (images, labels) pairs), on the model's device; SN-Net uses ~100 images. A layer shared
        by several stitch points is solved jointly over all of their activation pairs.
        """
        if isinstance(images, torch.Tensor):
            images = [images]
        points = self.layer_positions()
        equations = {key: _NormalEquations() for key in points}
        was_training = self.training
        self.eval()
        seen = 0
        for batch in images:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            acts = [self._block_inputs(a, batch, patch_size) for a in self.anchors]
            for key, group in points.items():
                for src, dst, front, end in group:
                    equations[key].add(acts[src][front + 1], acts[dst][end])
            seen += batch.shape[0]
        self.train(was_training)
        if seen == 0:
            raise ValueError("init_stitching_layers got no images")
        for (key, index), eq in equations.items():
            weight, bias = eq.solve(ridge, rtol=1e-5)
            layer = self.stitch_layers[key][index]
            layer.load_least_squares(weight.to(layer.weight.dtype), bias.to(layer.weight.dtype))

    def layer_positions(self) -> dict[tuple[str, int], set[tuple[int, int, int, int]]]:
        """{(key, index): {(front anchor, end anchor, front block, end block), ...}}: every
        stitch point each stitching layer serves."""
        points: dict[tuple[str, int], set[tuple[int, int, int, int]]] = defaultdict(set)
        for raw in self._raw:
            pairs = zip(raw.anchors, raw.anchors[1:], strict=False)
            for (src, dst), p in zip(pairs, raw.points, strict=True):
                points[(p.key, p.index)].add((src, dst, p.front, p.end))
        if self.options.get("dense") and self.options["two_way"]:
            last = len(self.anchors[0].blocks) - 1  # small's last block → large's last output
            points[("0to1", last)].add((0, 1, last, len(self.anchors[1].blocks)))
        return points

    @staticmethod
    def _block_inputs(anchor: VisionTransformer, images, patch_size) -> list[torch.Tensor]:
        """[embed output, block 0 output, ..., last block output]: acts[t] is block t's input."""
        x = anchor.forward_embed(images, patch_size)
        acts = [x]
        for block in anchor.blocks:
            x = block(x)
            acts.append(x)
        return acts

    # ---------------------------------------------------------------- ESTA
    def enable_pst(self, rank: int, alpha: float = 1.0, train_heads: bool = True) -> StitchedViT:
        """ESTA's parameter-efficient stitch fine-tuning (thesis ch. 3, Sec. 3.4.1).

        Every anchor's attention projections (``attn.qkv``, ``attn.proj``) become
        ``StitchingLayer``s of the same names: the pretrained W and b frozen, a LoRA update of
        ``rank`` shared by all stitches, and a per-stitch bias b_s added for the active stitch:
        y = x·Wᵀ + b + b_s + (alpha/r)·(x·Aᵀ)·Bᵀ. The stitching layers keep their LoRA and
        per-stitch biases trainable. Everything else is frozen, except the classifier heads
        when ``train_heads`` (a downstream task has new classes). Needs a model built with
        ``rank > 0`` and ``stitch_biases=True``.
        """
        if self.options["rank"] < 1 or not self.options["stitch_biases"]:
            raise ValueError(
                "enable_pst needs a StitchedViT built with rank > 0 and "
                "stitch_biases=True (ESTA's LoRA stitching layers)"
            )
        for param in self.parameters():
            param.requires_grad_(False)
        for anchor in self.anchors:
            for block in anchor.blocks:
                for name in ("qkv", "proj"):
                    linear = getattr(block.attn, name)
                    if isinstance(linear, StitchingLayer):
                        continue
                    layer = StitchingLayer(
                        linear.in_features,
                        linear.out_features,
                        rank=rank,
                        alpha=alpha,
                        num_stitch_biases=len(self.stitches),
                        bias=linear.bias is not None,
                        device=linear.weight.device,
                        dtype=linear.weight.dtype,
                    )
                    with torch.no_grad():
                        layer.weight.copy_(linear.weight)
                        if linear.bias is not None:
                            layer.bias.copy_(linear.bias)
                    setattr(block.attn, name, layer)
        for module in self.modules():
            if isinstance(module, StitchingLayer):
                module.weight.requires_grad_(False)
                if module.bias is not None:
                    module.bias.requires_grad_(False)
                for p in (module.lora_A, module.lora_B, module.stitch_bias):
                    p.requires_grad_(True)
        if train_heads:
            for anchor in self.anchors:
                anchor.head.requires_grad_(True)
        self.select(self.active)
        return self

    # ---------------------------------------------------------------- deployment
    def merge(self) -> StitchedViT:
        """Merge every LoRA update into its weight (deployment); ``unmerge`` undoes it."""
        for module in self.modules():
            if isinstance(module, StitchingLayer):
                module.merge()
        return self

    def unmerge(self) -> StitchedViT:
        for module in self.modules():
            if isinstance(module, StitchingLayer):
                module.unmerge()
        return self

    def extra_repr(self) -> str:
        kinds = defaultdict(int)
        for s in self.stitches:
            kinds[s.kind] += 1
        return f"stitches={len(self.stitches)} ({dict(kinds)}), options={self.options}"
