"""FlexiViT: PI-resize (Eq. 4), its cache, position-embedding resize, flexible forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stitchops import pi_resize_patch_embed
from stitchops.models import flexi, resize_pos_embed, vit_small_test
from stitchops.models.flexi import bilinear_resize


@pytest.mark.parametrize("old, new", [(4, 8), (8, 12), (16, 24), (2, 7), ((4, 6), (8, 9))])
def test_pi_resize_preserves_inner_products_when_upsampling(old, new):
    """<x, w> = <resize(x), PI-resize(w)> for every patch x (FlexiViT Sec. 3.4)."""
    old_hw, new_hw = flexi._pair(old), flexi._pair(new)
    weight = torch.randn(5, 3, *old_hw, dtype=torch.float64)
    x = torch.randn(7, 3, *old_hw, dtype=torch.float64)
    resized_w = pi_resize_patch_embed(weight, new)
    resized_x = bilinear_resize(x, new_hw, antialias_when_shrinking=False)
    assert resized_w.shape == (5, 3, *new_hw)
    lhs = torch.einsum("bchw,dchw->bd", x, weight)
    rhs = torch.einsum("bchw,dchw->bd", resized_x, resized_w)
    assert torch.allclose(lhs, rhs, rtol=1e-9, atol=1e-9)


def test_pi_resize_downsampling_is_the_least_squares_kernel():
    """For p' < p, ŵ minimises ‖Bᵀŵ − w‖: the residual is orthogonal to Bᵀ's columns."""
    weight = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    resized = pi_resize_patch_embed(weight, 5)
    # ŵ = argmin E(<x,w> - <Bx,ŵ>)² with x̂ = Bx; here B maps 8×8 → 5×5
    basis = torch.eye(64, dtype=torch.float64).reshape(64, 8, 8)
    down = bilinear_resize(basis, (5, 5), antialias_when_shrinking=False)
    b_mat = down.reshape(64, 25).t()  # [25, 64]: x̂ = B·x
    residual = b_mat.t() @ resized.reshape(8, 25).t() - weight.reshape(8, 64).t()
    assert torch.allclose(b_mat @ residual, torch.zeros(25, 8, dtype=torch.float64), atol=1e-9)


def _tf_bilinear(image: np.ndarray, new: tuple[int, int]) -> np.ndarray:
    """``tf.image.resize(image, new, method="bilinear")`` (antialias off, half-pixel centres),
    written out: output pixel i samples the input at (i + 0.5)·in/out − 0.5, clamped to the
    image, between its two nearest pixels."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        w = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            lo = min(int(np.floor(src)), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            frac = src - lo if lo < n_in - 1 else 0.0
            w[i, lo] += 1 - frac
            w[i, hi] += frac
        return w

    return weights(image.shape[0], new[0]) @ image @ weights(image.shape[1], new[1]).T


def _big_vision_pi_matrix(old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
    """big_vision's resample_patchemb: resize every basis image, stack, pinv of the
    transpose."""
    mat = []
    for i in range(old[0] * old[1]):
        basis = np.zeros(old)
        basis[np.unravel_index(i, old)] = 1.0
        mat.append(_tf_bilinear(basis, new).reshape(-1))
    resize_mat = np.stack(mat).T  # [new², old²]
    return np.linalg.pinv(resize_mat.T)


@pytest.mark.parametrize(
    "old, new", [(16, 8), (16, 12), (32, 16), (16, 24), (7, 5), ((6, 9), (4, 5))]
)
def test_pi_matrix_is_big_visions(old, new):
    """The PI-resize matrix equals one built independently, as big_vision does, when shrinking
    (no antialias: tf.image.resize's default) and when enlarging."""
    old, new = flexi._pair(old), flexi._pair(new)
    ours = flexi._pi_matrix_f64(old, new).numpy()
    np.testing.assert_allclose(ours, _big_vision_pi_matrix(old, new), rtol=1e-9, atol=1e-9)


def test_flexi_model_from_a_32x32_kernel_gives_big_visions_kernel_at_patch_16():
    model = vit_small_test(
        img_size=48, patch_size=16, in_chans=3, embed_dim=8, depth=1, flexi=True
    ).double()
    stored = model.patch_embed.proj.weight.detach()  # [D, C, 32, 32]
    matrix = torch.from_numpy(_big_vision_pi_matrix((32, 32), (16, 16)))
    want = (stored.reshape(-1, 32 * 32) @ matrix.t()).reshape(8, 3, 16, 16)
    got = pi_resize_patch_embed(stored, 16)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    tokens = model.patch_embed(x, patch_size=16)
    conv = torch.nn.functional.conv2d(x, want, model.patch_embed.proj.bias, stride=16)
    assert torch.allclose(tokens, conv.flatten(2).transpose(1, 2), rtol=1e-9, atol=1e-12)


def test_pos_embed_resize_antialiases_when_shrinking():
    """The position grid follows jax.image.resize (antialiased when shrinking), as FlexiViT."""
    pos = torch.randn(1, 1 + 64, 3, dtype=torch.float64)
    out = resize_pos_embed(pos, 8, 4, num_prefix=1)
    grid = pos[0, 1:].reshape(8, 8, 3).permute(2, 0, 1)[None]
    smooth = torch.nn.functional.interpolate(
        grid, size=(4, 4), mode="bilinear", align_corners=False, antialias=True
    )[0]
    assert torch.allclose(out[0, 1:].reshape(4, 4, 3).permute(2, 0, 1), smooth)


def test_pi_matrix_is_cached_per_size_pair():
    flexi._pi_matrix_f64.cache_clear()
    flexi._pi_matrix.cache_clear()
    w = torch.randn(3, 1, 4, 4)
    for _ in range(5):
        pi_resize_patch_embed(w, 6)
    info = flexi._pi_matrix_f64.cache_info()
    assert info.misses == 1
    assert flexi._pi_matrix.cache_info().hits == 4


def test_pi_resize_identity_and_errors():
    w = torch.randn(3, 1, 4, 4)
    assert pi_resize_patch_embed(w, 4) is w
    with pytest.raises(ValueError, match="patch size"):
        pi_resize_patch_embed(w, 0)
    with pytest.raises(ValueError, match="weight must be"):
        pi_resize_patch_embed(torch.randn(3, 4, 4), 6)
    with pytest.raises(TypeError, match="floating-point"):
        pi_resize_patch_embed(torch.ones(3, 1, 4, 4, dtype=torch.int64), 6)


def test_pi_resize_is_differentiable():
    w = torch.randn(3, 1, 4, 4, requires_grad=True)
    pi_resize_patch_embed(w, 8).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_pos_embed_resize_keeps_class_token_and_is_bilinear():
    pos = torch.randn(1, 1 + 9, 4, dtype=torch.float64)
    out = resize_pos_embed(pos, 3, 6, num_prefix=1)
    assert out.shape == (1, 37, 4)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = pos[0, 1:].reshape(3, 3, 4).permute(2, 0, 1)
    expected = torch.nn.functional.interpolate(
        grid[None], size=(6, 6), mode="bilinear", align_corners=False
    )[0]
    assert torch.allclose(out[0, 1:].reshape(6, 6, 4).permute(2, 0, 1), expected)
    assert resize_pos_embed(pos, 3, 3, 1) is pos


def test_model_runs_at_every_patch_size():
    model = vit_small_test(img_size=24, patch_size=4, in_chans=3, embed_dim=32, depth=2)
    x = torch.randn(2, 3, 24, 24)
    for p in (2, 3, 4, 6, 8, 12):
        out = model(x, patch_size=p)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    # native patch size: exactly the plain forward
    assert torch.equal(model(x, patch_size=4), model(x))


def test_flexi_model_stores_underlying_32x32_kernel_and_7x7_grid():
    model = vit_small_test(img_size=48, patch_size=8, in_chans=3, embed_dim=32, depth=2, flexi=True)
    assert model.patch_embed.proj.weight.shape == (32, 3, 32, 32)
    assert model.pos_embed.shape == (1, 1 + 49, 32)
    x = torch.randn(2, 3, 48, 48)
    for p in (8, 12, 16, 24, 48):
        out = model(x, patch_size=p)
        assert out.shape == (2, 10)
    out = model(x)  # the constructor's patch size
    out.sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.pos_embed.grad.abs().sum() > 0
