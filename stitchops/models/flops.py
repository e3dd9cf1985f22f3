"""FLOPs of ViTs and stitches, counted like fvcore, and the parameters a stitch deploys.

fvcore counts one FLOP per multiply-add of a linear, matmul or conv, and 5·numel for an
affine LayerNorm; additions of biases and residuals, softmax, GELU and LayerScale count
nothing. For a ViT with N = prefix + gh·gw tokens of width D and MLP width H:

    patch embedding   gh·gw · D · C · p_h·p_w
    block             2 · 5ND (LayerNorms) + 3ND² (qkv) + 2N²D (q·kᵀ, attn·v) + ND² (proj)
                      + 2NDH (fc1, fc2)
    tail              5ND (final norm) + D · classes (head on the class token)
    stitching layer   N · D_in · D_out (deployed: a LoRA update is merged into W)

which gives DeiT-Ti / S / B at 224² 1.26 / 4.61 / 17.58 GFLOPs and DeiT3-L 61.6 GFLOPs.

A stitch's route (segments of anchors' blocks joined by stitching layers) costs its first
anchor's embedding, its segments' blocks, its stitching layers and its last anchor's tail;
its parameters are those modules' as deployed (LoRA merged, per-stitch bias tables folded).
"""

from __future__ import annotations

from torch import nn

from stitchops.models.flexi import _pair

# Parameter names that a deployed stitch does not carry: LoRA factors (merged into W) and
# per-stitch bias tables (the active row folded into the bias).
NOT_DEPLOYED = ("lora_A", "lora_B", "stitch_bias")


def num_tokens(cfg, img_size=None, patch_size=None) -> tuple[int, int]:
    """(patch tokens, all tokens) at an image and patch size (defaults: the model's)."""
    h, w = _pair(cfg.img_size if img_size is None else img_size)
    ph, pw = _pair(cfg.patch_size if patch_size is None else patch_size)
    if h % ph or w % pw:
        raise ValueError(f"patch size {(ph, pw)} does not divide the image size {(h, w)}")
    patches = (h // ph) * (w // pw)
    return patches, patches + 1


def embed_flops(cfg, img_size=None, patch_size=None) -> int:
    patches, _ = num_tokens(cfg, img_size, patch_size)
    ph, pw = _pair(cfg.patch_size if patch_size is None else patch_size)
    return patches * cfg.embed_dim * cfg.in_chans * ph * pw


def block_flops(cfg, img_size=None, patch_size=None) -> int:
    _, n = num_tokens(cfg, img_size, patch_size)
    d, hidden = cfg.embed_dim, cfg.mlp_hidden
    return 2 * 5 * n * d + 4 * n * d * d + 2 * n * n * d + 2 * n * d * hidden


def tail_flops(cfg, img_size=None, patch_size=None) -> int:
    _, n = num_tokens(cfg, img_size, patch_size)
    return 5 * n * cfg.embed_dim + cfg.embed_dim * cfg.num_classes


def stitch_layer_flops(in_dim: int, out_dim: int, cfg, img_size=None, patch_size=None) -> int:
    _, n = num_tokens(cfg, img_size, patch_size)
    return n * in_dim * out_dim


def vit_flops(cfg, img_size=None, patch_size=None) -> int:
    """fvcore-style FLOPs of one image through a ``ViTConfig``."""
    args = (cfg, img_size, patch_size)
    return embed_flops(*args) + cfg.depth * block_flops(*args) + tail_flops(*args)


def block_flops_of(block: nn.Module, cfg, img_size=None, patch_size=None) -> int:
    """One block's FLOPs: its own count where it has one (``block.flops(cfg, img_size,
    patch_size)``, e.g. a block pruned by SPViT), else a ViT block's."""
    own = getattr(block, "flops", None)
    return (
        own(cfg, img_size, patch_size) if callable(own) else block_flops(cfg, img_size, patch_size)
    )


def model_flops(model: nn.Module, img_size=None, patch_size=None) -> int:
    """FLOPs of one image through a ViT, block by block (``vit_flops`` for an unpruned one)."""
    cfg = model.cfg
    blocks = sum(block_flops_of(b, cfg, img_size, patch_size) for b in model.blocks)
    return embed_flops(cfg, img_size, patch_size) + blocks + tail_flops(cfg, img_size, patch_size)


def route_flops(anchors, raw, img_size=None, patch_size=None) -> int:
    """FLOPs of one image through a stitch (``raw``, a space.RawStitch) of ``anchors``,
    block by block (pruned anchors included)."""
    cfgs = [a.cfg for a in anchors]
    route = raw.route([len(a.blocks) for a in anchors])
    args = (img_size, patch_size)
    total = embed_flops(cfgs[route[0].anchor], *args)
    for seg in route:
        blocks = anchors[seg.anchor].blocks[seg.start : seg.stop]
        total += sum(block_flops_of(b, cfgs[seg.anchor], *args) for b in blocks)
    for src, dst in zip(raw.anchors, raw.anchors[1:], strict=False):
        total += stitch_layer_flops(cfgs[src].embed_dim, cfgs[dst].embed_dim, cfgs[src], *args)
    return total + tail_flops(cfgs[route[-1].anchor], *args)


def deployed_numel(module: nn.Module) -> int:
    """Parameters of a module once deployed: LoRA merged, per-stitch bias tables folded."""
    return sum(
        p.numel()
        for name, p in module.named_parameters()
        if name.rsplit(".", 1)[-1] not in NOT_DEPLOYED
    )


def route_params(anchors, stitch_layers, route, points) -> int:
    """Deployed parameters of a stitch: its first anchor's embedding, its segments' blocks,
    its stitching layers (``stitch_layers[key][index]`` of each point), its last anchor's
    norm and head."""
    first, last = anchors[route[0].anchor], anchors[route[-1].anchor]
    total = deployed_numel(first.patch_embed) + first.cls_token.numel()
    total += first.pos_embed.numel() + deployed_numel(last.norm) + deployed_numel(last.head)
    for seg in route:
        total += sum(deployed_numel(b) for b in anchors[seg.anchor].blocks[seg.start : seg.stop])
    return total + sum(deployed_numel(stitch_layers[p.key][p.index]) for p in points)
