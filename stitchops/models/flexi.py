"""FlexiViT's resizing of patch-embedding weights and position embeddings.

PI-resize (FlexiViT Eq. 4). A patch x of p×p pixels is resized to x̂ = B·x with B the
[p'², p²] matrix of bilinear resizing, built as big_vision's ``resample_patchemb`` builds
it: each basis image resized by ``tf.image.resize(..., method="bilinear")`` (half-pixel
centres, no antialiasing, also when shrinking). The new kernel ŵ minimises
E_x[(<x, w> − <B·x, ŵ>)²]; for x ~ N(0, I) the solution is ŵ = (Bᵀ)⁺·w, so for upsampling
(p' ≥ p, B of full column rank) <x, w> = <B·x, ŵ> holds exactly for every x. For
downsampling it is the least-squares best kernel.

The [p'², p²] matrix (Bᵀ)⁺ depends only on (p, p'): it is computed once per size pair in
float64 and cached (per device and dtype as well), so a forward pass at a new patch size
costs one small matmul over the weights, not a pseudo-inverse.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from stitchops._runtime import constant_shapes, untraced


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"a patch size is a positive int or a pair of them, got {size!r}")
    return int(size[0]), int(size[1])


def bilinear_resize(
    x: torch.Tensor, size: tuple[int, int], antialias_when_shrinking: bool = True
) -> torch.Tensor:
    """Bilinear resize of [..., h, w] to [..., *size] with half-pixel centres.

    ``antialias_when_shrinking=True`` is ``jax.image.resize(..., "bilinear")``, which FlexiViT
    uses for the position grid; False is ``tf.image.resize(..., method="bilinear")`` (its
    default ``antialias=False``), which big_vision uses for the PI-resize matrix. Both are
    the same when enlarging.
    """
    with constant_shapes():
        old = (int(x.shape[-2]), int(x.shape[-1]))
    if old == tuple(size):
        return x
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *old)
    shrink = size[0] < old[0] or size[1] < old[1]
    antialias = shrink and antialias_when_shrinking
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return out.reshape(*lead, *size)


@functools.lru_cache(maxsize=64)
def _pi_matrix_f64(old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(Bᵀ)⁺ as a [new_h·new_w, old_h·old_w] float64 CPU matrix (big_vision's resize matrix:
    no antialiasing)."""
    basis = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, *old)
    resize = bilinear_resize(basis, new, antialias_when_shrinking=False)
    resize = resize.reshape(old[0] * old[1], -1)  # Bᵀ: [old², new²]
    return torch.linalg.pinv(resize)  # [new², old²]


@functools.lru_cache(maxsize=256)
def _pi_matrix(old, new, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _pi_matrix_f64(old, new).to(device=device, dtype=dtype)


def pi_resize_patch_embed(weight: torch.Tensor, new_patch_size) -> torch.Tensor:
    """PI-resize a patch-embedding kernel [D, C, p, p] to [D, C, p', p'] (FlexiViT Eq. 4).

    Differentiable in ``weight`` (FlexiViT trains the underlying kernel through it).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError("weight must be a [D, C, p_h, p_w] patch-embedding kernel")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    with constant_shapes():
        old, new = (int(weight.shape[-2]), int(weight.shape[-1])), _pair(new_patch_size)
    if old == new:
        return weight
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with untraced():  # a constant of the trace, cached across calls
        matrix = _pi_matrix(old, new, weight.device, dtype)
    flat = weight.reshape(-1, old[0] * old[1]).to(dtype)
    return (flat @ matrix.t()).reshape(*weight.shape[:2], *new).to(weight.dtype)


def resize_pos_embed(pos: torch.Tensor, old_grid, new_grid, num_prefix: int) -> torch.Tensor:
    """Bilinear resize of a [1, prefix + gh·gw, D] position embedding to a new grid.

    The first ``num_prefix`` rows (class token) are kept as they are (FlexiViT Sec. 3.2).
    """
    old_grid, new_grid = _pair(old_grid), _pair(new_grid)
    if old_grid == new_grid:
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    grid = bilinear_resize(grid, new_grid).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, grid], dim=1)
