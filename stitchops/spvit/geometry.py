"""The sizes SPViT's FLOPs count, read off a ViT (ours, or timm's attribute names), and the
FLOPs of one block for a choice of op, in the convention of ``stitchops.models.flops``
(fvcore: a multiply-add is one FLOP, a LayerNorm 5 per element, biases, softmax, GELU,
ReLU and BatchNorm nothing; BatchNorm folds into the convolution when deployed):

    norm1          5·N·D        (not when the attention is skipped)
    MSA            4·N·D² + 2·N²·D
    k×k conv       P·(k²·D·d_h + d_h·D)     P = gh·gw patch tokens (the prefix bypasses it)
    norm2 + MLP    5·N·D + 2·N·D·kept       (nothing when no hidden unit is kept)

so that an unpruned model's count is ``models.flops.vit_flops``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from stitchops.models import flops as vit_flops_module


@dataclass(frozen=True)
class Geometry:
    """One ViT's sizes at its own image size: tokens N (= prefix + P), patches P, width D,
    heads, MLP width, and the embedding's and the tail's FLOPs."""

    tokens: int
    patches: int
    dim: int
    heads: int
    hidden: int
    prefix: int
    embed_flops: int
    tail_flops: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def of_config(cfg, img_size=None, patch_size=None) -> Geometry:
    """The sizes of a ``ViTConfig``'s model at an image and patch size (default: its own)."""
    args = (cfg, img_size, patch_size)
    patches, tokens = vit_flops_module.num_tokens(*args)
    return Geometry(
        tokens,
        patches,
        cfg.embed_dim,
        cfg.num_heads,
        cfg.mlp_hidden,
        tokens - patches,
        vit_flops_module.embed_flops(*args),
        vit_flops_module.tail_flops(*args),
    )


def geometry(model: nn.Module) -> Geometry:
    """The sizes of ``model`` (a VisionTransformer of this package; timm's ViT by its
    attribute names)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return of_config(cfg)
    embed = model.patch_embed
    gh, gw = embed.grid_size
    patches, prefix, dim = gh * gw, getattr(model, "num_prefix_tokens", 1), model.embed_dim
    block = model.blocks[0]
    ph, pw = embed.patch_size
    classes = getattr(model, "num_classes", 0)
    return Geometry(
        patches + prefix,
        patches,
        dim,
        block.attn.num_heads,
        block.mlp.fc1.out_features,
        prefix,
        patches * dim * embed.proj.in_channels * ph * pw,
        5 * (patches + prefix) * dim + dim * classes,
    )


def attention_flops(g: Geometry, op: str) -> int:
    """FLOPs of the attention layer's op ("skip", "conv{k}x{k}" or "msa"), norm1 included."""
    if op == "skip":
        return 0
    norm = 5 * g.tokens * g.dim
    if op == "msa":
        return norm + 4 * g.tokens * g.dim**2 + 2 * g.tokens**2 * g.dim
    k = int(op.removeprefix("conv").split("x")[0])
    return norm + g.patches * (k * k * g.dim * g.head_dim + g.head_dim * g.dim)


def mlp_flops(g: Geometry, kept: float) -> float:
    """FLOPs of norm2 and the MLP with ``kept`` hidden units (none: nothing)."""
    return 0 if kept == 0 else 5 * g.tokens * g.dim + 2 * g.tokens * g.dim * kept


def dense_flops(g: Geometry, depth: int) -> int:
    """The unpruned model's FLOPs (``models.flops.vit_flops`` for ours)."""
    block = attention_flops(g, "msa") + mlp_flops(g, g.hidden)
    return g.embed_flops + depth * block + g.tail_flops
