"""FASeg (stitchops.models.faseg): the decoder's schedule (levels, masked attention, HRCA
windows, DFPQ), Mask2Former's set loss (stitchops.models.mask_loss), training from the CLI."""

from __future__ import annotations

import pytest
import torch
from test_train import SEG_LARGE, assert_same_tensors, tensors, torchrun

from stitchops.cli import main
from stitchops.models import FASeg, vit_small_test
from stitchops.models.faseg import FASegDecoder, Prediction, default_levels, semantic_scores
from stitchops.models.mask_loss import LossWeights, mask_classification_loss, match, targets_of

SMALL = {"hidden": 32, "heads": 4, "queries": 6, "ffn": 64}


def decoder(**options) -> FASegDecoder:
    torch.manual_seed(0)
    return FASegDecoder(5, **{**SMALL, **options}).eval()


def maps(batch=2, coarse=(2, 3), seed=1):
    """1/32, 1/16, 1/8 maps and the 1/4 one (8× the 1/32 side), [B, 32, h, w]."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(coarse[0] * f, coarse[1] * f) for f in (1, 2, 4, 8)]
    return [torch.randn(batch, 32, *s, generator=g) for s in sizes]


def record_layers(model: FASegDecoder):
    """Each layer's (memory tokens, query_pos, attention keywords, result) as it runs."""
    seen = []

    def hook(module, args, kwargs, output):
        seen.append({"keys": args[2].shape[1], "query_pos": args[1].detach().clone(),
                     "attend": kwargs, "result": output[1]})  # fmt: skip

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in model.layers]
    return seen, handles


def test_layers_cycle_the_levels_with_masked_attention_then_hrca():
    model = decoder(layers=6)
    levels = maps()
    seen, handles = record_layers(model)
    predictions = model(levels[:3], levels[3], levels[3])
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
    model(levels[:3], levels[3], levels[3])
    for h in handles:
        h.remove()
    learned = model.query_embed.weight
    for t in (1, 2, 3):
        expected = model.pos_mlp(seen[t - 1]["result"].pos_out + learned)
        assert torch.allclose(seen[t]["query_pos"], expected, atol=1e-6)
    assert torch.equal(seen[4]["query_pos"], seen[3]["query_pos"])  # HRCA does not update it
    plain = decoder(layers=3, dfpq=False, hrca=None)
    seen, handles = record_layers(plain)
    plain(levels[:3], levels[3], levels[3])
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
    assert torch.allclose(thesis[0, 1], torch.full((3,), 7.5))  # no foreground: uniform
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
    model(levels[:3], levels[3], levels[3])
    for h in handles:
        h.remove()
    attend = seen[3]["attend"]
    assert ("windows" in attend) == (hrca == "random")


def test_semantic_inference_and_the_segmenter():
    prediction = Prediction(torch.randn(2, 4, 6), torch.randn(2, 4, 3, 5))
    scores = semantic_scores(prediction)
    manual = sum(prediction.classes[:, q].softmax(-1)[:, :5, None, None]
                 * prediction.masks[:, q, None].sigmoid() for q in range(4))  # fmt: skip
    assert torch.allclose(scores, manual, atol=1e-6)
    torch.manual_seed(0)
    vit = vit_small_test(img_size=32, patch_size=4, in_chans=3, num_classes=5, depth=4,
                         embed_dim=32, num_heads=2)  # fmt: skip
    model = FASeg(vit, 5, layers=5, **SMALL)
    assert model.out_indices == default_levels(4) == (1, 2, 3, 3)
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
    (rows, cols), = match(Prediction(logits, mask_logits), [(classes, masks)], 256,
                          LossWeights())  # fmt: skip
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
    assert (mask_classification_loss([good], labels, 2, **uniform)
            < 0.25 * mask_classification_loss([bad], labels, 2, **uniform))  # fmt: skip
    for sampling in ("importance", "uniform"):  # deep supervision: a term per prediction
        g = torch.Generator().manual_seed(1)
        one, two = (mask_classification_loss([p], labels, 2, points=256, sampling=sampling,
                                             generator=g) for p in (bad, good))  # fmt: skip
        both = mask_classification_loss([bad, good], labels, 2, points=256, sampling=sampling,
                                        generator=torch.Generator().manual_seed(1))  # fmt: skip
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
        decoder(layers=4)(levels[:3], levels[3][..., :-1], levels[3][..., :-1])


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
    assert main(["train", "--mode", "anchor", "--task", "seg", *FASEG, "--anchors", SEG_LARGE,
                 "--max-steps", "2", "--batch-size", "4", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["eval", str(out / "checkpoint.safetensors"), "--no-progress",
                 "--latency-repeats", "1"]) == 0  # fmt: skip
    assert "mIoU %" in capsys.readouterr().out
    assert main(["train", "--task", "seg", "--head", "faseg", "--faseg", "hrca=all",
                 "--anchors", SEG_LARGE, "--mode", "anchor", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2  # fmt: skip
    assert "hrca must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's own error: one line too
        main(["train", "--task", "seg", "--head", "faseg", "--faseg", "queries"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "expected KEY=VALUE" in err and err.count("\n") == 1, err


def test_faseg_demo_end_to_end(tmp_path):
    """Two of the demo's variants for one epoch: the table's figures and the picture."""
    from stitchops.train.fasegdemo import VARIANTS, run_faseg_demo

    summary = run_faseg_demo(out=tmp_path, epochs=1, progress=False,
                             variants=(VARIANTS[0], VARIANTS[3]))  # fmt: skip
    rows = summary["rows"]
    assert [r["variant"] for r in rows] == ["Mask2Former", "FASeg (DFPQ + HRCA)"]
    for r in rows:
        assert 0 <= r["miou"] <= 1 and r["step_ms"] > 0
    assert (tmp_path / "faseg.png").stat().st_size > 10_000
    assert (tmp_path / "faseg.json").exists()
