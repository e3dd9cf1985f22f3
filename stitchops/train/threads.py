"""How many intra-op threads a CPU run gets: chosen for the work, not left at the core count.

A tiny model's step is hundreds of small ops; each is a parallel region that waits for all
its threads, and with a busy neighbour core the second thread waits for a time slice at
every region (measured: ``stitchops demo`` 600 s with torch's two threads against 73 s with
one, another process busy on the machine). One thread per ``stitchops._runtime
.CPU_STEP_GRAIN_FLOPS`` of the model's largest GEMM in a step (at least one, at most the
cores); ``--threads N`` (or ``OMP_NUM_THREADS``) decides instead.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from stitchops._runtime import CPU_STEP_GRAIN_FLOPS


def cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS says, else the
    machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def largest_gemm_flops(model: nn.Module, rows: int) -> int:
    """FLOPs of the model's largest ``nn.Linear`` over ``rows`` token rows (2·rows·in·out)."""
    sizes = [m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    return 2 * rows * max(sizes, default=0)


def choose(model: nn.Module, rows: int, requested: int | None = None) -> tuple[int, str]:
    """(threads, why) for a CPU run of ``model`` whose steps carry ``rows`` token rows."""
    if requested is not None:
        return requested, f"--threads {requested}"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    flops = largest_gemm_flops(model, rows)
    threads = max(1, min(cores(), int(flops // CPU_STEP_GRAIN_FLOPS)))
    return threads, f"chosen for the work: largest GEMM {flops / 1e9:.2g} GFLOP a step"


def token_rows(model: nn.Module, batch: int) -> int:
    """Token rows of a batch through a ViT-like model (batch × tokens; batch if unknown)."""
    vit = getattr(model, "backbone", model)
    vit = vit.anchors[-1] if hasattr(vit, "anchors") else vit
    cfg = getattr(vit, "cfg", None)
    if cfg is None:
        return batch
    return batch * ((cfg.img_size // cfg.patch_size) ** 2 + 1)
