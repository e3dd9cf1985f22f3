"""``stitchops train --mode spvit`` through the real command line: the search, its plan and
finalised weights, the fine-tuning, evaluation beside the dense model, exact resume after
Ctrl-C in the search, a plan without a search, and bad options in one line."""

from __future__ import annotations

import json
import random
import signal
import time

import pytest
from safetensors.torch import save_file
from test_runs import cli, logged_steps
from test_train import assert_same_tensors, tensors

from stitchops import spvit
from stitchops.cli import main
from stitchops.train import load_trained

SPEC = "vit_small_test:embed_dim=24,depth=2,num_heads=3"
# The tiny run's gates must move within a few dozen steps: a large architecture rate.
SEARCH = [
    *"--mode spvit --anchors".split(),
    SPEC,
    *"--search-epochs 1 --epochs 1 --batch-size 64 --target-ratio 0.5".split(),
    *"--spvit-arch-lr 0.3 --spvit-lambda 5".split(),
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A briefly trained anchor's weights (a plain weights file)."""
    folder = tmp_path_factory.mktemp("pretrained")
    args = [
        *"train --mode anchor --anchors".split(),
        SPEC,
        "--max-steps",
        "5",
        "--out",
        str(folder / "run"),
        "--no-progress",
    ]
    assert main(args) == 0
    model, _ = load_trained(folder / "run" / "checkpoint.safetensors")
    weights = folder / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights


def test_search_then_finetune(pretrained, tmp_path, capsys):
    out = tmp_path / "sp"
    args = [
        "train",
        *SEARCH,
        "--anchor-weights",
        str(pretrained),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "SPViT search" in text and "total:" in text and "validation accuracy" in text
    plan = spvit.Plan.load(out / "search" / "plan.json")
    assert plan.flops < plan.dense_flops
    gates = [json.loads(line) for line in (out / "search" / "gates.jsonl").read_text().splitlines()]
    assert len(gates) == logged_steps(out / "search") and len(gates[0]["gates"]) == 2
    assert (out / "search" / "finalized.safetensors").is_file()
    model, cfg = load_trained(out / "checkpoint.safetensors")
    assert cfg.mode == "spvit" and spvit.count_flops(model) == plan.flops
    assert (
        main(
            ["eval", str(out / "checkpoint.safetensors"), "--no-progress", "--latency-repeats", "1"]
        )
        == 0
    )
    rows = json.loads((out / "stitches.json").read_text())["rows"]
    assert [r["route"] for r in rows] == ["dense model", "spvit model"]
    assert rows[0]["flops"] == plan.dense_flops and rows[1]["flops"] == plan.flops
    # the plan alone: only the fine-tuning, from the pretrained weights
    again = tmp_path / "plan-only"
    args = [
        "train",
        "--mode",
        "spvit",
        "--anchors",
        SPEC,
        "--anchor-weights",
        str(pretrained),
        "--spvit-plan",
        str(out / "search" / "plan.json"),
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--out",
        str(again),
        "--no-progress",
    ]
    assert main(args) == 0
    assert not (again / "search").exists()
    assert spvit.count_flops(load_trained(again / "checkpoint.safetensors")[0]) == plan.flops


@pytest.mark.slow
def test_ctrl_c_in_the_search_then_resume_equals_a_straight_run(pretrained, tmp_path):
    """SIGINT during the search: exit 130; --resume finishes the search and fine-tunes, and
    both phases' checkpoints equal a straight run's bit for bit."""
    args = [*SEARCH, "--anchor-weights", str(pretrained)]
    straight = cli("train", *args, "--out", str(tmp_path / "straight"), "--no-progress")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    total = logged_steps(tmp_path / "straight" / "search")
    stop = random.Random(7).randint(1, total - 2)
    run = cli("train", *args, "--out", str(tmp_path / "run"), "--no-progress")
    deadline = time.time() + 300
    while logged_steps(tmp_path / "run" / "search") < stop and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 130 and "Traceback" not in err + out, err
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()  # stopped in the search
    checkpoint = tmp_path / "run" / "search" / "checkpoint.safetensors"
    resumed = cli("train", "--resume", str(checkpoint), "--no-progress")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    for name in ("search/checkpoint.safetensors", "checkpoint.safetensors"):
        (a, meta_a) = tensors(tmp_path / "straight" / name)
        (b, meta_b) = tensors(tmp_path / "run" / name)
        assert meta_a["step"] == meta_b["step"]
        assert_same_tensors(a, b)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--target-ratio", "2"], "--target-ratio must be in (0, 1]"),
        (["--spvit-kernels", "2,4"], "kernel_sizes must be odd"),
        (["--spvit-weights", "w.safetensors"], "give its --spvit-plan too"),
        (["--spvit-plan", "missing.json"], "SPViT plan missing.json does not exist"),
        (["--spvit-lambda", "big"], "'auto' or a number"),
    ],
    ids=["ratio", "kernels", "weights", "plan", "lambda"],
)
def test_bad_options_are_one_line(extra, words, tmp_path, capsys):
    args = ["train", "--mode", "spvit", "--anchors", SPEC, "--out", str(tmp_path / "x"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_spvit_options_of_another_mode_are_said_ignored(tmp_path, capsys):
    args = [
        *"train --mode anchor --anchors".split(),
        SPEC,
        "--max-steps",
        "1",
        "--target-ratio",
        "0.5",
        "--out",
        str(tmp_path / "a"),
        "--no-progress",
    ]
    assert main(args) == 0
    assert "--target-ratio ignored" in capsys.readouterr().err


def test_spvit_demo_end_to_end(tmp_path):
    from stitchops.demos.spvit import run

    summary = run(out=tmp_path, anchor_epochs=1, stitch_epochs=1, progress=False, search_epochs=1)
    rows = {r["model"]: r for r in summary["rows"]}
    assert list(rows) == ["dense", "searched", "fine-tuned", "uniform"]
    plan = spvit.Plan.from_dict(summary["plan"])
    assert rows["fine-tuned"]["mflops"] == pytest.approx(plan.flops / 1e6)
    assert rows["uniform"]["mflops"] == pytest.approx(plan.flops / 1e6, rel=0.05)
    assert rows["dense"]["mflops"] == pytest.approx(plan.dense_flops / 1e6)
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["latency_ms"] > 0 for r in rows.values())
    assert (tmp_path / "spvit.png").read_bytes().startswith(b"\x89PNG")
