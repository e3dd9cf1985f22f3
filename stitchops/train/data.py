"""Datasets for training and evaluation: scikit-learn's bundled digits, or an image folder.

* ``digits``: 1,797 grayscale 8×8 images of 10 digits shipped inside scikit-learn (no
  download), split 80/20 into train/val with a fixed permutation.
* ``shapes-cls``: generated grayscale 8×8 images of one shape each (disc, square, triangle,
  ring, cross; random centre, size and rotation, noise), 2,000 train / 500 val: a second
  small task in the digits' format, the downstream task of ``stitchops demo spt``.
* An ImageFolder-layout folder ``root/<class>/<image>`` (or ``root/train/<class>/...`` and
  ``root/val/<class>/...``), read with Pillow, resized to the model's image size and
  normalised with ImageNet's mean and std.

Errors about the data (missing, empty or unreadable folder, unreadable image) are
``DataError``s that name the path and say what is expected.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stitchops.train.images import (
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    pixel_centres,
    read_image,
    shape_mask,
)

__all__ = [
    "DataError",
    "ImageFolder",
    "TensorDataset",
    "load_dataset",
    "load_digits",
    "load_shapes_cls",
]


class TensorDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def load_digits(split: str) -> TensorDataset:
    """scikit-learn's digits as [N, 1, 8, 8] float32 (standardised) and int64 labels."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise DataError(
            "the digits data needs scikit-learn, a dependency of stitchops: "
            "pip install scikit-learn"
        ) from exc
    bunch = _load()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    images = (images - 0.3) / 0.4
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(labels))
    index = order[:cut] if split == "train" else order[cut:]
    return TensorDataset(images[index], labels[index], [str(c) for c in range(10)])


SHAPE_NAMES = ("disc", "square", "triangle", "ring", "cross")


def load_shapes_cls(split: str) -> TensorDataset:
    """The ``shapes-cls`` task as [N, 1, 8, 8] float32 (standardised) and int64 labels; the
    same images on every run (seeded per split)."""
    count, seed = (2000, 11) if split == "train" else (500, 12)
    g = torch.Generator().manual_seed(seed)
    ys, xs = pixel_centres(8)
    labels = torch.randint(0, len(SHAPE_NAMES), (count,), generator=g)
    images = torch.empty(count, 1, 8, 8)
    for i, label in enumerate(labels.tolist()):
        cy, cx = (3.0 + 2 * torch.rand(2, generator=g)).tolist()
        radius = 2.6 + 0.9 * torch.rand((), generator=g).item()
        angle = 3.1416 * torch.rand((), generator=g).item()
        mask = shape_mask(label + 1, cy, cx, radius, angle, ys, xs).float()
        images[i, 0] = mask + 0.1 * torch.randn(8, 8, generator=g)
    images = (images - 0.3) / 0.5
    return TensorDataset(images, labels, list(SHAPE_NAMES))


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/<image>`` read with Pillow, resized to ``img_size``, normalised."""

    def __init__(self, root, img_size: int, in_chans: int = 3) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist or is not a folder")
        try:
            classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        except OSError as exc:
            raise DataError(f"cannot read the data folder {root}: {exc}") from exc
        if not classes:
            raise DataError(
                f"data folder {root} has no class sub-folders: expected ImageFolder layout, "
                f"{root}/<class name>/<image file>"
            )
        self.samples = []
        for label, name in enumerate(classes):
            try:
                files = sorted(os.listdir(root / name))
            except OSError as exc:
                raise DataError(f"cannot read {root / name}: {exc}") from exc
            self.samples += [
                (root / name / f, label) for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES
            ]
        if not self.samples:
            raise DataError(
                f"data folder {root} has class folders but no image files "
                f"({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        self.classes, self.img_size, self.in_chans = classes, img_size, in_chans

    def __len__(self) -> int:
        return len(self.samples)

    def scan(self) -> str:
        """Open every image's header (fast: no pixels decoded); DataError naming the first
        unreadable one. Returns the resize policy in words: sizes found → the model's input."""
        from PIL import Image, UnidentifiedImageError

        sizes, modes = set(), set()
        for path, _ in self.samples:
            try:
                with Image.open(path) as img:
                    sizes.add(img.size)
                    modes.add(img.mode)
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"cannot read image {path}: {exc}; remove or replace it") from exc
            if img.mode in ("I", "F"):
                read_image(path)  # the reason such an image is refused
        found = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3]) + (
            f" and {len(sizes) - 3} more sizes" if len(sizes) > 3 else ""
        )
        target = "RGB" if self.in_chans == 3 else "grayscale"
        return (
            f"images of {found} ({'/'.join(sorted(modes))}) are resized to "
            f"{self.img_size}x{self.img_size} {target}, the model's img_size and "
            "in_chans"
        )

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        pixels = read_image(path, 3 if self.in_chans == 3 else 1)
        img = Image.fromarray(pixels if self.in_chans == 3 else pixels[..., 0])
        img = img.resize((self.img_size, self.img_size), Image.BILINEAR)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        x = data.reshape(self.img_size, self.img_size, -1).permute(2, 0, 1).float() / 255
        if self.in_chans == 3:
            mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
            x = (x - mean) / torch.tensor(IMAGENET_STD)[:, None, None]
        else:
            x = (x - 0.5) / 0.25
        return x, label


def load_dataset(data: str, split: str, img_size: int, in_chans: int):
    """``"digits"``, ``"shapes-cls"`` or a folder; a folder with train/ and val/ sub-folders
    is split by them, otherwise the same folder serves both splits."""
    if data in ("digits", "shapes-cls"):
        if img_size != 8 or in_chans != 1:
            raise DataError(
                f"the {data} data are 1-channel 8x8 images; the model expects "
                f"{in_chans}-channel {img_size}x{img_size}"
            )
        return load_digits(split) if data == "digits" else load_shapes_cls(split)
    root = Path(data)
    if (root / split).is_dir():
        root = root / split
    return ImageFolder(root, img_size, in_chans)
