"""``StitchingLayer``: the stitching layer of SN-Net, SN-Netv2 (LoRA SL) and ESTA.

    y = x · Wᵀ + b + b_s[active_stitch] + (alpha / r) · (x · Aᵀ) · Bᵀ

* rank = 0: a trainable linear layer (SN-Net), a drop-in for ``nn.Linear``.
* rank > 0: W frozen after least-squares init, b trains, A [r, IN] Kaiming-uniform like
  ``nn.Linear``'s weight, B [OUT, r] zeros, scale alpha / r (SN-Netv2 Sec. 4.3, peft init).
* num_stitch_biases > 0: a [num, OUT] table of per-stitch biases b_s (ESTA), one row added
  for the stitch in ``active_stitch`` (None adds none).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stitchops.ops import _checks
from stitchops.ops.least_squares import least_squares_init
from stitchops.ops.lora import lora_linear

MERGED_KEY = "lora_merged"


def _save_merged_flag(module, state_dict, prefix, local_metadata):
    if module.rank > 0:
        state_dict[prefix + MERGED_KEY] = torch.tensor(module.merged)


def _load_merged_flag(module, state_dict, prefix, *args):
    flag = state_dict.pop(prefix + MERGED_KEY, None)
    if module.rank > 0:
        module.merged = bool(flag) if flag is not None else False


class StitchingLayer(nn.Module):
    """Linear stitching layer with optional LoRA update and per-stitch biases.

    Parameters keep ``nn.Linear``'s names (``weight`` [OUT, IN], ``bias`` [OUT]), so an
    ``nn.Linear`` state dict loads into a rank-0 layer; the LoRA factors are ``lora_A``
    [r, IN] and ``lora_B`` [OUT, r]; per-stitch biases are ``stitch_bias`` [num, OUT].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 0,
        alpha: float = 1.0,
        num_stitch_biases: int = 0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("in_features", in_features, 1),
            ("out_features", out_features, 1),
            ("rank", rank, 0),
            ("num_stitch_biases", num_stitch_biases, 0),
        ):
            _checks.int_at_least(name, value, low)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank if rank > 0 else 0.0
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        optional = {
            "bias": (out_features,) if bias else None,
            "lora_A": (rank, in_features) if rank > 0 else None,
            "lora_B": (out_features, rank) if rank > 0 else None,
            "stitch_bias": (num_stitch_biases, out_features) if num_stitch_biases else None,
        }
        for name, shape in optional.items():
            param = nn.Parameter(torch.zeros(shape, **factory)) if shape else None
            self.register_parameter(name, param)
        if rank > 0:
            self.weight.requires_grad_(False)
        self.active_stitch: int | None = None
        # A Python bool (a tensor flag would be a data-dependent branch under torch.compile).
        # With rank > 0 it is saved as `lora_merged`, so a merged layer reloads as merged; at
        # rank 0 the state dict is exactly nn.Linear's.
        self.merged = False
        self._register_state_dict_hook(_save_merged_flag)
        self._register_load_state_dict_pre_hook(_load_merged_flag, with_module=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init for weight and bias; A like nn.Linear's weight, B = 0."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.rank > 0:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            self.merged = False

    def _extra_bias(self) -> torch.Tensor | None:
        if self.stitch_bias is None or self.active_stitch is None:
            return None
        num = self.stitch_bias.shape[0]
        if not 0 <= self.active_stitch < num:
            raise ValueError(f"active_stitch must be in [0, {num}), got {self.active_stitch}")
        return self.stitch_bias[self.active_stitch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_lora = self.rank > 0 and not self.merged
        return lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A if use_lora else None,
            self.lora_B if use_lora else None,
            self.scale,
            self._extra_bias(),
        )

    @torch.no_grad()
    def init_least_squares(self, x_src, x_dst=None, ridge: float = 0.0) -> StitchingLayer:
        """Set W, b to the least-squares map x_src → x_dst (SN-Net Eq. 4-5); B reset to 0.

        Takes tensors [..., IN] / [..., OUT] or an iterable of (x_src, x_dst) batches, as
        ``stitchops.least_squares_init``. Returns self.
        """
        weight, bias = least_squares_init(x_src, x_dst, ridge=ridge)
        return self.load_least_squares(weight, bias)

    @torch.no_grad()
    def load_least_squares(self, weight: torch.Tensor, bias: torch.Tensor) -> StitchingLayer:
        """Set W, b to a solved least-squares map (weight [OUT, IN], bias [OUT]); B reset to 0."""
        if weight.shape != self.weight.shape:
            raise ValueError(
                f"least-squares data maps {weight.shape[1]} -> {weight.shape[0]} features but "
                f"this layer is {self.in_features} -> {self.out_features}"
            )
        self.weight.copy_(weight)
        if self.bias is not None:
            self.bias.copy_(bias)
        if self.rank > 0:
            self.lora_B.zero_()
            self.merged = False
        return self

    def _lora_delta(self) -> torch.Tensor:
        """scale·B·A in W's dtype, formed in float32 at least (float64 for float64 layers)."""
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        delta = self.scale * (self.lora_B.to(wide) @ self.lora_A.to(wide))
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> StitchingLayer:
        """Fold scale·B·A into W for deployment (one GEMM per call afterwards)."""
        if self.rank > 0 and not self.merged:
            self.weight += self._lora_delta()
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> StitchingLayer:
        """Undo ``merge`` (exact up to the rounding of W's dtype)."""
        if self.merged:
            self.weight -= self._lora_delta()
            self.merged = False
        return self

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        parts.append(f"bias={self.bias is not None}")
        if self.rank > 0:
            parts.append(f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}")
        if self.stitch_bias is not None:
            parts.append(f"num_stitch_biases={self.stitch_bias.shape[0]}")
        return ", ".join(parts)
