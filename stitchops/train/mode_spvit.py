"""``stitchops train --mode spvit``: SPViT's search, then fine-tuning of the pruned model.

Two phases of the shared loop (``loop.run_phase``), each with its own folder and checkpoint
(so each resumes exactly, and a resumed search goes on into the fine-tuning):

1. search (``<out>/search``, ``--search-epochs``): the pretrained model converted in place
   (``stitchops.spvit.apply``), the loss CE + λ·(F_target − F)² with λ = ``--spvit-lambda``
   ("auto": the FLOPs term starts at 1.1× the cross-entropy, agreed over the processes), the
   gate logits in their own AdamW group at ``--spvit-arch-lr`` without decay or schedule (the
   official code), the gates drawn from a stream seeded per step and process. It writes
   ``<out>/search/plan.json`` (printed as a table), ``<out>/search/finalized.safetensors``
   (the pruned model made from the searched one) and ``<out>/search/gates.jsonl`` (each
   block's gate probabilities over the steps).
2. fine-tuning (``<out>``, ``--epochs``): the pruned model of the plan, from the search's
   finalised weights (or, with ``--spvit-plan FILE`` and no search, from the pretrained
   weights with SPViT's initial mixing), trained as an anchor; ``--distill FILE --teacher
   SPEC`` adds hard-label distillation here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from stitchops import spvit
from stitchops.nn.spvit import check_kernel_sizes
from stitchops.train.loop import Hooks, run_phase
from stitchops.train.plugins import ModePlugin, Option


def _kernels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in str(text).split(",") if k)
    except ValueError:
        raise ValueError(f"--spvit-kernels: expected odd sizes like 1,3, got {text!r}") from None


def _lambda(text):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--spvit-lambda: 'auto' or a number, got {text!r}") from None


OPTIONS = (
    Option("target_ratio", float, 0.7, "SPViT: the FLOPs target, a fraction of the dense ones"),
    Option("spvit_lambda", str, "auto", "SPViT: λ of the FLOPs loss, or 'auto'"),
    Option("spvit_kernels", str, "1,3", "SPViT: the convolutions a layer may become"),
    Option("search_epochs", int, 10, "SPViT: epochs of the search before the fine-tuning"),
    Option("spvit_arch_lr", float, 5e-4, "SPViT: the gate logits' learning rate (constant)"),
    Option("spvit_plan", str, None, "SPViT: a plan.json to fine-tune without searching"),
    Option("spvit_weights", str, None, "SPViT: the finalised weights the search wrote"),
    # what the fine-tuning takes from the run (kept in the search's config, for its resume)
    Option("finetune", dict, None, "the fine-tuning's epochs and distillation", cli=False),
)


def check(cfg) -> None:
    options = cfg.mode_options
    if cfg.task != "cls":
        raise ValueError("mode 'spvit' prunes classifiers (task cls)")
    if not 0 < float(options["target_ratio"]) <= 1:
        raise ValueError(f"--target-ratio must be in (0, 1], got {options['target_ratio']}")
    lam = _lambda(options["spvit_lambda"])
    if lam != "auto" and lam < 0:
        raise ValueError(f"--spvit-lambda must be >= 0, got {lam}")
    check_kernel_sizes(_kernels(options["spvit_kernels"]))
    if int(options["search_epochs"]) < 1:
        raise ValueError(f"--search-epochs must be >= 1, got {options['search_epochs']}")
    if options["spvit_plan"] is not None:
        spvit.Plan.load(options["spvit_plan"])  # a foreign or broken file: refused now
    if options["spvit_weights"] is not None and options["spvit_plan"] is None:
        raise ValueError("--spvit-weights fine-tunes a plan: give its --spvit-plan too")


class SearchHooks(Hooks):
    """The search phase: conversion, the FLOPs loss, the two optimizer groups, the gates."""

    def __init__(self) -> None:
        self.search: spvit.Search | None = None
        self.gates_log = None

    def prepare(self, run) -> None:
        options = run.cfg.mode_options
        self.search = spvit.apply(
            run.model,
            kernel_sizes=_kernels(options["spvit_kernels"]),
            target_ratio=float(options["target_ratio"]),
            lam=_lambda(options["spvit_lambda"]),
        )
        if run.main:
            run.out.mkdir(parents=True, exist_ok=True)
            self.gates_log = (run.out / "gates.jsonl").open("a")

    def param_groups(self, run) -> list:
        arch_lr = float(run.cfg.mode_options["spvit_arch_lr"])
        return [
            {"params": self.search.weight_parameters()},
            {
                "params": self.search.arch_parameters(),
                "lr": arch_lr,
                "weight_decay": 0.0,
                "fixed_lr": True,
            },
        ]

    def restore(self, run, meta: dict) -> None:
        self.search.lam = meta["spvit_lambda"]

    def before_step(self, run, step: int) -> None:
        self.search.seed((run.cfg.seed * 1_000_003 + step) * 1009 + run.rank)
        if self.gates_log is not None and step % run.cfg.log_every == 0:
            self._log_gates(step)

    def _log_gates(self, step: int) -> None:
        probs = [torch.sigmoid(attn.kernel_thresholds).tolist() for attn, _ in self.search.layers()]
        kept = [
            float((torch.sigmoid(mlp.ffn_thresholds) > 0.5).float().mean())
            for _, mlp in self.search.layers()
        ]
        record = {
            "step": step,
            "gates": probs,
            "mlp_kept": kept,
            "gflops": float(self.search.flops().detach()) / 1e9,
        }
        self.gates_log.write(json.dumps(record) + "\n")
        self.gates_log.flush()

    def extra_loss(self, run, task_loss: torch.Tensor):
        if self.search.lam == "auto":
            value = task_loss.detach().float().reshape(1)
            if run.world > 1:  # every process takes the same λ
                dist.all_reduce(value)
                value /= run.world
            self.search.calibrate(float(value))
        return self.search.complexity_loss()

    def meta(self, run) -> dict:
        return {"spvit_lambda": self.search.lam}

    def finish(self, run) -> bool:
        if self.gates_log is not None:
            self.gates_log.close()
        plan = self.search.plan()
        plan.save(run.out / "plan.json")
        print(
            f"SPViT search: λ {float(self.search.lam):.4g}, target "
            f"{self.search.target_flops / 1e6:.2f} MFLOPs\n" + plan.table(self.search.geometry),
            flush=True,
        )
        run.model.eval()
        pruned = spvit.finalize(run.model, plan)
        save_file(
            {k: v.contiguous() for k, v in pruned.state_dict().items()},
            str(run.out / "finalized.safetensors"),
        )
        return True


class FinetuneHooks(Hooks):
    """The fine-tuning phase: the plan's pruned model, from the search's weights."""

    def prepare(self, run) -> None:
        options = run.cfg.mode_options
        plan = spvit.Plan.load(options["spvit_plan"])
        if run.state is not None or options["spvit_weights"] is not None:
            spvit.prune(run.model, plan)  # the checkpoint's or the search's weights load next
            if run.state is None:
                run.model.load_state_dict(
                    load_file(options["spvit_weights"], device=str(run.device))
                )
        else:  # from the pretrained weights, SPViT's initial mixing (a mean of the heads)
            spvit.apply(run.model, kernel_sizes=plan.kernel_sizes, target_ratio=1.0)
            spvit.finalize(run.model, plan)
        run.model.train()
        self.plan = plan

    def meta(self, run) -> dict:
        return {"spvit_plan": self.plan.to_dict()}


def train(cfg, resume: str | None, overwrite: bool) -> Path:
    """Search (unless the config has a plan), then fine-tune; or resume either phase."""
    from stitchops.train.checkpoint import read_checkpoint
    from stitchops.train.config import TrainConfig
    from stitchops.train.loop import RUN_SETTINGS, claim_folder

    if resume is not None:
        saved = TrainConfig.from_dict(read_checkpoint(resume)[2]["config"])
        if saved.mode_options.get("spvit_plan") is not None:  # the fine-tuning
            return run_phase(cfg, resume, overwrite, FinetuneHooks())
        out = Path(cfg.out) if cfg.out else Path(resume).parent.parent
        run_phase(dataclasses.replace(cfg, out=str(out / "search")), resume, False, SearchHooks())
        settings = {key: getattr(cfg, key) for key in RUN_SETTINGS}
        return run_phase(
            _finetune_config(dataclasses.replace(saved, **settings), out),
            None,
            overwrite,
            FinetuneHooks(),
        )
    cfg = cfg.resolved()
    out = Path(cfg.out)
    if cfg.mode_options["spvit_plan"] is not None:
        return run_phase(cfg, None, overwrite, FinetuneHooks())
    for folder in (out, out / "search"):  # both refused (or cleared) before any work
        claim_folder(folder, overwrite)
    run_phase(_search_config(cfg, out), None, overwrite, SearchHooks())
    return run_phase(
        _finetune_config(_search_config(cfg, out), out), None, overwrite, FinetuneHooks()
    )


def _search_config(cfg, out: Path):
    """The search's config: its folder, its epochs, no distillation; what the fine-tuning
    takes from the run kept in ``finetune``."""
    finetune = {"epochs": cfg.epochs, "distill": cfg.distill, "teacher": cfg.teacher}
    options = {**cfg.mode_options, "finetune": finetune}
    return dataclasses.replace(
        cfg,
        out=str(out / "search"),
        distill="none",
        teacher=None,
        epochs=int(cfg.mode_options["search_epochs"]),
        mode_options=options,
    )


def _finetune_config(search_cfg, out: Path):
    """The fine-tuning's config, from the search's: the plan and weights the search wrote."""
    finetune = search_cfg.mode_options["finetune"]
    options = {
        **search_cfg.mode_options,
        "finetune": None,
        "spvit_plan": str(out / "search" / "plan.json"),
        "spvit_weights": str(out / "search" / "finalized.safetensors"),
    }
    return dataclasses.replace(search_cfg, out=str(out), mode_options=options, **finetune)


def load(model, meta: dict, cfg):
    """The model a checkpoint of either phase loads into: searched or pruned."""
    if "spvit_plan" in meta:
        return spvit.prune(model, spvit.Plan.from_dict(meta["spvit_plan"]))
    options = cfg.mode_options
    spvit.apply(model, kernel_sizes=_kernels(options["spvit_kernels"]), target_ratio=1.0)
    return model


def companions(cfg, device) -> list:
    """The dense model the run pruned (its pretrained weights), for ``stitchops eval``."""
    from stitchops.train.build import build_anchor

    if not cfg.anchor_weights or not Path(cfg.anchor_weights[0]).is_file():
        return []
    dense = build_anchor(cfg.anchors[0], cfg.anchor_weights[0], new_head=True)
    return [("dense model", dense.to(device))]


MODE = ModePlugin(
    name="spvit",
    help="SPViT's search of attention layers into convolutions and MLP units, then "
    "fine-tuning of the pruned model (--target-ratio)",
    options=OPTIONS,
    check=check,
    train=train,
    load=load,
    companions=companions,
)
