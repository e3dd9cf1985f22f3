"""Sensitivity-aware sparse tuning (SPT, thesis ch. 2) for any model built of ``nn.Linear``.

sensitivity(model, batches)        Σ of squared gradients per parameter entry
allocate(sensitivity, model, budget) -> SPTPlan   top-τ entries, LoRA / unstructured /
                                   vectors, τ searched exactly under the budget
apply(model, plan)                 SparseDeltaLinear / LoRALinear / AdapterLinear in place
param_groups(model, weight_decay)  AdamW groups: no decay on deltas and vectors
merge(model)                       deltas and LoRAs folded back into plain nn.Linear
"""

from stitchops.spt.allocate import PlanEntry, SPTPlan, allocate
from stitchops.spt.apply import apply, merge, param_groups, trainable_count
from stitchops.spt.sensitivity import sensitivity

__all__ = [
    "PlanEntry",
    "SPTPlan",
    "allocate",
    "apply",
    "merge",
    "param_groups",
    "sensitivity",
    "trainable_count",
]
