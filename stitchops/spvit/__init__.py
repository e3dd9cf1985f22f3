"""SPViT (thesis ch. 4): prune a ViT's self-attention layers into convolutions in a single
path, and its MLPs unit by unit, under a FLOPs target.

apply(model, target_ratio=0.6)      convert in place for the search; returns the Search:
                                    flops(), complexity_loss(), arch_parameters(),
                                    weight_parameters(), plan()
finalize(model, plan)               the pruned dense model (convolutions, MSAs, sliced MLPs)
prune(model, plan)                  that structure on a plain model (to load a saved one)
Plan                                per block the op and the kept MLP units; JSON, table
count_flops(model), fold_batchnorm(model)
"""

from stitchops.spvit.finalize import count_flops, finalize, fold_batchnorm, prune
from stitchops.spvit.plan import BlockPlan, Plan
from stitchops.spvit.search import Search, apply

__all__ = [
    "BlockPlan",
    "Plan",
    "Search",
    "apply",
    "count_flops",
    "finalize",
    "fold_batchnorm",
    "prune",
]
