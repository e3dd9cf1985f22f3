"""Trainable-parameter allocation under a budget (SPT, thesis Sec. 2.3.2, Eq. 2.4-2.5).

Take the τ most sensitive entries over every ranked parameter (ties: the earlier parameter,
then the earlier entry, first). For each parameter with c of them:

* an ``nn.Linear`` weight [d_out, d_in]: structured tuning when c ≥ cost_s / α, where
  cost_s = r·(d_in + d_out) for a LoRA of rank r and 2·r·d_out + r + d_out for an adapter
  (α = 1: the thesis's rule, structured tuning never adds parameters; α = 10: the official
  scripts); otherwise its c entries, unstructured;
* a vector (bias, norm): tuned whole when c ≥ len / β, otherwise its c entries.

A fused ``qkv`` projection (timm's ``*.qkv.weight`` [3D, D] and its bias) is ranked as three
matrices q, k and v (``split_fused=True``, the default), as the official code's separate
q / k / v layers: each part has its own structured cost r·(D + D) and threshold, and a plan
entry ``<name>[q]`` (``PlanEntry.parameter``, ``rows``); ``split_fused=False`` ranks the
fused matrix as one (a LoRA of 4rD instead of three of 2rD).

The plan's cost (unstructured entries + structured modules + vectors; heads and other
excluded parameters not counted) never decreases as τ grows, so τ is found by binary search
as the largest whose plan costs at most ``budget`` (``tau_search="exact"``). The official
code instead sweeps τ = ⌈0.02·i·10⁶⌉ for i = 1..79 and keeps the plan whose cost plus the
class token (its hard-coded 768, a ViT-B's) is closest to the budget, ties to the larger τ
(``tau_search="official"``): its 0.6, 0.8 and 1.0 M budgets can all land on the plan at the
sweep's end (τ = 1.58 M), and a plan may exceed the budget.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

KINDS = ("lora", "adapter", "unstructured", "whole", "partial")
TAU_SEARCHES = ("exact", "official")
FUSED_PARTS = ("q", "k", "v")
OFFICIAL_SWEEP = tuple(math.ceil(0.02 * i * 1e6) for i in range(1, 80))


@dataclass
class PlanEntry:
    """How one parameter (or one part of a fused one) is tuned."""

    name: str
    shape: tuple[int, ...]
    kind: str  # one of KINDS
    count: int  # its entries among the top τ
    cost: int  # trainable parameters this entry adds
    index: list[int] | None = None  # sorted flat indices (unstructured / partial)
    parameter: str | None = None  # a part's fused parameter (its name is parameter[part])
    rows: tuple[int, int] | None = None  # a part's rows [start, stop) of that parameter

    @property
    def tensor(self) -> str:
        """The model parameter this entry tunes."""
        return self.parameter or self.name


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
        lines = [
            f"{'parameter':<{width}}  {'shape':<14} {'kind':<12} {'sensitive':>10} "
            f"{'trainable':>10}"
        ]
        for e in self.entries.values():
            shape = "x".join(map(str, e.shape))
            lines.append(
                f"{e.name:<{width}}  {shape:<14} {e.kind:<12} {e.count:>10,} {e.cost:>10,}"
            )
        t = self.totals()
        lines.append(
            f"unstructured {t['unstructured'] + t['partial']:,} | structured "
            f"({self.structured}, r={self.rank}) {t['lora'] + t['adapter']:,} | whole vectors "
            f"{t['whole']:,} | total {t['total']:,} of budget {self.budget:,} (tau = {self.tau:,},"
            f" alpha = {self.alpha:g}, beta = {self.beta:g})"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            **{k: v for k, v in asdict(self).items() if k != "entries"},
            "entries": [asdict(e) for e in self.entries.values()],
        }

    @classmethod
    def from_dict(cls, data: dict) -> SPTPlan:
        """The plan of ``to_dict``'s dict; ValueError naming what is missing or malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise ValueError(
                "not an SPT plan: expected a JSON object with 'entries' (a list), "
                "'budget', 'tau', 'structured', 'rank', 'alpha' and 'beta', as "
                "stitchops' plan.json"
            )
        head = {k: v for k, v in data.items() if k != "entries"}
        missing = {"budget", "tau", "structured", "rank", "alpha", "beta"} - set(head)
        if missing:
            raise ValueError(f"not an SPT plan: missing {', '.join(sorted(missing))}")
        try:
            entries = [
                PlanEntry(
                    **{
                        **e,
                        "shape": tuple(e["shape"]),
                        "rows": tuple(e["rows"]) if e.get("rows") else None,
                    }
                )
                for e in data["entries"]
            ]
            plan = cls(**head, entries={e.name: e for e in entries})
        except (TypeError, KeyError) as err:
            raise ValueError(f"not an SPT plan: a malformed entry ({err})") from None
        for e in plan.entries.values():
            if e.kind not in KINDS:
                raise ValueError(f"not an SPT plan: entry {e.name!r} has kind {e.kind!r}")
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> SPTPlan:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from None
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def linear_weights(model: nn.Module) -> set[str]:
    """Names of the weights of the model's ``nn.Linear`` layers."""
    return {
        f"{name}.weight" if name else "weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


def structured_cost(structured: str, rank: int, shape: tuple[int, ...]) -> int:
    d_out, d_in = shape
    return rank * (d_in + d_out) if structured == "lora" else 2 * rank * d_out + rank + d_out


@dataclass(frozen=True)
class Ranked:
    """One matrix or vector as the allocation ranks it: a parameter, or a part of a fused
    one (``rows`` of ``parameter``)."""

    name: str
    values: torch.Tensor
    parameter: str
    rows: tuple[int, int] | None = None


def is_fused_qkv(name: str, shape: tuple[int, ...]) -> bool:
    """A fused q, k, v projection's weight [3D, D] or bias [3D] (timm's ``qkv`` names)."""
    return name.rsplit(".", 2)[-2:-1] == ["qkv"] and shape[0] % 3 == 0 and len(shape) <= 2


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
            raise ValueError(
                f"sensitivity[{name!r}] must have the parameter's shape "
                f"{tuple(params[name].shape)}, got {got}"
            )
        if value.dim() != 1 and name not in matrices:
            raise ValueError(
                f"parameter {name!r} {tuple(value.shape)} is neither an nn.Linear weight nor a "
                "vector: SPT tunes only those; leave it out of the sensitivity (exclude=...)"
            )
        bad = ~torch.isfinite(value) | (value < 0)
        if bool(bad.any()):
            raise ValueError(
                f"sensitivity[{name!r}] holds {int(bad.sum())} NaN, infinite or "
                "negative values: sensitivities are sums of squared gradients "
                "(>= 0); check the loss and the model for NaN"
            )
        shapes[name] = tuple(value.shape)
    return shapes


def ranked(sensitivity: dict, shapes: dict, split_fused: bool) -> list[Ranked]:
    """What the allocation ranks, in order: each parameter, a fused qkv one as its q, k, v."""
    out = []
    for name, value in sensitivity.items():
        if split_fused and is_fused_qkv(name, shapes[name]):
            size = shapes[name][0] // 3
            for i, part in enumerate(FUSED_PARTS):
                rows = (i * size, (i + 1) * size)
                out.append(Ranked(f"{name}[{part}]", value[rows[0] : rows[1]], name, rows))
        else:
            out.append(Ranked(name, value, name))
    return out


class _Costs:
    """The plan's cost as a function of τ, over the globally sorted sensitivities."""

    def __init__(
        self, items: list[Ranked], structured: str, rank: int, alpha: float, beta: float
    ) -> None:
        self.items = items
        self.names = [r.name for r in items]
        shapes = [tuple(r.values.shape) for r in items]
        self.shapes = dict(zip(self.names, shapes, strict=True))
        sizes = torch.tensor([math.prod(shape) for shape in shapes])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        flat = torch.cat([r.values.detach().float().flatten().cpu() for r in items])
        self.order = torch.sort(flat, descending=True, stable=True).indices
        self.owner = torch.searchsorted(self.offsets, self.order, right=True) - 1
        matrix = torch.tensor([len(shape) == 2 for shape in shapes])
        s_cost = torch.tensor(
            [
                structured_cost(structured, rank, shape) if len(shape) == 2 else sizes[i].item()
                for i, shape in enumerate(shapes)
            ]
        )
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


def _official_tau(costs: _Costs, budget: int, extra: int) -> int:
    """The official sweep's τ (module docstring): the plan closest to the budget (its cost
    plus ``extra``, the class token), ties to the larger τ; τ past the ranked entries is
    taken as all of them. As the official code starts from a distance of ``budget`` (its
    "plan of 0"), a sweep whose plans all cost more than twice the budget finds none."""
    best, gap = None, budget
    for tau in OFFICIAL_SWEEP:
        tau = min(tau, costs.order.numel())
        distance = abs(costs.total(tau) + extra - budget)
        if distance <= gap:
            best, gap = tau, distance
    if best is None:
        smallest = costs.total(min(OFFICIAL_SWEEP[0], costs.order.numel())) + extra
        raise ValueError(
            f"the official tau sweep has no plan for budget {budget:,}: its "
            f"smallest (tau 20,000) tunes {smallest:,} parameters, more than "
            "twice the budget; use tau_search='exact'"
        )
    return best


def allocate(
    sensitivity: dict[str, torch.Tensor],
    model: nn.Module,
    budget: int | float,
    *,
    structured: str = "lora",
    rank: int = 8,
    alpha: float = 10.0,
    beta: float = 5.0,
    split_fused: bool = True,
    tau_search: str = "exact",
) -> SPTPlan:
    """The plan tuning the most sensitive entries under ``budget`` trainable parameters.

    Args:
        sensitivity: ``{name: tensor of the parameter's shape}`` (``spt.sensitivity``); no
            NaN, infinite or negative value.
        model: the model the names refer to.
        budget: the most trainable parameters (heads excluded), > 0. A budget above what a
            plan can use (every ranked entry chosen) gives that plan, with a warning.
        structured: ``"lora"`` (rank-r LoRA in parallel) or ``"adapter"`` (SPT-Adapter).
        rank: the structured modules' rank.
        alpha: a matrix goes structured when its count ≥ structured cost / alpha.
        beta: a vector is tuned whole when its count ≥ its length / beta.
        split_fused: rank a fused qkv projection as its q, k and v (the official code).
        tau_search: ``"exact"`` (the largest τ within the budget) or ``"official"`` (the
            official τ sweep, module docstring).
    """
    if structured not in ("lora", "adapter"):
        raise ValueError(f"structured must be 'lora' or 'adapter', got {structured!r}")
    if tau_search not in TAU_SEARCHES:
        raise ValueError(f"tau_search must be one of {TAU_SEARCHES}, got {tau_search!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not budget > 0
        or not math.isfinite(budget)
    ):
        raise ValueError(f"budget must be a positive number of parameters, got {budget!r}")
    budget = int(budget)
    shapes = _check_sensitivity(sensitivity, model)
    costs = _Costs(ranked(sensitivity, shapes, split_fused), structured, rank, alpha, beta)
    if tau_search == "official":
        cls = dict(model.named_parameters()).get("cls_token")
        tau = _official_tau(costs, budget, cls.numel() if cls is not None else 0)
    else:
        smallest = costs.total(1)
        if smallest > budget:
            raise ValueError(
                f"budget {budget:,} is below the smallest possible plan "
                f"({smallest:,} trainable parameters)"
            )
        tau = _largest_tau(costs, budget)
        most = costs.total(costs.order.numel())
        if tau == costs.order.numel() and most < budget:
            warnings.warn(
                f"SPT budget {budget:,} is more than any plan uses: every ranked "
                f"entry is chosen and the plan tunes {most:,} parameters",
                stacklevel=2,
            )
    return _plan(costs, tau, budget, structured, rank, alpha, beta)


def _plan(costs: _Costs, tau: int, budget, structured, rank, alpha, beta) -> SPTPlan:
    counts = costs.counts(tau)
    per_param = costs.costs(counts)
    chosen = costs.order[:tau]
    owner = costs.owner[:tau]
    plan = SPTPlan(budget, tau, structured, rank, float(alpha), float(beta))
    for i, item in enumerate(costs.items):
        c = int(counts[i])
        if c == 0:
            continue
        shape = costs.shapes[item.name]
        matrix = len(shape) == 2
        switched = c >= float(costs.threshold[i])
        kind = (
            (structured if switched else "unstructured")
            if matrix
            else ("whole" if switched else "partial")
        )
        index = None
        if kind in ("unstructured", "partial"):
            index = (chosen[owner == i] - costs.offsets[i]).sort().values.tolist()
        parameter = item.parameter if item.rows is not None else None
        plan.entries[item.name] = PlanEntry(
            item.name, shape, kind, c, int(per_param[i]), index, parameter, item.rows
        )
    return plan
