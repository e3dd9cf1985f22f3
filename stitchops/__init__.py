"""stitchops: fast, exact kernels for stitched, expedited and sparse-tuned vision transformers.

Public API (this release):
  lora_linear(x, weight, bias, lora_a, lora_b, scale, extra_bias)   fused stitching projection
  least_squares_init(x_src, x_dst, ridge)                           SN-Net least-squares init
  nn.StitchingLayer                                                 drop-in nn.Linear
  use_backend(name), available_backends()                           backend control
  models.VisionTransformer, models.StitchedViT                      ViT and stitched ViTs
  pi_resize_patch_embed(weight, patch_size)                         FlexiViT PI-resize
  eval_stitches(model, loader)                                      every stitch, Pareto front

Nothing here imports triton or the compiled extension at import time: a missing backend is a
reason reported by ``available_backends()``, never an import error.
"""

from stitchops import models, nn
from stitchops._dispatch import BACKENDS, BackendUnavailableError, available_backends, use_backend
from stitchops.models.flexi import pi_resize_patch_embed
from stitchops.ops.least_squares import least_squares_init
from stitchops.ops.lora import lora_linear
from stitchops.train.evaluate import eval_stitches

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "eval_stitches",
    "least_squares_init",
    "lora_linear",
    "models",
    "nn",
    "pi_resize_patch_embed",
    "use_backend",
]
