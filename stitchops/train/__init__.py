"""Training and evaluation of anchors and stitched ViTs (samplers, loop, data, evaluation)."""

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
