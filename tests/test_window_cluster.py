"""Expedit's window variant through the module layer (stitchops.nn.WindowTokenClustering):
every K×K window on its own, the padding of cut windows masked out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stitchops import token_cluster, token_reconstruct
from stitchops.nn import WindowTokenClustering, WindowTokenReconstruction
from stitchops.nn.window_cluster import cells

GEN = torch.Generator().manual_seed(0)
SETTINGS = {"window": 3, "iters": 2, "temperature": 4.0}


def _explicit(x, size, grid):
    """Per window, by hand: (its map slice, its centres) from token_cluster on the slice's
    valid tokens, and the clustered map built from them (zeros past a cut window's centres)."""
    b, height, width, c = x.shape
    rows, cols = -(-height // size), -(-width // size)
    out = torch.zeros(b, rows * grid, cols * grid, c, dtype=x.dtype)
    found = {}
    for i in range(rows):
        for j in range(cols):
            piece = x[:, i * size : (i + 1) * size, j * size : (j + 1) * size]
            g = (cells(piece.shape[1], size, grid), cells(piece.shape[2], size, grid))
            s = token_cluster(piece, g, **SETTINGS)
            out[:, i * grid : i * grid + g[0], j * grid : j * grid + g[1]] = s
            found[i, j] = (piece, s)
    return out, found


@pytest.mark.parametrize("hw, size, grid", [((12, 18), 6, 3), ((13, 17), 6, 3), ((5, 9), 7, 4)])
def test_each_window_is_clustered_on_its_own_valid_tokens(hw, size, grid):
    x = torch.randn(2, *hw, 8, generator=GEN, dtype=torch.float64)
    layer = WindowTokenClustering(size, grid, **SETTINGS)
    clustered = layer(x)
    expected, _ = _explicit(x, size, grid)
    assert clustered.shape == expected.shape
    torch.testing.assert_close(clustered, expected, rtol=1e-12, atol=1e-12)


def test_padding_is_masked_out_unlike_the_official_zero_padding():
    """The border windows' centres do not see the padding: zero-padding the map to a
    multiple of K, as the official code does, moves them."""
    x = torch.randn(1, 13, 17, 8, generator=GEN, dtype=torch.float64) + 3.0
    ours = WindowTokenClustering(6, 3, **SETTINGS)(x)
    padded = F.pad(x, (0, 0, 0, 1, 0, 5))  # to 18 × 18
    official = WindowTokenClustering(6, 3, **SETTINGS)(padded)
    torch.testing.assert_close(ours[:, :6, :6], official[:, :6, :6])  # whole windows agree
    assert (ours[:, 6:, 6:] - official[:, 6:, 6:]).abs().max() > 0.1  # the corner does not


@pytest.mark.parametrize("hw", [(12, 18), (13, 17)])
def test_reconstruction_per_window_and_identity_at_full_grid(hw):
    x = torch.randn(2, *hw, 8, generator=GEN, dtype=torch.float64)
    cluster = WindowTokenClustering(6, 3, **SETTINGS)
    rebuild = WindowTokenReconstruction(window=3, temperature=4.0)
    clustered = cluster(x)
    values = torch.randn(*clustered.shape[:3], 5, generator=GEN, dtype=torch.float64)
    y = rebuild(values, cluster)
    assert y.shape == (2, *hw, 5)
    _, found = _explicit(x, 6, 3)
    for (i, j), (piece, s) in found.items():
        v = values[:, i * 3 : i * 3 + s.shape[1], j * 3 : j * 3 + s.shape[2]]
        expected = token_reconstruct(piece, s, v, window=3, temperature=4.0)
        got = y[:, i * 6 : i * 6 + piece.shape[1], j * 6 : j * 6 + piece.shape[2]]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    identity = WindowTokenClustering(6, 6, window=3, iters=2, temperature=1e-6)
    same = WindowTokenReconstruction(window=3, temperature=1e-6)(identity(x), identity)
    torch.testing.assert_close(same, x, rtol=1e-9, atol=1e-9)


def test_gradients_reach_the_tokens_through_both_layers():
    x = torch.randn(1, 13, 17, 4, generator=GEN, requires_grad=True)
    cluster = WindowTokenClustering(6, 3, **SETTINGS)
    y = WindowTokenReconstruction(window=3, temperature=4.0)(cluster(x) * 2.0, cluster)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: WindowTokenClustering(4, 5), "must fit the window_size"),
        (lambda: WindowTokenClustering(0, 1), "window_size must be a positive int"),
        (lambda: WindowTokenClustering(6, "3"), "grid must be a positive int"),
        (lambda: WindowTokenClustering(6, (3, 3, 3)), "grid must be a positive int"),
    ],
)
def test_bad_settings(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_inputs():
    cluster = WindowTokenClustering(6, 3, **SETTINGS)
    with pytest.raises(ValueError, match=r"x must be \[B, H, W, C\]"):
        cluster(torch.randn(13, 17, 4))
    clustered = cluster(torch.randn(1, 13, 17, 4))
    rebuild = WindowTokenReconstruction(window=3)
    with pytest.raises(ValueError, match=r"values must be \[B, 9, 9, D\]"):
        rebuild(clustered[:, :6], cluster)
    with pytest.raises(ValueError, match="needs the state"):
        rebuild(clustered, None)
