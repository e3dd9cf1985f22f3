"""stitchops: fast, exact kernels for stitched, expedited and sparse-tuned vision transformers.

The ops (each with a torch reference, Triton and CUDA kernels, ``torch.library``
registration and autograd) and backend control are this module's names (``__all__``;
docs/api.md lists every public name with its arguments). The layers above load at first
use: ``stitchops.nn`` (drop-in modules), ``stitchops.models`` (ViTs, stitched ViTs,
segmentation models), ``stitchops.train`` (training and evaluation), ``stitchops.spt``
(sensitivity-aware sparse tuning).

Importing ``stitchops`` registers the ops (``torch.ops.stitchops.*``) and loads nothing
above them (module ``__getattr__``). Nothing imports triton or the compiled extension at
import time either: a missing backend is a reason reported by ``available_backends()``.
"""

from __future__ import annotations

import importlib

from stitchops._dispatch import BACKENDS, BackendUnavailableError, available_backends, use_backend
from stitchops.ops.focus_attention import FocusOutput, focus_attention
from stitchops.ops.head_mixed_conv import head_mixed_conv
from stitchops.ops.least_squares import least_squares_init
from stitchops.ops.lora import lora_linear
from stitchops.ops.sparse_delta import sparse_delta_linear
from stitchops.ops.token_cluster import token_cluster, token_reconstruct

__version__ = "0.1.0"

# Names of the upper layers, loaded on first access: name -> (module, attribute or None).
_LAZY = {
    "nn": ("stitchops.nn", None),
    "models": ("stitchops.models", None),
    "train": ("stitchops.train", None),
    "spt": ("stitchops.spt", None),
    "pi_resize_patch_embed": ("stitchops.models.flexi", "pi_resize_patch_embed"),
    "eval_stitches": ("stitchops.train.evaluate", "eval_stitches"),
}

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FocusOutput",
    "available_backends",
    "eval_stitches",
    "focus_attention",
    "head_mixed_conv",
    "least_squares_init",
    "lora_linear",
    "models",
    "nn",
    "pi_resize_patch_embed",
    "sparse_delta_linear",
    "spt",
    "token_cluster",
    "token_reconstruct",
    "train",
    "use_backend",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'stitchops' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
