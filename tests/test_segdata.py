"""Segmentation data: ADE20K / plain folder readers, joint augmentation, the generated set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stitchops.train.data import DataError
from stitchops.train.segdata import IGNORE_INDEX, GeneratedShapes, SegAugment, SegmentationFolder


def _write(root: Path, images: str, masks: str, names, size=(12, 10), mask_size=None):
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / masks).mkdir(parents=True, exist_ok=True)
    w, h = size
    for k, name in enumerate(names):
        Image.fromarray(np.full((h, w, 3), 40 * k, dtype=np.uint8)).save(
            root / images / f"{name}.jpg"
        )
        mw, mh = mask_size or size
        ids = (np.arange(mh * mw).reshape(mh, mw) % 4).astype(np.uint8)  # ids 0..3
        Image.fromarray(ids, mode="L").save(root / masks / f"{name}.png")


def test_ade20k_layout_with_reduce_zero_label(tmp_path):
    _write(tmp_path, "images/training", "annotations/training", ["a", "b"])
    data = SegmentationFolder(tmp_path, "train", num_classes=3)
    assert len(data) == 2
    image, mask = data[0]
    assert image.shape == (3, 10, 12) and mask.shape == (10, 12) and mask.dtype == torch.int64
    raw = torch.arange(120).reshape(10, 12) % 4
    want = torch.where(raw == 0, torch.tensor(IGNORE_INDEX), raw - 1)  # 0 → ignore, k → k − 1
    assert torch.equal(mask, want)
    data.scan()


def test_plain_layout_keeps_ids(tmp_path):
    _write(tmp_path, "images", "masks", ["x"])
    _, mask = SegmentationFolder(tmp_path, layout="plain", num_classes=4)[0]
    assert torch.equal(mask, torch.arange(120).reshape(10, 12) % 4)


def test_folder_bad_input(tmp_path):
    _write(tmp_path / "lonely", "images", "masks", ["a", "b"])
    (tmp_path / "lonely" / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"unpaired: .*b\.jpg"):
        SegmentationFolder(tmp_path / "lonely", layout="plain")
    _write(tmp_path / "sizes", "images", "masks", ["a"], mask_size=(8, 8))
    with pytest.raises(DataError, match=r"mask .*a\.png is 8x8 but its image .*a\.jpg is 12x10"):
        SegmentationFolder(tmp_path / "sizes", layout="plain")[0]
    _write(tmp_path / "ids", "images", "masks", ["a"])
    ids_rule = r"holds class id 3: the model has 3 classes, so the file.s ids must be in 0\.\.2"
    with pytest.raises(DataError, match=ids_rule):
        SegmentationFolder(tmp_path / "ids", layout="plain", num_classes=3).scan()
    with pytest.raises(DataError, match="does not exist"):
        SegmentationFolder(tmp_path / "none")
    with pytest.raises(DataError, match="layout must be"):
        SegmentationFolder(tmp_path / "ids", layout="coco")


def test_augment_moves_image_and_mask_together():
    mask = torch.randint(0, 5, (20, 30))
    image = (mask.float() / 10)[None].repeat(3, 1, 1)
    aug = SegAugment(crop=16, scale=30, ratio_range=(1.0, 1.0), flip=1.0, jitter=0.0)
    for _ in range(5):
        img, m = aug(image, mask)
        assert img.shape == (3, 16, 16) and m.shape == (16, 16)
        assert torch.allclose(img[0] * 10, m.float(), atol=1e-5)  # same crop, same flip
    small = SegAugment(crop=16, scale=8, ratio_range=(1.0, 1.0), flip=0.0, jitter=0.0)
    img, m = small(image, mask)  # 8x12 after resize: padded to 16x16
    assert (m[8:] == IGNORE_INDEX).all() and (m[:, 12:] == IGNORE_INDEX).all()
    assert (img[:, 8:] == 0).all()
    jittered, _ = SegAugment(crop=16, jitter=0.4)(image, mask)
    assert jittered.min() >= 0 and jittered.max() <= 1


def test_generated_shapes_are_deterministic_and_varied():
    a, b = GeneratedShapes(16, size=32, seed=3), GeneratedShapes(16, size=32, seed=3)
    x, m = a[5]
    assert x.shape == (3, 32, 32) and m.shape == (32, 32)
    assert torch.equal(x, b[5][0]) and torch.equal(m, b[5][1])
    assert not torch.equal(m, GeneratedShapes(16, size=32, seed=4)[5][1])
    seen = torch.cat([a[i][1].flatten() for i in range(16)]).unique().tolist()
    assert seen == list(range(len(GeneratedShapes.classes)))  # every class appears
    with pytest.raises(IndexError):
        a[16]
