"""Drop-in ``nn.Module`` replacements built on stitchops ops."""

from stitchops.nn.focus import FocusCrossAttention
from stitchops.nn.sparse import AdapterLinear, LoRALinear, PartedLinear, SparseDeltaLinear
from stitchops.nn.stitching import StitchingLayer
from stitchops.nn.token_cluster import ClusterState, TokenClustering, TokenReconstruction
from stitchops.nn.window_cluster import (
    WindowClusterState,
    WindowTokenClustering,
    WindowTokenReconstruction,
)

__all__ = ["AdapterLinear", "ClusterState", "FocusCrossAttention", "LoRALinear",
           "PartedLinear", "SparseDeltaLinear", "StitchingLayer", "TokenClustering",
           "TokenReconstruction", "WindowClusterState", "WindowTokenClustering",
           "WindowTokenReconstruction"]  # fmt: skip
