"""Training: anchors (pretraining), SN-Net, SN-Netv2 and ESTA, one loop, for classification
(``task="cls"``) or semantic segmentation (``task="seg"``: a ``Segmenter`` head on the anchor
or on a dense SN-Netv2 ``StitchedViT``, per-pixel cross-entropy with ignore index 255).

Plain PyTorch: AdamW, linear warm-up then cosine decay or mmseg's poly decay (set per step,
so a resumed run has exactly the same schedule), AMP (bf16 autocast) on CUDA, gradient
clipping, tqdm progress, a JSON-lines log (step, epoch, stitch, patch size, loss, lr) and
safetensors checkpoints that resume exactly. Multi-process through ``torchrun`` (DDP: gloo
on CPU, nccl on GPU): every process samples its own stitch from its own stream (seed +
rank), as SN-Net does; parameters outside the sampled routes get zero gradients through
``find_unused_parameters``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from stitchops import _memory, spt
from stitchops.models.segmentation import Segmenter
from stitchops.models.stitched import StitchedViT
from stitchops.train import build, plugins, spt_mode, threads
from stitchops.train.checkpoint import read_checkpoint, save_checkpoint
from stitchops.train.config import MODE_DEFAULTS, MODES, SINGLE_MODEL_MODES, TASKS, TrainConfig  # noqa: F401
from stitchops.train.data import DataError, load_dataset
from stitchops.train.images import IGNORE_INDEX
from stitchops.train.interrupt import StopRequests, TrainingInterrupted
from stitchops.train.outdir import check_output_folder
from stitchops.train.samplers import SAMPLERS, ESTASampler, ROSSampler, snip_score
from stitchops.train.segdata import has_split, load_seg_dataset

# What a resumed run takes from the command line instead of its checkpoint: where to stop,
# how to save and show it, and the machine's settings. Everything else (the schedule
# included) comes from the checkpoint, so the resumed run is the uninterrupted one.
RUN_SETTINGS = (
    "max_steps",
    "progress",
    "save_every",
    "save_minutes",
    "workers",
    "threads",
    "deterministic",
)
# The files of a run in its folder (``--overwrite`` removes them before a new run).
RUN_FILES = (
    "checkpoint.safetensors",
    "config.json",
    "log.jsonl",
    "usage.json",
    "plan.json",
    "spt.json",
    "merged.safetensors",
    "result.json",
)


def _dist_info() -> tuple[int, int, int]:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    return 0, 1, 0


def stitched_part(model):
    """The StitchedViT of a model (itself, or a Segmenter's backbone), or None."""
    backbone = model.backbone if isinstance(model, Segmenter) else model
    return backbone if isinstance(backbone, StitchedViT) else None


class _Step(torch.nn.Module):
    """One DDP forward: the sampled stitch, plus the largest anchor for in-place distillation."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, stitch_id, teacher_id, patch_size):
        stitched = stitched_part(self.model)
        if stitched is None:
            return self.model(x, patch_size=patch_size), None
        teacher = None
        if teacher_id is not None:
            stitched.select(teacher_id)
            teacher = self.model(x, patch_size=patch_size)
        stitched.select(stitch_id)
        return self.model(x, patch_size=patch_size), teacher


class _Batches(torch.utils.data.Sampler):
    """Index batches of steps [start, stop): epoch e is a permutation seeded by seed + e, split
    round-robin over the processes, last partial batch dropped. Deterministic in the step.
    ``keyed``: each item is (index, draw), draw numbering every sample the run draws (an
    augmented dataset seeds its random draws with it, so resuming draws the same)."""

    def __init__(self, n, batch_size, rank, world, seed, start, stop, keyed=False) -> None:
        self.n, self.bs, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.start, self.stop, self.keyed = start, stop, keyed
        self.per_epoch = (n // world) // batch_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        epoch, order = None, None
        for step in range(self.start, self.stop):
            e, b = divmod(step, self.per_epoch)
            if e != epoch:
                gen = torch.Generator().manual_seed(self.seed + e)
                order = torch.randperm(self.n, generator=gen)[self.rank :: self.world]
                epoch = e
            batch = order[b * self.bs : (b + 1) * self.bs].tolist()
            if self.keyed:
                first = (step * self.world + self.rank) * self.bs
                batch = [(i, first + j) for j, i in enumerate(batch)]
            yield batch


def _lr(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up, then cosine or poly (mmseg's: (1 − progress)^0.9) decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "poly":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - progress) ** 0.9
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


LOSS_OPTIONS = ("points", "sampling")  # decoder_options for the set loss, not the head


def _segmenter(backbone, num_classes: int, cfg: TrainConfig) -> Segmenter:
    head = {k: v for k, v in cfg.decoder_options.items() if k not in LOSS_OPTIONS}
    return Segmenter(
        backbone, num_classes, cfg.decoder, decoder_options=head if cfg.decoder == "faseg" else None
    )


def _task_loss(model, logits, labels, cfg: TrainConfig, step: int, rank: int) -> torch.Tensor:
    """Cross-entropy (classes, or pixels with 255 ignored), or a Segmenter's own loss (the
    FASeg set loss of the forward that gave ``logits``, its random points drawn from a
    generator seeded by the seed, step and rank: a resumed run draws the same)."""
    if isinstance(model, Segmenter):
        options = {k: v for k, v in cfg.decoder_options.items() if k in LOSS_OPTIONS}
        if cfg.decoder == "faseg":
            seed = (cfg.seed * 1_000_003 + step) * 1009 + rank
            options["generator"] = torch.Generator().manual_seed(seed)
        return model.loss(logits, labels, IGNORE_INDEX, **options)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def build_model(cfg: TrainConfig, with_weights: bool = True):
    """The model a config describes (weights of anchors loaded when ``with_weights``)."""
    weights = cfg.anchor_weights if with_weights else None
    if cfg.mode in SINGLE_MODEL_MODES or plugins.find(cfg.mode) is not None:
        anchor = build.build_anchor(cfg.anchors[0], weights[0] if weights else None, new_head=True)
        if cfg.task == "seg":
            return _segmenter(anchor, anchor.cfg.num_classes, cfg)
        return anchor
    anchors = build.build_anchors(cfg.anchors, weights)
    rank = cfg.rank
    if rank == -1:  # ESTA: d_out / 4 for every stitching layer (one rank for the model)
        rank = max(1, min(a.embed_dim for a in anchors) // 4)
    model = StitchedViT(
        anchors,
        kernel_size=cfg.kernel_size,
        stride=cfg.stride,
        partial_windows=cfg.partial_windows,
        nearest=cfg.nearest,
        two_way=cfg.two_way,
        rank=rank,
        alpha=cfg.alpha,
        stitch_biases=cfg.stitch_biases,
        dense=cfg.task == "seg",
    )
    if cfg.mode == "esta":
        model.enable_pst(cfg.pst_rank, cfg.alpha)
    if cfg.task == "seg":  # one head on the large anchor's width, shared by every stitch
        segmenter = _segmenter(model, anchors[-1].cfg.num_classes, cfg)
        if cfg.head_weights and with_weights:
            build.load_weights(segmenter.decoder, cfg.head_weights, prefix="decoder.")
        return segmenter
    return model


def make_sampler(cfg: TrainConfig, model, seed: int):
    flops = [s.flops for s in model.stitches]
    if cfg.sampler == "ros":
        step = cfg.ros_step * 1e9 if cfg.ros_step else None
        return ROSSampler(flops, step=step, seed=seed)
    if cfg.sampler == "esta":
        return ESTASampler(flops, cfg.esta_intervals, cfg.esta_momentum, cfg.esta_warmup, seed=seed)
    return SAMPLERS[cfg.sampler](flops, seed=seed)


def check_data_fits(dataset, model_cfg, data: str) -> str:
    """The data's classes must be the model head's, and every image readable (checked now, not
    after an epoch); returns how images become the model's input, in words."""
    classes = len(dataset.classes)
    if classes != model_cfg.num_classes:
        raise DataError(
            f"the data ({data}) has {classes} classes but the model's head has "
            f"{model_cfg.num_classes} outputs: add num_classes={classes} to the model spec"
        )
    scan = getattr(dataset, "scan", None)
    if scan is None:  # a tensor dataset: already the model's input
        return f"{len(dataset)} images, {classes} classes"
    return f"{len(dataset)} images, {classes} classes; {scan()}"


@dataclass
class _Run:
    """One training run's state, filled in by the phases of ``train``."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    state: tuple | None = None  # (model, optimizer, meta) of the checkpoint resumed from
    model: Any = None
    stitched: Any = None
    train_set: Any = None
    plan: Any = None
    optimizer: Any = None
    params: list = field(default_factory=list)
    sampler: Any = None
    patch_rng: random.Random | None = None
    start: int = 0
    per_epoch: int = 0
    total: int = 0
    stop: int = 0
    hooks: Any = None  # a plugin mode's Hooks (stitchops.train.plugins), or None

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Run (or resume from the checkpoint ``resume``) training; returns the path of the final
    checkpoint.

    A new run refuses a folder that holds one (``overwrite`` starts over there); a resumed
    run continues in the checkpoint's folder unless ``cfg.out`` names another. Checkpoints
    are written atomically at each epoch's end, every ``save_minutes`` and every
    ``save_every`` steps; on SIGINT / SIGTERM the step finishes, a checkpoint is saved and
    ``TrainingInterrupted`` is raised (module stitchops.train.interrupt).
    """
    mode = read_checkpoint(resume)[2]["config"]["mode"] if resume else cfg.mode
    plugin = plugins.find(mode)
    if plugin is not None:
        return plugin.train(cfg, resume, overwrite)
    return run_phase(cfg, resume, overwrite)


class Hooks:
    """What a plugin mode changes in a phase of the loop; the defaults change nothing."""

    def prepare(self, run: _Run) -> None:
        """After the model and the data are built, before a checkpoint's state is loaded."""

    def param_groups(self, run: _Run) -> list | None:
        """AdamW's parameter groups (None: every trainable parameter, one group)."""
        return None

    def restore(self, run: _Run, meta: dict) -> None:
        """From a resumed checkpoint's meta (what ``meta`` saved)."""

    def before_step(self, run: _Run, step: int) -> None:
        """Before the forward of step ``step``."""

    def extra_loss(self, run: _Run, task_loss: torch.Tensor):
        """A term added to the task loss (None: nothing)."""
        return None

    def meta(self, run: _Run) -> dict:
        """More of the checkpoint's meta."""
        return {}

    def finish(self, run: _Run) -> bool:
        """After the last step (main process); True: it said the final figures itself."""
        return False


def run_phase(cfg: TrainConfig, resume: str | None, overwrite: bool, hooks: Hooks | None = None):
    """One run of the loop (a plugin mode may chain several), with ``hooks``; returns the
    final checkpoint's path."""
    run = _start(cfg, resume, overwrite)
    run.hooks = hooks
    _build(run)
    _optimisation(run)
    path = _loop(run)
    _finish(run)
    return path


def _start(cfg: TrainConfig, resume: str | None, overwrite: bool) -> _Run:
    """The run's config (from the checkpoint when resuming), its output folder checked, the
    processes and the device."""
    rank, world, local_rank = _dist_info()
    state = None
    if resume:
        state = read_checkpoint(resume)
        saved = TrainConfig.from_dict(state[2]["config"])
        for key in RUN_SETTINGS:
            setattr(saved, key, getattr(cfg, key))
        saved.out = cfg.out or str(Path(resume).parent)
        cfg = saved
    cfg = cfg.resolved()
    check_output_folder(cfg.out)
    if resume is None:
        claim_folder(Path(cfg.out), overwrite)
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and cfg.deterministic:
        deterministic_cuda()
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world > 1:
        dist.barrier()  # every process checked the folder before any writes to it
    return _Run(cfg, rank, world, device, state)


def deterministic_cuda() -> None:
    """The training loop's deterministic mode on CUDA: cuBLAS's fixed workspace (read when
    cuBLAS starts: set before the first GEMM of the process) and PyTorch's deterministic
    algorithms (a warning, not an error, where an op has none). Our kernels are
    deterministic but for Triton's focus_attention with per-query windows (atomics), which
    FASeg's HRCA does not use; a resumed run then equals an uninterrupted one bit for bit."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def claim_folder(out: Path, overwrite: bool) -> None:
    """A new run's folder must not hold another run, unless ``overwrite`` (which removes
    that run's files)."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return
    if not overwrite:
        raise ValueError(
            f"--out {out} already holds a run ({', '.join(found)}): continue it with "
            f"--resume {out / 'checkpoint.safetensors'}, or start over there with "
            "--overwrite"
        )
    if _dist_info()[0] == 0:
        for name in found:
            (out / name).unlink()


def _build(run: _Run) -> None:
    """The model (threads chosen for it on the CPU), the training data, the SPT plan."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    run.model = build_model(cfg, with_weights=run.state is None).to(run.device)
    if run.device.type == "cpu":
        count, why = threads.choose(
            run.model, threads.token_rows(run.model, cfg.batch_size), cfg.threads
        )
        torch.set_num_threads(count)
        if run.main:
            print(f"cpu threads: {count} ({why})", flush=True)
    run.stitched = stitched_part(run.model)
    in_cfg = input_config(run.model)
    if cfg.task == "seg":
        run.train_set = load_seg_dataset(
            cfg.data, "train", in_cfg, in_cfg.num_classes, cfg.seed, cfg.reduce_zero_label
        )
        policy = f"{len(run.train_set)} images; {run.train_set.describe()}"
    else:
        run.train_set = load_dataset(cfg.data, "train", in_cfg.img_size, in_cfg.in_chans)
        policy = check_data_fits(run.train_set, in_cfg, cfg.data)  # before anything is written
    if run.main:
        print(f"data: {policy}", flush=True)
        note = evaluation_note(cfg)
        if note:
            print(f"note: {note}", flush=True)
    if run.stitched is not None and run.state is None and cfg.init_images > 0:
        count = min(cfg.init_images, len(run.train_set))
        images = torch.stack([run.train_set[i][0] for i in range(count)]).to(run.device)
        run.stitched.init_stitching_layers(images.split(cfg.batch_size))
    if cfg.mode == "spt":  # sensitivity, allocation and the tuned layers (or the saved plan)
        meta = run.state[2] if run.state else None
        run.plan = spt_mode.prepare(run.model, cfg, run.train_set, meta, run.rank)
    if run.hooks is not None:
        run.hooks.prepare(run)


def _optimisation(run: _Run) -> None:
    """Optimizer, stitch sampler, patch-size stream and the schedule's length, restored from
    the checkpoint when resuming."""
    cfg = run.cfg
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    groups = spt.param_groups(run.model, cfg.weight_decay) if run.plan is not None else run.params
    if run.hooks is not None:
        groups = run.hooks.param_groups(run) or groups
    run.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if run.stitched is not None:
        run.sampler = make_sampler(cfg, run.stitched, cfg.seed + run.rank)
    run.patch_rng = random.Random(cfg.seed + 1000 + run.rank)
    if run.state is not None:
        model_state, optim_state, meta = run.state
        run.model.load_state_dict(model_state)
        run.optimizer.load_state_dict(optim_state)
        run.start = meta["step"]
        if run.sampler is not None:
            run.sampler.load_state_dict(meta["samplers"][run.rank])
        version, internal, gauss = meta["patch_rngs"][run.rank]
        run.patch_rng.setstate((version, tuple(internal), gauss))
        if run.hooks is not None:
            run.hooks.restore(run, meta)
    run.per_epoch = (len(run.train_set) // run.world) // cfg.batch_size
    if run.per_epoch == 0:
        raise ValueError(
            f"the training data has {len(run.train_set)} images: fewer than one batch of "
            f"{cfg.batch_size} per process ({run.world}); lower --batch-size"
        )
    run.total = cfg.epochs * run.per_epoch
    run.stop = run.total if cfg.max_steps is None else min(run.total, cfg.max_steps)


def _save(run: _Run, step: int) -> Path:
    """The checkpoint of step ``step`` (every process's sampler and patch streams)."""
    states = [run.sampler.state_dict() if run.sampler else None]
    version, internal, gauss = run.patch_rng.getstate()
    rngs = [[version, list(internal), gauss]]
    if run.world > 1:
        states, rngs = _gather(states[0]), _gather(rngs[0])
    path = run.out / "checkpoint.safetensors"
    if run.main:
        meta = {"config": asdict(run.cfg), "step": step, "samplers": states, "patch_rngs": rngs}
        if run.plan is not None:
            meta["spt_plan"] = run.plan.to_dict()
        if run.hooks is not None:
            meta.update(run.hooks.meta(run))
        save_checkpoint(path, run.model, run.optimizer, meta)
    return path


def _due(run: _Run, step: int, last_save: float) -> bool:
    """Whether to save after ``step``: an epoch's end, every save_every steps, or
    save_minutes since the last save (decided by the main process for all)."""
    cfg = run.cfg
    due = step % run.per_epoch == 0 or (cfg.save_every and step % cfg.save_every == 0)
    due = due or time.time() - last_save >= 60 * cfg.save_minutes
    if run.world > 1:
        flag = torch.tensor([float(due)], device=run.device)
        dist.broadcast(flag, 0)
        due = bool(flag.item())
    return bool(due) and step != run.stop


def _loop(run: _Run) -> Path:
    """The training steps from the checkpoint's (or 0) to the stop; returns the final
    checkpoint's path."""
    cfg, model, device = run.cfg, run.model, run.device
    step_module = _Step(model)
    if run.world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device] if device.type == "cuda" else None,
            # a sampled route leaves the other anchors' blocks without gradients (and a
            # segmentation backbone its classifier's norm and head); an anchor classifier
            # trains every parameter
            find_unused_parameters=run.stitched is not None or cfg.task == "seg",
        )
    teacher = _teacher(cfg, device)
    keyed = getattr(run.train_set, "transform", None) is not None
    batches = _Batches(
        len(run.train_set),
        cfg.batch_size,
        run.rank,
        run.world,
        cfg.seed,
        run.start,
        run.stop,
        keyed,
    )
    loader = torch.utils.data.DataLoader(
        run.train_set, batch_sampler=batches, num_workers=cfg.workers
    )
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    log = (run.out / "log.jsonl").open("a") if run.main else None
    usage = _Usage(device)
    bar = tqdm(
        total=run.stop,
        initial=run.start,
        desc=f"train {cfg.mode}",
        disable=not cfg.progress or not run.main,
    )
    step, last_save = run.start, time.time()
    model.train()
    with StopRequests(run.world) as stops:
        for images, labels in loader:
            loss, sid, patch = _step(run, step_module, teacher, step, images, labels)
            usage.step_done()
            step += 1
            bar.update(1)
            if log is not None and (step % cfg.log_every == 0 or step == run.stop):
                _log(log, run, step, loss, sid, patch)
                bar.set_postfix(loss=f"{loss.item():.3f}", stitch=sid)
            signum = stops.requested(device)
            if signum:
                bar.close()
                path = _save(run, step)
                if run.main:
                    print(
                        f"interrupted after step {step} of {run.stop}: saved {path}; continue "
                        f"with: stitchops train --resume {path}",
                        flush=True,
                    )
                raise TrainingInterrupted(path, signum)
            if _due(run, step, last_save):
                _save(run, step)
                last_save = time.time()
    bar.close()
    path = _save(run, step)
    if run.main:
        (run.out / "usage.json").write_text(json.dumps(usage.summary(model), indent=1))
    if log is not None:
        log.close()
    return path


def _teacher(cfg: TrainConfig, device):
    """An external teacher for ``--distill FILE`` (None otherwise)."""
    if cfg.distill in ("none", "inplace"):
        return None
    if not cfg.teacher:
        raise ValueError("distillation from a weights file needs the teacher's model spec")
    return build.build_anchor(cfg.teacher, cfg.distill).to(device).eval()


def _step(run: _Run, step_module, teacher, step: int, images, labels):
    """One optimizer step; (loss, the sampled stitch, the patch size)."""
    cfg, device, sampler = run.cfg, run.device, run.sampler
    images, labels = images.to(device), labels.to(device)
    for group in run.optimizer.param_groups:
        if not group.get("fixed_lr"):  # a plugin's group may keep its own rate
            group["lr"] = _lr(cfg, step, run.total)
    if run.hooks is not None:
        run.hooks.before_step(run, step)
    sid = sampler.sample(step) if sampler else None
    patch = run.patch_rng.choice(cfg.patch_sizes) if cfg.patch_sizes else None
    inplace = run.stitched is not None and cfg.distill == "inplace"
    teacher_id = len(run.stitched.anchors) - 1 if inplace else None
    amp = cfg.amp and device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits, teacher_logits = step_module(images, sid, teacher_id, patch)
        # labels [B] or masks [B, H, W] (pixels of 255 ignored); argmax(1) is over classes
        loss = _task_loss(run.model, logits, labels, cfg, step, run.rank)
        if teacher_logits is not None:
            hard = teacher_logits.detach().argmax(1)
            loss = F.cross_entropy(teacher_logits.float(), labels, ignore_index=IGNORE_INDEX)
            loss = loss + F.cross_entropy(logits.float(), hard)
        elif teacher is not None:
            with torch.no_grad():
                hard = teacher(images, patch_size=patch).argmax(1)
            loss = 0.5 * loss + 0.5 * F.cross_entropy(logits.float(), hard)
        extra = run.hooks.extra_loss(run, loss) if run.hooks is not None else None
        if extra is not None:
            loss = loss + extra
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss became {loss.item()} at step {step} (stitch {sid}); "
            "lower --lr or enable --clip-grad"
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.clip_grad)
    if isinstance(sampler, ESTASampler):
        route = run.stitched.route_parameters(sid)
        score = snip_score(run.stitched.get_parameter(n) for n in route)
        for s, q in _gather((sid, score)) if run.world > 1 else [(sid, score)]:
            sampler.update(s, q)
    run.optimizer.step()
    return loss, sid, patch


def _log(log, run: _Run, step: int, loss, sid, patch) -> None:
    record = {
        "step": step,
        "epoch": (step - 1) // run.per_epoch,
        "stitch": sid,
        "patch_size": patch,
        "loss": round(loss.item(), 6),
        "lr": run.optimizer.param_groups[0]["lr"],
        "time": round(time.time(), 3),
    }
    log.write(json.dumps(record) + "\n")
    log.flush()


def _finish(run: _Run) -> None:
    """The final validation figure (SPT: its accuracies and the merged weights)."""
    if run.main:
        if run.plan is not None:
            spt_mode.finish(run.model, run.cfg, run.device)
        elif run.hooks is None or not run.hooks.finish(run):
            print(final_validation(run.model, run.cfg, run.device), flush=True)
    if run.world > 1:
        dist.barrier()


def input_config(model):
    """The ViTConfig whose images the model takes (the first anchor of a stitched model)."""
    backbone = model.backbone if isinstance(model, Segmenter) else model
    stitched = stitched_part(model)
    return (backbone.anchors[0] if stitched is not None else backbone).cfg


def evaluation_note(cfg: TrainConfig) -> str | None:
    """What to say when the evaluation data are the training data (no validation split)."""
    if cfg.task == "seg":
        if cfg.val_data or has_split(cfg.data):
            return None
        return (
            f"{cfg.data} has no validation split (images/ + masks/): evaluation would read "
            "the training images; give --val-data FOLDER"
        )
    root = Path(cfg.data)
    if cfg.data in ("digits", "shapes-cls") or (root / "val").is_dir():
        return None
    return (
        f"{cfg.data} has no val/ sub-folder: the same images serve training and evaluation "
        "(split them into train/ and val/)"
    )


@torch.no_grad()
def final_validation(model, cfg: TrainConfig, device) -> str:
    """One line: the trained model's validation accuracy or mIoU (a stitched model: how to
    evaluate its stitches)."""
    if stitched_part(model) is not None:
        return (
            f"trained {len(stitched_part(model).stitches)} stitches: evaluate them with "
            f"stitchops eval {Path(cfg.out) / 'checkpoint.safetensors'}"
        )
    from stitchops.train.evaluate import segmentation_miou, validation_accuracy

    model.eval()
    if cfg.task == "seg":
        miou = segmentation_miou(model, cfg, device)
        return f"validation mIoU {100 * miou:.2f}% ({cfg.val_data or cfg.data})"
    accuracy = validation_accuracy(model, cfg.data, device)
    return f"validation accuracy {100 * accuracy:.2f}% ({cfg.data})"


class _Usage:
    """Step times (after the first, which warms up) and the training's peak memory since the
    loop began (stitchops._memory)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self.last = device, [], time.perf_counter()
        self.baseline = _memory.start_peak(device)

    def step_done(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now

    def summary(self, model) -> dict:
        peak = _memory.peak_since(self.device, self.baseline)
        times = sorted(self.times[1:] or self.times)
        return {
            "step_ms_median": 1e3 * times[len(times) // 2] if times else None,
            "peak_mb": peak / 1e6 if peak is not None else None,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }


def _gather(obj) -> list:
    items = [None] * dist.get_world_size()
    dist.all_gather_object(items, obj)
    return items


def load_trained(path, device="cpu"):
    """(model, config) of a training checkpoint, ready for evaluation."""
    model_state, _, meta = read_checkpoint(path)
    cfg = TrainConfig.from_dict(meta["config"]).resolved()
    model = build_model(cfg, with_weights=False)
    if cfg.mode == "spt":
        spt_mode.apply_saved(model, meta, cfg)
    plugin = plugins.find(cfg.mode)
    if plugin is not None:
        model = plugin.load(model, meta, cfg)
    model.load_state_dict(model_state)
    return model.to(device).eval(), cfg
