"""Parameter sensitivity (SPT, thesis Eq. 2.3 and Algorithm 1).

The sensitivity of an entry w is the first-order estimate of how much one gradient step on
it alone lowers the task loss, s = g², accumulated over a few task batches:

* default (the official code): Σ over batches of the squared gradient of the batch's mean
  loss;
* ``per_sample=True`` (the thesis's Algorithm 1): Σ over samples of each sample's squared
  gradient (micro-batches of one sample: exact, slower by the batch size).

The model runs in train mode (dropout and drop-path active, as the official code), its
parameters keep their dtype and device, and the squares accumulate in float32. Nothing of the
model changes: requires_grad flags, gradients and the training mode are restored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from stitchops.spt.allocate import linear_weights

EXCLUDE = ("head", "cls_token", "pos_embed", "patch_embed")


def _cross_entropy(model: nn.Module, inputs, targets) -> torch.Tensor:
    return F.cross_entropy(model(inputs), targets)


def ranked_parameters(model: nn.Module, exclude: Sequence[str]) -> dict[str, nn.Parameter]:
    """The parameters SPT ranks: the weights of the ``nn.Linear`` layers and every vector
    (biases, norms, layer scales) whose name contains none of ``exclude``. Other tensors
    (convolutions, embeddings, a StitchingLayer's weight) are left out: SPT tunes neither."""
    matrices = linear_weights(model)
    return {
        n: p
        for n, p in model.named_parameters()
        if (p.dim() == 1 or n in matrices) and not any(e in n for e in exclude)
    }


def sensitivity(
    model: nn.Module,
    batches: Iterable,
    *,
    loss_fn: Callable | None = None,
    exclude: Sequence[str] = EXCLUDE,
    per_sample: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Squared gradients summed over ``batches`` for every ranked parameter (the weights of
    ``nn.Linear`` layers and the vectors, less ``exclude``: ``ranked_parameters``).

    Args:
        model: any ``nn.Module``.
        batches: iterable of ``(inputs, targets)``; moved to the model's device.
        loss_fn: ``loss_fn(model, inputs, targets)`` -> scalar; default the cross-entropy of
            ``model(inputs)``.
        exclude: parameters whose names contain one of these strings are not ranked.
        per_sample: sum each sample's squared gradient instead of the batch mean's.
        progress: a tqdm bar over the batches.

    Returns:
        ``{name: float32 tensor of the parameter's shape}``.
    """
    loss_fn = loss_fn or _cross_entropy
    ranked = ranked_parameters(model, exclude)
    if not ranked:
        raise ValueError(f"sensitivity: every parameter of the model is excluded by {exclude}")
    device = next(iter(ranked.values())).device
    sums = {n: torch.zeros(p.shape, device=device, dtype=torch.float32) for n, p in ranked.items()}
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    saved_grads = {n: p.grad for n, p in model.named_parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in ranked.values():
            p.requires_grad_(True)
        model.train()
        for inputs, targets in tqdm(
            batches, desc="SPT sensitivity", disable=not progress, leave=False
        ):
            inputs, targets = inputs.to(device), targets.to(device)
            pieces = range(len(inputs)) if per_sample else [slice(None)]
            for piece in pieces:
                part = slice(piece, piece + 1) if per_sample else piece
                loss = loss_fn(model, inputs[part], targets[part])
                grads = torch.autograd.grad(loss, list(ranked.values()), allow_unused=True)
                for (name, _), g in zip(ranked.items(), grads, strict=True):
                    if g is not None:
                        sums[name] += g.float().square()
    finally:
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = saved_grads[n]
    return sums
