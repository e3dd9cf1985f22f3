"""SPViT's search (thesis ch. 4, Eq. 4.9-4.13): every block of a pretrained ViT made single
path (``UnifiedAttention``, ``UnifiedMlp``), trained with

    L = CE + λ · (F_target − F)²       (F in GFLOPs, differentiable in the gates)

the gate logits (``*_thresholds``) by their own optimizer group (the official code: AdamW,
lr 5e-4, no weight decay, no decay of the rate), everything else as usual.
``apply(model, ...)`` converts the model in place and returns the ``Search`` handle.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch import nn

from stitchops.models.flexi import _pair
from stitchops.nn.spvit import UnifiedAttention, UnifiedMlp, check_kernel_sizes, expected_gates
from stitchops.spvit.geometry import Geometry, attention_flops, dense_flops, geometry
from stitchops.spvit.plan import BlockPlan, Plan

LAMBDA_MARGIN = 1.1  # λ = "auto": the FLOPs term starts at 1.1× the task loss


class Search:
    """The handle of a model under search: FLOPs, the complexity loss, the optimizer's two
    parameter groups, the plan, the per-step random streams of the gates."""

    def __init__(self, model: nn.Module, target_flops: float, lam, kernel_sizes) -> None:
        self.model, self.kernel_sizes = model, tuple(kernel_sizes)
        self.geometry: Geometry = geometry(model)
        self.depth = len(model.blocks)
        self.dense_flops = dense_flops(self.geometry, self.depth)
        self.target_flops = float(target_flops)
        self.lam = lam  # a float, or "auto" until calibrate()
        self.generator: torch.Generator | None = None

    def layers(self) -> Iterator[tuple[UnifiedAttention, UnifiedMlp]]:
        for block in self.model.blocks:
            yield block.attn, block.mlp

    # ------------------------------------------------------------------ FLOPs and the loss
    def flops(self) -> torch.Tensor:
        """The expected FLOPs of one image (deterministic gates forward, their sigmoid's
        gradient backward), differentiable in every gate logit; ``vit_flops`` when every
        gate is open."""
        g = self.geometry
        choices = [*(f"conv{k}x{k}" for k in self.kernel_sizes), "msa"]
        steps = [attention_flops(g, op) for op in choices]
        total = torch.tensor(float(g.embed_flops + g.tail_flops))
        for attn, mlp in self.layers():
            gates = torch.cumprod(expected_gates(attn.kernel_thresholds), 0)
            previous = 0.0
            for gate, step in zip(gates, steps, strict=True):
                total = total + gate * (step - previous)
                previous = step
            kept = expected_gates(mlp.ffn_thresholds).sum()
            if kept.detach() > 0:
                total = total + 5 * g.tokens * g.dim + 2 * g.tokens * g.dim * kept
        return total

    def complexity_loss(self) -> torch.Tensor:
        """λ·(F_target − F)² in GFLOPs (Eq. 4.13)."""
        if self.lam == "auto":
            raise ValueError("λ is 'auto': call calibrate(task_loss) at the first step")
        gap = (self.target_flops - self.flops()) / 1e9
        return self.lam * gap**2

    def calibrate(self, task_loss: float) -> float:
        """λ = "auto": set λ so that the FLOPs term starts at LAMBDA_MARGIN × the task loss
        (the official maintainers' advice: slightly above the cross-entropy); returns λ."""
        if self.lam == "auto":
            gap = float((self.target_flops - self.flops().detach()) / 1e9)
            self.lam = LAMBDA_MARGIN * task_loss / max(gap * gap, 1e-12)
        return float(self.lam)

    # ------------------------------------------------------------------ optimisation
    def arch_parameters(self) -> list[nn.Parameter]:
        """The gate logits: the official code's architecture optimizer."""
        return [p for n, p in self.model.named_parameters() if n.endswith("_thresholds")]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other trainable parameter (the mixing logits among them)."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in arch]

    def seed(self, seed: int) -> None:
        """The gates of the next forward are drawn from ``seed`` (the loop: per step and
        process, so a resumed search draws the same gates)."""
        if self.generator is None:
            device = next(self.model.parameters()).device
            self.generator = torch.Generator(device=device)
            for attn, mlp in self.layers():
                attn.generator = mlp.generator = self.generator
        self.generator.manual_seed(seed)

    # ------------------------------------------------------------------ the result
    def plan(self) -> Plan:
        """The architecture the deterministic gates choose now, with its FLOPs."""
        blocks = [BlockPlan(attn.choice(), mlp.kept()) for attn, mlp in self.layers()]
        plan = Plan(self.kernel_sizes, blocks, self.dense_flops)
        plan.flops = self.geometry.embed_flops + self.geometry.tail_flops
        plan.flops += sum(plan.block_flops(self.geometry))
        return plan


def _target(dense: int, target_flops, target_ratio) -> float:
    if (target_flops is None) == (target_ratio is None):
        raise ValueError("give exactly one of target_flops and target_ratio")
    if target_ratio is not None:
        if not 0 < target_ratio <= 1:
            raise ValueError(f"target_ratio must be in (0, 1], got {target_ratio}")
        return target_ratio * dense
    if target_flops <= 0:
        raise ValueError(f"target_flops must be > 0, got {target_flops}")
    return float(target_flops)


_GRID_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_grid(model: nn.Module, modules: list[nn.Module]) -> None:
    """A hook on the patch embedding that tells ``modules`` each forward's token grid
    (replacing the one an earlier call installed on ``model``; none for no modules)."""
    previous = _GRID_HOOKS.pop(model, None)
    if previous is not None:
        previous.remove()
    if not modules:
        return

    def read(embedding, args):
        height, width = args[0].shape[-2:]
        patch = args[1] if len(args) > 1 and args[1] is not None else embedding.patch_size
        ph, pw = _pair(patch)
        for module in modules:
            module.grid = (height // ph, width // pw)

    _GRID_HOOKS[model] = model.patch_embed.register_forward_pre_hook(read)


def apply(
    model: nn.Module,
    *,
    kernel_sizes=(1, 3),
    target_flops: float | None = None,
    target_ratio: float | None = None,
    lam="auto",
    alpha: float = 1e-2,
    theta: float = 1.5,
) -> Search:
    """Convert every block of ``model`` (a ViT of this package, or timm's) for the search, in
    place: ``block.attn`` → ``UnifiedAttention`` around its own qkv and proj, ``block.mlp`` →
    ``UnifiedMlp`` around its fc1 and fc2 (parameter names kept: a checkpoint of the plain
    model loads, only SPViT's tensors are new). Target: ``target_flops`` per image, or
    ``target_ratio`` of the dense model's. ``lam``: λ, or "auto" (``Search.calibrate``)."""
    if lam != "auto" and (isinstance(lam, bool) or not isinstance(lam, int | float) or lam < 0):
        raise ValueError(f"lam must be 'auto' or a number >= 0, got {lam!r}")
    if any(isinstance(block.attn, UnifiedAttention) for block in model.blocks):
        raise ValueError("the model is already converted for SPViT's search")
    check_kernel_sizes(kernel_sizes)
    g = geometry(model)
    target = _target(dense_flops(g, len(model.blocks)), target_flops, target_ratio)
    # every argument checked: only now is the model changed
    prefix = getattr(model, "num_prefix_tokens", 1)
    converted = []
    for block in model.blocks:
        block.attn = UnifiedAttention.wrap(
            block.attn, kernel_sizes=kernel_sizes, prefix=prefix, alpha=alpha, theta=theta
        )
        block.mlp = UnifiedMlp.wrap(block.mlp, theta=theta)
        converted.append(block.attn)
    record_grid(model, converted)
    search = Search(model, target, lam, kernel_sizes)
    return search
