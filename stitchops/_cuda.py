"""Thin Python side of the CUDA backend (``stitchops._C``), imported only when chosen."""

from __future__ import annotations

import contextlib

import torch

from stitchops import _memory

try:
    from stitchops import _C
except ImportError:  # the dispatcher reports why (cuda_extension_missing_reason)
    _C = None


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device)


def lora_forward(x, weight, bias, lora_a, lora_b, scale, extra_bias, save_s):
    _C.set_poison_outputs(_memory.poisoning())
    with _device_guard(x):
        y, s = _C.lora_forward(
            x, weight, bias, lora_a, lora_b, scale, extra_bias, save_s, _stream(x)
        )
    return y, s


def lora_backward(grad_y, x, weight, lora_a, lora_b, s, scale, need_x, need_weight, need_a,
                  need_b, need_bias):  # fmt: skip
    _C.set_poison_outputs(_memory.poisoning())
    needed = (need_x, need_weight, need_a, need_b, need_bias)
    with _device_guard(x):
        grads = _C.lora_backward(
            grad_y, x, weight, lora_a, lora_b, s, scale,
            need_x, need_weight, need_a, need_b, need_bias, _stream(x),
        )  # fmt: skip
    return tuple(g if want else None for g, want in zip(grads, needed, strict=True))


@contextlib.contextmanager
def pinned_column_tiles(tiles: int):
    """Inside this ``with`` block, every CUDA forward covers ``tiles`` output column tiles
    per thread block (csrc/lora.h, ``column_tiles``); on exit the pin it replaced is back
    (blocks nest; outside every block the choice is per call).

    Per call, the binding chooses (csrc/binding.cpp, ``forward_column_tiles``). Tests pin
    it so that small shapes exercise the column groups too; benchmarks, to compare counts.
    """
    outer = _C.pin_column_tiles(tiles)
    try:
        yield
    finally:
        _C.pin_column_tiles(outer)
