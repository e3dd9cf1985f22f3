"""The official SN-Net / SN-Netv2 code's stitch numbering and checkpoints (official.py).

Checkpoints here are synthetic, laid out as the official code saves them (read from its
source): ``anchors.{i}.*`` (SN-Netv2's DeiT-III anchors with ``gamma_1`` / ``gamma_2``),
``stitch_layers.{pair}.{layer}.transform.*``, inside ``{"model": ..., "args": Namespace}``.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from stitchops.models import StitchedViT, vit_small_test
from stitchops.models.official import load_official_checkpoint


def _anchors(depths, widths, **kw):
    torch.manual_seed(0)
    return [
        vit_small_test(embed_dim=w, depth=d, num_heads=2, **kw)
        for d, w in zip(depths, widths, strict=True)
    ]


def test_snnetv2_official_numbering_deit3_s_l_depths():
    """12 and 24 blocks (DeiT3-S/L): 0-12 agree, 13 is built by the official code but is no
    stitch of ours, 14-24 → 13-23, 25-79 → 79-133, 80-134 → 24-78; 121 of 134 ids differ."""
    model = StitchedViT(_anchors((12, 24), (16, 32)), two_way=True, stitch_ids="official")
    ours = StitchedViT(_anchors((12, 24), (16, 32)), two_way=True)
    expected = {
        **{i: i for i in range(13)},
        **{o: o - 1 for o in range(14, 25)},
        **{o: o + 54 for o in range(25, 80)},
        **{o: o - 56 for o in range(80, 135)},
    }
    assert len(expected) == len(ours.stitches) == 134
    for official, position in expected.items():
        assert model.our_id(official) == ours.our_id(official) == position
        assert ours.official_id(position) == official
        assert model.stitches[position].id == official
        assert model.stitches[position].describe() == ours.stitches[position].describe()
    assert sum(o != p for o, p in expected.items()) == 121
    with pytest.raises(ValueError, match="official stitch 13 is not in this space"):
        ours.our_id(13)
    with pytest.raises(ValueError, match="unknown stitch id 13"):
        model.select(13)
    model.select(80)  # the official id of our FSF 24
    assert model.stitches[model.active].kind == "FSF" and model.active == 24
    assert model.flops(80) == ours.flops(24)


def test_snnet_official_numbering_is_ours_with_partial_windows():
    anchors = _anchors((12, 12, 12), (16, 24, 32))
    model = StitchedViT(anchors, kernel_size=3, stride=2, partial_windows=True)
    assert [model.official_id(i) for i in range(len(model.stitches))] == list(
        range(len(model.stitches))
    )
    # Full windows: the official ids of the second pair's stitches are 3 further on (the
    # first pair's partial window [10, 11] adds 3 stitches before them).
    full = StitchedViT(anchors, kernel_size=3, stride=2)
    second = [i for i, s in enumerate(full.stitches) if s.anchors == (1, 2)]
    assert len(full.stitches) == 3 + 2 * 41
    assert [full.official_id(i) for i in second] == [i + 3 for i in second]


def _official_snnet_state(model: StitchedViT) -> dict:
    """The model's weights as SN-Net's code names them (3 anchors, nearest stitching)."""
    state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("anchors.")}
    for pair, key in enumerate(("0to1", "1to2")):
        for j, layer in enumerate(model.stitch_layers[key]):
            state[f"stitch_layers.{pair}.{j}.transform.weight"] = layer.weight.detach().clone()
            state[f"stitch_layers.{pair}.{j}.transform.bias"] = layer.bias.detach().clone()
    return state


def test_snnet_checkpoint_loads_and_runs_as_the_official_forward(tmp_path):
    trained = StitchedViT(_anchors((4, 4, 4), (16, 24, 32)))
    with torch.no_grad():
        for p in trained.stitch_layers.parameters():
            p.normal_(0, 0.2)
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {"model": _official_snnet_state(trained), "epoch": 3, "args": argparse.Namespace(lr=1e-4)},
        path,
    )
    model = StitchedViT(_anchors((4, 4, 4), (16, 24, 32))).eval()
    report = load_official_checkpoint(model, path)
    assert report.family == "snnet" and report.ignored == []
    assert not model.final_norm_on_stitches
    for name, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for stitch in model.stitches:
            model.select(stitch.id)
            got = model(x)
            # the official forward: blocks, stitching layer, blocks, head on the class token;
            # a stitched route skips the final norm, an anchor keeps it
            tokens = model.anchors[stitch.route[0].anchor].forward_embed(x)
            for k, seg in enumerate(stitch.route):
                for block in model.anchors[seg.anchor].blocks[seg.start : seg.stop]:
                    tokens = block(tokens)
                if k < len(stitch.points):
                    p = stitch.points[k]
                    layer = model.stitch_layers[p.key][p.index]
                    tokens = tokens @ layer.weight.t() + layer.bias
            last = model.anchors[stitch.route[-1].anchor]
            tokens = tokens if stitch.points else last.norm(tokens)
            assert torch.allclose(got, last.head(tokens[:, 0]), atol=1e-6), stitch.id
    stitched = next(s for s in model.stitches if s.points)
    model.select(stitched.id)
    with torch.no_grad():
        without = model(x)
        model.final_norm_on_stitches = True
        assert not torch.allclose(model(x), without)  # the two readings differ


def _official_snnetv2_state(model: StitchedViT, extra_fs: torch.nn.Module) -> dict:
    """SN-Netv2's names: DeiT-III gamma_1/gamma_2, FS layers 0.*, the extra FS layer after
    the small anchor's last block, SF layers 1.*, LoRA inside ``transform``."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("anchors."):
            key = key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
            state[key] = value.clone()
    fs = [*model.stitch_layers["0to1"], extra_fs]
    for pair, layers in ((0, fs), (1, model.stitch_layers["1to0"])):
        for j, layer in enumerate(layers):
            for name in ("weight", "bias", "lora_A", "lora_B"):
                state[f"stitch_layers.{pair}.{j}.transform.{name}"] = (
                    getattr(layer, name).detach().clone()
                )
    return state


def test_snnetv2_checkpoint_with_lora_loads_every_stitch(tmp_path):
    kw = dict(init_values=0.1, no_embed_class=True)
    trained = StitchedViT(_anchors((4, 8), (16, 32), **kw), two_way=True, rank=2)
    with torch.no_grad():
        for p in trained.stitch_layers.parameters():
            p.normal_(0, 0.2)
        for anchor in trained.anchors:
            for block in anchor.blocks:
                block.ls1.gamma.normal_()
    extra = type(trained.stitch_layers["0to1"][0])(16, 32, rank=2)
    from safetensors.torch import save_file

    path = tmp_path / "snnetv2.safetensors"
    save_file(
        {k: v.contiguous() for k, v in _official_snnetv2_state(trained, extra).items()}, str(path)
    )
    model = StitchedViT(
        _anchors((4, 8), (16, 32), **kw), two_way=True, rank=2, stitch_ids="official"
    ).eval()
    report = load_official_checkpoint(model, path)
    assert report.family == "snnetv2" and model.final_norm_on_stitches
    assert report.ignored == [
        f"stitch_layers.0.3.transform.{n}" for n in ("bias", "lora_A", "lora_B", "weight")
    ]
    trained.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for stitch in model.stitches:
            trained.select(model.our_id(stitch.id))
            model.select(stitch.id)
            assert torch.equal(model(x), trained(x)), stitch.id


def test_official_checkpoint_that_does_not_fit_is_refused(tmp_path):
    model = StitchedViT(_anchors((4, 4, 4), (16, 24, 32)))
    state = _official_snnet_state(model)
    del state["stitch_layers.1.2.transform.bias"]
    with pytest.raises(ValueError, match="lacks 1 of the model's tensors"):
        load_official_checkpoint(model, state)
    state = _official_snnet_state(model)
    state["anchors.0.head.weight"] = torch.zeros(3, 16)
    with pytest.raises(ValueError, match=r"anchors.0.head.weight is \(3, 16\)"):
        load_official_checkpoint(model, state)
    with pytest.raises(ValueError, match="does not exist"):
        load_official_checkpoint(model, tmp_path / "missing.pth")
