"""Dense prediction from stitched ViTs: multi-level token maps of any stitch (SN-Netv2)."""

from __future__ import annotations

import pytest
import torch

from stitchops.models import StitchedViT, vit_small_test


def _model(depths=(12, 24), widths=(16, 32), **kw) -> StitchedViT:
    torch.manual_seed(0)
    anchors = [
        vit_small_test(embed_dim=w, depth=d, num_heads=2)
        for d, w in zip(depths, widths, strict=True)
    ]
    return StitchedViT(anchors, two_way=True, dense=True, **kw).eval()


def _expected_levels(model: StitchedViT, stitch) -> list[tuple[int, int]]:
    """(anchor, block) of each level, in route order, from the route and the mapped ids."""
    levels = model.out_indices_of()
    return [
        (seg.anchor, b)
        for seg in stitch.route
        for b in range(seg.start, seg.stop)
        for _ in range(levels[seg.anchor].count(b))
    ]


def test_levels_of_every_stitch_have_the_large_width():
    """DeiT3-S/L depths (12, 24): (9, 14, 19, 23) on the large anchor, (4, 7, 9, 11) mapped
    onto the small one; every level of every stitch is [B, D_large, H/p, W/p]."""
    model = _model()
    assert model.default_out_indices() == (9, 14, 19, 23)
    assert model.out_indices_of() == [(4, 7, 9, 11), (9, 14, 19, 23)]
    assert len(model.stitch_layers["0to1"]) == 12  # the FS layer after block 11 too
    x = torch.randn(2, 1, 8, 8)
    counts = set()
    with torch.no_grad():
        for stitch in model.stitches:
            model.select(stitch.id)
            maps = model.forward_features(x)
            assert len(maps) == len(_expected_levels(model, stitch)), stitch.id
            assert all(m.shape == (2, 32, 4, 4) for m in maps), stitch.id
            counts.add(len(maps))
    assert counts == {4}  # every route meets four levels at these depths


def test_anchor_routes_give_the_anchors_own_features():
    model = _model()
    x = torch.randn(2, 1, 8, 8)
    small, large = model.anchors
    with torch.no_grad():
        model.select(1)
        for got, want in zip(
            model.forward_features(x),
            large.forward_features(x, out_indices=(9, 14, 19, 23)),
            strict=True,
        ):
            assert torch.equal(got, want)
        model.select(0)  # each level projected by the FS layer at its block
        own = small.forward_features(x, out_indices=(4, 7, 9, 11))
        for got, block, level in zip(model.forward_features(x), (4, 7, 9, 11), own, strict=True):
            tokens = level.flatten(2).transpose(1, 2)
            layer = model.stitch_layers["0to1"][block]
            want = (tokens @ layer.weight.t() + layer.bias).transpose(1, 2).reshape(2, 32, 4, 4)
            assert torch.allclose(got, want, atol=1e-6), block


def test_chosen_out_indices_and_the_extra_layers_init():
    model = _model(depths=(4, 8), widths=(16, 32))
    assert model.out_indices_of((1, 7)) == [(0, 3), (1, 7)]
    before = model.stitch_layers["0to1"][3].weight.detach().clone()
    model.init_stitching_layers(torch.randn(4, 1, 8, 8))
    assert not torch.equal(model.stitch_layers["0to1"][3].weight, before)
    model.select(0)
    assert len(model.forward_features(torch.randn(1, 1, 8, 8), out_indices=(1, 7))) == 2


def test_dense_bad_input():
    model = _model(depths=(4, 8), widths=(16, 32))
    x = torch.randn(1, 1, 8, 8)
    for bad in ((8,), (-1,), (), ("3",)):
        with pytest.raises(ValueError, match=r"out_indices must be block ids .* 0\.\.7"):
            model.forward_features(x, out_indices=bad)
    classifier = StitchedViT(list(model.anchors), two_way=True)
    with pytest.raises(ValueError, match="dense=True"):
        classifier.forward_features(x)
    three = [vit_small_test(embed_dim=w, depth=4, num_heads=2) for w in (16, 24, 32)]
    with pytest.raises(ValueError, match="anchor 0 stitched to the largest anchor 2"):
        StitchedViT(three, dense=True)
    with pytest.raises(ValueError, match="two anchors, got 3"):
        StitchedViT(three, two_way=True, dense=True)


@pytest.mark.parametrize("depths", [(4, 4), (4, 8)], ids=["paired", "unpaired"])
def test_snnet_space_levels_projected_by_its_stitching_layers(depths):
    """SN-Net's space: a small-anchor level goes through the layer of the stitch from that
    block that enters the large anchor latest; every stitch gives large-width maps."""
    torch.manual_seed(0)
    anchors = [
        vit_small_test(embed_dim=w, depth=d, num_heads=2)
        for d, w in zip(depths, (16, 32), strict=True)
    ]
    model = StitchedViT(anchors, dense=True).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for stitch in model.stitches:
            model.select(stitch.id)
            maps = model.forward_features(x)
            assert maps and all(m.shape == (2, 32, 4, 4) for m in maps), stitch.id
    if depths == (4, 4):  # k 2, s 1: block b's latest entry is (b, b + 1), the last (3, 3)
        fronts_ends = {(p.front, p.end): p.index for s in model.stitches for p in s.points}
        for b in range(4):
            key, index = model._projection_table()[(0, b)]
            assert key == "0to1" and index == fronts_ends[(b, min(b + 1, 3))]
