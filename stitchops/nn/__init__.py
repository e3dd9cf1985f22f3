"""Drop-in ``nn.Module`` replacements built on stitchops ops."""

from stitchops.nn.sparse import AdapterLinear, LoRALinear, SparseDeltaLinear
from stitchops.nn.stitching import StitchingLayer
from stitchops.nn.token_cluster import ClusterState, TokenClustering, TokenReconstruction

__all__ = ["AdapterLinear", "ClusterState", "LoRALinear", "SparseDeltaLinear", "StitchingLayer",
           "TokenClustering", "TokenReconstruction"]  # fmt: skip
