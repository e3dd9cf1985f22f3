"""Stitching spaces, FLOPs of stitches, StitchedViT forward/backward, LS init, selection."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stitchops.models import (
    StitchedViT,
    deit3_large_patch16_224,
    deit3_small_patch16_224,
    deit_base_patch16_224,
    deit_small_patch16_224,
    deit_tiny_patch16_224,
    vit_small_test,
)
from stitchops.models.space import paired_points
from stitchops.nn import StitchingLayer


def small_pair(**kwargs):
    a = vit_small_test(embed_dim=16, depth=3, num_heads=2)
    b = vit_small_test(embed_dim=24, depth=6, num_heads=2)
    return StitchedViT([a, b], **kwargs)


def test_snnet_space_deit_tiny_small_base_has_71_stitches():
    with torch.device("meta"):
        model = StitchedViT(
            [deit_tiny_patch16_224(), deit_small_patch16_224(), deit_base_patch16_224()]
        )
    assert len(model.stitches) == 71
    assert Counter(s.kind for s in model.stitches) == {"anchor": 3, "stitch": 68}
    assert {k: len(v) for k, v in model.stitch_layers.items()} == {"0to1": 11, "1to2": 11}
    assert [round(s.flops / 1e9, 2) for s in model.stitches[:3]] == [1.26, 4.61, 17.58]
    assert len(paired_points(12, 2, 1)) == 34
    # every stitch of Ti→S lies between the two anchors' FLOPs, none uses anchors 0 and 2
    assert all(set(s.anchors) != {0, 2} for s in model.stitches)


def test_two_way_space_deit3_small_large_has_134_stitches():
    with torch.device("meta"):
        model = StitchedViT(
            [deit3_small_patch16_224(), deit3_large_patch16_224()], two_way=True, rank=16
        )
    assert len(model.stitches) == 134
    kinds = Counter(s.kind for s in model.stitches)
    assert kinds == {"anchor": 2, "FS": 11, "SF": 11, "FSF": 55, "SFS": 55}
    assert round(model.stitches[1].flops / 1e9, 1) == 61.6
    fs = [s for s in model.stitches if s.kind == "FS"]
    # FS (i, 2(i+1)): small blocks 0..i then large blocks from 2(i+1); not after the last block
    assert [(s.route[0].stop, s.route[1].start) for s in fs] == [
        (i + 1, 2 * i + 2) for i in range(11)
    ]


def test_every_stitch_flops_match_torch_flop_counter():
    model = small_pair(two_way=True, rank=2).eval().merge()
    x = torch.randn(1, 1, 8, 8)
    for stitch in model.stitches:
        model.select(stitch.id)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
        n, layernorms = 17, 0
        for seg in stitch.route:
            d = model.anchors[seg.anchor].embed_dim
            layernorms += 5 * n * d * 2 * (seg.stop - seg.start)
        layernorms += 5 * n * model.anchors[stitch.route[-1].anchor].embed_dim
        assert counter.get_total_flops() // 2 == stitch.flops - layernorms, stitch


def test_every_stitch_runs_forward_and_backward_through_its_route_only():
    model = small_pair(two_way=True, rank=2, stitch_biases=True)
    # depths 3 and 6: 2 anchors + FS 2 + SF 2 + FSF 1 + SFS 1
    assert Counter(s.kind for s in model.stitches) == {
        "anchor": 2,
        "FS": 2,
        "SF": 2,
        "FSF": 1,
        "SFS": 1,
    }
    x = torch.randn(3, 1, 8, 8)
    for stitch in model.stitches:
        model.zero_grad(set_to_none=True)
        model.select(stitch.id)
        out = model(x)
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        out.square().mean().backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        expected = {
            n for n in model.route_parameters(stitch.id) if model.get_parameter(n).requires_grad
        }
        assert got == expected, stitch.describe()
        assert all(torch.isfinite(model.get_parameter(n).grad).all() for n in got)
        for name in stitch.layers:
            layer = model.get_submodule(name)
            assert layer.stitch_bias.grad[stitch.id].abs().sum() > 0
            other = torch.cat(
                [layer.stitch_bias.grad[: stitch.id], layer.stitch_bias.grad[stitch.id + 1 :]]
            )
            assert other.abs().sum() == 0


def test_least_squares_init_reproduces_end_anchor_better_than_random():
    model = small_pair()
    images = torch.randn(64, 1, 8, 8)
    acts = [StitchedViT._block_inputs(a, images, None) for a in model.anchors]
    points = model.layer_positions()  # every (front, end) point each layer serves

    def errors():
        out = {}
        with torch.no_grad():
            for (key, index), group in points.items():
                layer = model.stitch_layers[key][index]
                num = sum(((layer(acts[s][f + 1]) - acts[d][e]) ** 2).sum() for s, d, f, e in group)
                den = sum((acts[d][e] ** 2).sum() for s, d, f, e in group)
                out[(key, index)] = float(num / den)
        return out

    before = errors()
    model.init_stitching_layers(images.split(16))
    after = errors()
    for key in points:
        assert after[key] < 0.5 * before[key], (key, before[key], after[key])


def test_select_and_select_by_flops():
    model = small_pair(two_way=True)
    flops = sorted(s.flops for s in model.stitches)
    chosen = model.select_by_flops(flops[2])
    assert chosen.flops == flops[2] and model.active == chosen.id
    acc = {s.id: 0.5 for s in model.stitches}
    acc[0] = 0.9
    assert model.select_by_flops(flops[-1], accuracy=acc).id == 0
    with pytest.raises(ValueError, match="no stitch fits a budget"):
        model.select_by_flops(flops[0] - 1)
    with pytest.raises(ValueError, match="unknown stitch id 999"):
        model.select(999)
    with pytest.raises(TypeError, match="stitch_id must be an int"):
        model.select("3")


def test_anchor_route_equals_plain_anchor_and_state_dict_round_trip():
    model = small_pair(two_way=True, rank=2, stitch_biases=True).eval()
    x = torch.randn(2, 1, 8, 8)
    for i, anchor in enumerate(model.anchors):
        model.select(i)
        assert torch.equal(model(x), anchor(x))
    model.select(len(model.stitches) - 1)
    for layer in model.modules():
        if isinstance(layer, StitchingLayer):
            torch.nn.init.normal_(layer.lora_B)
    ref = model(x)
    clone = small_pair(two_way=True, rank=2, stitch_biases=True).eval()
    clone.load_state_dict(model.state_dict())
    clone.select(len(model.stitches) - 1)
    assert torch.equal(clone(x), ref)
    model.merge()
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_pst_trains_only_lora_stitch_biases_and_heads():
    model = small_pair(rank=2, stitch_biases=True).enable_pst(rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    allowed = ("lora_A", "lora_B", "stitch_bias", "head.weight", "head.bias")
    assert trainable and all(n.endswith(allowed) for n in trainable)
    names = dict(model.named_parameters())
    assert "anchors.0.blocks.0.attn.qkv.weight" in names  # timm names kept
    assert "anchors.0.blocks.0.attn.qkv.lora_A" in names
    x = torch.randn(2, 1, 8, 8)
    model.select(3)
    qkv = model.anchors[0].blocks[0].attn.qkv
    assert qkv.active_stitch == 3
    before = model(x)
    with torch.no_grad():
        qkv.stitch_bias[3].fill_(0.5)
    assert not torch.allclose(model(x), before)
    with pytest.raises(ValueError, match="rank > 0"):
        small_pair().enable_pst(rank=4)


def test_bad_anchors_raise_clear_errors():
    a = vit_small_test(embed_dim=16, depth=2)
    with pytest.raises(ValueError, match="share patch_size"):
        StitchedViT([a, vit_small_test(patch_size=4, embed_dim=32)])
    with pytest.raises(ValueError, match="share img_size"):
        StitchedViT([a, vit_small_test(img_size=16, embed_dim=32)])
    with pytest.raises(ValueError, match="Fast-to-Slow"):
        StitchedViT([vit_small_test(embed_dim=32), a])
    with pytest.raises(ValueError, match="at least 2 anchors"):
        StitchedViT([a])
    with pytest.raises(TypeError, match="VisionTransformer"):
        StitchedViT([a, torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="no deeper"):
        StitchedViT(
            [vit_small_test(embed_dim=16, depth=4), vit_small_test(embed_dim=32, depth=2)],
            two_way=True,
        )


@pytest.mark.parametrize("rank", [0, 4])
def test_every_stitched_route_traces(rank):
    """torch.jit.trace of each route reproduces it (fvcore's FlopCountAnalysis traces)."""
    import warnings

    small = vit_small_test(embed_dim=16, depth=2, num_heads=2)
    large = vit_small_test(embed_dim=32, depth=4, num_heads=2)
    model = StitchedViT([small, large], rank=rank, two_way=True).eval()
    x = torch.randn(2, 1, 8, 8)
    for stitch in model.stitches:
        model.select(stitch.id)
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, x)
        with torch.no_grad():
            assert torch.equal(traced(x), model(x)), stitch.id


def test_partial_last_windows_as_the_official_code():
    """k 3, s 2 over 12 blocks: full windows give 41 points (block 11 never stitched), the
    official code's partial window [10, 11] adds (10, 11), (11, 10), (11, 11) and a layer."""
    full = paired_points(12, 3, 2)
    partial = paired_points(12, 3, 2, partial_windows=True)
    assert len(full) == 41 and len(partial) == 44
    assert partial[:41] == full
    assert [p[:2] for p in partial[41:]] == [(10, 11), (11, 10), (11, 11)]
    assert {p[2] for p in partial[41:]} == {max(p[2] for p in full) + 1}
    assert not any(11 in p[:2] for p in full) and any(p[0] == 11 for p in partial)
    # k 2, s 1: the last partial window holds no new pair, both readings agree
    assert paired_points(12, 2, 1) == paired_points(12, 2, 1, partial_windows=True)
    small = vit_small_test(embed_dim=16, depth=12, num_heads=2)
    large = vit_small_test(embed_dim=32, depth=12, num_heads=2)
    for flag, count in ((False, 41), (True, 44)):
        model = StitchedViT([small, large], kernel_size=3, stride=2, partial_windows=flag)
        assert len(model.stitches) == 2 + count
        assert model.options["partial_windows"] is flag


def test_other_image_sizes_resize_the_position_grid():
    """Built for 8×8, given 16×16: every route runs on a bilinearly resized position grid (the
    documented choice, as FlexiViT), the same as an anchor whose grid was resized by hand."""
    from stitchops.models import resize_pos_embed

    small = vit_small_test(embed_dim=16, depth=2, num_heads=2)
    large = vit_small_test(embed_dim=32, depth=4, num_heads=2)
    model = StitchedViT([small, large], two_way=True).eval()
    x = torch.randn(2, 1, 16, 16)
    for stitch in model.stitches:
        model.select(stitch.id)
        assert model(x).shape == (2, 10)
    model.select(1)  # the large anchor alone
    by_hand = vit_small_test(img_size=16, embed_dim=32, depth=4, num_heads=2).eval()
    state = dict(large.state_dict())
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], 4, 8, num_prefix=1)
    by_hand.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(model(x), by_hand(x), atol=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        model(torch.randn(2, 1, 9, 9))
