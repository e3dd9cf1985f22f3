"""Drop-in ``nn.Module``s built on stitchops ops: the stitching layer (SN-Net, SN-Netv2,
ESTA), SPT's tuned linear layers, Expedit's clustering and reconstruction (global and per
window), FASeg's focus cross-attention, SPViT's single-path attention and gated MLP."""

from stitchops.nn.focus import FocusCrossAttention
from stitchops.nn.sparse import AdapterLinear, LoRALinear, PartedLinear, SparseDeltaLinear
from stitchops.nn.spvit import ConvAttention, UnifiedAttention, UnifiedMlp
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
    "ConvAttention",
    "FocusCrossAttention",
    "LoRALinear",
    "PartedLinear",
    "SparseDeltaLinear",
    "StitchingLayer",
    "TokenClustering",
    "TokenReconstruction",
    "UnifiedAttention",
    "UnifiedMlp",
    "WindowClusterState",
    "WindowTokenClustering",
    "WindowTokenReconstruction",
]
