"""Drop-in ``nn.Module`` replacements built on stitchops ops."""

from stitchops.nn.sparse import AdapterLinear, LoRALinear, SparseDeltaLinear
from stitchops.nn.stitching import StitchingLayer

__all__ = ["AdapterLinear", "LoRALinear", "SparseDeltaLinear", "StitchingLayer"]
