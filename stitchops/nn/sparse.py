"""The layers SPT (thesis ch. 2) puts in place of a pretrained ``nn.Linear``.

* ``SparseDeltaLinear``: unstructured tuning, ``y = x·(W + S(δ))ᵀ + b`` with W frozen and
  only the nnz entries δ trained (``stitchops.sparse_delta_linear``).
* ``LoRALinear``: structured tuning, a parallel LoRA ``y = x·Wᵀ + b + (x·Aᵀ)·Bᵀ`` with no
  alpha / r scale (as the official SPT code), on the fused ``stitchops.lora_linear``; the
  LoRA branch takes optional dropout on its input and drop-path per sample, which run it
  unfused.
* ``AdapterLinear``: structured tuning as the thesis's SPT-Adapter, a bottleneck added in
  parallel to the layer's output, ``y = x·Wᵀ + b + U·act(D·(x·Wᵀ + b) + b_D) + b_U``
  (D [r, OUT], U [OUT, r]: 2·r·OUT + r + OUT parameters; U starts at zero).

Each keeps ``nn.Linear``'s ``weight`` and ``bias`` names, and ``merged_linear()`` folds its
update back into a plain ``nn.Linear`` where that is exact (SparseDeltaLinear, LoRALinear).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stitchops.ops.lora import lora_linear
from stitchops.ops.sparse_delta import check_index, sparse_delta_linear


def _copy_linear(linear: nn.Linear, target: nn.Module) -> None:
    """``target`` shares ``linear``'s weight and bias tensors (no copy), W frozen."""
    target.weight = linear.weight
    target.weight.requires_grad_(False)
    target.bias = linear.bias


def _linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding copies of ``weight`` [OUT, IN] and ``bias``."""
    out = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    out.weight.copy_(weight)
    if bias is not None:
        out.bias.copy_(bias)
    return out


def _plus_delta(weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + S(δ) as a new tensor."""
    flat = weight.detach().flatten().clone()
    flat.index_add_(0, index, delta.detach())
    return flat.view_as(weight)


class SparseDeltaLinear(nn.Module):
    """A linear layer whose pretrained weight moves only at ``index`` (SPT unstructured).

    Parameters: ``weight`` [OUT, IN] (frozen), ``bias`` [OUT] or None, ``delta`` [nnz]
    (zeros at creation, so the layer starts as the pretrained one); buffer ``index`` int64
    [nnz] of flat indices ``row·IN + col`` (sorted, unique; checked once here).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        index: torch.Tensor,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, **kw), requires_grad=False
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        check_index(index, (out_features, in_features))
        self.register_buffer("index", index.to(device=self.weight.device, copy=True))
        self.delta = nn.Parameter(torch.zeros(index.numel(), **kw))

    @classmethod
    def from_linear(cls, linear: nn.Linear, index: torch.Tensor) -> SparseDeltaLinear:
        """Wrap ``linear`` (sharing its weight and bias) with trainable entries at ``index``."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            index.to(w.device),
            bias=linear.bias is not None,
            device="meta",
            dtype=w.dtype,
        )
        _copy_linear(linear, layer)
        layer.index = index.to(w.device, copy=True)
        layer.delta = nn.Parameter(torch.zeros(index.numel(), device=w.device, dtype=w.dtype))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_delta_linear(
            x, self.weight, self.delta, self.index, self.bias, validate_index=False
        )

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight W + S(δ) (new tensors)."""
        return _linear_of(_plus_delta(self.weight, self.index, self.delta), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.index.numel()}, bias={self.bias is not None}"
        )


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop each sample's whole branch with probability ``p`` (scaled by 1/(1-p))."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class LoRALinear(nn.Module):
    """A frozen linear layer with a parallel LoRA: ``y = x·Wᵀ + b + (x·Aᵀ)·Bᵀ``.

    ``lora_A`` [r, IN] Kaiming-uniform (as ``nn.Linear``'s weight), ``lora_B`` [OUT, r] zeros,
    no alpha / r scale (the official SPT code). ``dropout`` acts on the branch's input,
    ``drop_path`` drops the branch per sample; with neither active the layer runs the fused
    ``stitchops.lora_linear``.
    """

    def __init__(
        self, linear: nn.Linear, rank: int, dropout: float = 0.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        for name, p in (("dropout", dropout), ("drop_path", drop_path)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.in_features, self.out_features, self.rank = (
            linear.in_features,
            linear.out_features,
            rank,
        )
        _copy_linear(linear, self)
        kw = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        self.dropout, self.drop_path = dropout, drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or (self.dropout == 0.0 and self.drop_path == 0.0):
            return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B)
        branch = F.linear(F.linear(F.dropout(x, self.dropout), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + _drop_path(branch, self.drop_path, True)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight W + B·A (new tensors)."""
        return _linear_of(self.weight + self.lora_B @ self.lora_A, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class AdapterLinear(nn.Module):
    """A frozen linear layer with a parallel bottleneck adapter on its output (SPT-Adapter):

        h = x·Wᵀ + b,   y = h + U·GELU(D·h + b_D) + b_U

    ``adapter_down`` D [r, OUT] (+ bias [r]) Kaiming-uniform, ``adapter_up`` U [OUT, r]
    (+ bias [OUT]) zeros: 2·r·OUT + r + OUT trainable parameters, and y = h at creation.
    The adapter is not linear, so ``merged_linear`` is not offered: deploy it as it is.
    """

    def __init__(self, linear: nn.Linear, rank: int, drop_path: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = (
            linear.in_features,
            linear.out_features,
            rank,
        )
        _copy_linear(linear, self)
        kw = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.adapter_down = nn.Linear(self.out_features, rank, **kw)
        self.adapter_up = nn.Linear(rank, self.out_features, **kw)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)
        branch = self.adapter_up(F.gelu(self.adapter_down(h)))
        return h + _drop_path(branch, self.drop_path, self.training)


class Bottleneck(nn.Module):
    """An adapter's bottleneck on ``width`` features: U·GELU(D·h + b_D) + b_U, ``adapter_down``
    D [r, width] Kaiming-uniform, ``adapter_up`` U [width, r] zeros (0 at creation)."""

    def __init__(self, width: int, rank: int, device=None, dtype=None) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(width, rank, device=device, dtype=dtype)
        self.adapter_up = nn.Linear(rank, width, device=device, dtype=dtype)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(F.gelu(self.adapter_down(h)))


class PartedLinear(nn.Module):
    """A frozen fused linear layer whose row blocks are tuned as separate matrices: SPT on a
    fused qkv projection, its q, k and v each tuned as the official code's separate layers.

        y = x·(W + S(δ))ᵀ + b,  then per structured part p on its rows [r0, r1):
        LoRA: y_p += (x·A_pᵀ)·B_pᵀ    adapter: y_p += U_p·GELU(D_p·y_p + b_D) + b_U

    ``parts``: ``{name: (rows (r0, r1), kind, index)}`` with kind ``"lora"``, ``"adapter"``
    or ``"unstructured"`` (``index``: flat indices within the part's [r1 − r0, IN] block);
    rows of no part stay frozen. Parameters: ``weight``, ``bias`` (shared with ``linear``,
    W frozen), ``delta`` [nnz] and buffer ``index`` (the unstructured parts' entries as flat
    indices of W), ``lora_A`` / ``lora_B`` and ``adapters`` keyed by part. ``dropout`` acts
    on the LoRA branches' input, ``drop_path`` drops each structured branch per sample.
    """

    def __init__(
        self,
        linear: nn.Linear,
        parts: dict,
        rank: int,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = (
            linear.in_features,
            linear.out_features,
            rank,
        )
        _copy_linear(linear, self)
        kw = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.parts = {name: (tuple(rows), kind) for name, (rows, kind, _) in parts.items()}
        flat = [
            torch.as_tensor(index, dtype=torch.int64) + rows[0] * self.in_features
            for rows, kind, index in parts.values()
            if kind == "unstructured"
        ]
        index = torch.cat(flat).sort().values if flat else torch.zeros(0, dtype=torch.int64)
        check_index(index, (self.out_features, self.in_features))
        self.register_buffer("index", index.to(kw["device"]))
        self.delta = nn.Parameter(torch.zeros(index.numel(), **kw))
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.adapters = nn.ModuleDict()
        for name, ((r0, r1), kind) in self.parts.items():
            if kind == "lora":
                self.lora_A[name] = nn.Parameter(torch.empty(rank, self.in_features, **kw))
                nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
                self.lora_B[name] = nn.Parameter(torch.zeros(r1 - r0, rank, **kw))
            elif kind == "adapter":
                self.adapters[name] = Bottleneck(r1 - r0, rank, **kw)
        self.dropout, self.drop_path = dropout, drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index.numel():
            y = sparse_delta_linear(
                x, self.weight, self.delta, self.index, self.bias, validate_index=False
            )
        else:
            y = F.linear(x, self.weight, self.bias)
        pieces, start = [], 0
        for name, ((r0, r1), kind) in sorted(self.parts.items(), key=lambda p: p[1][0]):
            if kind == "unstructured":
                continue
            if r0 > start:
                pieces.append(y.new_zeros(*y.shape[:-1], r0 - start))
            if kind == "lora":
                xd = F.dropout(x, self.dropout, self.training)
                branch = F.linear(F.linear(xd, self.lora_A[name]), self.lora_B[name])
            else:
                branch = self.adapters[name](y[..., r0:r1])
            pieces.append(_drop_path(branch, self.drop_path, self.training))
            start = r1
        if not pieces:
            return y
        if start < self.out_features:
            pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - start))
        return y + torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with W + S(δ) + the LoRAs in their rows (no adapter part:
        an adapter is not linear)."""
        if len(self.adapters):
            raise ValueError(
                "a PartedLinear with adapter parts does not merge: the adapter's "
                "GELU bottleneck is not linear; deploy it as it is"
            )
        weight = _plus_delta(self.weight, self.index, self.delta)
        for name, ((r0, r1), kind) in self.parts.items():
            if kind == "lora":
                weight[r0:r1] += self.lora_B[name] @ self.lora_A[name]
        return _linear_of(weight, self.bias)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{name} {kind}" for name, (_, kind) in self.parts.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, parts=({parts})"
        )
