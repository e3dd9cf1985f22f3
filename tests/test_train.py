"""Training loop: every mode runs, checkpoints resume exactly (1 and 2 processes), data and
command-line errors are clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stitchops.cli import main
from stitchops.train import TrainConfig, eval_stitches, load_trained, pareto_frontier, train
from stitchops.train.checkpoint import read_checkpoint
from stitchops.train.data import DataError, ImageFolder, load_digits

SMALL = "vit_small_test:embed_dim=16,depth=2,num_heads=2"
LARGE = "vit_small_test:embed_dim=24,depth=4,num_heads=2"
TINY = dict(
    anchors=[SMALL, LARGE],
    data="digits",
    batch_size=32,
    epochs=2,
    progress=False,
    init_images=64,
    lr=1e-3,
)


def tensors(path):
    model, optim, meta = read_checkpoint(path)
    flat = {f"model.{k}": v for k, v in model.items()}
    for index, state in optim["state"].items():
        flat.update({f"optim.{index}.{k}": v for k, v in state.items()})
    return flat, meta


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "mode, extra",
    [
        ("snnetv2", {"rank": 2}),
        ("snnet", {}),
        ("esta", {"pst_rank": 2, "esta_warmup": 1, "esta_intervals": 3}),
        ("esta", {"pst_rank": 2, "distill": "inplace"}),
    ],
)
def test_resume_is_exact(tmp_path, mode, extra):
    full = train(TrainConfig(mode=mode, out=str(tmp_path / "full"), max_steps=3, **TINY, **extra))
    part = train(TrainConfig(mode=mode, out=str(tmp_path / "part"), max_steps=2, **TINY, **extra))
    resumed_cfg = TrainConfig(out=str(tmp_path / "part"), max_steps=3, progress=False)
    resumed = train(resumed_cfg, resume=str(part))
    (a, meta_a), (b, meta_b) = tensors(full), tensors(resumed)
    assert meta_a["step"] == meta_b["step"] == 3
    assert_same_tensors(a, b)
    assert meta_a["samplers"] == meta_b["samplers"]
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"step", "stitch", "loss", "lr", "epoch"} <= log[0].keys()


def test_anchor_pretraining_and_flexible_patch_sizes(tmp_path):
    spec = "vit_small_test:embed_dim=16,depth=2,num_heads=2"
    cfg = TrainConfig(
        mode="anchor",
        anchors=[spec],
        out=str(tmp_path),
        max_steps=4,
        patch_sizes=[1, 2, 4],
        **{k: v for k, v in TINY.items() if k != "anchors"},
    )
    path = train(cfg)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["patch_size"] in (1, 2, 4) for r in log)
    model, _ = load_trained(path)
    assert model(torch.randn(2, 1, 8, 8), patch_size=4).shape == (2, 10)


def test_eval_stitches_table_frontier_and_plot(tmp_path):
    path = train(TrainConfig(mode="snnetv2", out=str(tmp_path), max_steps=2, rank=2, **TINY))
    model, _ = load_trained(path)
    loader = torch.utils.data.DataLoader(load_digits("val"), batch_size=200)
    table = eval_stitches(model, loader, progress=False)
    assert len(table.rows) == len(model.stitches)
    assert all(0 <= r.accuracy <= 1 and r.latency_ms > 0 for r in table.rows)
    assert table.frontier == pareto_frontier([(r.id, r.flops, r.accuracy) for r in table.rows])
    assert "pareto" in table.format()
    assert main(["eval", str(path), "--out", str(tmp_path / "eval")]) == 0
    png = (tmp_path / "eval" / "stitches.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert json.loads((tmp_path / "eval" / "stitches.json").read_text())["rows"]


def test_latency_is_a_warm_median(monkeypatch):
    """A stitch's first forward (allocations, lazy set-up) is not timed, and the figure is
    the median of repeats: one slow call among them does not move it."""
    from stitchops.train import evaluate

    calls = []

    def forward(images, patch_size=None):
        calls.append(1)
        if len(calls) in (1, 3):  # the warm-up call, and one outlier among the repeats
            time.sleep(0.3)
        return images

    ms = evaluate.median_latency_ms(forward, torch.zeros(2, 1, 8, 8), repeats=5)
    assert len(calls) == 6 and ms < 150
    with pytest.raises(ValueError, match="latency_repeats must be >= 1"):
        eval_stitches(object(), [], latency_repeats=0, device="cpu")


def test_pareto_frontier():
    points = [(0, 1.0, 0.5), (1, 2.0, 0.4), (2, 2.0, 0.7), (3, 3.0, 0.6), (4, 4.0, 0.9)]
    assert pareto_frontier(points) == [0, 2, 4]


def write_images(root: Path, classes=("cat", "dog"), count=3, size=12):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (size + i, size), color=(40 * i, 90, 200)).save(root / c / f"{i}.png")


def test_image_folder(tmp_path):
    write_images(tmp_path)
    data = ImageFolder(tmp_path, img_size=8)
    assert len(data) == 6 and data.classes == ["cat", "dog"]
    x, y = data[4]
    assert x.shape == (3, 8, 8) and y == 1 and torch.isfinite(x).all()
    (tmp_path / "dog" / "bad.png").write_bytes(b"not an image")
    data = ImageFolder(tmp_path, img_size=8)
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png"):
        data[[str(p) for p, _ in data.samples].index(str(tmp_path / "dog" / "bad.png"))]


def test_train_on_image_folder(tmp_path):
    write_images(tmp_path / "data" / "train", count=8)
    write_images(tmp_path / "data" / "val", count=2)
    spec = "vit_small_test:img_size=8,in_chans=3,num_classes=2,embed_dim=16,depth=2,num_heads=2"
    code = main(
        [
            *"train --mode anchor --anchors".split(),
            spec,
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            *"--batch-size 4 --epochs 1 --no-progress".split(),
        ]
    )
    assert code == 0 and (tmp_path / "run" / "checkpoint.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{empty}"], "has no class sub-folders"),
        (["--data", "{missing}"], "does not exist"),
        (["--anchors", "resnet50", SMALL], "unknown model 'resnet50'"),
        (["--anchors", SMALL, "vit_small_test:patch_size=4,embed_dim=32"], "share patch_size"),
        (["--anchors", SMALL, "vit_small_test:img_size=16,embed_dim=32"], "share img_size"),
        (["--batch-size", "5000"], "fewer than one batch"),
    ],
)
def test_cli_errors_are_clear(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", missing=tmp_path / "nope") for a in args]
    base = [
        *"train --mode snnet --anchors".split(),
        SMALL,
        LARGE,
        "--out",
        str(tmp_path / "r"),
        *"--no-progress --max-steps 1".split(),
    ]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_eval_chosen_ids_quietly(tmp_path, capsys):
    path = train(TrainConfig(mode="snnet", out=str(tmp_path), max_steps=1, **TINY))
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                str(path),
                *"--ids 0,2 --no-progress --latency-repeats 2 --out".split(),
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads((out / "stitches.json").read_text())["rows"]
    assert [r["id"] for r in rows] == [0, 2]
    assert "evaluating stitches" not in capsys.readouterr().err
    assert main(["eval", str(path), "--ids", "999"]) == 2
    assert "--ids [999]" in capsys.readouterr().err


def test_cli_eval_unknown_stitch_budget(tmp_path, capsys):
    path = train(TrainConfig(mode="snnet", out=str(tmp_path), max_steps=1, **TINY))
    model, _ = load_trained(path)
    with pytest.raises(ValueError, match="unknown stitch id"):
        model.select(len(model.stitches))
    with pytest.raises(ValueError, match="no stitch fits"):
        model.select_by_flops(1.0)
    assert main(["eval", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


SEG_SMALL = "vit_small_test:img_size=16,patch_size=4,in_chans=3,num_classes=6,embed_dim=16,depth=2,num_heads=2"  # noqa: E501
SEG_LARGE = "vit_small_test:img_size=16,patch_size=4,in_chans=3,num_classes=6,embed_dim=32,depth=4,num_heads=2"  # noqa: E501


def _specs(mode: str, task: str) -> tuple[str, ...]:
    specs = (SEG_SMALL, SEG_LARGE) if task == "seg" else (SMALL, LARGE)
    return specs[-1:] if mode == "anchor" else specs


def torchrun(tmp_path, out, steps, resume=None, mode="snnetv2", task="cls", extra=(), specs=None):
    launch = "-m torch.distributed.run --standalone --nproc_per_node 2 -m stitchops train"
    sizes = "--rank 2 --batch-size 16 --epochs 2 --init-images 32"
    cmd = [sys.executable, *launch.split(), "--mode", mode, "--task", task, "--anchors",
           *(specs or _specs(mode, task)), *sizes.split(), "--max-steps", str(steps), "--out",
           str(out), "--no-progress"]  # fmt: skip
    cmd += list(extra)
    if resume:
        cmd += ["--resume", str(resume)]
    root = str(Path(__file__).resolve().parents[1])  # this checkout, installed or not
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    if torch.cuda.device_count() < 2:  # a process per GPU, or CPU processes (gloo): never cuda:1
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("checkpoint: ") == 1, proc.stdout  # rank 0 alone says where
    # DDP warns when told of unused parameters that are not: only routes leave some unused
    assert "find_unused_parameters" not in proc.stderr, proc.stderr[-3000:]
    return out / "checkpoint.safetensors"


def test_torchrun_two_processes_and_exact_resume(tmp_path):
    full = torchrun(tmp_path, tmp_path / "full", 3)
    part = torchrun(tmp_path, tmp_path / "part", 2)
    resumed = torchrun(tmp_path, tmp_path / "part", 3, resume=part)
    (a, meta_a), (b, meta_b) = tensors(full), tensors(resumed)
    assert meta_a["step"] == 3 and len(meta_a["samplers"]) == 2
    assert meta_a["samplers"][0] != meta_a["samplers"][1]  # each rank its own stream
    assert_same_tensors(a, b)
    assert meta_a["samplers"] == meta_b["samplers"]


def test_torchrun_segmentation_three_steps_and_exact_resume(tmp_path):
    """--task seg on two processes: SN-Netv2's dense stitching with one shared head."""
    full = torchrun(tmp_path, tmp_path / "full", 3, task="seg")
    part = torchrun(tmp_path, tmp_path / "part", 2, task="seg")
    resumed = torchrun(tmp_path, tmp_path / "part", 3, resume=part, task="seg")
    (a, meta_a), (b, meta_b) = tensors(full), tensors(resumed)
    assert meta_a["step"] == 3 and meta_a["config"]["task"] == "seg"
    assert any(k.startswith("model.decoder.") for k in a)
    assert_same_tensors(a, b)
    assert meta_a["samplers"] == meta_b["samplers"]


def test_segmentation_train_and_eval_through_the_cli(tmp_path, capsys):
    out = tmp_path / "seg"
    assert (
        main(
            [
                *"train --mode anchor --task seg --decoder mask --anchors".split(),
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
            [
                "eval",
                str(out / "checkpoint.safetensors"),
                *"--task seg --no-progress --latency-repeats 1".split(),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "mIoU %" in text
    rows = json.loads((out / "stitches.json").read_text())
    assert rows["metric"] == "mIoU" and 0 <= rows["rows"][0]["accuracy"] <= 1
    assert rows["rows"][0]["flops"] > 0
    checkpoint = str(out / "checkpoint.safetensors")
    # sliding windows that cover the 16x16 images: the whole-image mIoU
    assert (
        main(
            [
                "eval",
                checkpoint,
                *"--crop 16 --stride 8 --no-progress --latency-repeats 1 --out".split(),
                str(tmp_path / "slide"),
            ]
        )
        == 0
    )
    slide = json.loads((tmp_path / "slide" / "stitches.json").read_text())
    assert slide["rows"][0]["accuracy"] == pytest.approx(rows["rows"][0]["accuracy"])
    # a crop larger than the images: they are padded to it (mmseg's sliding inference)
    assert (
        main(
            [
                "eval",
                checkpoint,
                *"--crop 64 --stride 8 --no-progress --latency-repeats 1 --out".split(),
                str(tmp_path / "big"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", checkpoint, "--crop", "18", "--stride", "8"]) == 2
    err = capsys.readouterr().err
    assert "crop 18 is not a multiple of the patch size 4x4" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "args, words",
    [
        (["--mode", "snnet", "--anchors", SEG_SMALL, SEG_SMALL, SEG_LARGE],
         "stitched to the largest anchor"),
        (["--mode", "anchor", "--anchors", SEG_LARGE.replace("num_classes=6", "num_classes=5")],
         "shapes data has 6 classes"),
        (["--mode", "anchor", "--anchors", SEG_LARGE.replace("in_chans=3", "in_chans=1")],
         "in_chans=3"),
    ],
    ids=["snnet-space", "classes", "channels"],
)  # fmt: skip
def test_segmentation_training_refuses_a_mismatch(tmp_path, capsys, args, words):
    out = str(tmp_path / "x")
    assert main(["train", "--task", "seg", "--max-steps", "1", "--out", out, *args]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_segmentation_on_snnet_and_esta_spaces(tmp_path):
    for mode in ("snnet", "esta"):
        path = train(
            TrainConfig(
                mode=mode,
                task="seg",
                anchors=[SEG_SMALL, SEG_LARGE],
                out=str(tmp_path / mode),
                max_steps=2,
                batch_size=4,
                init_images=8,
                progress=False,
            )
        )
        model, cfg = load_trained(path)
        assert cfg.task == "seg" and model.backbone.options["dense"]


def test_poly_schedule():
    from stitchops.train.loop import _lr

    cfg = TrainConfig(anchors=[SMALL], mode="anchor", task="seg", lr=1.0, min_lr=0.0).resolved()
    assert cfg.schedule == "poly" and cfg.data == "shapes"
    assert _lr(cfg, 0, 10) == 1.0 and _lr(cfg, 5, 10) == pytest.approx(0.5**0.9)
    assert TrainConfig(anchors=[SMALL], mode="anchor").resolved().schedule == "cosine"


def test_torchrun_anchor_pretraining(tmp_path):
    path = torchrun(tmp_path, tmp_path / "anchor", 2, mode="anchor")
    assert tensors(path)[1]["step"] == 2


def test_demo_runs_end_to_end(tmp_path):
    from stitchops.demos.cls import run

    summary = run(out=tmp_path, anchor_epochs=1, stitch_epochs=1, progress=False)
    assert summary["stitches"] == 14
    assert summary["anchor_small"]["mflops"] < summary["anchor_large"]["mflops"]
    assert summary["stitches_between_anchors_in_flops"] == 12
    assert (tmp_path / "stitches.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_demo_without_its_extra_is_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    """An environment without scikit-learn: the demo says what to install, before training."""
    import importlib.util

    from stitchops import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a)
    )
    assert cli.main(["demo", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install scikit-learn" in err[0], err
    assert not any(tmp_path.iterdir())  # nothing trained


def _bad_inputs(tmp_path: Path) -> dict:
    """name -> (command-line arguments, words the one-line error must hold)."""
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"model.x": {')
    text = tmp_path / "notes.safetensors"
    text.write_text("not a checkpoint")
    from safetensors.torch import save_file

    from stitchops.models import vit_small_test

    small = vit_small_test(embed_dim=16, depth=2, num_heads=2)
    weights = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(weights))
    three = tmp_path / "three"
    write_images(three, classes=("a", "b", "c"), size=32)
    broken = tmp_path / "broken"
    write_images(broken, size=12)
    (broken / "dog" / "9.png").write_bytes(b"not a png")
    out = ["--out", str(tmp_path / "run"), "--no-progress"]
    anchor = ["train", "--mode", "anchor", "--max-steps", "1", *out]
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a folder")
    small_spec = ["--anchors", "vit_small_test:embed_dim=16,depth=1,num_heads=2"]
    return {
        "out-file": (
            [*anchor, *small_spec, "--out", str(a_file)],
            ["--out", "a-file.txt is a file, not a folder"],
        ),
        "out-under-file": (
            [*anchor, *small_spec, "--out", str(a_file / "run")],
            ["--out", "is a file, so no folder can be made there"],
        ),
        "eval-out-file": (
            ["eval", str(corrupt), "--out", str(a_file)],
            ["--out", "is a file, not a folder"],
        ),
        "resume-corrupt": (
            ["train", "--resume", str(corrupt), *out],
            [str(corrupt), "truncated, corrupt"],
        ),
        "resume-not-checkpoint": (["train", "--resume", str(text), *out], [str(text)]),
        "eval-corrupt": (["eval", str(corrupt)], [str(corrupt), "truncated, corrupt"]),
        "weights-shapes": (
            [
                *anchor,
                "--anchors",
                "vit_small_test:embed_dim=32,num_heads=2",
                "--anchor-weights",
                str(weights),
            ],
            [str(weights), "blocks.0", "(16", "(32", "differ"],
        ),
        "spec-value": (
            [*anchor, "--anchors", "vit_small_test:embed_dim=abc"],
            ["embed_dim='abc'", "must be int"],
        ),
        "spec-key": (
            [*anchor, "--anchors", "vit_small_test:embdim=3"],
            ["unknown model option 'embdim'", "embed_dim"],
        ),
        "classes": (
            [*anchor, "--anchors", "vit_small_test:img_size=32,in_chans=3", "--data", str(three)],
            ["3 classes", "10 outputs", "num_classes=3"],
        ),
        "unreadable-image": (
            [*anchor, "--anchors", "vit_small_test:num_classes=2", "--data", str(broken)],
            ["9.png", "cannot read image"],
        ),
        "eval-device": (["eval", str(corrupt), "--device", "cuda"], ["no CUDA GPU"]),
        "eval-bad-device": (["eval", str(corrupt), "--device", "gpu"], ["not a device"]),
    }


BAD_CLI_CASES = (
    "resume-corrupt",
    "resume-not-checkpoint",
    "eval-corrupt",
    "weights-shapes",
    "spec-value",
    "spec-key",
    "classes",
    "unreadable-image",
    "eval-device",
    "eval-bad-device",
    "out-file",
    "out-under-file",
    "eval-out-file",
)


@pytest.mark.parametrize("case", BAD_CLI_CASES)
def test_cli_user_mistakes_are_one_line_with_exit_code_2(case, tmp_path, capsys):
    """Each mistake: exit code 2, one line `stitchops <cmd>: error: ...` that names what is
    wrong, no traceback, and nothing written into the output folder."""
    if case == "eval-device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, words = _bad_inputs(tmp_path)[case]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stitchops {args[0]}: error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert not (tmp_path / "run").exists()


def test_cli_prints_the_resize_policy_and_trains_a_folder(tmp_path, capsys):
    """A folder of 32x32 RGB images into an 8x8 one-channel model: said before training."""
    write_images(tmp_path / "data", classes=("a", "b", "c"), size=32, count=6)
    spec = "vit_small_test:num_classes=3,embed_dim=16,depth=1,num_heads=2"
    data = str(tmp_path / "data")
    assert (
        main(
            [
                *"train --mode anchor --anchors".split(),
                spec,
                "--data",
                data,
                "--out",
                str(tmp_path / "run"),
                *"--max-steps 1 --batch-size 4".split(),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "data: 18 images, 3 classes; images of 32x32" in out
    assert "resized to 8x8 grayscale" in out


def test_help_describes_every_option():
    """train, eval, demo and bench: every option has a description; train lists the spec keys."""
    from stitchops import cli

    commands = cli.build_parser()._subparsers._group_actions[0].choices
    for name in ("train", "eval", "demo", "bench"):
        for action in commands[name]._actions:
            assert action.help, (name, action.option_strings)
        assert "(default:" in commands[name].format_help() or name == "train"
    text = " ".join(commands["train"].format_help().split())
    for key in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth"):
        assert f"{key} (int)" in text
    assert "[by mode: snnet 0, snnetv2 16, esta -1]" in text
    assert "--no-progress" in commands["eval"].format_help()


def test_segmentation_demo_end_to_end(tmp_path):
    """demo seg in miniature: table, both pictures, the summary."""
    assert (
        main(
            [
                *"demo seg --out".split(),
                str(tmp_path),
                *"--anchor-epochs 1 --stitch-epochs 1 --no-progress".split(),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stitches"] == 14 and summary["stitches_between_anchors_in_flops"] == 12
    assert summary["anchor_small"]["mflops"] < summary["anchor_large"]["mflops"]
    for name in ("stitches.png", "predictions.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    rows = json.loads((tmp_path / "stitches.json").read_text())
    assert rows["metric"] == "mIoU" and len(rows["rows"]) == 14


def test_segmentation_data_mistakes_through_the_cli(tmp_path, capsys):
    """Unpaired files, a mask of another size, a class id past the head: one line, exit 2,
    nothing written."""
    from PIL import Image

    def folder(name, mask_size=(16, 16), ids=3):
        root = tmp_path / name
        for sub in ("images", "masks"):
            (root / sub).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(root / "images" / "a.png")
        Image.new("L", mask_size, color=ids).save(root / "masks" / "a.png")
        return root

    lonely = folder("lonely")
    Image.new("RGB", (16, 16)).save(lonely / "images" / "b.png")
    cases = {
        str(lonely): "unpaired",
        str(folder("sizes", mask_size=(8, 8))): "is 8x8 but its image",
        str(folder("ids", ids=9)): "holds class id 9",
    }
    for data, words in cases.items():
        code = main(
            [
                *"train --task seg --mode anchor --anchors".split(),
                SEG_LARGE,
                "--data",
                data,
                "--out",
                str(tmp_path / "run"),
                *"--max-steps 1".split(),
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_closed_pipe_is_not_a_traceback(tmp_path):
    """`stitchops info | true`: the reader is gone before the first line; no BrokenPipeError
    traceback (stitchops takes a second to import, `true` none)."""
    proc = subprocess.run(
        f"{sys.executable} -m stitchops info | true",
        shell=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
