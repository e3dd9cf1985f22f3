"""Put an ``SPTPlan`` into a model, train it with nnz-sized state, and fold it back.

``apply`` swaps layers in place, keeping every parameter's name and tensor:
* unstructured matrix -> ``stitchops.nn.SparseDeltaLinear`` (``weight``, ``bias``, plus
  ``delta`` [c] and buffer ``index``);
* structured matrix -> ``stitchops.nn.LoRALinear`` (``lora_A``, ``lora_B``) or
  ``AdapterLinear`` (``adapter_down``, ``adapter_up``);
* a fused qkv matrix ranked as q, k and v (plan entries ``<name>[q]`` ...) ->
  ``stitchops.nn.PartedLinear``: each part tuned as its entry says, in its rows;
* whole vector -> trains as it is; partial vector -> a parametrization ``base + S(δ)`` with
  only δ [c] trainable (``<module>.parametrizations.<name>.original`` frozen, ``...[0].delta``);
* everything else frozen, except parameters whose names contain a ``trainable`` string.
Deltas and B (or the adapter's up-projection) start at zero: the outputs do not change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from stitchops.nn.sparse import AdapterLinear, LoRALinear, PartedLinear, SparseDeltaLinear
from stitchops.spt.allocate import PlanEntry, SPTPlan


class VectorDelta(nn.Module):
    """Parametrization of a vector tuned at a few entries: v = v₀ + S(δ)."""

    def __init__(self, index: torch.Tensor, like: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(like.device))
        self.delta = nn.Parameter(torch.zeros(index.numel(), device=like.device, dtype=like.dtype))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base.index_add(0, self.index, self.delta)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str, str]:
    """(module holding parameter ``name``, its attribute, the module's path)."""
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr, path


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def _check_plan(model: nn.Module, plan: SPTPlan) -> None:
    if not isinstance(plan, SPTPlan):
        raise TypeError(f"plan must be an SPTPlan, got {type(plan).__name__}")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError("apply: the model has no nn.Linear layer; SPT tunes nn.Linear weights")
    params = dict(model.named_parameters())
    for name, entry in plan.entries.items():
        if entry.tensor not in params:
            raise ValueError(f"the plan names {entry.tensor!r}, which the model does not have")
        shape = tuple(params[entry.tensor].shape)
        if entry.rows is not None:
            shape = (entry.rows[1] - entry.rows[0], *shape[1:])
        if shape != tuple(entry.shape):
            raise ValueError(
                f"plan entry {name!r} has shape {entry.shape} but the model's parameter is {shape}"
            )


def apply(
    model: nn.Module,
    plan: SPTPlan,
    *,
    trainable: Sequence[str] = ("head",),
    dropout: float = 0.0,
    drop_path: float = 0.0,
) -> nn.Module:
    """Tune ``model`` as ``plan`` says (in place; returned). ``dropout`` and ``drop_path``
    act on the structured branches."""
    _check_plan(model, plan)
    for p in model.parameters():
        p.requires_grad_(False)
    by_tensor: dict[str, list[PlanEntry]] = {}
    for entry in plan.entries.values():
        by_tensor.setdefault(entry.tensor, []).append(entry)
    for name, entries in by_tensor.items():
        if any(e.rows is not None for e in entries):
            _apply_parts(model, name, entries, plan.rank, dropout, drop_path)
    for name, entry in plan.entries.items():
        if entry.rows is not None:
            continue
        module, attr, path = _owner(model, name)
        if entry.kind in ("lora", "adapter", "unstructured"):
            if not isinstance(module, nn.Linear) or attr != "weight":
                raise ValueError(f"plan entry {name!r} ({entry.kind}) is not an nn.Linear weight")
            if entry.kind == "lora":
                new = LoRALinear(module, plan.rank, dropout=dropout, drop_path=drop_path)
            elif entry.kind == "adapter":
                new = AdapterLinear(module, plan.rank, drop_path=drop_path)
            else:
                index = torch.tensor(entry.index, dtype=torch.int64, device=module.weight.device)
                new = SparseDeltaLinear.from_linear(module, index)
            _replace(model, path, new)
        elif entry.kind == "whole":
            getattr(module, attr).requires_grad_(True)
        else:  # partial vector
            like = getattr(module, attr)
            index = torch.tensor(entry.index, dtype=torch.int64)
            parametrize.register_parametrization(module, attr, VectorDelta(index, like))
            module.parametrizations[attr].original.requires_grad_(False)
    for name, p in model.named_parameters():
        if any(t in name for t in trainable):
            p.requires_grad_(True)
    return model


def _apply_parts(model, name, entries, rank, dropout, drop_path) -> None:
    """The entries of one fused parameter's parts: a weight becomes a ``PartedLinear``, a
    vector trains at the union of its parts' entries (whole parts: all their rows)."""
    module, attr, path = _owner(model, name)
    if attr == "weight" and isinstance(module, nn.Linear):
        parts = {e.name.rsplit("[", 1)[-1].rstrip("]"): (e.rows, e.kind, e.index) for e in entries}
        _replace(model, path, PartedLinear(module, parts, rank, dropout, drop_path))
        return
    like = getattr(module, attr)
    if like.dim() != 1:
        raise ValueError(f"plan parts of {name!r} must be of an nn.Linear weight or a vector")
    index = (
        torch.cat(
            [
                torch.arange(e.rows[0], e.rows[1])
                if e.kind == "whole"
                else torch.as_tensor(e.index, dtype=torch.int64) + e.rows[0]
                for e in entries
            ]
        )
        .sort()
        .values
    )
    parametrize.register_parametrization(module, attr, VectorDelta(index, like))
    module.parametrizations[attr].original.requires_grad_(False)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: deltas, biases and norm vectors
    without weight decay (as the official code), LoRA / adapter / head weights with it."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # deltas, biases and norm vectors are 1-D
            (no_decay if p.dim() <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def trainable_count(model: nn.Module, exclude: Sequence[str] = ("head",)) -> int:
    """Trainable parameters, leaving out those whose names contain an ``exclude`` string."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad and not any(e in n for e in exclude)
    )


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every SparseDeltaLinear, LoRALinear and PartedLinear (without adapter parts)
    back into a plain ``nn.Linear`` and every partial-vector parametrization into its vector
    (in place; returned). An AdapterLinear stays (its GELU bottleneck is not linear): deploy
    it as it is."""
    for path, module in list(model.named_modules()):
        parted_adapter = isinstance(module, PartedLinear) and len(module.adapters)
        if isinstance(module, (SparseDeltaLinear, LoRALinear, PartedLinear)) and not parted_adapter:
            _replace(model, path, module.merged_linear())
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return model
