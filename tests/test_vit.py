"""ViT: timm parameter names and shapes, float64 math, FLOPs, dense features, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stitchops.models import create_model, vit_flops, vit_small_test
from stitchops.models.vit import VisionTransformer


def timm_keys(depth, dim, hidden, classes, in_chans, patch, tokens, deit3):
    """Key → shape of timm's VisionTransformer state dict (read from timm 1.0's
    vision_transformer.py / layers: PatchEmbed.proj, Attention.qkv/proj, Mlp.fc1/fc2,
    LayerScale.gamma; fc_norm and head_drop hold no parameters)."""
    keys = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, tokens - (1 if deit3 else 0), dim),
        "patch_embed.proj.weight": (dim, in_chans, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "head.weight": (classes, dim),
        "head.bias": (classes,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.qkv.weight": (3 * dim, dim),
                b + "attn.qkv.bias": (3 * dim,),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.fc1.weight": (hidden, dim),
                b + "mlp.fc1.bias": (hidden,),
                b + "mlp.fc2.weight": (dim, hidden),
                b + "mlp.fc2.bias": (dim,),
            }
        )
        if deit3:
            keys[b + "ls1.gamma"] = (dim,)
            keys[b + "ls2.gamma"] = (dim,)
    return keys


@pytest.mark.parametrize(
    "name, depth, dim, deit3",
    [
        ("deit_tiny_patch16_224", 12, 192, False),
        ("deit_small_patch16_224", 12, 384, False),
        ("deit_base_patch16_224", 12, 768, False),
        ("deit3_small_patch16_224", 12, 384, True),
        ("deit3_medium_patch16_224", 12, 512, True),
        ("deit3_base_patch16_224", 12, 768, True),
        ("deit3_large_patch16_224", 24, 1024, True),
    ],
)
def test_timm_state_dict_names_and_shapes(name, depth, dim, deit3):
    with torch.device("meta"):
        model = create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == timm_keys(depth, dim, 4 * dim, 1000, 3, 16, 197, deit3)


@pytest.mark.parametrize("deit3", [False, True])
def test_timm_named_state_dict_round_trip(deit3):
    """A state dict built from timm's names loads strictly and drives the forward pass."""
    kwargs = dict(
        img_size=16,
        patch_size=4,
        in_chans=3,
        num_classes=7,
        embed_dim=32,
        depth=2,
        num_heads=2,
        no_embed_class=deit3,
        init_values=1e-1 if deit3 else None,
    )
    shapes = timm_keys(2, 32, 128, 7, 3, 4, 17, deit3)
    state = {k: torch.randn(s) * 0.1 for k, s in shapes.items()}
    model = VisionTransformer(**kwargs)
    model.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def naive_vit64(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The DeiT forward pass written out in float64 with an explicit softmax."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.cfg
    x = x.double()
    p = cfg.patch_size
    b, c, h, w = x.shape
    patches = (
        x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    )
    t = patches @ sd["patch_embed.proj.weight"].reshape(cfg.embed_dim, -1).T
    t = t + sd["patch_embed.proj.bias"]
    cls = sd["cls_token"].expand(b, -1, -1)
    if cfg.no_embed_class:
        t = torch.cat([cls, t + sd["pos_embed"]], 1)
    else:
        t = torch.cat([cls, t], 1) + sd["pos_embed"]

    def ln(v, pre):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6) * sd[pre + ".weight"] + sd[pre + ".bias"]

    heads, d = cfg.num_heads, cfg.embed_dim
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        y = ln(t, pre + "norm1") @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]
        q, k, v = y.reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1)
        y = (att @ v).transpose(1, 2).reshape(b, -1, d)
        y = y @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        t = t + y * sd.get(pre + "ls1.gamma", 1.0)
        y = ln(t, pre + "norm2") @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"]
        y = torch.nn.functional.gelu(y) @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
        t = t + y * sd.get(pre + "ls2.gamma", 1.0)
    return ln(t, "norm")[:, 0] @ sd["head.weight"].T + sd["head.bias"]


@pytest.mark.parametrize("deit3", [False, True])
def test_forward_matches_float64_math(deit3):
    model = vit_small_test(
        img_size=12,
        patch_size=3,
        in_chans=3,
        num_classes=5,
        embed_dim=24,
        depth=2,
        num_heads=3,
        no_embed_class=deit3,
        init_values=0.5 if deit3 else None,
    )
    x = torch.randn(3, 3, 12, 12)
    ref = naive_vit64(model, x)
    assert torch.allclose(model.double()(x.double()), ref, rtol=1e-10, atol=1e-10)
    err = (model.float()(x) - ref).abs().max() / ref.abs().max()
    assert err < 1e-5


def analytic_minus_layernorm(model, img=None, patch=None) -> int:
    cfg = model.cfg
    grid = (img or cfg.img_size) // (patch or cfg.patch_size)
    n = grid * grid + 1
    return vit_flops(cfg, img, patch) - 5 * n * cfg.embed_dim * (2 * cfg.depth + 1)


@pytest.mark.parametrize("img, patch", [(None, None), (24, 4), (24, 8)])
def test_flops_match_torch_flop_counter(img, patch):
    """FlopCounterMode counts 2 FLOPs per multiply-add of convs, matmuls and attention; fvcore
    counts 1, plus 5·numel per LayerNorm. The analytic count at (img, patch) of a patch-4
    model must equal the counted FLOPs of a native model at that patch size (the counter
    would also count the one-off PI-resize of the kernel, which is weight preparation)."""
    dims = dict(img_size=16, in_chans=3, embed_dim=32, depth=3, num_heads=2)
    model = vit_small_test(patch_size=4, **dims)
    native = vit_small_test(patch_size=patch or 4, **{**dims, "img_size": img or 16})
    x = torch.randn(1, 3, img or 16, img or 16)
    # The math backend decomposes attention into matmuls the counter sees (CPU's fused
    # kernel is not registered with FlopCounterMode).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        native(x)
    assert counter.get_total_flops() // 2 == analytic_minus_layernorm(model, img, patch)


@pytest.mark.parametrize(
    "name, gflops",
    [
        ("deit_tiny_patch16_224", 1.26),
        ("deit_small_patch16_224", 4.61),
        ("deit_base_patch16_224", 17.58),
        ("deit3_large_patch16_224", 61.6),
    ],
)
def test_anchor_flops_as_published(name, gflops):
    with torch.device("meta"):
        model = create_model(name)
    digits = 1 if gflops > 50 else 2
    assert round(vit_flops(model.cfg) / 1e9, digits) == gflops


def test_forward_features_dense_maps():
    model = vit_small_test(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=4)
    x = torch.randn(2, 3, 16, 16)
    maps = model.forward_features(x, out_indices=(1, -1))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4), (2, 32, 4, 4)]
    tokens = model.blocks(model.forward_embed(x))
    assert torch.allclose(maps[1], tokens[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4))
    maps = model.forward_features(torch.randn(1, 3, 16, 24), out_indices=[0], patch_size=2)
    assert maps[0].shape == (1, 32, 8, 12)
    with pytest.raises(ValueError, match="out_indices"):
        model.forward_features(x, out_indices=[4])


def test_bad_inputs():
    model = vit_small_test()
    with pytest.raises(ValueError, match=r"x must be images \[B, 1, H, W\]"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="does not divide"):
        model(torch.randn(2, 1, 8, 8), patch_size=3)
    with pytest.raises(ValueError, match="not a multiple"):
        vit_small_test(img_size=9)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")
    with pytest.raises(ValueError, match="divisible"):
        vit_small_test(embed_dim=30, num_heads=4)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit3_small_patch16_224"])
def test_matches_timm_itself(name):
    """Where timm imports (the GPU machines), its own model's weights load into ours strictly
    and give the same logits."""
    timm = pytest.importorskip("timm", reason="timm does not import here (CPU torchvision)")
    theirs = timm.create_model(name, pretrained=False, img_size=64).eval().double()
    ours = create_model(name, img_size=64).eval().double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), rtol=1e-9, atol=1e-9)


def _assert_traces(model: torch.nn.Module, x: torch.Tensor) -> None:
    """torch.jit.trace (as fvcore's FLOP counter runs it) works without a tracer warning, passes
    its own re-run check, and the trace reproduces the eager output."""
    import warnings

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


@pytest.mark.slow
def test_deit_small_traces():
    torch.manual_seed(0)
    _assert_traces(create_model("deit_small_patch16_224"), torch.randn(1, 3, 224, 224))


def test_flexi_vit_traces_at_its_patch_size():
    model = vit_small_test(img_size=24, patch_size=6, in_chans=3, embed_dim=16, depth=2, flexi=True)
    _assert_traces(model, torch.randn(2, 3, 24, 24))
