"""SPViT's single-path layers (thesis ch. 4; official code ziplab/SPViT): an attention layer
that chooses among {skip, k×k bottleneck convolutions, MSA} made of its own weights, and an
MLP whose hidden units are gated.

``UnifiedAttention`` wraps an existing attention layer's ``qkv`` and ``proj`` (kept under
those names, not copied) and adds, as the official code:

* ``head_probs`` [H, k_max²] (ones): mixing logits; σ = softmax(head_probs / α, over heads),
  α = 1e-2. A k×k convolution uses the centre k×k taps of the k_max grid (the 1×1 the
  centre tap, as the official code):

      conv_k(x) = proj_k(ReLU(BN_k(Σ_p Σ_h σ[h, p]·(x·W_v,hᵀ) shifted by tap p + b_k)))
      b_k = Σ_p Σ_h σ[h, p]·b_v,h     proj_k = Σ_p Σ_h σ[h, p]·W_proj[:, h]  (+ b_proj)

  (``stitchops.head_mixed_conv`` for the stencil, Eq. 4.5-4.7); the prefix (class) tokens
  pass through a convolution unchanged, as the official code.
* ``kernel_thresholds`` [len(kernel_sizes) + 1] (θ = 1.5): ordered gates g_0 (not skip),
  g_1... (a larger kernel), g_last (MSA): sampled while training (relaxed Bernoulli of
  sigmoid(θ), hard in the forward, the sigmoid's gradient backward, cumulative products),
  sigmoid(θ) > 0.5 in eval mode (as the official code). The output is the highest open
  gate's branch: Σ_j g_j·Π_(i>j)(1 − g_i)·branch_j (Eq. 4.9). A branch whose coefficient is 0 in the
  forward runs without gradient of its own (its value still trains the gates).
* ``bn_{k}x{k}``: a BatchNorm2d over the head dim per kernel size.

``UnifiedMlp`` wraps ``fc1`` / ``fc2`` and gates each hidden unit the same way
(``ffn_thresholds`` [hidden], θ = 1.5).

Both take the token grid from ``grid`` (set per forward by ``stitchops.spvit.apply``'s hook on
the patch embedding; a square map otherwise) and their random gates from ``generator``
(seeded per step by the training loop, so that a resumed search draws the same gates).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stitchops.ops.head_mixed_conv import head_mixed_conv

ALPHA = 1e-2  # the mixing softmax's temperature
THETA = 1.5  # the gate logits' initial value (the official configs)


def bernoulli_gates(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Hard samples of Bernoulli(probs) with the relaxed sample's gradient (straight-through,
    temperature 1, as the official code's ``bernoulli_sample``)."""
    eps = torch.finfo(probs.dtype).eps
    p = probs.clamp(eps, 1 - eps)
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    u = u.clamp(eps, 1 - eps)
    logits = u.log() - (-u).log1p() + p.log() - (-p).log1p()
    soft = torch.sigmoid(logits)
    return (logits > 0).to(probs.dtype) - soft.detach() + soft


def expected_gates(logits: torch.Tensor) -> torch.Tensor:
    """The gates the FLOPs count: 1[σ(θ) > 0.5] forward, sigmoid(σ(θ) − 0.5)'s gradient
    backward (the official code's complexity indicators)."""
    probs = torch.sigmoid(logits)
    smooth = torch.sigmoid(probs - 0.5)
    return (probs > 0.5).to(logits.dtype) - smooth.detach() + smooth


def check_kernel_sizes(kernel_sizes) -> tuple[int, ...]:
    """``kernel_sizes`` as a tuple, or ValueError unless odd (up to 7) and increasing."""
    sizes = tuple(kernel_sizes)
    odd = all(isinstance(k, int) and k % 2 == 1 and 1 <= k <= 7 for k in sizes)
    if not sizes or not odd or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"kernel_sizes must be odd, at most 7 and increasing, got {kernel_sizes}")
    return sizes


def centre_taps(k: int, k_max: int) -> list[int]:
    """Columns of a k_max² tap grid (p = a + k_max·c) holding the centre k×k taps, in the
    k×k order p = a + k·c."""
    shift = (k_max - k) // 2
    return [(p % k + shift) + k_max * (p // k + shift) for p in range(k * k)]


class UnifiedAttention(nn.Module):
    """MSA, k×k convolutions and skip in one layer (module docstring).

    Args:
        qkv, proj: the attention layer's fused [D → 3D] and output [D → D] projections.
        num_heads: H.
        kernel_sizes: the convolutions offered, odd and increasing (official: (1, 3)).
        prefix: tokens before the patch map (1: the class token).
    """

    def __init__(
        self,
        qkv: nn.Linear,
        proj: nn.Linear,
        num_heads: int,
        kernel_sizes=(1, 3),
        prefix: int = 1,
        alpha: float = ALPHA,
        theta: float = THETA,
    ) -> None:
        super().__init__()
        dim = proj.in_features
        if dim % num_heads or qkv.out_features != 3 * dim:
            raise ValueError(f"qkv must be [D → 3D] with D divisible by num_heads ({num_heads})")
        sizes = tuple(kernel_sizes)
        if (
            not sizes
            or any(k % 2 == 0 or k < 1 for k in sizes)
            or list(sizes) != sorted(set(sizes))
        ):
            raise ValueError(f"kernel_sizes must be odd and increasing, got {kernel_sizes}")
        self.qkv, self.proj = qkv, proj
        self.num_heads, self.head_dim, self.dim = num_heads, dim // num_heads, dim
        self.kernel_sizes, self.prefix, self.alpha = sizes, prefix, alpha
        factory = {"device": proj.weight.device, "dtype": proj.weight.dtype}
        self.head_probs = nn.Parameter(torch.ones(num_heads, sizes[-1] ** 2, **factory))
        self.kernel_thresholds = nn.Parameter(torch.full((len(sizes) + 1,), theta, **factory))
        for k in sizes:
            setattr(self, f"bn_{k}x{k}", nn.BatchNorm2d(self.head_dim, **factory))
        self.grid: tuple[int, int] | None = None
        self.generator: torch.Generator | None = None

    @classmethod
    def wrap(cls, attention: nn.Module, **options) -> UnifiedAttention:
        """Around an attention layer with ``qkv``, ``proj`` and ``num_heads`` (ours, timm's)."""
        return cls(attention.qkv, attention.proj, attention.num_heads, **options)

    @property
    def choices(self) -> tuple[str, ...]:
        """The ops gate j opens, in order: the convolutions, then MSA."""
        return (*(f"conv{k}x{k}" for k in self.kernel_sizes), "msa")

    def mixing(self) -> torch.Tensor:
        """σ [H, k_max²]: softmax over the heads of head_probs / α."""
        return (self.head_probs / self.alpha).softmax(0)

    def gates(self) -> torch.Tensor:
        """Cumulative gates [len(choices)]: sampled while training, sigmoid(θ) > 0.5 otherwise.
        Sampled ones keep the gradient of the last open gate only (the official code's
        slower gradient for the less complex gates)."""
        probs = torch.sigmoid(self.kernel_thresholds)
        if not self.training:
            return torch.cumprod((probs > 0.5).to(probs.dtype), 0)
        sampled = torch.cumprod(bernoulli_gates(probs, self.generator), 0)
        kept = [
            sampled[j].detach() if j + 1 < len(sampled) and sampled[j + 1] > 0 else sampled[j]
            for j in range(len(sampled))
        ]
        return torch.stack(kept)

    def choice(self) -> str:
        """The op the deterministic gates choose: "skip" or one of ``choices``."""
        open_gates = int(torch.cumprod(torch.sigmoid(self.kernel_thresholds) > 0.5, 0).sum())
        return "skip" if open_gates == 0 else self.choices[open_gates - 1]

    def _grid(self, n: int) -> tuple[int, int]:
        if self.grid is not None:
            return self.grid
        side = math.isqrt(n - self.prefix)
        if side * side != n - self.prefix:
            raise ValueError(f"{n - self.prefix} patch tokens are not a square map: give the grid")
        return side, side

    def msa(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def conv_weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mix [H, k²], value bias b_k [hd], output projection proj_k [D, hd]) of the k×k conv."""
        mix = self.mixing()[:, centre_taps(k, self.kernel_sizes[-1])]
        b_v = self.qkv.bias[2 * self.dim :] if self.qkv.bias is not None else None
        bias = (
            (b_v.view(self.num_heads, self.head_dim).t() @ mix).sum(-1)
            if b_v is not None
            else mix.new_zeros(self.head_dim)
        )
        w_proj = self.proj.weight.view(self.dim, self.num_heads, self.head_dim)
        proj = torch.einsum("chd,h->cd", w_proj, mix.sum(1))
        return mix, bias, proj

    def conv(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The k×k bottleneck convolution branch (prefix tokens passed through)."""
        b, n, _ = x.shape
        gh, gw = self._grid(n)
        mix, bias, proj = self.conv_weights(k)
        v = F.linear(x, self.qkv.weight[2 * self.dim :]).view(b, n, self.num_heads, self.head_dim)
        y = head_mixed_conv(v, mix.to(v.dtype), (gh, gw), prefix=self.prefix)[:, self.prefix :]
        y = y + bias
        y = y.transpose(1, 2).reshape(b, self.head_dim, gh, gw)
        y = F.relu(getattr(self, f"bn_{k}x{k}")(y)).flatten(2).transpose(1, 2)
        return torch.cat([x[:, : self.prefix], F.linear(y, proj, self.proj.bias)], dim=1)

    def branch(self, x: torch.Tensor, j: int) -> torch.Tensor:
        return self.msa(x) if j == len(self.kernel_sizes) else self.conv(x, self.kernel_sizes[j])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gates()
        if not self.training:  # the chosen op alone
            chosen = int(gates.sum())
            return torch.zeros_like(x) if chosen == 0 else self.branch(x, chosen - 1)
        out = torch.zeros_like(x)
        for j in range(len(gates)):
            coefficient = gates[j] * torch.prod(1 - gates[j + 1 :])
            if coefficient.detach() != 0:
                out = out + coefficient * self.branch(x, j)
            else:  # closed: its value trains the gates, its own weights get no gradient
                with torch.no_grad():
                    value = self.branch(x, j)
                out = out + coefficient * value
        return out

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, choices={self.choices}, prefix={self.prefix}"


class UnifiedMlp(nn.Module):
    """An MLP whose hidden units are gated (``ffn_thresholds``, module docstring): ``fc1``,
    ``act`` and ``fc2`` are the wrapped MLP's."""

    def __init__(self, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear, theta: float = THETA):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        factory = {"device": fc1.weight.device, "dtype": fc1.weight.dtype}
        self.ffn_thresholds = nn.Parameter(torch.full((fc1.out_features,), theta, **factory))
        self.generator: torch.Generator | None = None

    @classmethod
    def wrap(cls, mlp: nn.Module, **options) -> UnifiedMlp:
        return cls(mlp.fc1, mlp.act, mlp.fc2, **options)

    def gates(self) -> torch.Tensor:
        probs = torch.sigmoid(self.ffn_thresholds)
        if self.training:
            return bernoulli_gates(probs, self.generator)
        return (probs > 0.5).to(probs.dtype)

    def kept(self) -> list[int]:
        """The hidden units the deterministic gates keep."""
        return (torch.sigmoid(self.ffn_thresholds) > 0.5).nonzero().flatten().tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)) * self.gates())


class ConvAttention(nn.Module):
    """A finalised k×k bottleneck convolution in place of an attention layer (SPViT's pruned
    model): conv [D → hd, k×k, zero padding] + BN + ReLU + linear [hd → D], prefix tokens
    passed through; ``grid`` set per forward as UnifiedAttention's."""

    def __init__(self, dim: int, head_dim: int, k: int, prefix: int = 1, **factory) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, head_dim, k, padding=k // 2, **factory)
        self.bn = nn.BatchNorm2d(head_dim, **factory)
        self.proj = nn.Linear(head_dim, dim, **factory)
        self.prefix = prefix
        self.grid: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        gh, gw = self.grid or (math.isqrt(n - self.prefix),) * 2
        y = x[:, self.prefix :].transpose(1, 2).reshape(b, d, gh, gw)
        y = F.relu(self.bn(self.conv(y))).flatten(2).transpose(1, 2)
        return torch.cat([x[:, : self.prefix], self.proj(y)], dim=1)

    def fold_batchnorm(self) -> None:
        """Fold the BatchNorm (eval statistics) into the conv, for deployment."""
        bn, conv = self.bn, self.conv
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        with torch.no_grad():
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
        self.bn = nn.Identity()
