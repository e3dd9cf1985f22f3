"""Training and evaluation: one loop for anchors, stitched ViTs (SN-Net, SN-Netv2, ESTA) and
SPT, for classification and segmentation (samplers, data, checkpoints, evaluation)."""

from stitchops.train.evaluate import StitchTable, eval_stitches, pareto_frontier, plot_stitches
from stitchops.train.loop import TrainConfig, load_trained, train
from stitchops.train.samplers import ESTASampler, ROSSampler, UniformSampler, snip_score

__all__ = [
    "ESTASampler",
    "ROSSampler",
    "StitchTable",
    "TrainConfig",
    "UniformSampler",
    "eval_stitches",
    "load_trained",
    "pareto_frontier",
    "plot_stitches",
    "snip_score",
    "train",
]
