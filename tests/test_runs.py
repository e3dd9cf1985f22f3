"""A user's run is never lost: Ctrl-C saves and ``--resume`` continues bit for bit (cls, seg
with augmentation, SPT), a second run into a folder is refused, data as users keep it
(images of any size, ADE20K's masks, 16-bit images), every checkpoint evaluates."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import assert_same_tensors, tensors

from stitchops.cli import main
from stitchops.train.images import read_image

ROOT = Path(__file__).resolve().parents[1]
CLS = "vit_small_test:embed_dim=16,depth=2,num_heads=2"
SEG = (
    "vit_small_test:img_size=32,patch_size=8,in_chans=3,num_classes=4,embed_dim=16,depth=2,"
    "num_heads=2"
)


def cli(*args: str) -> subprocess.Popen:
    """``stitchops`` in a fresh process (its own signals), output captured."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "stitchops", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def logged_steps(folder: Path) -> int:
    log = folder / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def interrupt_at(args: list[str], folder: Path, step: int) -> tuple[int, str, str]:
    """Run ``stitchops train`` and send SIGINT once ``step`` steps are logged."""
    proc = cli("train", *args, "--out", str(folder), "--no-progress")
    deadline = time.time() + 300
    while logged_steps(folder) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def ade20k_folder(root: Path, sizes=((40, 48), (48, 40), (44, 44)), val=((683, 512),)) -> Path:
    """An ADE20K-layout folder: RGB images, masks of ids 1..4 with 0 ("other") and 255
    (ignored) pixels."""
    rng = np.random.default_rng(0)
    for split, shapes in (("training", sizes), ("validation", val)):
        for i, (w, h) in enumerate(shapes):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{i}.jpg"
            )
            mask = rng.integers(1, 5, (h, w), dtype=np.uint8)
            mask[: h // 4] = 0
            mask[-3:] = 255
            Image.fromarray(mask).save(root / "annotations" / split / f"{i}.png")
    return root


MODES = {
    "cls": ["--mode", "anchor", "--anchors", CLS, "--epochs", "2", "--batch-size", "64"],
    "spt": [
        *"--mode spt --anchors".split(),
        CLS,
        *"--budget 300 --spt-batches 2 --epochs 2 --batch-size 64".split(),
    ],
    "seg": [
        *"--mode anchor --task seg --anchors".split(),
        SEG,
        *"--epochs 6 --batch-size 1".split(),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_ctrl_c_then_resume_equals_a_straight_run(mode, tmp_path):
    """SIGINT at a random step: exit 130, one line saying how to resume, no traceback; then
    --resume (in the checkpoint's folder) gives the straight run's tensors bit for bit."""
    args = list(MODES[mode])
    if mode == "seg":
        args += ["--data", str(ade20k_folder(tmp_path / "ade"))]
    if mode == "spt":
        weights = tmp_path / "pretrained.safetensors"
        assert (
            main(
                [
                    *"train --mode anchor --anchors".split(),
                    CLS,
                    *"--max-steps 1 --out".split(),
                    str(tmp_path / "pre"),
                    "--no-progress",
                ]
            )
            == 0
        )
        from safetensors.torch import save_file

        from stitchops.train import load_trained

        model, _ = load_trained(tmp_path / "pre" / "checkpoint.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        args += ["--anchor-weights", str(weights)]
    straight = cli("train", *args, "--out", str(tmp_path / "straight"), "--no-progress")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    total = logged_steps(tmp_path / "straight")
    stop = random.Random(mode).randint(1, total - 2)
    code, out, err = interrupt_at(args, tmp_path / "run", stop)
    assert code == 130, err
    assert "Traceback" not in err + out
    line = [x for x in out.splitlines() if x.startswith("interrupted after step")]
    assert len(line) == 1 and "stitchops train --resume" in line[0], out
    checkpoint = tmp_path / "run" / "checkpoint.safetensors"
    assert tensors(checkpoint)[1]["step"] < total
    resumed = cli("train", "--resume", str(checkpoint), "--no-progress")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    (a, meta_a), (b, meta_b) = (
        tensors(tmp_path / "straight" / "checkpoint.safetensors"),
        tensors(checkpoint),
    )
    assert meta_a["step"] == meta_b["step"] == total
    assert_same_tensors(a, b)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    first = [
        *"train --mode anchor --anchors".split(),
        CLS,
        *"--max-steps 2 --out".split(),
        str(run),
        "--no-progress",
    ]
    assert main(first) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main([*first[:-3], "--max-steps", "1", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0], err
    assert "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert main([*first, "--overwrite"]) == 0
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # started over, not appended


def test_resume_continues_in_the_checkpoints_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert (
        main(
            [
                *"train --mode anchor --anchors".split(),
                CLS,
                *"--max-steps 1 --out".split(),
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    monkeypatch.chdir(tmp_path)  # a default folder here would be runs/stitchops
    assert (
        main(
            [
                *"train --resume".split(),
                str(run / "checkpoint.safetensors"),
                *"--max-steps 2 --no-progress".split(),
            ]
        )
        == 0
    )
    assert tensors(run / "checkpoint.safetensors")[1]["step"] == 2
    assert not (tmp_path / "runs").exists()


def test_ade20k_folder_with_a_683x512_image_and_255_labels_trains_and_evaluates(tmp_path, capsys):
    """ADE20K's image size (not a multiple of the patch), reduce_zero_label keeping 255 as
    ignored; whole-image evaluation pads to the patch grid; sliding windows of any crop."""
    data = ade20k_folder(tmp_path / "ade")
    run = tmp_path / "run"
    assert (
        main(
            [
                *"train --mode anchor --task seg --anchors".split(),
                SEG,
                "--data",
                str(data),
                *"--max-steps 2 --batch-size 1 --out".split(),
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "validation mIoU" in out and "zero label ignored" in out
    checkpoint = str(run / "checkpoint.safetensors")
    assert main(["eval", checkpoint, "--no-progress", "--latency-repeats", "1"]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert (
        main(
            [
                "eval",
                checkpoint,
                *"--no-progress --latency-repeats 1 --crop 32 --stride 24 --out".split(),
                str(tmp_path / "slide"),
            ]
        )
        == 0
    )


def test_mask_ids_are_named_as_the_file_holds_them(tmp_path, capsys):
    data = ade20k_folder(tmp_path / "ade", sizes=((40, 40),))
    mask = np.array(Image.open(data / "annotations" / "training" / "0.png"))
    mask[5, 5] = 9
    Image.fromarray(mask).save(data / "annotations" / "training" / "0.png")
    args = [
        *"train --mode anchor --task seg --anchors".split(),
        SEG,
        "--data",
        str(data),
        *"--max-steps 1 --batch-size 1 --out".split(),
        str(tmp_path / "r"),
        "--no-progress",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds class id 9" in err and "1..4" in err and "--no-reduce-zero-label" in err
    assert main([*args, "--no-reduce-zero-label"]) == 2  # 4 is now out of range too
    assert "0..3" in capsys.readouterr().err


def test_sixteen_bit_and_palette_images_are_read_faithfully(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    deep = Image.fromarray(ramp)
    assert deep.mode == "I;16"
    deep.save(tmp_path / "deep.png")
    rgb = read_image(tmp_path / "deep.png")
    assert rgb.shape == (8, 8, 3) and rgb.max() < 255 and rgb.min() == 0  # not all white
    assert rgb[7, 7, 0] == round(63000 * 255 / 65535)
    palette = Image.new("P", (2, 2))
    palette.putdata([0, 1, 1, 0])
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png")[0, 1].tolist() == [0, 0, 255]
    floats = Image.fromarray(np.ones((4, 4), dtype=np.float32))
    floats.save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"floating-point image .* convert it"):
        read_image(tmp_path / "f.tiff")


def test_every_checkpoint_evaluates(tmp_path, capsys):
    """An anchor's checkpoint, SPT's training checkpoint and its merged weights (with the
    model spec): each gives a one-row table; training printed its validation figure."""
    anchor = tmp_path / "anchor"
    assert (
        main(
            [
                *"train --mode anchor --anchors".split(),
                CLS,
                *"--max-steps 2 --out".split(),
                str(anchor),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "validation accuracy" in capsys.readouterr().out
    assert (
        main(
            [
                "eval",
                str(anchor / "checkpoint.safetensors"),
                "--no-progress",
                "--latency-repeats",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "CPU thread" in out and "acc %" in out
    from safetensors.torch import save_file

    from stitchops.train import load_trained

    model, _ = load_trained(anchor / "checkpoint.safetensors")
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    spt = tmp_path / "spt"
    assert (
        main(
            [
                *"train --mode spt --anchors".split(),
                CLS,
                "--anchor-weights",
                str(weights),
                *"--budget 300 --spt-batches 2 --max-steps 2 --out".split(),
                str(spt),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            ["eval", str(spt / "checkpoint.safetensors"), "--no-progress", "--latency-repeats", "1"]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                str(spt / "merged.safetensors"),
                "--model",
                CLS,
                *"--data digits --no-progress --latency-repeats 1 --out".split(),
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "m" / "stitches.json").read_text())["rows"]
    assert len(rows) == 1 and 0 <= rows[0]["accuracy"] <= 1


def test_ignored_options_are_said_in_one_line(tmp_path, capsys):
    assert (
        main(
            [
                *"train --mode anchor --anchors".split(),
                CLS,
                *"--max-steps 1 --out".split(),
                str(tmp_path / "r"),
                *"--faseg queries=4 --sampler ros --no-progress".split(),
            ]
        )
        == 0
    )
    err = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(err) == 1 and "--sampler" in err[0] and "--decoder-options" in err[0], err


def test_help_lists_every_demo(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for demo in ("demo seg", "demo spt", "demo expedit", "demo faseg"):
        assert demo in text


def test_an_images_and_masks_folder_warns_that_it_evaluates_its_training_images(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for kind in ("images", "masks"):
        (tmp_path / "plain" / kind).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "plain" / "images" / f"{i}.png"
        )
        Image.fromarray(rng.integers(0, 4, (32, 32), dtype=np.uint8)).save(
            tmp_path / "plain" / "masks" / f"{i}.png"
        )
    assert (
        main(
            [
                *"train --mode anchor --task seg --anchors".split(),
                SEG,
                "--data",
                str(tmp_path / "plain"),
                *"--max-steps 1 --batch-size 1 --out".split(),
                str(tmp_path / "r"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "--val-data" in capsys.readouterr().out
    torch.manual_seed(0)
