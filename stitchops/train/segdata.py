"""Segmentation data: folder readers, joint image-mask augmentation, a generated set.

* ``SegmentationFolder``: the ADE20K layout (``images/{training,validation}/*.jpg`` with
  ``annotations/{training,validation}/*.png`` of class ids, paired by file stem;
  ``reduce_zero_label`` as ADE20K needs, on by default there: 0 "other" and 255 become the
  ignore index 255 and every other id drops by one, as mmseg's ``LoadAnnotations``) or a
  plain one (``images/`` + ``masks/``, no split of its own: ``--val-data`` names the
  evaluation folder). Images of any size and mode (``stitchops.train.images``).
* ``SegAugment``: random resize within a ratio range, random crop padded with the ignore
  label, horizontal flip, photometric jitter; the image and its mask move together. Its
  random draws come from a generator seeded by the run's seed and the draw's number (the
  training loop asks for item ``(index, draw)``), so a resumed run draws what an
  uninterrupted one would.
* ``GeneratedShapes``: a segmentation set made on the fly, deterministic by seed, with no
  files: five object classes of distinct shapes and textures (disc, square, triangle, ring,
  cross) in random colours, sizes and positions, drawn over a textured background (class 0)
  so that later objects occlude earlier ones.

Images are float [3, H, W] in [0, 1] (normalised by ``normalize``); masks int64 [H, W].
Errors about the data are ``DataError``s naming the file and what is expected.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from stitchops.train.images import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    pixel_centres,
    read_image,
    read_label_map,
    shape_mask,
)

ADE20K_SPLITS = {"train": "training", "val": "validation"}


def normalize(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [0, 1] → ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    return (image - mean) / torch.tensor(IMAGENET_STD)[:, None, None]


def _files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder} ({what}) does not exist or is not a folder")
    found = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not found:
        raise DataError(f"{folder} ({what}) holds no image files")
    return found


class SegmentationFolder(torch.utils.data.Dataset):
    """Image-mask pairs of a folder (module docstring); ``split`` "train" or "val".

    ``num_classes``: every mask id must be below it or the ignore index (checked per item,
    and for the whole set by ``scan``).
    """

    def __init__(
        self,
        root,
        split: str = "train",
        layout: str = "ade20k",
        reduce_zero_label: bool | None = None,
        num_classes: int | None = None,
        transform=None,
        seed: int = 0,
    ) -> None:
        root = Path(root)
        if layout == "ade20k":
            if split not in ADE20K_SPLITS:
                raise DataError(f"split must be 'train' or 'val', got {split!r}")
            folder = ADE20K_SPLITS[split]
            images = _files(root / "images" / folder, f"the {folder} split's images")
            masks = _files(root / "annotations" / folder, f"the {folder} split's masks")
            reduce_zero_label = True if reduce_zero_label is None else reduce_zero_label
        elif layout == "plain":
            images, masks = _files(root / "images", "images"), _files(root / "masks", "masks")
            reduce_zero_label = bool(reduce_zero_label)
        else:
            raise DataError(f"layout must be 'ade20k' or 'plain', got {layout!r}")
        lonely = sorted(set(images) ^ set(masks))
        if lonely or not images:
            which = [f"{images.get(n) or masks.get(n)}" for n in lonely[:3]]
            raise DataError(
                f"{root}: every image needs a mask of the same name and the reverse; "
                + (f"unpaired: {', '.join(which)}" if lonely else "no images found")
            )
        self.pairs = [(images[n], masks[n]) for n in sorted(images)]
        self.reduce_zero_label, self.num_classes = reduce_zero_label, num_classes
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[i]
        rgb = read_image(image_path)
        ids = read_label_map(mask_path)
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
        mask = torch.from_numpy(ids.copy())
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise DataError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{image_path} is {image.shape[2]}x{image.shape[1]}"
            )
        self._check_labels(mask, mask_path)
        if self.reduce_zero_label:  # mmseg: 0 → 255, then −1, and 255 stays 255
            ignored = (mask == 0) | (mask == IGNORE_INDEX)
            mask = torch.where(ignored, IGNORE_INDEX, mask - 1)
        return image, mask

    def _check_labels(self, mask: torch.Tensor, path) -> None:
        """The ids as the file stores them: below num_classes (num_classes + 1 with
        reduce_zero_label, whose 0 is ignored), or the ignore index."""
        if self.num_classes is None:
            return
        top = self.num_classes + (1 if self.reduce_zero_label else 0)
        bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= top))
        if bad.any():
            rule = (
                f"1..{self.num_classes} (0 and {IGNORE_INDEX} ignored: reduce_zero_label, "
                "--no-reduce-zero-label to turn it off)"
                if self.reduce_zero_label
                else f"0..{self.num_classes - 1} ({IGNORE_INDEX} ignored)"
            )
            raise DataError(
                f"mask {path} holds class id {int(mask[bad][0])}: the model has "
                f"{self.num_classes} classes, so the file's ids must be in "
                f"{rule}"
            )

    def scan(self) -> None:
        """Read every pair once (before training): DataError naming the first bad file."""
        for i in range(len(self)):
            self._read(i)

    def describe(self) -> str:
        aug = "random resize, crop, flip and jitter" if self.transform else "as they are"
        return f"image-mask pairs of {self.pairs[0][0].parent.parent}, {aug}" + (
            ", zero label ignored" if self.reduce_zero_label else ""
        )

    def __getitem__(self, key):
        """Item ``i``, or ``(i, draw)``: with its augmentation drawn from a generator seeded
        by the dataset's seed and ``draw`` (the training loop's draws, so resuming draws the
        same)."""
        i, draw = key if isinstance(key, tuple) else (key, None)
        image, mask = self._read(i)
        if self.transform is not None:
            g = (
                None
                if draw is None
                else torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
            )
            image, mask = self.transform(image, mask, g)
        return normalize(image), mask


class SegAugment:
    """Random resize (ratio in ``ratio_range`` of ``scale``, aspect kept), random crop of
    ``crop`` × ``crop`` padded with 0 / the ignore label, horizontal flip, photometric jitter
    (brightness, contrast, saturation). Called as ``(image, mask) → (image, mask)``."""

    def __init__(
        self,
        crop: int,
        scale: int | None = None,
        ratio_range=(0.5, 2.0),
        flip: float = 0.5,
        jitter: float = 0.2,
        generator=None,
    ) -> None:
        if crop < 1:
            raise ValueError(f"crop must be >= 1, got {crop}")
        self.crop, self.scale, self.ratio_range = crop, scale or crop, ratio_range
        self.flip, self.jitter = flip, jitter
        self.generator = generator or torch.Generator().manual_seed(0)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, generator=None):
        """One draw, from ``generator`` (default: this augmentation's own)."""
        g = generator or self.generator

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * torch.rand((), generator=g).item()

        h, w = image.shape[-2:]
        factor = uniform(*self.ratio_range) * self.scale / max(h, w)
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        pad_h, pad_w = max(self.crop - size[0], 0), max(self.crop - size[1], 0)
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(uniform(0, image.shape[1] - self.crop + 1 - 1e-9))
        left = int(uniform(0, image.shape[2] - self.crop + 1 - 1e-9))
        image = image[:, top : top + self.crop, left : left + self.crop]
        mask = mask[top : top + self.crop, left : left + self.crop]
        if uniform(0, 1) < self.flip:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.jitter:
            j = self.jitter
            image = image * uniform(1 - j, 1 + j)  # brightness
            mean = image.mean()
            image = (image - mean) * uniform(1 - j, 1 + j) + mean  # contrast
            gray = image.mean(0, keepdim=True)
            image = (image - gray) * uniform(1 - j, 1 + j) + gray  # saturation
            image = image.clamp(0, 1)
        return image, mask


SHAPE_CLASSES = ("background", "disc", "square", "triangle", "ring", "cross")


class GeneratedShapes(torch.utils.data.Dataset):
    """``length`` generated images of ``size`` × ``size`` (module docstring); item i is the
    same for every run with the same ``seed``. Six classes: background and five shapes."""

    classes = SHAPE_CLASSES

    def __init__(
        self, length: int = 256, size: int = 64, seed: int = 0, max_objects: int = 4, transform=None
    ) -> None:
        if length < 1 or size < 8:
            raise ValueError(f"length must be >= 1 and size >= 8, got {length}, {size}")
        self.length, self.size, self.seed, self.max_objects = length, size, seed, max_objects
        self.transform = transform
        self.ys, self.xs = pixel_centres(size)

    def __len__(self) -> int:
        return self.length

    def describe(self) -> str:
        return (
            f"generated shapes, {self.size}x{self.size}, {len(self.classes)} classes, "
            f"seed {self.seed}"
        )

    def _shape(self, kind: int, cy: float, cx: float, r: float, angle: float) -> torch.Tensor:
        return shape_mask(kind, cy, cx, r, angle, self.ys, self.xs)

    def _texture(self, kind: int, g: torch.Generator) -> torch.Tensor:
        """A [size, size] pattern in [0, 1], one family per class: stripes, checks, dots..."""
        f = 2 * math.pi / (3 + 4 * torch.rand((), generator=g).item())
        y, x = self.ys, self.xs
        patterns = {
            0: 0.5 + 0.15 * torch.sin(f * 0.5 * (x + y)),  # background: slow waves
            1: 0.5 + 0.5 * torch.sin(f * x),  # disc: vertical stripes
            2: ((torch.floor(x * f) + torch.floor(y * f)) % 2).float(),  # square: checks
            3: 0.5 + 0.5 * torch.sin(f * (x - y)),  # triangle: diagonal stripes
            4: (torch.sin(f * x) * torch.sin(f * y) > 0.3).float(),  # ring: dots
            5: torch.ones_like(x),  # cross: flat
        }
        return patterns[kind]

    def __getitem__(self, i):
        i = i[0] if isinstance(i, tuple) else i  # a training draw: the images are fixed
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} images")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        rand = lambda: torch.rand((), generator=g).item()  # noqa: E731
        base = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.25
        image = base * (0.7 + 0.3 * self._texture(0, g)) + 0.05 * torch.randn(
            3, self.size, self.size, generator=g
        )
        mask = torch.zeros(self.size, self.size, dtype=torch.int64)
        for _ in range(1 + int(rand() * self.max_objects)):
            kind = 1 + int(rand() * 5)
            r = self.size * (0.1 + 0.18 * rand())
            region = self._shape(kind, rand() * self.size, rand() * self.size, r, rand() * math.pi)
            colour = torch.rand(3, 1, 1, generator=g)
            pattern = self._texture(kind, g)
            fill = colour * (0.45 + 0.55 * pattern) + (1 - colour) * 0.1 * (1 - pattern)
            image = torch.where(region, fill, image)
            mask[region] = kind
        image = image.clamp(0, 1)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return normalize(image), mask


def has_split(data: str) -> bool:
    """Whether ``data`` holds a validation split of its own (the generated shapes and the
    ADE20K layout do; a plain ``images/`` + ``masks/`` folder does not)."""
    return data == "shapes" or (Path(data) / "images" / "training").is_dir()


def load_seg_dataset(
    data: str,
    split: str,
    model_cfg,
    num_classes: int,
    seed: int = 0,
    reduce_zero_label: bool | None = None,
    scan: bool = True,
):
    """``"shapes"`` (generated: 512 training and 128 validation images at the model's
    img_size, disjoint seeds) or a folder (ADE20K layout if it has ``images/training``, else
    ``images/`` + ``masks/``, the whole folder for either split; training crops of img_size
    with ``SegAugment``). ``reduce_zero_label``: None for the layout's default (ADE20K on,
    plain off). Checked now: RGB input, the classes against ``num_classes``, every pair
    readable (``scan``)."""
    if model_cfg.in_chans != 3:
        raise DataError(
            f"segmentation images are RGB but the model takes in_chans={model_cfg.in_chans}: "
            "add in_chans=3 to the model spec"
        )
    if data == "shapes":
        classes = len(GeneratedShapes.classes)
        if num_classes != classes:
            raise DataError(
                f"the shapes data has {classes} classes but the model's head has {num_classes} "
                f"outputs: add num_classes={classes} to the model spec"
            )
        length = 512 if split == "train" else 128
        return GeneratedShapes(length, model_cfg.img_size, seed=2 * seed + (split != "train"))
    root = Path(data)
    layout = "ade20k" if (root / "images" / "training").is_dir() else "plain"
    transform = SegAugment(model_cfg.img_size, generator=torch.Generator().manual_seed(seed))
    dataset = SegmentationFolder(
        root,
        split if layout == "ade20k" else "train",
        layout,
        reduce_zero_label=reduce_zero_label,
        num_classes=num_classes,
        transform=transform if split == "train" else None,
        seed=seed,
    )
    if scan:
        dataset.scan()
    return dataset
