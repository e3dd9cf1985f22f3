"""Trainable-parameter allocation under a budget (SPT, thesis Sec. 2.3.2, Eq. 2.4-2.5).

Take the τ most sensitive entries over every ranked parameter (ties: the earlier parameter,
then the earlier entry, first). For each parameter with c of them:

* an ``nn.Linear`` weight [d_out, d_in]: structured tuning when c ≥ cost_s / α, where
  cost_s = r·(d_in + d_out) for a LoRA of rank r and 2·r·d_out + r + d_out for an adapter
  (α = 1: the thesis's rule, structured tuning never adds parameters; α = 10: the official
  scripts); otherwise its c entries, unstructured;
* a vector (bias, norm): tuned whole when c ≥ len / β, otherwise its c entries.

The plan's cost (unstructured entries + structured modules + vectors; heads and other
excluded parameters not counted) never decreases as τ grows, so τ is found by binary search
as the largest whose plan costs at most ``budget``: exact, where the official code sweeps τ
in steps of 20k.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

KINDS = ("lora", "adapter", "unstructured", "whole", "partial")


@dataclass
class PlanEntry:
    """How one parameter is tuned."""

    name: str
    shape: tuple[int, ...]
    kind: str  # one of KINDS
    count: int  # its entries among the top τ
    cost: int  # trainable parameters this entry adds
    index: list[int] | None = None  # sorted flat indices (unstructured / partial)


@dataclass
class SPTPlan:
    """The result of ``allocate``: one ``PlanEntry`` per parameter that trains."""

    budget: int
    tau: int
    structured: str
    rank: int
    alpha: float
    beta: float
    entries: dict[str, PlanEntry] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(e.cost for e in self.entries.values())

    def totals(self) -> dict[str, int]:
        """Trainable parameters by kind, and the total."""
        out = dict.fromkeys(KINDS, 0)
        for e in self.entries.values():
            out[e.kind] += e.cost
        return {**out, "total": self.total}

    def __str__(self) -> str:
        width = max([len("parameter"), *map(len, self.entries)])
        lines = [f"{'parameter':<{width}}  {'shape':<14} {'kind':<12} {'sensitive':>10} "
                 f"{'trainable':>10}"]  # fmt: skip
        for e in self.entries.values():
            shape = "x".join(map(str, e.shape))
            lines.append(f"{e.name:<{width}}  {shape:<14} {e.kind:<12} {e.count:>10,} "
                         f"{e.cost:>10,}")  # fmt: skip
        t = self.totals()
        lines.append(
            f"unstructured {t['unstructured'] + t['partial']:,} | structured "
            f"({self.structured}, r={self.rank}) {t['lora'] + t['adapter']:,} | whole vectors "
            f"{t['whole']:,} | total {t['total']:,} of budget {self.budget:,} (tau = {self.tau:,},"
            f" alpha = {self.alpha:g}, beta = {self.beta:g})"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "entries"},
                "entries": [asdict(e) for e in self.entries.values()]}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> SPTPlan:
        entries = [PlanEntry(**{**e, "shape": tuple(e["shape"])}) for e in data["entries"]]
        head = {k: v for k, v in data.items() if k != "entries"}
        return cls(**head, entries={e.name: e for e in entries})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> SPTPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))


def linear_weights(model: nn.Module) -> set[str]:
    """Names of the weights of the model's ``nn.Linear`` layers."""
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear)}  # fmt: skip


def structured_cost(structured: str, rank: int, shape: tuple[int, ...]) -> int:
    d_out, d_in = shape
    return rank * (d_in + d_out) if structured == "lora" else 2 * rank * d_out + rank + d_out


def _check_sensitivity(sensitivity: dict, model: nn.Module) -> dict[str, tuple[int, ...]]:
    if not isinstance(sensitivity, dict) or not sensitivity:
        raise TypeError("sensitivity must be a non-empty dict {parameter name: tensor}")
    params = dict(model.named_parameters())
    matrices = linear_weights(model)
    shapes = {}
    for name, value in sensitivity.items():
        if name not in params:
            raise ValueError(f"sensitivity names {name!r}, which the model does not have")
        if not isinstance(value, torch.Tensor) or value.shape != params[name].shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"sensitivity[{name!r}] must have the parameter's shape "
                             f"{tuple(params[name].shape)}, got {got}")  # fmt: skip
        if value.dim() != 1 and name not in matrices:
            raise ValueError(
                f"parameter {name!r} {tuple(value.shape)} is neither an nn.Linear weight nor a "
                "vector: SPT tunes only those; leave it out of the sensitivity (exclude=...)"
            )
        shapes[name] = tuple(value.shape)
    return shapes


class _Costs:
    """The plan's cost as a function of τ, over the globally sorted sensitivities."""

    def __init__(self, sensitivity: dict, shapes: dict, structured: str, rank: int,
                 alpha: float, beta: float) -> None:  # fmt: skip
        self.names = list(sensitivity)
        sizes = torch.tensor([math.prod(shapes[n]) for n in self.names])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        flat = torch.cat([sensitivity[n].detach().float().flatten().cpu() for n in self.names])
        self.order = torch.sort(flat, descending=True, stable=True).indices
        self.owner = torch.searchsorted(self.offsets, self.order, right=True) - 1
        matrix = torch.tensor([len(shapes[n]) == 2 for n in self.names])
        s_cost = torch.tensor([structured_cost(structured, rank, shapes[n]) if len(shapes[n]) == 2
                               else sizes[i].item() for i, n in enumerate(self.names)])  # fmt: skip
        self.matrix, self.sizes, self.s_cost = matrix, sizes, s_cost
        # Structured (or whole) from this many entries on.
        self.threshold = torch.where(matrix, s_cost.double() / alpha, sizes.double() / beta)

    def counts(self, tau: int) -> torch.Tensor:
        return torch.bincount(self.owner[:tau], minlength=len(self.names))

    def costs(self, counts: torch.Tensor) -> torch.Tensor:
        switch = (counts > 0) & (counts >= self.threshold)
        return torch.where(switch, self.s_cost, counts)

    def total(self, tau: int) -> int:
        return int(self.costs(self.counts(tau)).sum())


def _largest_tau(costs: _Costs, budget: int) -> int:
    low, high = 1, costs.order.numel()  # total(low) <= budget < total(high + 1)
    if costs.total(high) <= budget:
        return high
    while low < high:
        mid = (low + high + 1) // 2
        if costs.total(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def allocate(
    sensitivity: dict[str, torch.Tensor],
    model: nn.Module,
    budget: int | float,
    *,
    structured: str = "lora",
    rank: int = 8,
    alpha: float = 10.0,
    beta: float = 5.0,
) -> SPTPlan:
    """The plan tuning the most sensitive entries under ``budget`` trainable parameters.

    Args:
        sensitivity: ``{name: tensor of the parameter's shape}`` (``spt.sensitivity``).
        model: the model the names refer to.
        budget: the most trainable parameters (heads excluded), > 0.
        structured: ``"lora"`` (rank-r LoRA in parallel) or ``"adapter"`` (SPT-Adapter).
        rank: the structured modules' rank.
        alpha: a matrix goes structured when its count ≥ structured cost / alpha.
        beta: a vector is tuned whole when its count ≥ its length / beta.
    """
    if structured not in ("lora", "adapter"):
        raise ValueError(f"structured must be 'lora' or 'adapter', got {structured!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0 \
            or not math.isfinite(budget):  # fmt: skip
        raise ValueError(f"budget must be a positive number of parameters, got {budget!r}")
    budget = int(budget)
    shapes = _check_sensitivity(sensitivity, model)
    costs = _Costs(sensitivity, shapes, structured, rank, alpha, beta)
    smallest = costs.total(1)
    if smallest > budget:
        raise ValueError(f"budget {budget:,} is below the smallest possible plan "
                         f"({smallest:,} trainable parameters)")  # fmt: skip
    tau = _largest_tau(costs, budget)
    counts = costs.counts(tau)
    per_param = costs.costs(counts)
    chosen = costs.order[:tau]
    owner = costs.owner[:tau]
    plan = SPTPlan(budget, tau, structured, rank, float(alpha), float(beta))
    for i, name in enumerate(costs.names):
        c = int(counts[i])
        if c == 0:
            continue
        matrix = len(shapes[name]) == 2
        switched = c >= float(costs.threshold[i])
        kind = (structured if switched else "unstructured") if matrix else (
            "whole" if switched else "partial")  # fmt: skip
        index = None
        if kind in ("unstructured", "partial"):
            index = (chosen[owner == i] - costs.offsets[i]).sort().values.tolist()
        plan.entries[name] = PlanEntry(name, shapes[name], kind, c, int(per_param[i]), index)
    return plan
