"""``stitchops train --mode spt`` and ``stitchops demo spt``: sensitivity, plan, fine-tuning,
evaluation and the merged checkpoint; exact resume (1 and 2 processes); clear mistakes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import assert_same_tensors, tensors, torchrun

from stitchops.cli import main
from stitchops.models import vit_small_test
from stitchops.train import TrainConfig, load_trained, train
from stitchops.train.data import load_shapes_cls
from stitchops.train.spt_mode import parse_budget

BACKBONE = "vit_small_test:embed_dim=16,depth=2,num_heads=2"


@pytest.fixture
def pretrained(tmp_path):
    """A digits-shaped ViT's weights (10 classes): the SPT runs give it a 5-class head."""
    torch.manual_seed(1)
    model = vit_small_test(embed_dim=16, depth=2, num_heads=2)
    path = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def spt_config(tmp_path, pretrained, name, **kw):
    return TrainConfig(
        mode="spt",
        anchors=[BACKBONE + ",num_classes=5"],
        anchor_weights=[pretrained],
        data="shapes-cls",
        budget=400,
        epochs=1,
        batch_size=32,
        spt_batches=2,
        progress=False,
        out=str(tmp_path / name),
        **kw,
    )


def test_spt_trains_evaluates_and_merges(tmp_path, pretrained):
    path = train(spt_config(tmp_path, pretrained, "run", max_steps=4, lr=1e-2))
    out = tmp_path / "run"
    plan = json.loads((out / "plan.json").read_text())
    total = sum(e["cost"] for e in plan["entries"])
    assert 0 < total <= 400 and plan["budget"] == 400
    _, meta = tensors(path)
    assert meta["spt_plan"] == plan
    model, cfg = load_trained(path)
    assert cfg.mode == "spt"
    # The merged weights load into the plain ViT and give the tuned model's outputs.
    plain = vit_small_test(embed_dim=16, depth=2, num_heads=2, num_classes=5)
    plain.load_state_dict(load_file(str(out / "merged.safetensors")))
    x = load_shapes_cls("val").images[:64]
    torch.testing.assert_close(plain.eval()(x), model(x), rtol=1e-5, atol=1e-5)
    result = json.loads((out / "spt.json").read_text())
    assert result["accuracy"] == result["merged_accuracy"]
    assert result["trainable_without_head"] == total
    usage = json.loads((out / "usage.json").read_text())
    assert usage["trainable"] == total + 5 * 16 + 5 + 16  # the head and class token train too
    assert result["class_token"] == 16
    assert usage["step_ms_median"] > 0


def test_spt_resume_is_exact(tmp_path, pretrained):
    full = train(spt_config(tmp_path, pretrained, "full", max_steps=3))
    train(spt_config(tmp_path, pretrained, "part", max_steps=2))
    resumed = train(
        TrainConfig(out=str(tmp_path / "part"), max_steps=3, progress=False),
        resume=str(tmp_path / "part" / "checkpoint.safetensors"),
    )
    (a, meta_a), (b, meta_b) = tensors(full), tensors(resumed)
    assert_same_tensors(a, b)
    assert meta_a["spt_plan"] == meta_b["spt_plan"]
    assert any(k.endswith(".delta") for k in a)  # unstructured entries were tuned


def test_lora_everywhere_plan_and_adapter_plans(tmp_path, pretrained):
    path = train(
        spt_config(tmp_path, pretrained, "lora", max_steps=1, spt_plan="lora-all", spt_rank=2)
    )
    model, _ = load_trained(path)
    loras = [n for n, _ in model.named_parameters() if n.endswith("lora_A")]
    assert len(loras) == 2 * 4  # qkv, proj, fc1, fc2 in each of 2 blocks
    path = train(
        spt_config(
            tmp_path, pretrained, "adapter", max_steps=1, spt_structured="adapter", spt_alpha=100.0
        )
    )
    assert any("adapter_up" in n for n, _ in load_trained(path)[0].named_parameters())


@pytest.mark.slow
def test_torchrun_spt_two_processes_and_exact_resume(tmp_path, pretrained):
    extra = [
        "--anchor-weights",
        pretrained,
        *"--budget 400 --data shapes-cls --spt-batches 2".split(),
    ]
    specs = [BACKBONE + ",num_classes=5"]
    full = torchrun(tmp_path, tmp_path / "full", 3, mode="spt", extra=extra, specs=specs)
    part = torchrun(tmp_path, tmp_path / "part", 2, mode="spt", extra=extra, specs=specs)
    resumed = torchrun(
        tmp_path, tmp_path / "part", 3, resume=part, mode="spt", extra=extra, specs=specs
    )
    (a, meta_a), (b, _) = tensors(full), tensors(resumed)
    assert meta_a["step"] == 3 and "spt_plan" in meta_a
    assert_same_tensors(a, b)


@pytest.mark.parametrize(
    "text, value", [("0.4M", 4e5), ("250k", 2.5e5), ("1200", 1200.0), ("1e3", 1e3)]
)
def test_budget_parsing(text, value):
    assert parse_budget(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "-3k", "0"])
def test_bad_budget_is_a_clear_error(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


def test_cli_spt_mistakes_are_one_line_with_exit_code_2(tmp_path, pretrained, capsys):
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"layers": [1, 2, 3]}')
    base = [
        *"train --mode spt --anchors".split(),
        BACKBONE + ",num_classes=5",
        "--anchor-weights",
        pretrained,
        *"--data shapes-cls --out".split(),
        str(tmp_path / "run"),
        "--no-progress",
    ]
    for args, words in (
        (base, ["needs --budget"]),
        ([*base, "--budget", "0.5"], ["below the smallest possible plan"]),
        ([*base, "--budget", "400", "--spt-plan", str(tmp_path / "none.json")], ["none.json"]),
        ([*base, "--spt-plan", str(foreign)], ["foreign.json", "not an SPT plan"]),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("stitchops train: error: "), err
        for word in words:
            assert word in err[0], (word, err[0])
        assert not (tmp_path / "run").exists()


def test_spt_demo_end_to_end(tmp_path):
    from stitchops.demos.spt import run

    summary = run(out=tmp_path, anchor_epochs=1, stitch_epochs=1, progress=False)
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["full", "lora-8", "spt", "spt-half"]
    assert rows["full"]["trainable"] > rows["lora-8"]["trainable"] >= rows["spt"]["trainable"]
    assert rows["spt-half"]["trainable"] <= rows["lora-8"]["trainable"] / 2
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["step_ms"] > 0 for r in rows.values())
    assert (tmp_path / "spt.png").read_bytes().startswith(b"\x89PNG")
