"""FASeg (stitchops.models.faseg): the decoder's schedule (levels, masked attention, HRCA
windows, DFPQ), Mask2Former's set loss (stitchops.models.mask_loss), training from the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import SEG_LARGE, assert_same_tensors, tensors, torchrun

from stitchops.cli import main
from stitchops.models import FASeg, vit_small_test
from stitchops.models.decoders import default_levels
from stitchops.models.faseg import FASegDecoder, Prediction, semantic_scores
from stitchops.models.mask_loss import LossWeights, mask_classification_loss, match, targets_of

SMALL = {"hidden": 32, "heads": 4, "queries": 6, "ffn": 64}


def decoder(**options) -> FASegDecoder:
    torch.manual_seed(0)
    return FASegDecoder(5, **{**SMALL, **options}).eval()


def maps(batch=2, coarse=(2, 3), seed=1, channels=32, dtype=torch.float32):
    """1/32, 1/16, 1/8 maps and the 1/4 one (8× the 1/32 side), [B, channels, h, w]."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(coarse[0] * f, coarse[1] * f) for f in (1, 2, 4, 8)]
    return [torch.randn(batch, channels, *s, generator=g, dtype=dtype) for s in sizes]


def run(model: FASegDecoder, levels, positions=None):
    """The decoder on maps [1/32, 1/16, 1/8, 1/4] (the 1/4 one also the mask features), with
    positions (default: other random maps of the same shapes)."""
    if positions is None:
        positions = maps(
            levels[0].shape[0],
            tuple(levels[0].shape[-2:]),
            seed=7,
            channels=levels[0].shape[1],
            dtype=levels[0].dtype,
        )
    return model(levels[:3], levels[3], levels[3], positions)


def record_layers(model: FASegDecoder):
    """Each layer's (memory tokens, query_pos, attention keywords, result) as it runs."""
    seen = []

    def hook(module, args, kwargs, output):
        seen.append(
            {
                "keys": args[2].shape[1],
                "query_pos": args[1].detach().clone(),
                "attend": kwargs,
                "result": output[1],
            }
        )

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in model.layers]
    return seen, handles


def test_layers_cycle_the_levels_with_masked_attention_then_hrca():
    model = decoder(layers=6)
    levels = maps()
    seen, handles = record_layers(model)
    predictions = run(model, levels)
    for h in handles:
        h.remove()
    assert len(predictions) == 7  # before the first layer and after each
    tokens = [2 * 3, 4 * 6, 8 * 12, 16 * 24]
    assert [s["keys"] for s in seen] == [tokens[i % 4] for i in range(6)]
    for i, s in enumerate(seen):
        if i % 4 == 3:  # HRCA: the windows under the top ⌊n/32⌋ (>= 1) 1/32 scores
            assert "mask" not in s["attend"] and s["attend"]["window_size"] == 8
            top = seen[0]["result"].scores.topk(1, dim=-1).indices
            assert torch.equal(s["attend"]["windows"], top)
        else:
            assert s["attend"]["mask"].shape == (2, 6, tokens[i % 4])
    assert predictions[-1].masks.shape == (2, 6, 16, 24)
    assert predictions[-1].classes.shape == (2, 6, 6)


def test_dfpq_positions_follow_the_previous_attention_and_skip_hrca():
    model = decoder(layers=6)
    levels = maps()
    seen, handles = record_layers(model)
    run(model, levels)
    for h in handles:
        h.remove()
    learned = model.query_embed.weight
    for t in (1, 2, 3):
        expected = model.pos_mlp(seen[t - 1]["result"].pos_out + learned)
        assert torch.allclose(seen[t]["query_pos"], expected, atol=1e-6)
    assert torch.equal(seen[4]["query_pos"], seen[3]["query_pos"])  # HRCA does not update it
    plain = decoder(layers=3, dfpq=False, hrca=None)
    seen, handles = record_layers(plain)
    run(plain, levels)
    for h in handles:
        h.remove()
    for s in seen:  # Mask2Former: the learned positional queries, three levels
        assert torch.equal(s["query_pos"], plain.query_embed.weight.expand(2, -1, -1))
    assert [s["keys"] for s in seen] == [6, 24, 96]


def test_first_positions_pool_over_the_foreground_or_as_the_code():
    model = decoder()
    masks = torch.full((1, 2, 4, 4), -5.0)
    masks[0, 0, :2, :2] = 5.0  # query 0: the top-left quarter is foreground
    pos = torch.arange(16, dtype=torch.float32).view(1, 16, 1).expand(1, 16, 3)
    thesis = model._first_positions(masks, pos, (4, 4))
    assert torch.allclose(thesis[0, 0], torch.full((3,), (0 + 1 + 4 + 5) / 4))
    assert torch.equal(thesis[0, 1], torch.zeros(3))  # no foreground: 0, as the code's guard
    model.first_pos = "code"
    code = model._first_positions(masks, pos, (4, 4))
    assert torch.allclose(code[0, 0], torch.full((3,), (120 - 10) / 12))


def test_attention_mask_threshold():
    model = decoder()
    masks = torch.tensor([-2.0, -1.0, 0.0, 2.0]).view(1, 1, 2, 2)  # sigmoid .12 .27 .5 .88
    assert model._blocked(masks, (2, 2)).tolist() == [[[True, False, False, False]]]
    model.mask_threshold = 0.5
    assert model._blocked(masks, (2, 2)).tolist() == [[[True, True, False, False]]]


@pytest.mark.parametrize("hrca", ["full", "random"])
def test_hrca_ablations_run(hrca):
    model = decoder(layers=4, hrca=hrca)
    levels = maps()
    seen, handles = record_layers(model)
    run(model, levels)
    for h in handles:
        h.remove()
    attend = seen[3]["attend"]
    assert ("windows" in attend) == (hrca == "random")


def test_semantic_inference_and_the_segmenter():
    prediction = Prediction(torch.randn(2, 4, 6), torch.randn(2, 4, 3, 5))
    scores = semantic_scores(prediction)
    manual = sum(
        prediction.classes[:, q].softmax(-1)[:, :5, None, None]
        * prediction.masks[:, q, None].sigmoid()
        for q in range(4)
    )
    assert torch.allclose(scores, manual, atol=1e-6)
    torch.manual_seed(0)
    vit = vit_small_test(
        img_size=32, patch_size=4, in_chans=3, num_classes=5, depth=4, embed_dim=32, num_heads=2
    )
    model = FASeg(vit, 5, layers=5, **SMALL)
    assert model.out_indices == default_levels(4, 4) == (1, 2, 3, 3)
    images = torch.randn(2, 3, 32, 32)
    out = model(images)
    assert out.shape == (2, 5, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    loss = model.loss(out, labels, points=128)
    loss.backward()
    decoder_grads = [p.grad for p in model.decoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in decoder_grads)


def test_targets_and_hungarian_matching():
    labels = torch.tensor([[[0, 0, 2, 2], [0, 255, 2, 2]]])
    ((classes, masks),) = targets_of(labels, num_classes=3)
    assert classes.tolist() == [0, 2] and masks.shape == (2, 2, 4)
    assert masks[0].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]  # the ignored pixel is in none
    # query 2 predicts class 0 on its mask, query 0 class 2 on its: the matching finds them
    logits = torch.full((1, 3, 4), -4.0)
    logits[0, 2, 0] = logits[0, 0, 2] = 4.0
    mask_logits = torch.full((1, 3, 2, 4), -6.0)
    mask_logits[0, 2] = masks[0] * 12 - 6
    mask_logits[0, 0] = masks[1] * 12 - 6
    ((rows, cols),) = match(Prediction(logits, mask_logits), [(classes, masks)], 256, LossWeights())
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True)) == {0: 2, 1: 0}


def test_loss_prefers_the_right_prediction_and_sums_every_layer():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, 4:] = 1
    ((_, masks),) = targets_of(labels, 2)
    good_logits = torch.full((1, 3, 3), -5.0)
    good_logits[0, 0, 0] = good_logits[0, 1, 1] = good_logits[0, 2, 2] = 5.0
    good_masks = torch.full((1, 3, 8, 8), -8.0)
    good_masks[0, :2] = masks * 16 - 8
    good = Prediction(good_logits, good_masks)
    bad = Prediction(torch.zeros(1, 3, 3), torch.zeros(1, 3, 8, 8))
    # uniform points: importance sampling would pick the boundary, blurred in both
    uniform = {"points": 256, "sampling": "uniform"}
    assert mask_classification_loss([good], labels, 2, **uniform) < 0.25 * mask_classification_loss(
        [bad], labels, 2, **uniform
    )
    for sampling in ("importance", "uniform"):  # deep supervision: a term per prediction
        g = torch.Generator().manual_seed(1)
        one, two = (
            mask_classification_loss([p], labels, 2, points=256, sampling=sampling, generator=g)
            for p in (bad, good)
        )
        both = mask_classification_loss(
            [bad, good],
            labels,
            2,
            points=256,
            sampling=sampling,
            generator=torch.Generator().manual_seed(1),
        )
        assert torch.allclose(both, one + two)
    with pytest.raises(ValueError, match="sampling must be one of"):
        mask_classification_loss([bad], labels, 2, sampling="grid")


def test_bad_settings():
    with pytest.raises(ValueError, match="hrca must be one of"):
        FASegDecoder(3, hrca="all")
    with pytest.raises(ValueError, match="first_pos must be one of"):
        FASegDecoder(3, first_pos="mean")
    with pytest.raises(ValueError, match="layers must be >= 1"):
        FASegDecoder(3, layers=0)
    with pytest.raises(ValueError, match="whole multiple of the 1/32 map"):
        levels = maps()
        run(decoder(layers=4), [*levels[:3], levels[3][..., :-1]])


FASEG = ["--head", "faseg", "--faseg", "queries=6,layers=5,hidden=32,heads=4,ffn=64,points=128"]


def test_torchrun_faseg_two_processes_and_exact_resume(tmp_path):
    """--task seg --head faseg on two processes, SN-Netv2's stitched backbone."""
    full = torchrun(tmp_path, tmp_path / "full", 3, task="seg", extra=FASEG)
    part = torchrun(tmp_path, tmp_path / "part", 2, task="seg", extra=FASEG)
    resumed = torchrun(tmp_path, tmp_path / "part", 3, resume=part, task="seg", extra=FASEG)
    (a, meta_a), (b, _) = tensors(full), tensors(resumed)
    assert meta_a["step"] == 3 and meta_a["config"]["decoder"] == "faseg"
    assert any(k.startswith("model.decoder.decoder.layers.") for k in a)
    assert_same_tensors(a, b)


def test_faseg_train_and_eval_through_the_cli(tmp_path, capsys):
    out = tmp_path / "faseg"
    assert (
        main(
            [
                *"train --mode anchor --task seg".split(),
                *FASEG,
                "--anchors",
                SEG_LARGE,
                *"--max-steps 2 --batch-size 4 --out".split(),
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            ["eval", str(out / "checkpoint.safetensors"), "--no-progress", "--latency-repeats", "1"]
        )
        == 0
    )
    assert "mIoU %" in capsys.readouterr().out
    assert (
        main(
            [
                *"train --task seg --head faseg --faseg hrca=all --anchors".split(),
                SEG_LARGE,
                *"--mode anchor --out".split(),
                str(tmp_path / "x"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "hrca must be one of" in capsys.readouterr().err
    for option, words in (
        ("queries", "expected KEY=VALUE"),
        ("queries=0", "must be >= 1"),
        ("layers=-2", "must be >= 1"),
    ):
        with pytest.raises(SystemExit) as stop:  # argparse's own error: one line too
            main(["train", "--task", "seg", "--head", "faseg", "--faseg", option])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_faseg_demo_end_to_end(tmp_path):
    """Two of the demo's variants for one epoch: the table's figures and the picture."""
    from stitchops.demos.faseg import VARIANTS, run

    summary = run(
        out=tmp_path, anchor_epochs=1, progress=False, variants=(VARIANTS[0], VARIANTS[3])
    )
    rows = summary["rows"]
    assert [r["variant"] for r in rows] == ["Mask2Former", "FASeg (DFPQ + HRCA)"]
    for r in rows:
        assert 0 <= r["miou"] <= 1 and r["step_ms"] > 0
    assert (tmp_path / "faseg.png").stat().st_size > 10_000
    assert (tmp_path / "faseg.json").exists()


OFFICIAL = {"first_pos": "code", "hrca_pos": "learned", "hrca_windows": "floor"}


def official_setup(hidden=64, heads=8, queries=20, layers=13, coarse=(8, 8), **options):
    torch.manual_seed(3)
    model = (
        FASegDecoder(
            5,
            hidden=hidden,
            heads=heads,
            queries=queries,
            ffn=2 * hidden,
            layers=layers,
            **{**OFFICIAL, **options},
        )
        .double()
        .eval()
    )
    levels = maps(batch=2, coarse=coarse, channels=hidden, dtype=torch.float64)
    positions = maps(batch=2, coarse=coarse, seed=9, channels=hidden, dtype=torch.float64)
    return model, levels, positions


def test_decoder_matches_the_official_decoder_in_every_prediction():
    """The official decoder's 14 predictions (13 layers) on the same weights, in float64:
    with the official switches every class and mask logit agrees to rounding; with HRCA
    taking the dynamic positions (ours, hrca_pos="dfpq") they do not."""
    from official_faseg import official_decoder

    model, levels, positions = official_setup()
    with torch.no_grad():
        want = official_decoder(model, levels, levels[3], positions)
        got = run(model, levels, positions)
        assert len(got) == len(want) == 14
        for p, (classes, masks) in zip(got, want, strict=True):
            assert (p.classes - classes).abs().max() < 1e-10 * classes.abs().max()
            assert (p.masks - masks).abs().max() < 1e-10 * masks.abs().max()
        model.hrca_pos = "dfpq"
        other = run(model, levels, positions)
    assert (other[-1].classes - want[-1][0]).abs().max() > 1e-6


def test_an_hrca_layer_at_the_thesis_shapes_matches_the_official_one():
    """One HRCA layer as FASeg's (hidden 256, 8 heads, 100 queries, a 512² image: the 1/32
    map 16×16, the 1/4 map 128×128, the top 8 windows of 8×8), output and its gradients to
    the queries and the map, float64."""
    from official_faseg import cross, multihead, window_partition

    torch.manual_seed(4)
    model = FASegDecoder(5, hidden=256, heads=8, queries=100, layers=4).double()
    layer = model.layers[3]
    g = torch.Generator().manual_seed(5)
    tgt = torch.randn(2, 100, 256, generator=g, dtype=torch.float64, requires_grad=True)
    hires = torch.randn(2, 256, 128, 128, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(2, 256, 128, 128, generator=g, dtype=torch.float64)
    query_pos = torch.randn(2, 100, 256, generator=g, dtype=torch.float64)
    scores = torch.rand(2, 256, generator=g, dtype=torch.float64)
    attend = model._hrca(scores, (128, 128), (16, 16), 2)
    tokens = hires.flatten(2).transpose(1, 2)
    ours = layer.cross(tgt, tokens, query_pos, pos.flatten(2).transpose(1, 2), **attend).out
    ours = layer.cross_norm(tgt + ours)
    top = scores.sort(dim=-1, descending=True).indices[:, :8]
    pick = top[..., None, None].expand(-1, -1, 64, 256)
    windows = torch.gather(window_partition(hires, 8).view(2, -1, 64, 256), 1, pick)
    window_pos = torch.gather(window_partition(pos, 8).view(2, -1, 64, 256), 1, pick)
    want, _ = cross(
        layer,
        multihead(layer.cross),
        tgt.transpose(0, 1),
        windows.view(2, -1, 256).transpose(0, 1),
        None,
        window_pos.view(2, -1, 256).transpose(0, 1),
        query_pos.transpose(0, 1),
    )
    want = want.transpose(0, 1)
    assert (ours - want).abs().max() < 1e-12 * want.abs().max()
    grad = torch.randn_like(want)
    got = torch.autograd.grad(ours, (tgt, hires), grad)
    expected = torch.autograd.grad(want, (tgt, hires), grad)
    for a, b in zip(got, expected, strict=True):
        assert (a - b).abs().max() < 1e-10 * b.abs().max()


def test_official_window_count_is_zero_on_a_small_map():
    """⌊n/32⌋ windows on a 1/32 map of 2×3: none, and the HRCA layer attends no key (its
    output before the residual is the projection's bias, as nn.MultiheadAttention over an
    empty memory); the default attends one window."""
    model = decoder(layers=4, hrca_windows="floor")
    levels = maps()
    seen, handles = record_layers(model)
    run(model, levels)
    for h in handles:
        h.remove()
    assert seen[3]["attend"]["windows"].shape == (2, 0)
    assert decoder(layers=4)._hrca(torch.rand(2, 6), (16, 24), (2, 3), 2)["windows"].shape == (2, 1)
    empty = model.layers[3].cross(
        torch.randn(2, 6, 32),
        torch.randn(2, 384, 32),
        windows=torch.zeros(2, 0, dtype=torch.long),
        window_size=8,
        map_size=(16, 24),
    )
    assert torch.equal(empty.out, model.layers[3].cross.out_proj.bias.expand(2, 6, 32))


def test_sine_positions_are_mask2formers():
    """DETR's normalised sine encoding, written out for one position."""
    from stitchops.models.faseg import sine_positions

    pos = sine_positions(torch.zeros(1, 8, 3, 4), 8)
    assert pos.shape == (1, 8, 3, 4)
    y, x = 2 * math.pi * 2 / (3 + 1e-6), 2 * math.pi * 4 / (4 + 1e-6)  # row 1, column 3
    want = torch.tensor([math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100)])
    assert torch.allclose(pos[0, :4, 1, 3], want, atol=1e-6)
    assert torch.allclose(pos[0, 4, 1, 3], torch.tensor(math.sin(x)), atol=1e-6)


def test_inference_upsamples_the_masks_before_their_sigmoid():
    torch.manual_seed(0)
    vit = vit_small_test(
        img_size=32, patch_size=4, in_chans=3, num_classes=5, depth=4, embed_dim=32, num_heads=2
    )
    model = FASeg(vit, 5, layers=2, **SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
        last = model.decoder.predictions[-1]
        masks = torch.nn.functional.interpolate(
            last.masks, size=(32, 32), mode="bilinear", align_corners=False
        )
    assert torch.allclose(out, semantic_scores(Prediction(last.classes, masks)), atol=1e-6)
    assert model.decoder.key_pos == "conv"
    assert FASeg(vit, 5, layers=2, dfpq=False, hrca=None, **SMALL).decoder.key_pos == "sine"
