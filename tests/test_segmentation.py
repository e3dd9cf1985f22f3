"""Segmenter heads on ViT, FlexiViT and stitched backbones; the pyramid neck and FPN;
whole-image and sliding-window inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stitchops.models import StitchedViT, vit_small_test
from stitchops.models.necks import FPNDecoder, MultiScaleNeck
from stitchops.models.segmentation import Segmenter


def _vit(**kw):
    torch.manual_seed(0)
    return vit_small_test(
        img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=4, num_heads=2, **kw
    )


@pytest.mark.parametrize("decoder", ["linear", "mask", "setr"])
def test_every_decoder_gives_image_sized_logits_and_trains(decoder):
    model = Segmenter(_vit(), num_classes=5, decoder=decoder)
    x = torch.randn(2, 3, 16, 16)
    logits = model(x)
    assert logits.shape == (2, 5, 16, 16) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.randint(0, 5, (2, 16, 16))).backward()
    assert model.backbone.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)


def test_linear_decoder_is_a_linear_map_of_the_normed_tokens():
    model = Segmenter(_vit(), num_classes=3, decoder="linear").eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        (last,) = model.backbone.forward_features(x, out_indices=(3,))
        tokens = last.flatten(2).transpose(1, 2)
        per_patch = model.decoder.head(model.decoder.norm(tokens)).transpose(1, 2)
        want = F.interpolate(per_patch.reshape(1, 3, 4, 4), size=(16, 16), mode="bilinear")
        assert torch.allclose(model(x), want, atol=1e-6)


def test_mask_transformer_scores_are_cosines_before_the_mask_norm():
    model = Segmenter(_vit(), num_classes=4, decoder="mask").eval()
    model.decoder.mask_norm = torch.nn.Identity()
    with torch.no_grad():
        logits = model.decoder(model.backbone.forward_features(torch.randn(2, 3, 16, 16), (3,)))
    assert logits.shape == (2, 4, 4, 4) and logits.abs().max() <= 1 + 1e-5


def test_flexible_patch_size_and_stitched_backbones():
    flexi = Segmenter(_vit(flexi=True), num_classes=2)
    assert flexi(torch.randn(1, 3, 16, 16), patch_size=8).shape == (1, 2, 16, 16)
    torch.manual_seed(0)
    small = vit_small_test(embed_dim=16, depth=2, num_heads=2)
    large = vit_small_test(embed_dim=32, depth=4, num_heads=2)
    stitched = StitchedViT([small, large], two_way=True, dense=True)
    model = Segmenter(stitched, num_classes=3, decoder="mask")
    assert model.out_indices == (1, 2, 3, 3)
    x = torch.randn(2, 1, 8, 8)
    for stitch in stitched.stitches:
        stitched.select(stitch.id)
        assert model(x).shape == (2, 3, 8, 8), stitch.id


def test_sliding_window_equals_whole_image_when_the_crop_covers_it():
    model = Segmenter(_vit(), num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    whole = model.predict(x)
    assert torch.equal(model.predict(x, mode="slide", crop=16, stride=8), whole)
    wide = torch.randn(1, 3, 16, 28)  # windows at 0, 8 and 12 (the last flush with the edge)
    slid = model.predict(wide, mode="slide", crop=16, stride=8)
    assert slid.shape == (1, 3, 16, 28) and torch.isfinite(slid).all()
    by_hand = torch.zeros_like(slid)
    count = torch.zeros(1, 1, 16, 28)
    for left in (0, 8, 12):
        by_hand[..., left : left + 16] += model.predict(wide[..., left : left + 16])
        count[..., left : left + 16] += 1
    assert torch.allclose(slid, by_hand / count, atol=1e-6)


def test_neck_and_fpn_shapes():
    levels = [torch.randn(2, 32, 4, 4) for _ in range(4)]
    pyramid = MultiScaleNeck(32)(levels)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    maps = FPNDecoder(32, channels=64)(pyramid)
    assert [tuple(m.shape) for m in maps] == [
        (2, 64, 16, 16),
        (2, 64, 8, 8),
        (2, 64, 4, 4),
        (2, 64, 2, 2),
    ]
    with pytest.raises(ValueError, match="takes 4 levels, got 3"):
        MultiScaleNeck(32)(levels[:3])


def test_segmentation_bad_input():
    model = Segmenter(_vit(), num_classes=3)
    x = torch.randn(1, 3, 16, 16)
    small = model.predict(x, mode="slide", crop=32, stride=8)  # padded to the crop, as mmseg
    assert small.shape == (1, 3, 16, 16) and torch.isfinite(small).all()
    with pytest.raises(ValueError, match="crop 10 is not a multiple of the patch size"):
        model.predict(x, mode="slide", crop=10, stride=8)
    with pytest.raises(ValueError, match="crop >= 1 and stride >= 1"):
        model.predict(x, mode="slide", crop=16, stride=0)
    with pytest.raises(ValueError, match="mode must be"):
        model.predict(x, mode="tiles")
    with pytest.raises(ValueError, match="decoder must be one of"):
        Segmenter(_vit(), num_classes=3, decoder="upernet")
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        Segmenter(_vit(), num_classes=0)
    with pytest.raises(ValueError, match="out_indices entry 9 is outside the 4 blocks"):
        Segmenter(_vit(), num_classes=3, out_indices=(9,))(x)


def test_segmentation_flops_are_backbone_plus_head():
    """A ViT with a linear head: embed + blocks up to the last level + N·D·K for the head
    (multiply-adds, as the classifiers count them); a stitched anchor route: its route's
    FLOPs without the classifier tail, plus the same head."""
    from stitchops.models import flops as F_
    from stitchops.models.segflops import segmenter_flops

    vit = _vit()
    model = Segmenter(vit, num_classes=5, out_indices=(1, 3))
    n, d = 16, 32  # 4x4 tokens of width 32 at 16x16
    want = F_.embed_flops(vit.cfg, 16) + 4 * F_.block_flops(vit.cfg, 16) + n * d * 5
    assert segmenter_flops(model, 16) == want
    torch.manual_seed(0)
    small = vit_small_test(embed_dim=16, depth=2, num_heads=2)
    large = vit_small_test(embed_dim=32, depth=4, num_heads=2)
    stitched = StitchedViT([small, large], two_way=True, dense=True)
    seg = Segmenter(stitched, num_classes=3)
    stitched.select(1)
    tail = F_.tail_flops(large.cfg, 8)
    assert segmenter_flops(seg, 8) == stitched.flops(1, 8) - tail + 16 * 32 * 3
