"""Expedit's two non-parametric layers as modules (NeurIPS 2022, Sec. 3).

``TokenClustering`` turns an H×W token map into h×w centres and keeps what the matching
``TokenReconstruction`` needs (the tokens it clustered and the centres it found) for the
same forward; the reconstruction spreads the refined centres (or a head's per-centre
outputs) back to H×W. Neither has parameters: inserted into a trained ViT, no weight
changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stitchops.ops.token_cluster import token_cluster, token_reconstruct


@dataclass
class ClusterState:
    """What a clustering saw and found, for its reconstruction."""

    tokens: torch.Tensor  # [B, H, W, C]
    centres: torch.Tensor  # [B, h, w, C]


class TokenClustering(nn.Module):
    """x [B, H, W, C] → centres [B, h, w, C] (``stitchops.token_cluster``); the state for
    the reconstruction is ``self.state`` after each forward."""

    def __init__(
        self,
        grid: tuple[int, int],
        window: int = 5,
        iters: int = 5,
        temperature: float = 50.0,
        numerics: str = "exact",
        affinity_grad: bool = False,
    ) -> None:
        super().__init__()
        self.grid, self.window, self.iters = tuple(grid), window, iters
        self.temperature, self.numerics, self.affinity_grad = temperature, numerics, affinity_grad
        self.state: ClusterState | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centres = token_cluster(
            x,
            self.grid,
            window=self.window,
            iters=self.iters,
            temperature=self.temperature,
            numerics=self.numerics,
            affinity_grad=self.affinity_grad,
        )
        self.state = ClusterState(x, centres)
        return centres

    def extra_repr(self) -> str:
        return (
            f"grid={self.grid}, window={self.window}, iters={self.iters}, "
            f"temperature={self.temperature}, numerics={self.numerics!r}"
        )


class TokenReconstruction(nn.Module):
    """values [B, h, w, D] → [B, H, W, D] (``stitchops.token_reconstruct``), given the
    ``ClusterState`` (or the ``TokenClustering``) of the same forward. The weights are
    differentiable in the clustered tokens and the centres unless ``weight_grad=False``."""

    def __init__(
        self,
        window: int = 5,
        temperature: float = 50.0,
        mode: str = "local",
        k: int = 20,
        numerics: str = "exact",
        weight_grad: bool = True,
    ) -> None:
        super().__init__()
        self.window, self.temperature, self.mode, self.k = window, temperature, mode, k
        self.numerics, self.weight_grad = numerics, weight_grad

    def forward(self, values: torch.Tensor, state: ClusterState | TokenClustering) -> torch.Tensor:
        if isinstance(state, TokenClustering):
            state = state.state
        if not isinstance(state, ClusterState):
            raise ValueError(
                "TokenReconstruction needs the state of a TokenClustering that "
                "ran in this forward: pass the clustering or its .state"
            )
        return self.reconstruct(state.tokens, state.centres, values)

    def reconstruct(
        self, tokens: torch.Tensor, centres: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """``stitchops.token_reconstruct`` with this module's settings."""
        return token_reconstruct(
            tokens,
            centres,
            values,
            window=self.window,
            temperature=self.temperature,
            mode=self.mode,
            k=self.k,
            numerics=self.numerics,
            weight_grad=self.weight_grad,
        )

    def extra_repr(self) -> str:
        return (
            f"window={self.window}, temperature={self.temperature}, mode={self.mode!r}, "
            f"numerics={self.numerics!r}"
        )
