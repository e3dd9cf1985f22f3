"""Expedit's window variant (NeurIPS 2022, Sec. 3: Swin and SAM-style windowed backbones):
each K×K window of an H×W token map is clustered to k×k centres on its own, and later
reconstructed on its own.

The map is cut into ⌈H/K⌉ × ⌈W/K⌉ windows as if zero-padded to a multiple of K (Swin's
padding). Unlike the official code, the padding never enters clustering or reconstruction:
a window cut by the border (its valid part vh × vw, top-left) is clustered from its valid
tokens only, to ``cells(vh, K, k)`` × ``cells(vw, K, k)`` centres, k·v/K rounded up (every
cell keeps about the size it has in a whole window), and its reconstruction writes only its
valid tokens. The clustered map is [B, ⌈H/K⌉·k, ⌈W/K⌉·k, C], each window's centres in its own
k×k block (top-left), zeros where a cut window has fewer (as Swin pads), so the next layers
can window-partition it with window k.

Windows of one valid shape (whole windows, the bottom row, the right column, the corner)
run as one batch through ``stitchops.token_cluster`` / ``token_reconstruct``: at most four
calls, no separate kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from stitchops.nn.token_cluster import TokenReconstruction
from stitchops.ops.token_cluster import token_cluster


def _pair(value, name: str) -> tuple[int, int]:
    pair = (
        (value, value)
        if isinstance(value, int)
        else tuple(value)
        if isinstance(value, (tuple, list))
        else ()
    )
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def cells(valid: int, size: int, grid: int) -> int:
    """Centres along one side of a window with ``valid`` of its ``size`` tokens inside the
    map: ⌈grid·valid/size⌉, at least 1, at most ``valid``."""
    return max(1, min(valid, math.ceil(grid * valid / size)))


@dataclass(frozen=True)
class Group:
    """The windows of one valid shape: map rows [row0, row0 + rows·vh) and columns
    [col0, col0 + cols·vw), clustered to ``grid`` centres each."""

    row0: int
    col0: int
    rows: int  # windows down
    cols: int  # windows across
    valid: tuple[int, int]  # (vh, vw)
    grid: tuple[int, int]  # its centres (gh, gw)


def groups(hw: tuple[int, int], size: tuple[int, int], grid: tuple[int, int]) -> list[Group]:
    """The ≤ 4 groups of an H×W map in K×K windows (whole ones first, the border last)."""
    spans = []
    for extent, k, g in zip(hw, size, grid, strict=True):
        whole, rest = divmod(extent, k)
        axis = [(0, whole, k)] if whole else []
        if rest:
            axis.append((whole * k, 1, rest))
        spans.append([(start, count, valid, cells(valid, k, g)) for start, count, valid in axis])
    return [
        Group(r0, c0, nr, nc, (vh, vw), (gh, gw))
        for r0, nr, vh, gh in spans[0]
        for c0, nc, vw, gw in spans[1]
    ]


def _windows(x: torch.Tensor, g: Group) -> torch.Tensor:
    """[B, H, W, C] → the group's windows [B·rows·cols, vh, vw, C]."""
    b, c = x.shape[0], x.shape[-1]
    (vh, vw) = g.valid
    region = x[:, g.row0 : g.row0 + g.rows * vh, g.col0 : g.col0 + g.cols * vw]
    return (
        region.reshape(b, g.rows, vh, g.cols, vw, c)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(b * g.rows * g.cols, vh, vw, c)
    )


def _tile(windows: torch.Tensor, g: Group, batch: int, shape: tuple[int, int]) -> torch.Tensor:
    """[B·rows·cols, sh, sw, C] windows → their region [B, rows·sh, cols·sw, C]."""
    (sh, sw), c = shape, windows.shape[-1]
    return (
        windows.reshape(batch, g.rows, g.cols, sh, sw, c)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch, g.rows * sh, g.cols * sw, c)
    )


def _assemble(regions: list[torch.Tensor], parts: list[Group]) -> torch.Tensor:
    """The groups' regions (row-major: whole, right column; bottom row, corner) → one map."""
    bands: dict[int, list[torch.Tensor]] = {}
    for region, g in zip(regions, parts, strict=True):
        bands.setdefault(g.row0, []).append(region)
    return torch.cat([torch.cat(band, dim=2) for band in bands.values()], dim=1)


@dataclass
class WindowClusterState:
    """What a window clustering saw and found: per group, its windows' tokens and centres."""

    hw: tuple[int, int]
    window_size: tuple[int, int]  # K
    grid: tuple[int, int]  # k
    parts: list[Group]
    tokens: list[torch.Tensor]  # [n, vh, vw, C] per group
    centres: list[torch.Tensor]  # [n, gh, gw, C] per group


class WindowTokenClustering(nn.Module):
    """x [B, H, W, C] → the clustered map [B, ⌈H/K⌉·k, ⌈W/K⌉·k, C] (module docstring);
    ``self.state`` holds what ``WindowTokenReconstruction`` needs after each forward.

    Args:
        window_size: K (or (Kh, Kw)), the windows clustered on their own.
        grid: k (or (kh, kw)) centres per whole window, k <= K.
        window, iters, temperature, numerics: ``stitchops.token_cluster``'s.
    """

    def __init__(
        self,
        window_size,
        grid,
        window: int = 5,
        iters: int = 5,
        temperature: float = 50.0,
        numerics: str = "exact",
    ) -> None:
        super().__init__()
        self.window_size = _pair(window_size, "window_size")
        self.grid = _pair(grid, "grid")
        if any(g > k for g, k in zip(self.grid, self.window_size, strict=True)):
            raise ValueError(f"grid {self.grid} must fit the window_size {self.window_size}")
        self.window, self.iters, self.temperature = window, iters, temperature
        self.numerics = numerics
        self.state: WindowClusterState | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be [B, H, W, C], got shape {tuple(x.shape)}")
        batch, height, width, _ = x.shape
        parts = groups((height, width), self.window_size, self.grid)
        tokens = [_windows(x, g) for g in parts]
        centres = [
            token_cluster(
                t,
                g.grid,
                window=self.window,
                iters=self.iters,
                temperature=self.temperature,
                numerics=self.numerics,
            )
            for t, g in zip(tokens, parts, strict=True)
        ]
        self.state = WindowClusterState(
            (height, width), self.window_size, self.grid, parts, tokens, centres
        )
        kh, kw = self.grid
        blocks = [
            _tile(
                torch.nn.functional.pad(s, (0, 0, 0, kw - g.grid[1], 0, kh - g.grid[0])),
                g,
                batch,
                self.grid,
            )
            for s, g in zip(centres, parts, strict=True)
        ]
        return _assemble(blocks, parts)

    def extra_repr(self) -> str:
        return (
            f"window_size={self.window_size}, grid={self.grid}, window={self.window}, "
            f"iters={self.iters}, temperature={self.temperature}"
        )


def _clustered_windows(values: torch.Tensor, state: WindowClusterState, g: Group) -> torch.Tensor:
    """The group's blocks of a clustered-layout map [B, ⌈H/K⌉·k, ⌈W/K⌉·k, D], each cut to
    the window's centres: [B·rows·cols, gh, gw, D]."""
    (kh, kw), (big_h, big_w) = state.grid, state.window_size
    top, left = g.row0 // big_h * kh, g.col0 // big_w * kw
    expected = (math.ceil(state.hw[0] / big_h) * kh, math.ceil(state.hw[1] / big_w) * kw)
    if values.dim() != 4 or tuple(values.shape[1:3]) != expected:
        raise ValueError(
            f"values must be [B, {expected[0]}, {expected[1]}, D] (the clustered "
            f"map's layout), got shape {tuple(values.shape)}"
        )
    region = values[:, top : top + g.rows * kh, left : left + g.cols * kw]
    windows = _windows(region, Group(0, 0, g.rows, g.cols, (kh, kw), (kh, kw)))
    return windows[:, : g.grid[0], : g.grid[1]]


class WindowTokenReconstruction(TokenReconstruction):
    """values [B, ⌈H/K⌉·k, ⌈W/K⌉·k, D] (the clustered map's layout) → [B, H, W, D], each
    window's valid tokens from its own centres, given the ``WindowClusterState`` (or the
    ``WindowTokenClustering``) of the same forward. ``window``, ``temperature``, ``mode``,
    ``k``, ``numerics`` and ``weight_grad`` are ``stitchops.token_reconstruct``'s."""

    def forward(self, values: torch.Tensor, state) -> torch.Tensor:
        if isinstance(state, WindowTokenClustering):
            state = state.state
        if not isinstance(state, WindowClusterState):
            raise ValueError(
                "WindowTokenReconstruction needs the state of a "
                "WindowTokenClustering that ran in this forward"
            )
        batch = values.shape[0]
        outputs = []
        for tokens, centres, g in zip(state.tokens, state.centres, state.parts, strict=True):
            per_window = _clustered_windows(values, state, g)
            y = self.reconstruct(tokens, centres, per_window)
            outputs.append(_tile(y, g, batch, g.valid))
        return _assemble(outputs, state.parts)
