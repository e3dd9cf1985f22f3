"""LoRA stitching projection in plain PyTorch (SN-Netv2 Sec. 4.3 LoRA SL, ESTA stitch bias).

    y = x · Wᵀ + b + b_s + scale · (x · Aᵀ) · Bᵀ

Shapes: x [T, IN], W [OUT, IN], A [R, IN], B [OUT, R], b and b_s [OUT], y [T, OUT].
With S = x · Aᵀ [T, R] and G = dL/dy [T, OUT], the gradients are

    dS  = G · B                       [T, R]
    dx  = G · W + scale · dS · A      [T, IN]
    dW  = Gᵀ · x                      [OUT, IN]   (only when W trains: SN-Net v1)
    dA  = scale · dSᵀ · x             [R, IN]
    dB  = scale · Gᵀ · S              [OUT, R]
    db  = db_s = Σ_t G[t]             [OUT]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# The gradients the backward computes, in the order of its ``needs`` flags and its results.
# The bias gradient serves both b and b_s (they receive the same Σ_t G[t]).
GRADIENTS = ("x", "weight", "lora_a", "lora_b", "bias")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float = 1.0,
    extra_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op written for clarity, differentiable by autograd, any dtype (float64 included)."""
    y = F.linear(x, weight, bias)
    if extra_bias is not None:
        y = y + extra_bias
    if lora_a is not None:
        y = y + scale * F.linear(F.linear(x, lora_a), lora_b)
    return y


def saved_s_dtype(dtype: torch.dtype) -> torch.dtype:
    """S = x·Aᵀ is saved for the backward in float32 (float64 for float64 inputs)."""
    return torch.promote_types(dtype, torch.float32)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    extra_bias: torch.Tensor | None,
    save_s: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward for 2-D x [T, IN]: returns (y [T, OUT], S [T, R] or [0, 0]).

    S is kept at least in float32 (``saved_s_dtype``), as the kernels keep it.
    """
    y = F.linear(x, weight, bias)
    if extra_bias is not None:
        y += extra_bias
    s = x.new_empty(0, 0, dtype=saved_s_dtype(x.dtype))
    if lora_a is not None:
        s_low = F.linear(x, lora_a)
        y += scale * F.linear(s_low, lora_b)
        if save_s:
            s = s_low.to(s.dtype)
    return y, s


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    s: torch.Tensor,
    scale: float,
    needs: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """Explicit gradients (module docstring) for 2-D tensors, in the order of GRADIENTS;
    ``needs`` says which (same order), None where not needed.

    ``s`` (the forward's S) is read only when B needs its gradient.
    """
    need_x, need_weight, need_a, need_b, need_bias = needs
    dx = dw = da = db = dbias = None
    has_lora = lora_a is not None
    ds = grad_y @ lora_b if has_lora and (need_x or need_a) else None
    if need_x:
        dx = grad_y @ weight
        if has_lora:
            dx += scale * (ds @ lora_a)
    if need_weight:
        dw = grad_y.t() @ x
    if has_lora and need_a:
        da = scale * (ds.t() @ x)
    if has_lora and need_b:
        db = scale * (grad_y.t() @ s.to(grad_y.dtype))
    if need_bias:
        dbias = grad_y.sum(0)
    return dx, dw, da, db, dbias
