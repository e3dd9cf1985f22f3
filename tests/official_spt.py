"""The official SPT allocation (ziplab/SPT ``engine.get_sensitivity``), written from a reading
of its code, not copied: on a model with separate q, k, v layers, the top-τ entries of the
concatenated sensitivities (head, class token, patch and position embeddings left out), per
parameter its count c; vectors (``norm`` / ``bias`` in the name) whole when c ≥ len / β else
their c entries; matrices (``.q.``, ``.k.``, ``.v.``, ``proj``, ``fc``) structured when
c ≥ r·(in + out) / α else their c entries; τ swept as ⌈0.02·i·10⁶⌉, i = 1..79, keeping per
budget the plan whose cost plus the class token (the code's 768, a ViT-B's) is closest,
ties to the later τ.
"""

from __future__ import annotations

import math

import torch

SKIP = ("head", "cls_token", "patch_embed", "pos_embed")
MATRICES = (".q.", ".k.", ".v.", "proj", "fc")
VECTORS = ("norm", "bias")


def official_plans(sensitivity: dict, budgets_m, rank=8, alpha=10.0, beta=5.0, extra=768):
    """{budget in M: (structured matrix names, whole vectors, {name: sorted flat indices})}
    for ``sensitivity`` named as the official separate-q/k/v model."""
    names = [n for n in sensitivity if not any(k in n for k in SKIP)]
    large = torch.cat([sensitivity[n].flatten() for n in names])
    best = {b: (0.0, None) for b in budgets_m}
    for i in range(1, 80):
        tau = min(math.ceil(i * 0.02 * 1e6), large.numel())
        mask = torch.zeros_like(large)
        mask[large.topk(tau).indices] = 1.0
        parts = mask.split([sensitivity[n].numel() for n in names])
        structured, vectors, unstructured, cost = [], [], {}, 0
        for name, m in zip(names, parts, strict=True):
            shape, count = sensitivity[name].shape, int(m.sum())
            if any(k in name for k in VECTORS) and len(shape) == 1:
                if count >= shape[0] / beta:
                    vectors.append(name)
                    cost += shape[0]
                    continue
            elif any(k in name for k in MATRICES):
                structured_cost = rank * (shape[0] + shape[1])
                if count >= structured_cost / alpha:
                    structured.append(name)
                    cost += structured_cost
                    continue
            if count:
                unstructured[name] = m.nonzero().flatten().tolist()
                cost += count
        total = (cost + extra) / 1e6
        for b in budgets_m:
            if abs(total - b) <= abs(best[b][0] - b):
                best[b] = (total, (structured, vectors, unstructured))
    return {b: plan for b, (_, plan) in best.items()}
