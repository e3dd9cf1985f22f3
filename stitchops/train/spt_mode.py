"""``stitchops train --mode spt``: the SPT steps around the shared training loop.

1. ``prepare``: on a fresh run, the sensitivity of the pretrained anchor on the first
   ``spt_batches`` training batches (``stitchops.spt.sensitivity``), the allocation under
   ``budget`` (printed, saved as ``plan.json``), or a given plan (a JSON file, or
   ``"lora-all"``: a rank-``spt_rank`` LoRA on every matrix, the LoRA baseline); then
   ``stitchops.spt.apply`` with the official recipe's defaults: the head and the class token
   fully trainable (``spt_train_cls``), dropout 0.1 on the LoRA branches' input and
   drop-path 0.1 on the structured branches (``spt_dropout``, ``spt_drop_path``). A resumed
   run or a loaded checkpoint re-applies the plan saved in the checkpoint, so the state dict
   fits. (The official fine-tuning also runs the backbone with stochastic depth 0.1; our
   ViT has none: the one recipe difference left.)
2. the shared loop fine-tunes the trainable parameters (AdamW groups from
   ``spt.param_groups``: no weight decay on deltas and vectors).
3. ``finish``: accuracy on the validation split, and ``merged.safetensors``: the plain ViT's
   weights with every delta and LoRA folded in (loads with ``--anchor-weights``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from stitchops import spt
from stitchops.spt.allocate import PlanEntry, SPTPlan, linear_weights
from stitchops.train.evaluate import validation_accuracy


def parse_budget(text: str | float | int) -> float:
    """``"0.4M"``, ``"400k"``, ``"1e5"`` or a number → parameters (> 0)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text.strip()[-1:].lower(), 1.0)
        digits = text.strip()[:-1] if scale != 1.0 else text.strip()
        try:
            value = float(digits) * scale
        except ValueError:
            raise ValueError(
                f"budget {text!r} is not a number of parameters (e.g. 0.4M, 400k, 400000)"
            ) from None
    if not value > 0:
        raise ValueError(f"budget must be > 0 parameters, got {text!r}")
    return value


def lora_everywhere(model: nn.Module, rank: int, exclude=("head",)) -> SPTPlan:
    """The plan of the LoRA baseline: a rank-``rank`` LoRA on every ``nn.Linear`` weight."""
    entries = {}
    for name in sorted(linear_weights(model)):
        if any(e in name for e in exclude):
            continue
        shape = tuple(model.get_parameter(name).shape)
        cost = rank * (shape[0] + shape[1])
        entries[name] = PlanEntry(name, shape, "lora", 0, cost)
    total = sum(e.cost for e in entries.values())
    return SPTPlan(total, 0, "lora", rank, 1.0, 1.0, entries)


def _sensitivity_batches(train_set, cfg):
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))
    for b in range(min(cfg.spt_batches, len(train_set) // cfg.batch_size)):
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size].tolist()
        images, labels = zip(*(train_set[i] for i in idx), strict=True)
        yield torch.stack(images), torch.stack([torch.as_tensor(y) for y in labels])


def make_plan(model: nn.Module, cfg, train_set, announce: bool) -> SPTPlan:
    if cfg.spt_plan == "lora-all":
        return lora_everywhere(model, cfg.spt_rank)
    if cfg.spt_plan:
        return SPTPlan.load(cfg.spt_plan)
    sens = spt.sensitivity(
        model,
        _sensitivity_batches(train_set, cfg),
        per_sample=cfg.spt_per_sample,
        progress=announce,
    )
    return spt.allocate(
        sens,
        model,
        cfg.budget,
        structured=cfg.spt_structured,
        rank=cfg.spt_rank,
        alpha=cfg.spt_alpha,
        beta=cfg.spt_beta,
        split_fused=cfg.spt_split_fused,
        tau_search=cfg.spt_tau_search,
    )


def _apply(model: nn.Module, plan: SPTPlan, cfg) -> None:
    trainable = ("head", "cls_token") if cfg.spt_train_cls else ("head",)
    spt.apply(
        model, plan, trainable=trainable, dropout=cfg.spt_dropout, drop_path=cfg.spt_drop_path
    )


def prepare(model: nn.Module, cfg, train_set, meta: dict | None, rank: int) -> SPTPlan:
    """The run's plan, applied to ``model`` (module docstring, step 1)."""
    if meta is not None:
        plan = SPTPlan.from_dict(meta["spt_plan"])
    else:
        plan = make_plan(model, cfg, train_set, announce=cfg.progress and rank == 0)
        if rank == 0:
            out = Path(cfg.out)
            out.mkdir(parents=True, exist_ok=True)
            plan.save(out / "plan.json")
            if cfg.progress:
                print(plan, flush=True)
    _apply(model, plan, cfg)
    return plan


def apply_saved(model: nn.Module, meta: dict, cfg) -> None:
    """Re-apply the plan a checkpoint recorded (before loading its state dict)."""
    _apply(model, SPTPlan.from_dict(meta["spt_plan"]), cfg)


def accuracy(model: nn.Module, data: str, cfg_model, device, batch_size: int = 256) -> float:
    """Validation accuracy (``stitchops.train.evaluate.validation_accuracy``)."""
    return validation_accuracy(model, data, device, batch_size)


def finish(model: nn.Module, cfg, device) -> dict:
    """Validation accuracy, trainable count, and the merged weights (module docstring, 3)."""
    from safetensors.torch import save_file

    out = Path(cfg.out)
    trainable = spt.trainable_count(model, exclude=("head", "cls_token"))
    acc = accuracy(model, cfg.data, model.cfg, device)
    merged = spt.merge(copy.deepcopy(model).cpu())
    merged_acc = accuracy(merged.to(device), cfg.data, model.cfg, device)
    state = {k: v.contiguous() for k, v in merged.state_dict().items()}
    save_file({k: v.cpu() for k, v in state.items()}, str(out / "merged.safetensors"))
    result = {
        "accuracy": acc,
        "merged_accuracy": merged_acc,
        "trainable_without_head": trainable,
        "head": sum(p.numel() for n, p in model.named_parameters() if "head" in n),
        "class_token": sum(
            p.numel() for n, p in model.named_parameters() if "cls_token" in n and p.requires_grad
        ),
    }
    (out / "spt.json").write_text(json.dumps(result, indent=1))
    if cfg.progress:
        print(
            f"spt: val accuracy {100 * acc:.2f}% (merged {100 * merged_acc:.2f}%), "
            f"{trainable:,} trainable parameters + head and class token; "
            f"{out / 'merged.safetensors'}",
            flush=True,
        )
    return result
