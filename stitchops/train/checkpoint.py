"""safetensors checkpoints that resume exactly: model, optimizer, step, sampler streams.

One file: tensors ``model.<name>`` and ``optim.<param index>.<state key>``; the metadata
entry ``stitchops`` holds JSON with the run config, the step, the optimizer's param groups
and every process's sampler / patch-size random streams.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class _NotACheckpoint(ValueError):
    """A readable safetensors file without stitchops' metadata."""


def save_checkpoint(path, model, optimizer, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {
        f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
    }
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().clone()
    meta = {**meta, "param_groups": opt["param_groups"]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"stitchops": json.dumps(meta)})
    os.replace(tmp, path)


def read_checkpoint(path) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, meta) of a checkpoint file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    model, optim = {}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("stitchops")
            if raw is None:
                raise _NotACheckpoint(
                    f"{path} is a safetensors file but not a stitchops training checkpoint "
                    "(anchor weights go to train --anchor-weights)"
                )
            meta = json.loads(raw)
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                kind, _, rest = key.partition(".")
                if kind == "model":
                    model[rest] = f.get_tensor(key)
                else:
                    index, _, name = rest.partition(".")
                    optim.setdefault(int(index), {})[name] = f.get_tensor(key)
        optimizer = {"state": optim, "param_groups": meta.pop("param_groups")}
    except _NotACheckpoint:
        raise
    except Exception as exc:  # safetensors' own error types differ between its versions
        raise ValueError(
            f"cannot read checkpoint {path}: it is truncated, corrupt or not a stitchops "
            f"checkpoint ({type(exc).__name__}: {str(exc)[:120]}); use the checkpoint.safetensors "
            "that stitchops train wrote"
        ) from exc
    return model, optimizer, meta
