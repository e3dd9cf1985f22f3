"""Drop-in ``nn.Module`` replacements built on stitchops ops."""

from stitchops.nn.stitching import StitchingLayer

__all__ = ["StitchingLayer"]
