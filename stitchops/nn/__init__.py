"""Drop-in ``nn.Module``s built on stitchops ops: the stitching layer (SN-Net, SN-Netv2,
ESTA), SPT's tuned linear layers, Expedit's clustering and reconstruction (global and per
window), FASeg's focus cross-attention."""

from stitchops.nn.focus import FocusCrossAttention
from stitchops.nn.sparse import AdapterLinear, LoRALinear, PartedLinear, SparseDeltaLinear
from stitchops.nn.stitching import StitchingLayer
from stitchops.nn.token_cluster import ClusterState, TokenClustering, TokenReconstruction
from stitchops.nn.window_cluster import (
    WindowClusterState,
    WindowTokenClustering,
    WindowTokenReconstruction,
)

__all__ = [
    "AdapterLinear",
    "ClusterState",
    "FocusCrossAttention",
    "LoRALinear",
    "PartedLinear",
    "SparseDeltaLinear",
    "StitchingLayer",
    "TokenClustering",
    "TokenReconstruction",
    "WindowClusterState",
    "WindowTokenClustering",
    "WindowTokenReconstruction",
]
