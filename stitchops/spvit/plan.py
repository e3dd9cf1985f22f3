"""A searched SPViT architecture: per block the attention's op and the MLP's kept units.

Saved as JSON (``plan.json``): ``{"kernel_sizes": [1, 3], "dense_flops": F, "flops": F',
"blocks": [{"op": "conv3x3", "mlp_keep": [0, 5, ...]}, ...]}``; ``table()`` prints it with
each block's FLOPs and parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stitchops.spvit.geometry import Geometry, attention_flops, mlp_flops


@dataclass
class BlockPlan:
    op: str  # "skip", "conv{k}x{k}" or "msa"
    mlp_keep: list[int] = field(default_factory=list)  # the kept hidden units, increasing


@dataclass
class Plan:
    kernel_sizes: tuple[int, ...]
    blocks: list[BlockPlan]
    dense_flops: int = 0
    flops: int = 0

    def block_flops(self, g: Geometry) -> list[int]:
        return [attention_flops(g, b.op) + int(mlp_flops(g, len(b.mlp_keep))) for b in self.blocks]

    def block_params(self, g: Geometry) -> list[int]:
        """Deployed parameters per block (BatchNorm folded into its convolution)."""
        d, hd = g.dim, g.head_dim
        counts = []
        for b in self.blocks:
            attn = 0 if b.op == "skip" else 2 * d  # norm1
            if b.op == "msa":
                attn += 3 * d * d + 3 * d + d * d + d
            elif b.op != "skip":
                k = int(b.op.removeprefix("conv").split("x")[0])
                attn += k * k * d * hd + hd + hd * d + d
            kept = len(b.mlp_keep)
            mlp = 0 if kept == 0 else 2 * d + d * kept + kept + kept * d + d
            counts.append(attn + mlp)
        return counts

    def to_dict(self) -> dict:
        return {
            "kernel_sizes": list(self.kernel_sizes),
            "dense_flops": self.dense_flops,
            "flops": self.flops,
            "blocks": [{"op": b.op, "mlp_keep": b.mlp_keep} for b in self.blocks],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        try:
            sizes = tuple(int(k) for k in data["kernel_sizes"])
            blocks = [
                BlockPlan(str(b["op"]), [int(i) for i in b["mlp_keep"]]) for b in data["blocks"]
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"not an SPViT plan ({err!r}): expected kernel_sizes and blocks of {{op, mlp_keep}}"
            ) from None
        known = {"skip", "msa", *(f"conv{k}x{k}" for k in sizes)}
        for i, b in enumerate(blocks):
            if b.op not in known:
                raise ValueError(f"block {i}: op {b.op!r} is not one of {sorted(known)}")
        return cls(sizes, blocks, int(data.get("dense_flops", 0)), int(data.get("flops", 0)))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"SPViT plan {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"SPViT plan {path} is not JSON: {err}") from None
        return cls.from_dict(data)

    def check_fits(self, depth: int, hidden: int) -> None:
        """ValueError unless the plan is for ``depth`` blocks of MLP width ``hidden``."""
        if len(self.blocks) != depth:
            raise ValueError(f"the plan has {len(self.blocks)} blocks, the model {depth}")
        for i, b in enumerate(self.blocks):
            if any(not 0 <= u < hidden for u in b.mlp_keep) or b.mlp_keep != sorted(
                set(b.mlp_keep)
            ):
                raise ValueError(f"block {i}: mlp_keep must be increasing units below {hidden}")

    def table(self, g: Geometry) -> str:
        """One line per block (op, kept MLP units, MFLOPs, parameters) and the totals."""
        flops, params = self.block_flops(g), self.block_params(g)
        lines = [f"{'block':>5}  {'attention':<9}  {'mlp units':>9}  {'MFLOPs':>8}  {'params':>8}"]
        for i, (b, f, p) in enumerate(zip(self.blocks, flops, params, strict=True)):
            units = f"{len(b.mlp_keep)}/{g.hidden}"
            lines.append(f"{i:>5}  {b.op:<9}  {units:>9}  {f / 1e6:>8.2f}  {p:>8}")
        ratio = f" ({self.flops / self.dense_flops:.0%} of dense)" if self.dense_flops else ""
        lines.append(f"total: {self.flops / 1e6:.2f} MFLOPs{ratio}")
        return "\n".join(lines)
