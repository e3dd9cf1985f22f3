"""What every data reader shares: the error type, the constants, reading image and label
files as users keep them, and the generated shapes' drawing (a leaf module: it imports no
other data module).

Images are read into RGB (or grayscale) uint8 whatever the file holds: 8-bit modes through
Pillow's conversion (palette images by their colours), 16-bit grayscale (PNG ``I;16``,
medical and depth images) scaled by 255/65535 instead of clipped to white, 32-bit integer
and float images refused with the reason. Label maps (segmentation masks) are read as the
class ids they store: 8-bit grayscale, palette indices (VOC-style masks) or 16-bit values.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IGNORE_INDEX = 255  # the segmentation label no loss or metric counts
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L")
LABEL_MODES = ("L", "P", *SIXTEEN_BIT, "I")


class DataError(ValueError):
    """The training or evaluation data cannot be used (the message says why)."""


def read_image(path: Path, channels: int = 3) -> np.ndarray:
    """[H, W, channels] uint8 of an image file (module docstring); DataError naming the file
    when it cannot be read or its mode cannot be shown faithfully."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in SIXTEEN_BIT:
                gray = np.asarray(img, dtype=np.uint16).astype(np.float32) * (255.0 / 65535.0)
                gray = np.round(gray).astype(np.uint8)
                return np.repeat(gray[..., None], channels, axis=-1)
            if mode in ("I", "F"):
                kind = "32-bit integer" if mode == "I" else "floating-point"
                raise DataError(
                    f"image {path} is a {kind} image (mode {mode}), whose value "
                    "range is unknown: convert it to 8 or 16 bits"
                )
            converted = img.convert("RGB" if channels == 3 else "L")
            data = np.asarray(converted, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return data if channels == 3 else data[..., None]


def read_label_map(path: Path) -> np.ndarray:
    """[H, W] int64 class ids of a mask file (grayscale, palette indices or 16-bit values);
    DataError naming the file for colour masks or unreadable files."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as m:
            if m.mode not in LABEL_MODES:
                raise DataError(
                    f"mask {path} is {m.mode}, not a map of class ids (grayscale, "
                    "palette or 16-bit)"
                )
            return np.asarray(m, dtype=np.int64)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read mask {path}: {exc}") from exc


def shape_mask(
    kind: int, cy: float, cx: float, r: float, angle: float, ys: torch.Tensor, xs: torch.Tensor
) -> torch.Tensor:
    """bool [size, size]: one of the generated shapes (1 disc, 2 square, 3 triangle, 4 ring,
    5 cross) of radius ``r`` centred at (cy, cx), rotated by ``angle``, over the pixel
    centres ``ys``, ``xs``."""
    dy, dx = ys - cy, xs - cx
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    dist = torch.sqrt(dx**2 + dy**2)
    if kind == 1:  # disc
        return dist <= r
    if kind == 2:  # square
        return (u.abs() <= r * 0.8) & (v.abs() <= r * 0.8)
    if kind == 3:  # triangle
        return (v <= r * 0.5) & (v >= -r + 2 * u.abs() * 0.9)
    if kind == 4:  # ring
        return (dist <= r) & (dist >= r * 0.55)
    return ((u.abs() <= r * 0.3) & (v.abs() <= r)) | ((v.abs() <= r * 0.3) & (u.abs() <= r))


def pixel_centres(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ys, xs) [size, size]: the pixel centres of a square image."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ys.float() + 0.5, xs.float() + 0.5
