"""FLOPs and parameters of a segmentation model, counted as for the classifiers.

FLOPs are multiply-adds of one image (fvcore's convention, as ``models.flops``): the
backbone's route by the same formulas as a classifier's (without its classifier norm and
head), up to its last level, plus the FS projections of levels taken on a small anchor, plus
the decoder, whose multiply-adds ``torch.utils.flop_counter`` counts on zero maps of the
levels' shape (it counts two FLOPs per multiply-add). The final bilinear upsampling is not counted.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from stitchops.models import flops as _flops
from stitchops.models.flops import deployed_numel
from stitchops.models.stitched import StitchedViT


@torch.no_grad()
def _decoder_flops(model, levels: int, dim: int, grid: tuple[int, int]) -> int:
    """The decoder's multiply-adds on ``levels`` zero maps [1, dim, *grid] (eval mode)."""
    param = next(model.decoder.parameters())
    fake = [param.new_zeros(1, dim, *grid) for _ in range(levels)]
    was_training = model.decoder.training
    model.decoder.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model.decoder(fake)
    finally:
        model.decoder.train(was_training)
    return counter.get_total_flops() // 2


def segmenter_flops(model, img_size) -> int:
    """Multiply-adds of one ``img_size`` image through the model's active route (module
    docstring)."""
    backbone = model.backbone
    if isinstance(backbone, StitchedViT):
        stitch = backbone.stitches[backbone.active]
        last = backbone.anchors[stitch.route[-1].anchor].cfg
        total = backbone.flops(stitch.id, img_size) - _flops.tail_flops(last, img_size)
        levels = backbone.out_indices_of(model.out_indices)
        cfg = backbone.anchors[-1].cfg
        for seg in stitch.route:  # each level taken on a smaller anchor is projected once
            if seg.anchor != len(backbone.anchors) - 1:
                source = backbone.anchors[seg.anchor].cfg
                hits = sum(levels[seg.anchor].count(b) for b in range(seg.start, seg.stop))
                total += hits * _flops.stitch_layer_flops(
                    source.embed_dim, cfg.embed_dim, source, img_size
                )
        count = len(levels[-1])
    else:
        cfg = backbone.cfg
        blocks = max(i % cfg.depth for i in model.out_indices) + 1
        total = _flops.embed_flops(cfg, img_size) + blocks * _flops.block_flops(cfg, img_size)
        count = len(model.out_indices)
    anchor = backbone.anchors[-1] if isinstance(backbone, StitchedViT) else backbone
    return total + _decoder_flops(model, count, cfg.embed_dim, anchor.grid_size(img_size))


def segmenter_params(model) -> int:
    """Parameters of the active route once deployed (with the layers projecting its levels),
    plus the decoder's."""
    backbone = model.backbone
    if isinstance(backbone, StitchedViT):
        stitch = backbone.stitches[backbone.active]
        projections = {
            backbone.stitch_layers[key][index]
            for key, index in backbone.level_projections(model.out_indices)
        }
        extra = [
            layer
            for layer in projections
            if not any(layer is backbone.stitch_layers[p.key][p.index] for p in stitch.points)
        ]
        route = stitch.params + sum(deployed_numel(layer) for layer in extra)
    else:
        route = deployed_numel(backbone)
    return route + deployed_numel(model.decoder)
