"""Pure-PyTorch implementations: the spec the kernels are tested against, and the CPU path."""

from stitchops.reference.least_squares import least_squares_init
from stitchops.reference.lora import lora_backward, lora_forward, lora_linear

__all__ = ["least_squares_init", "lora_backward", "lora_forward", "lora_linear"]
