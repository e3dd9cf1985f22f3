"""stitchops: fast, exact kernels for stitched, expedited and sparse-tuned vision transformers.

Public API (this release):
  lora_linear(x, weight, bias, lora_a, lora_b, scale, extra_bias)   fused stitching projection
  least_squares_init(x_src, x_dst, ridge)                           SN-Net least-squares init
  nn.StitchingLayer                                                 drop-in nn.Linear
  use_backend(name), available_backends()                           backend control

Nothing here imports triton or the compiled extension at import time: a missing backend is a
reason reported by ``available_backends()``, never an import error.
"""

from stitchops import nn
from stitchops._dispatch import BACKENDS, BackendUnavailableError, available_backends, use_backend
from stitchops.ops.least_squares import least_squares_init
from stitchops.ops.lora import lora_linear

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "least_squares_init",
    "lora_linear",
    "nn",
    "use_backend",
]
