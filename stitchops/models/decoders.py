"""The segmentation decoders by name, as ``Segmenter`` (and the command line's ``--decoder``)
chooses them: each takes ``(dim, num_classes, **options)`` and the backbone's levels, and
says how many levels it reads (``levels``: the last one, or four for FASeg's pyramid)."""

from __future__ import annotations

import math

from stitchops.models.faseg import FASegHead
from stitchops.models.heads import LinearDecoder, MaskTransformer, SETRNaiveHead

DECODERS = {
    "linear": LinearDecoder,
    "mask": MaskTransformer,
    "setr": SETRNaiveHead,
    "faseg": FASegHead,
}


def default_levels(depth: int, count: int) -> tuple[int, ...]:
    """``count`` block ids ending at the last: the last block alone, or four at the fractions
    (5/12, 5/8, 5/6, 1) of the depth, as StitchedViT.default_out_indices (SN-Netv2's choice
    at depth 24: 9, 14, 19, 23)."""
    if count == 1:
        return (depth - 1,)
    return tuple(max(0, math.ceil(depth * f) - 1) for f in (5 / 12, 5 / 8, 5 / 6, 1))
