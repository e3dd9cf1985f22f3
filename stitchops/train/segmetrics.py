"""Segmentation metrics from a confusion matrix: mIoU, per-class IoU and accuracy, pixel
accuracy, as mmseg computes them.

``matrix[t, p]`` counts the pixels of ground-truth class t predicted as p, over every batch
(and, after ``all_reduce``, every DDP rank); pixels labelled ``ignore_index`` are not
counted. Per class c, with TP = matrix[c, c], GT = Σ_p matrix[c, p], PRED = Σ_t matrix[t, c]:

    IoU_c = TP / (GT + PRED − TP)        Acc_c = TP / GT        aAcc = Σ_c TP / Σ GT

A class absent from both prediction and ground truth has no IoU (NaN) and is left out of the
mean (mIoU = nanmean), as is a class with no ground-truth pixel from mAcc.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Accumulates ``matrix[t, p]`` over batches of predicted and true label maps."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` integer label maps of one shape ([B, H, W])."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
            )
        valid = target != self.ignore_index
        t, p = target[valid].long(), pred[valid].long()
        bad = (t < 0) | (t >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"target holds label {int(t[bad][0])}, outside 0..{self.num_classes - 1} and not "
                f"the ignore index {self.ignore_index}"
            )
        if ((p < 0) | (p >= self.num_classes)).any():
            raise ValueError(f"pred holds labels outside 0..{self.num_classes - 1}")
        counts = torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes).to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrices of every DDP rank (a no-op without a process group)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def scores(self) -> dict:
        """{"mIoU", "mAcc", "aAcc", "IoU": [per class, NaN if absent], "Acc": [...]}."""
        m = self.matrix.double()
        tp, gt, pred = m.diag(), m.sum(1), m.sum(0)
        union = gt + pred - tp
        nan = torch.full_like(tp, float("nan"))
        iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
        total = gt.sum()
        return {
            "mIoU": torch.nanmean(iou).item(),
            "mAcc": torch.nanmean(acc).item(),
            "aAcc": (tp.sum() / total).item() if total > 0 else float("nan"),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
        }
