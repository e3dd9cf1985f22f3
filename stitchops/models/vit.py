"""DeiT / DeiT-III vision transformer with timm's parameter names and shapes.

A timm ``VisionTransformer`` state dict (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.norm1 / attn.qkv / attn.proj / ls1.gamma / norm2 / mlp.fc1 / mlp.fc2 /
ls2.gamma``, ``norm``, ``head``) loads with ``load_state_dict`` and no timm import.

Shapes: images [B, C, H, W] → tokens [B, prefix + (H/p)·(W/p), D] → logits [B, classes].
DeiT adds the position embedding to the class token too; DeiT-III (``no_embed_class``) adds
it to the patch tokens only and uses LayerScale (``init_values``).

FlexiViT: ``model(x, patch_size=p)`` runs at any patch size p dividing the image: the kernel
is PI-resized (FlexiViT Eq. 4) and the position grid bilinearly resized. With ``flexi=True``
the stored parameters are FlexiViT's underlying 32×32 kernel and 7×7 position grid, and every
forward resizes them (``patch_size`` then defaults to the constructor's ``patch_size``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stitchops._runtime import constant_shapes
from stitchops.models.flexi import _pair, pi_resize_patch_embed, resize_pos_embed
from stitchops.models.token_grid import clustered_grid


@dataclass(frozen=True)
class ViTConfig:
    """Architecture hyper-parameters (timm's argument names)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None
    no_embed_class: bool = False
    flexi: bool = False
    flexi_kernel: int = 32
    flexi_grid: int = 7

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float, device=None, dtype=None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention: qkv [D → 3D], softmax(q·kᵀ/√d_h)·v, proj [D → D]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, **factory) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, **factory) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: ViTConfig, **factory) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **factory)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, **factory)
        scale = cfg.init_values
        self.ls1 = LayerScale(dim, scale, **factory) if scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **factory)
        self.mlp = Mlp(dim, cfg.mlp_hidden, **factory)
        self.ls2 = LayerScale(dim, scale, **factory) if scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def static_shape(x: torch.Tensor) -> tuple[int, ...]:
    """``x.shape`` as Python ints, also under ``torch.jit.trace``, where sizes are traced
    tensors: a trace is specialised to its input's size (``_runtime.constant_shapes``)."""
    with constant_shapes():
        return tuple(int(size) for size in x.shape)


def image_size(x: torch.Tensor) -> tuple[int, int]:
    """(H, W) of images [B, C, H, W] as Python ints (see ``static_shape``)."""
    return static_shape(x)[-2:]


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → D channels (a strided conv, kernel ``proj``)."""

    def __init__(self, cfg: ViTConfig, **factory) -> None:
        super().__init__()
        kernel = cfg.flexi_kernel if cfg.flexi else cfg.patch_size
        self.patch_size = _pair(cfg.patch_size)
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel, stride=kernel, **factory)

    def forward(self, x: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
        weight = pi_resize_patch_embed(self.proj.weight, patch_size)
        x = F.conv2d(x, weight, self.proj.bias, stride=patch_size)
        return x.flatten(2).transpose(1, 2)  # [B, gh·gw, D]


def patch_token_map(
    tokens: torch.Tensor,
    prefix: int,
    grid: tuple[int, int],
    clustered: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Patch tokens [B, prefix + n, D] → map [B, D, gh, gw] on the image's token ``grid``, or
    on ``clustered`` (h, w) where the tokens are an expedited model's clustered ones
    (n = h·w ≠ gh·gw)."""
    patches = tokens[:, prefix:]
    if clustered is not None and patches.shape[1] != grid[0] * grid[1]:
        grid = clustered
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


class VisionTransformer(nn.Module):
    """DeiT / DeiT-III ViT (class-token pooling), timm-compatible parameters."""

    def __init__(self, device=None, dtype=None, **kwargs) -> None:
        super().__init__()
        cfg = ViTConfig(**kwargs)
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.img_size % cfg.patch_size:
            raise ValueError(
                f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}"
            )
        factory = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.embed_dim = self.num_features = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.num_prefix_tokens = 1
        self.no_embed_class = cfg.no_embed_class
        self.patch_embed = PatchEmbed(cfg, **factory)
        grid = cfg.flexi_grid if cfg.flexi else cfg.img_size // cfg.patch_size
        self.pos_grid = (grid, grid)
        embed_len = grid * grid + (0 if cfg.no_embed_class else 1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim, **factory))
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, cfg.embed_dim, **factory))
        self.blocks = nn.Sequential(*[Block(cfg, **factory) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6, **factory)
        head = nn.Linear(cfg.embed_dim, cfg.num_classes, **factory) if cfg.num_classes else None
        self.head = head if head is not None else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's init: truncated normal(0.02) for linears and the position embedding."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        fan_in = self.patch_embed.proj.weight[0].numel()
        nn.init.uniform_(
            self.patch_embed.proj.weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in)
        )

    # ---------------------------------------------------------------- shapes
    @property
    def config(self) -> dict:
        return asdict(self.cfg)

    def resolve_patch_size(self, patch_size=None) -> tuple[int, int]:
        return self.patch_embed.patch_size if patch_size is None else _pair(patch_size)

    def grid_size(self, img_size, patch_size=None) -> tuple[int, int]:
        """Token grid (H/p, W/p) for an image size; ValueError if p does not divide it."""
        ph, pw = self.resolve_patch_size(patch_size)
        h, w = _pair(img_size)
        if h % ph or w % pw:
            raise ValueError(f"patch size {(ph, pw)} does not divide the image size {(h, w)}")
        return h // ph, w // pw

    # ---------------------------------------------------------------- forward
    def forward_embed(self, x: torch.Tensor, patch_size=None) -> torch.Tensor:
        """Images [B, C, H, W] → tokens [B, 1 + gh·gw, D] (class token first, positions added).

        Any image size whose sides the patch size divides is taken: the position grid is
        resized bilinearly to the image's token grid, as FlexiViT (and timm's
        ``dynamic_img_size``) do; at ``img_size`` it is used as it is. So a model built for
        8×8 images runs 16×16 ones on a 2× position grid (and every StitchedViT route too).
        """
        if x.dim() != 4 or static_shape(x)[1] != self.cfg.in_chans:
            raise ValueError(
                f"x must be images [B, {self.cfg.in_chans}, H, W], got {tuple(x.shape)}"
            )
        patch = self.resolve_patch_size(patch_size)
        grid = self.grid_size(image_size(x), patch)
        tokens = self.patch_embed(x, patch)
        prefix = 0 if self.no_embed_class else 1
        pos = resize_pos_embed(self.pos_embed, self.pos_grid, grid, prefix)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.no_embed_class:
            return torch.cat([cls, tokens + pos], dim=1)
        return torch.cat([cls, tokens], dim=1) + pos

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normed tokens [B, N, D] → logits [B, classes] (class-token pooling, as timm)."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward_features(self, x: torch.Tensor, out_indices=None, patch_size=None):
        """Normed tokens [B, N, D]; with ``out_indices`` (block ids, negative from the end)
        the list of those blocks' patch-token maps [B, D, H/p, W/p] for dense prediction."""
        grid = self.grid_size(image_size(x), patch_size)
        x = self.forward_embed(x, patch_size)
        if out_indices is None:
            return self.norm(self.blocks(x))
        depth = len(self.blocks)
        wanted = []
        for i in out_indices:
            if not -depth <= i < depth:
                raise ValueError(f"out_indices entry {i} is outside the {depth} blocks")
            wanted.append(i % depth)
        maps = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in wanted:
                maps[i] = patch_token_map(x, self.num_prefix_tokens, grid, clustered_grid(self))
            if i >= max(wanted):
                break
        return [maps[i] for i in wanted]

    def forward(self, x: torch.Tensor, patch_size=None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, patch_size=patch_size))


def _make(defaults: dict, kwargs: dict) -> VisionTransformer:
    return VisionTransformer(**{**defaults, **kwargs})


def deit_tiny_patch16_224(**kwargs) -> VisionTransformer:
    return _make(dict(embed_dim=192, depth=12, num_heads=3), kwargs)


def deit_small_patch16_224(**kwargs) -> VisionTransformer:
    return _make(dict(embed_dim=384, depth=12, num_heads=6), kwargs)


def deit_base_patch16_224(**kwargs) -> VisionTransformer:
    return _make(dict(embed_dim=768, depth=12, num_heads=12), kwargs)


_DEIT3 = dict(no_embed_class=True, init_values=1e-6)


def deit3_small_patch16_224(**kwargs) -> VisionTransformer:
    return _make(dict(embed_dim=384, depth=12, num_heads=6, **_DEIT3), kwargs)


def deit3_medium_patch16_224(**kwargs) -> VisionTransformer:
    return _make(dict(embed_dim=512, depth=12, num_heads=8, **_DEIT3), kwargs)


def deit3_base_patch16_224(**kwargs) -> VisionTransformer:
    return _make(dict(embed_dim=768, depth=12, num_heads=12, **_DEIT3), kwargs)


def deit3_large_patch16_224(**kwargs) -> VisionTransformer:
    return _make(dict(embed_dim=1024, depth=24, num_heads=16, **_DEIT3), kwargs)


def vit_small_test(**kwargs) -> VisionTransformer:
    """A tiny ViT for tests and the demo: 8×8 images, patch 2, 64 wide, 4 blocks."""
    defaults = dict(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2
    )
    return _make(defaults, kwargs)


MODELS = {
    fn.__name__: fn
    for fn in (
        deit_tiny_patch16_224,
        deit_small_patch16_224,
        deit_base_patch16_224,
        deit3_small_patch16_224,
        deit3_medium_patch16_224,
        deit3_base_patch16_224,
        deit3_large_patch16_224,
        vit_small_test,
    )
}


def create_model(name: str, **kwargs) -> VisionTransformer:
    """Build a model by its timm name (``deit_small_patch16_224``, ...)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
