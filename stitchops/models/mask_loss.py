"""Mask2Former's training objective for semantic segmentation (Cheng et al., CVPR 2022), as
FASeg trains with it.

Targets: per image, one binary mask per class present in the label map (ignored pixels,
255, belong to no mask). Each prediction (``Prediction``: class logits [B, Q, K+1], mask
logits [B, Q, h, w]) is matched one-to-one to the targets by the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``) on the cost
    2·(−p(class)) + 5·BCE + 5·dice,
the mask terms on ``points`` points sampled uniformly (the same for every pair). The loss:
    2·CE over every query (matched: its target class; unmatched: no-object, weight 0.1)
  + 5·BCE + 5·dice on the matched pairs, on ``points`` points per mask chosen by
    uncertainty (Mask2Former's importance sampling: 3× as many random points, the 75% whose
    logits are nearest 0, plus 25% uniform; ``sampling="uniform"``: uniform only),
normalised by the number of target masks, summed over every prediction (deep supervision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

SAMPLINGS = ("importance", "uniform")


@dataclass
class Prediction:
    """One decoder layer's output: ``classes`` [B, Q, K + 1] logits (the last is "no
    object"), ``masks`` [B, Q, h, w] logits."""

    classes: torch.Tensor
    masks: torch.Tensor


@dataclass(frozen=True)
class LossWeights:
    classes: float = 2.0
    mask: float = 5.0
    dice: float = 5.0
    no_object: float = 0.1


def targets_of(labels: torch.Tensor, num_classes: int, ignore_index: int = 255):
    """Per image: (class ids [T], binary masks [T, H, W] float) of the classes present."""
    out = []
    for label in labels:
        present = [c for c in label.unique().tolist() if c != ignore_index and 0 <= c < num_classes]
        classes = torch.tensor(present, dtype=torch.long, device=labels.device)
        masks = (label[None] == classes[:, None, None]).float()
        out.append((classes, masks))
    return out


def point_sample(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """masks [N, h, w] at points [N, P, 2] in [0, 1]² (x, y) → [N, P] (bilinear)."""
    grid = points[:, None] * 2.0 - 1.0
    return F.grid_sample(masks[:, None], grid, align_corners=False)[:, 0, 0]


def _pairwise_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[Q, P] logits against [T, P] targets → [Q, T] mean BCE."""
    positive = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    negative = F.binary_cross_entropy_with_logits(
        logits, torch.zeros_like(logits), reduction="none"
    )
    return (positive @ targets.T + negative @ (1 - targets).T) / logits.shape[1]


def _pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    probabilities = logits.sigmoid()
    numerator = 2 * probabilities @ targets.T
    denominator = probabilities.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def _uniform(shape, device, generator) -> torch.Tensor:
    """Uniform [0, 1) points from ``generator`` (made on the CPU when it is a CPU generator:
    the same points whatever the device)."""
    where = generator.device if generator is not None else device
    return torch.rand(*shape, generator=generator, device=where).to(device)


@torch.no_grad()
def match(prediction: Prediction, targets, points: int, weights: LossWeights, generator=None):
    """Per image, (query indices, target indices) of the Hungarian matching."""
    out = []
    for b, (classes, masks) in enumerate(targets):
        if classes.numel() == 0:
            empty = torch.empty(0, dtype=torch.long)
            out.append((empty, empty))
            continue
        probabilities = prediction.classes[b].float().softmax(-1)[:, classes]  # [Q, T]
        where = _uniform((1, points, 2), masks.device, generator)
        pred = point_sample(
            prediction.masks[b].float(), where.expand(prediction.masks.shape[1], -1, -1)
        )
        gold = point_sample(masks, where.expand(masks.shape[0], -1, -1))
        cost = (
            -weights.classes * probabilities
            + weights.mask * _pairwise_bce(pred, gold)
            + weights.dice * _pairwise_dice(pred, gold)
        )
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        out.append(
            (torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long))
        )
    return out


def uncertain_points(
    logits: torch.Tensor, points: int, sampling: str, generator=None
) -> torch.Tensor:
    """[N, points, 2] points for masks [N, h, w]: Mask2Former's importance sampling (3×
    random, the 75% with the smallest |logit|, then 25% uniform) or uniform."""
    n = logits.shape[0]
    if sampling == "uniform":
        return _uniform((n, points, 2), logits.device, generator)
    candidates = _uniform((n, 3 * points, 2), logits.device, generator)
    uncertainty = -point_sample(logits.detach(), candidates).abs()
    important = int(0.75 * points)
    top = uncertainty.topk(important, dim=1).indices
    chosen = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    return torch.cat([chosen, _uniform((n, points - important, 2), logits.device, generator)], 1)


def prediction_loss(
    prediction: Prediction,
    targets,
    num_classes: int,
    points: int,
    sampling: str,
    weights: LossWeights,
    generator=None,
) -> torch.Tensor:
    """One prediction's weighted loss (module docstring), normalised by the target count."""
    matches = match(prediction, targets, points, weights, generator)
    batch, queries = prediction.classes.shape[:2]
    wanted = torch.full(
        (batch, queries), num_classes, dtype=torch.long, device=prediction.classes.device
    )
    for b, ((rows, cols), (classes, _)) in enumerate(zip(matches, targets, strict=True)):
        wanted[b, rows] = classes[cols]
    class_weight = torch.ones(num_classes + 1, device=wanted.device)
    class_weight[-1] = weights.no_object
    loss = weights.classes * F.cross_entropy(
        prediction.classes.float().transpose(1, 2), wanted, class_weight
    )
    chosen = [prediction.masks[b, rows] for b, (rows, _) in enumerate(matches)]
    gold = [targets[b][1][cols] for b, (_, cols) in enumerate(matches)]
    logits, masks = torch.cat(chosen).float(), torch.cat(gold)
    count = max(1, masks.shape[0])
    if masks.shape[0]:
        where = uncertain_points(logits, points, sampling, generator)
        pred, truth = point_sample(logits, where), point_sample(masks, where)
        bce = F.binary_cross_entropy_with_logits(pred, truth, reduction="none").mean(1)
        probabilities = pred.sigmoid()
        dice = 1 - (2 * (probabilities * truth).sum(1) + 1) / (
            probabilities.sum(1) + truth.sum(1) + 1
        )
        loss = loss + (weights.mask * bce.sum() + weights.dice * dice.sum()) / count
    return loss


def mask_classification_loss(
    predictions: list[Prediction],
    labels: torch.Tensor,
    num_classes: int,
    points: int = 12544,
    sampling: str = "importance",
    ignore_index: int = 255,
    weights: LossWeights = LossWeights(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The deep-supervised loss of every prediction against label maps [B, H, W]; the random
    points come from ``generator`` (a training loop seeds one per step for exact resumes)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    targets = targets_of(labels, num_classes, ignore_index)
    return sum(
        prediction_loss(p, targets, num_classes, points, sampling, weights, generator)
        for p in predictions
    )
