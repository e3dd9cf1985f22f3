"""stitchops.models.expedite: expedited ViTs without fine-tuning (Expedit Sec. 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from official_expedit import official_cluster, official_topk

from stitchops.models import (
    Segmenter,
    StitchedViT,
    expedite,
    expedited,
    expedition,
    unexpedite,
    vit_small_test,
)
from stitchops.models.token_grid import clustered_grid
from stitchops.train.data import load_digits


def vit(**kw):
    torch.manual_seed(0)
    return vit_small_test(patch_size=1, depth=4, **kw).eval()


IMAGES = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# The identity checks below (the full grid at a tiny τ) use the exact numerics: with τ = 1e-6
# a token's float32 distance to its own centre, rounding of order 1e-5, already puts the
# official weights under their 1e-12 norm floor (test_token_cluster shows that floor).


@pytest.mark.parametrize("alpha, beta", [(0, None), (1, 2), (3, 1)])
def test_full_grid_and_tiny_temperature_reproduce_the_plain_model(alpha, beta):
    model = vit()
    plain = model(IMAGES)
    with expedited(model, alpha, (8, 8), beta=beta, temperature=1e-6, numerics="exact"):
        assert torch.allclose(model(IMAGES), plain, atol=1e-5)


def test_flexivit_patch_sizes_and_segmenter_reproduce_too():
    torch.manual_seed(0)
    flexi = vit_small_test(flexi=True, flexi_kernel=4, flexi_grid=4, depth=3).eval()
    for patch in (1, 2):
        grid = (8 // patch, 8 // patch)
        plain = flexi(IMAGES, patch_size=patch)
        with expedited(flexi, 1, grid, temperature=1e-6, numerics="exact"):
            assert torch.allclose(flexi(IMAGES, patch_size=patch), plain, atol=1e-5)
    segmenter = Segmenter(vit(), num_classes=4).eval()
    plain = segmenter(IMAGES)
    with expedited(segmenter, 2, (8, 8), temperature=1e-6, numerics="exact"):
        assert torch.allclose(segmenter(IMAGES), plain, atol=1e-5)
    with expedited(segmenter, 2, (4, 4)):
        assert segmenter(IMAGES).shape == plain.shape


def test_beta_blocks_run_on_the_clustered_tokens_and_unexpedite_restores():
    model = vit()
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    plain = model(IMAGES)
    seen = []
    expedite(model, 1, (3, 5), beta=2)
    hooks = [
        b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.blocks
    ]  # after expedite's: they see what the blocks get
    assert expedition(model).grid == (3, 5)
    model(IMAGES)
    assert seen == [1 + 64, 1 + 15, 1 + 15, 1 + 64]  # class token + patch tokens
    unexpedite(model)
    for h in hooks:
        h.remove()
    assert torch.equal(model(IMAGES), plain) and expedition(model) is None
    assert list(model.state_dict()) == keys
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params  # nothing copied


def test_expediting_cuts_flops_at_the_local_clustering_cost():
    from torch.utils.flop_counter import FlopCounterMode

    model = vit(embed_dim=64)

    def flops():
        with FlopCounterMode(display=False) as counter:
            model(IMAGES)
        return counter.get_total_flops()

    plain = flops()
    with expedited(model, 1, (4, 4), window=3, iters=2):
        fewer = flops()
    # blocks 1-3 run 17 tokens instead of 65; the clustering adds 2·5·64·9·64 per image
    assert fewer < 0.5 * plain
    assert fewer > 3 * 2 * 5 * 64 * 9 * 64


@pytest.fixture(scope="module")
def trained():
    """A ViT trained a little on the digits (patch 1: an 8×8 token map)."""
    torch.manual_seed(0)
    model = vit_small_test(patch_size=1, depth=4, embed_dim=32)
    data = load_digits("train")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(3):
        for i in range(0, len(data), 64):
            x, y = data.images[i : i + 64], data.labels[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval(), load_digits("val").images[:128]


@pytest.mark.parametrize("alpha", [1, 2])
def test_reconstructed_features_beat_pooling_and_bilinear_upsampling(trained, alpha):
    """The paper's Table 1 against its Tables 4-5 baseline, on a trained model: the cosine
    similarity of the final features to the plain model's. τ = 1 suits this model's tokens
    (‖x‖² ≈ 19); the paper's τ = 50 suits ViT-L's, and here would blur every window into one
    average (0.85, below pooling's 0.94)."""
    model, images = trained
    with torch.no_grad():
        plain = model.forward_features(images)[:, 1:]

        def similarity(method):
            with expedited(model, alpha, (4, 4), beta=4 - alpha, method=method, temperature=1.0):
                return (
                    F.cosine_similarity(model.forward_features(images)[:, 1:], plain, dim=-1)
                    .mean()
                    .item()
                )

        ours, pooled = similarity("cluster"), similarity("pool")
    assert ours > pooled, (ours, pooled)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(alpha=4, grid=(4, 4)), ValueError, r"alpha must be an int in \[0, 3\]"),
        (dict(alpha=-1, grid=(4, 4)), ValueError, "alpha must be"),
        (dict(alpha=2, grid=(4, 4), beta=3), ValueError, r"beta must be an int in \[1, 2\]"),
        (dict(alpha=2, grid=(4, 4), beta=0), ValueError, "beta must be"),
        (dict(alpha=1, grid=(4, 4), method="conv"), ValueError, "method must be one of"),
        (dict(alpha=1, grid=4), TypeError, "grid must be a pair"),
        (dict(alpha=1, grid=(4, 4), where="neck"), ValueError, "where must be one of"),
        (dict(alpha=1, grid=(4, 4), where="head"), TypeError, "needs a segmentation model"),
        (dict(alpha=1, grid=(4, 4), reconstruct="soft"), ValueError, "reconstruct must be one"),
        (dict(alpha=1, grid=(4, 4), numerics="loose"), ValueError, "numerics must be one of"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, error, message):
    model = vit()
    with pytest.raises(error, match=message):
        expedite(model, **kwargs)
    assert expedition(model) is None


def stitched(dense=False):
    torch.manual_seed(0)
    small = vit_small_test(patch_size=1, embed_dim=16, depth=3, num_heads=2)
    large = vit_small_test(patch_size=1, embed_dim=24, depth=6, num_heads=2)
    return StitchedViT([small, large], dense=dense).eval()


def _crossing_stitch(model):
    """A stitch whose route runs on both anchors (the stitching layer inside the β blocks
    of the tests below)."""
    return next(s for s in model.stitches if len(s.route) == 2 and s.route[0].stop >= 2)


def test_stitched_route_reproduces_and_clusters_across_the_stitching_layer():
    model = stitched()
    stitch = _crossing_stitch(model)
    model.select(stitch.id)
    depth = sum(seg.stop - seg.start for seg in stitch.route)
    plain = model(IMAGES)
    with expedited(model, 1, (8, 8), temperature=1e-6, numerics="exact"):
        assert torch.allclose(model(IMAGES), plain, atol=1e-5)
    seen = []
    layer = model.stitch_layers[stitch.points[0].key][stitch.points[0].index]
    hook = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with expedited(model, 1, (3, 3), beta=depth - 2):
        assert model(IMAGES).shape == plain.shape
    hook.remove()
    assert seen == [1 + 9]  # the stitching layer ran on the class token and 3×3 centres
    expedite(model, 1, (3, 3))
    model.select(next(s.id for s in model.stitches if s.id != stitch.id))
    with pytest.raises(RuntimeError, match="expedited on another stitch"):
        model(IMAGES)
    unexpedite(model)


@pytest.mark.parametrize("backbone", ["vit", "stitched"])
def test_where_head_reconstructs_the_heads_logits(backbone):
    """γ = 0 as the official Segmenter code: the head reads the clustered h×w map and its
    logits are spread back to H×W; the full grid with a tiny τ is the plain model."""
    if backbone == "vit":
        trunk = vit()
    else:
        trunk = stitched(dense=True)
        trunk.select(_crossing_stitch(trunk).id)
    segmenter = Segmenter(trunk, num_classes=4, decoder="mask").eval()
    plain = segmenter(IMAGES)
    with expedited(segmenter, 2, (8, 8), temperature=1e-6, numerics="exact", where="head"):
        assert torch.allclose(segmenter(IMAGES), plain, atol=1e-5)
    maps = []
    hook = segmenter.decoder.register_forward_pre_hook(lambda m, a: maps.append(a[0][-1].shape))
    with expedited(segmenter, 2, (3, 5), where="head"):
        assert segmenter(IMAGES).shape == plain.shape
    hook.remove()
    assert maps[0][-2:] == (3, 5)
    assert clustered_grid(trunk) is None  # unexpedite cleared it
    with pytest.raises(ValueError, match="beta must run to the end"):
        expedite(segmenter, 1, (3, 3), beta=1, where="head")


def test_a_grid_larger_than_the_token_map_is_refused_at_the_forward():
    model = vit()
    with expedited(model, 1, (9, 4)), pytest.raises(ValueError, match="larger than the map"):
        model(IMAGES)


def test_not_a_vit():
    with pytest.raises(TypeError, match="has no blocks, patch_embed"):
        expedite(torch.nn.Linear(3, 3), 0, (2, 2))


def test_timm_vision_transformer():
    timm = pytest.importorskip("timm", reason="timm does not import here (CPU torchvision)")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    plain = model(images)
    with expedited(model, 4, (4, 4), temperature=1e-6, numerics="exact"):
        assert torch.allclose(model(images), plain, atol=1e-4)
    with expedited(model, 4, (2, 2)):
        assert model(images).shape == plain.shape


def test_expedit_demo_end_to_end(tmp_path):
    from stitchops.demos.expedit import VARIANTS, run

    summary = run(out=tmp_path, anchor_epochs=1, progress=False, settings=((2, (8, 8)),))
    rows = summary["rows"]
    assert {r["variant"] for r in rows} == set(VARIANTS)
    assert {r["tau_rule"] for r in rows} == {"paper", "scaled"}
    for r in rows:
        assert r["gflops"] < summary["plain"]["gflops"] and 0 <= r["miou"] <= 1
        assert 0 <= r["agreement"] <= 1 and r["temperature"] > 0
    assert (tmp_path / "expedit.png").read_bytes().startswith(b"\x89PNG")


def official_insertion(segmenter, images, alpha, grid):
    """Expedit-Segmenter's order (``HourglassVisionTransformer`` and
    ``EncoderDecoder.encode_decode``) on our Segmenter, from the float64 formulations of the
    official clustering and reconstruction: blocks 0..α−1, the official clustering of the
    patch tokens, blocks α.. on the class token and the centres, the head on the h×w map, the
    official top-k reconstruction (k 20) of its logits from the tokens before clustering and
    the centres, bilinear upsampling to the image."""
    vit = segmenter.backbone
    tokens = vit.forward_embed(images)
    for block in vit.blocks[:alpha]:
        tokens = block(tokens)
    b, _, c = tokens.shape
    x = tokens[:, 1:].reshape(b, images.shape[-2] // 2, images.shape[-1] // 2, c)
    centres = official_cluster(x, grid, 5, 5, 50.0)
    tokens = torch.cat([tokens[:, :1], centres.reshape(b, -1, c)], dim=1)
    for block in vit.blocks[alpha:]:
        tokens = block(tokens)
    logits = segmenter.decoder([tokens[:, 1:].transpose(1, 2).reshape(b, c, *grid)])
    y = official_topk(x, centres, logits.permute(0, 2, 3, 1), 20, 50.0)
    return F.interpolate(
        y.permute(0, 3, 1, 2), size=images.shape[-2:], mode="bilinear", align_corners=False
    )


def large_token_segmenter():
    """A float64 Segmenter (mask transformer) whose patch tokens have squared norms of a few
    thousand, as ViT-L's: patch 2 on 32×32 images (a 16×16 token map)."""
    torch.manual_seed(0)
    trunk = vit_small_test(
        patch_size=2, img_size=32, in_chans=3, embed_dim=32, depth=4, num_heads=2
    ).double()
    with torch.no_grad():
        trunk.patch_embed.proj.weight.mul_(60.0)
    return Segmenter(trunk, num_classes=5, decoder="mask").double().eval()


def test_defaults_are_the_official_segmenter_insertion():
    """``expedite(segmenter, alpha, grid)`` with every other argument at its default equals
    the official code's insertion to float64 rounding, at token scales where the official
    clamp and floor act (the exact numerics and the local reconstruction then differ)."""
    segmenter = large_token_segmenter()
    images = torch.randn(
        2, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    with torch.no_grad():
        tokens = segmenter.backbone.blocks[0](segmenter.backbone.forward_embed(images))
        assert tokens[:, 1:].square().sum(-1).median() > 2e3
        want = official_insertion(segmenter, images, 1, (10, 10))
        with expedited(segmenter, 1, (10, 10)):
            assert expedition(segmenter).where == "head"
            got = segmenter(images)
        with expedited(segmenter, 1, (10, 10), numerics="exact"):
            exact = segmenter(images)
        with expedited(segmenter, 1, (10, 10), reconstruct="local", numerics="exact"):
            local = segmenter(images)
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < 1e-10
    assert (exact - want).abs().max() / scale > 1e-3
    assert (local - want).abs().max() / scale > 1e-3


def test_training_gradients_reach_the_tokens_through_the_reconstruction_weights():
    """As the official code: the reconstruction weights are differentiable in the tokens
    and the centres (the patch embedding's gradient changes when they are made constants)."""
    segmenter = large_token_segmenter()
    images = torch.randn(
        1, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )

    def embed_grad(**options):
        segmenter.zero_grad()
        with expedited(segmenter, 1, (10, 10), temperature=5e3, **options):
            segmenter(images).square().sum().backward()
        return segmenter.backbone.patch_embed.proj.weight.grad.clone()

    through = embed_grad()
    detached = embed_grad(weight_grad=False)
    assert (through - detached).abs().max() > 1e-6 * through.abs().max()
