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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from stitchops import _memory, spt
from stitchops.models.segmentation import DECODERS, Segmenter
from stitchops.models.stitched import StitchedViT
from stitchops.train import build, spt_mode, threads
from stitchops.train.checkpoint import read_checkpoint, save_checkpoint
from stitchops.train.data import DataError, load_dataset
from stitchops.train.outdir import check_output_folder
from stitchops.train.samplers import SAMPLERS, ESTASampler, ROSSampler, snip_score
from stitchops.train.segdata import IGNORE_INDEX, load_seg_dataset

MODES = ("anchor", "snnet", "snnetv2", "esta", "spt")
TASKS = ("cls", "seg")
SCHEDULES = ("cosine", "poly")
MODE_DEFAULTS = {
    "snnet": dict(two_way=False, rank=0, sampler="uniform"),
    "snnetv2": dict(two_way=True, rank=16, sampler="ros"),
    "esta": dict(two_way=False, rank=-1, sampler="esta", stitch_biases=True),
}


@dataclass
class TrainConfig:
    """Everything a run needs; saved in every checkpoint. ``rank = -1``: ESTA's d_out / 4."""

    mode: str = "snnetv2"
    task: str = "cls"  # "cls" (classification) or "seg" (semantic segmentation)
    decoder: str = "linear"  # seg: Segmenter's "linear" or "mask", SETR's "setr", or "faseg"
    # seg with decoder "faseg": the head's keyword arguments (FASegHead: hidden, heads,
    # queries, layers, ffn, dfpq, hrca, hrca_ratio, mask_threshold, first_pos) and the set
    # loss's (points, sampling)
    decoder_options: dict = field(default_factory=dict)
    schedule: str | None = None  # "cosine" or "poly" (default: cosine for cls, poly for seg)
    head_weights: str | None = None  # seg: a segmentation checkpoint whose decoder to start from
    anchors: list[str] = field(default_factory=list)
    anchor_weights: list[str] | None = None
    data: str = "digits"
    out: str = "runs/stitchops"
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 0
    clip_grad: float | None = 1.0
    amp: bool = True
    seed: int = 0
    sampler: str | None = None
    ros_step: float | None = None
    esta_intervals: int = 15
    esta_momentum: float = 0.9
    esta_warmup: int = 0
    kernel_size: int = 2
    stride: int = 1
    partial_windows: bool = False
    nearest: bool = True
    two_way: bool | None = None
    rank: int | None = None
    alpha: float = 1.0
    stitch_biases: bool | None = None
    pst_rank: int = 16
    patch_sizes: list[int] | None = None
    distill: str = "none"  # "none", "inplace" or the path of a teacher anchor's weights
    teacher: str | None = None  # model spec of an external teacher
    init_images: int = 100
    save_every: int = 0
    log_every: int = 1
    workers: int = 0
    threads: int | None = None  # CPU intra-op threads (default: chosen for the work)
    progress: bool = True
    # SPT (mode "spt", stitchops/train/spt_mode.py): trainable parameters without the head
    budget: float | None = None
    spt_structured: str = "lora"  # "lora" or "adapter"
    spt_rank: int = 8
    spt_alpha: float = 10.0  # structured when sensitive count >= structured cost / alpha
    spt_beta: float = 5.0  # vectors whole when sensitive count >= length / beta
    spt_batches: int = 16  # batches of the sensitivity pass
    spt_per_sample: bool = False
    spt_plan: str | None = None  # a plan.json, or "lora-all" (the LoRA baseline); else computed
    spt_dropout: float = 0.1  # on the LoRA branches' input (the official recipe's 0.1)
    spt_drop_path: float = 0.1  # per sample on the structured branches (official: 0.1)
    spt_train_cls: bool = True  # the class token trains with the head (official)
    spt_tau_search: str = "exact"  # "exact" or "official" (the official τ sweep)
    spt_split_fused: bool = True  # a fused qkv ranked as q, k and v (official)

    def _check_spt(self) -> None:
        if self.task != "cls":
            raise ValueError("mode 'spt' fine-tunes classifiers (task cls)")
        if self.spt_plan is None and not (self.budget and self.budget > 0):
            raise ValueError("mode 'spt' needs --budget (trainable parameters, e.g. 0.4M) or "
                             "--spt-plan")  # fmt: skip
        if self.spt_structured not in ("lora", "adapter"):
            raise ValueError(f"spt_structured must be 'lora' or 'adapter', got "
                             f"{self.spt_structured!r}")  # fmt: skip
        if self.spt_batches < 1 or self.spt_rank < 1:
            raise ValueError("spt_batches and spt_rank must be >= 1")
        for name in ("spt_dropout", "spt_drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.spt_tau_search not in ("exact", "official"):
            raise ValueError(f"spt_tau_search must be 'exact' or 'official', got "
                             f"{self.spt_tau_search!r}")  # fmt: skip
        if self.spt_plan not in (None, "lora-all"):
            spt.SPTPlan.load(self.spt_plan)  # a foreign or broken file: refused before any work

    def resolved(self) -> TrainConfig:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.anchors:
            raise ValueError("give at least one model spec in anchors")
        if self.mode in ("anchor", "spt") and len(self.anchors) != 1:
            raise ValueError(f"mode {self.mode!r} trains one model: give exactly one spec")
        if self.mode == "spt":
            self._check_spt()
        if self.mode not in ("anchor", "spt") and len(self.anchors) < 2:
            raise ValueError(f"mode {self.mode!r} stitches anchors: give at least two specs")
        for key, value in MODE_DEFAULTS.get(self.mode, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "seg":
            if self.decoder not in DECODERS:
                raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
            if self.decoder == "faseg" and self.distill != "none":
                raise ValueError("distillation compares per-pixel logits; the FASeg head is "
                                 "trained with its set loss only (distill 'none')")  # fmt: skip
            if self.data == "digits":
                self.data = "shapes"
        self.schedule = self.schedule or ("poly" if self.task == "seg" else "cosine")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        return self


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
    round-robin over the processes, last partial batch dropped. Deterministic in the step."""

    def __init__(self, n, batch_size, rank, world, seed, start, stop) -> None:
        self.n, self.bs, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.start, self.stop = start, stop
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
            yield order[b * self.bs : (b + 1) * self.bs].tolist()


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
    return Segmenter(backbone, num_classes, cfg.decoder,
                     decoder_options=head if cfg.decoder == "faseg" else None)  # fmt: skip


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
    if cfg.mode in ("anchor", "spt"):
        anchor = build.build_anchor(cfg.anchors[0], weights[0] if weights else None,
                                    new_head=True)  # fmt: skip
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


def train(cfg: TrainConfig, resume: str | None = None) -> Path:
    """Run (or resume) training; returns the path of the final checkpoint."""
    rank, world, local_rank = _dist_info()
    meta = None
    if resume:
        model_state, optim_state, meta = read_checkpoint(resume)
        saved = TrainConfig(**meta["config"])
        # The run's own settings (schedule included) come from the checkpoint, so the resumed
        # run is exactly the uninterrupted one; only where to stop and how to show it change.
        for key in ("max_steps", "out", "progress", "save_every", "workers", "threads"):
            setattr(saved, key, getattr(cfg, key))
        cfg = saved
    cfg = cfg.resolved()
    check_output_folder(cfg.out)
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, with_weights=meta is None).to(device)
    if device.type == "cpu":
        count, why = threads.choose(model, threads.token_rows(model, cfg.batch_size), cfg.threads)
        torch.set_num_threads(count)
        if rank == 0 and cfg.progress:
            print(f"cpu threads: {count} ({why})", flush=True)
    stitched = stitched_part(model)  # the StitchedViT that routes run through, or None
    backbone = model.backbone if isinstance(model, Segmenter) else model
    in_cfg = (backbone.anchors[0] if stitched is not None else backbone).cfg
    seg = cfg.task == "seg"
    if seg:
        train_set = load_seg_dataset(cfg.data, "train", in_cfg, in_cfg.num_classes, cfg.seed)
        policy = f"{len(train_set)} images; {train_set.describe()}"
    else:
        train_set = load_dataset(cfg.data, "train", in_cfg.img_size, in_cfg.in_chans)
        policy = check_data_fits(train_set, in_cfg, cfg.data)  # before anything is written
    if rank == 0 and cfg.progress:
        print(f"data: {policy}", flush=True)
    if stitched is not None and meta is None and cfg.init_images > 0:
        count = min(cfg.init_images, len(train_set))
        images = torch.stack([train_set[i][0] for i in range(count)]).to(device)
        stitched.init_stitching_layers(images.split(cfg.batch_size))
    plan = None
    if cfg.mode == "spt":  # sensitivity, allocation and the tuned layers (or the saved plan)
        plan = spt_mode.prepare(model, cfg, train_set, meta, rank)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = spt.param_groups(model, cfg.weight_decay) if plan is not None else params
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = make_sampler(cfg, stitched, cfg.seed + rank) if stitched is not None else None
    patch_rng = random.Random(cfg.seed + 1000 + rank)
    start = 0
    if meta is not None:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        start = meta["step"]
        if sampler is not None:
            sampler.load_state_dict(meta["samplers"][rank])
        version, internal, gauss = meta["patch_rngs"][rank]
        patch_rng.setstate((version, tuple(internal), gauss))
    step_module = _Step(model)
    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device] if device.type == "cuda" else None,
            # a sampled route leaves the other anchors' blocks without gradients (and a
            # segmentation backbone its classifier's norm and head); an anchor classifier
            # trains every parameter
            find_unused_parameters=stitched is not None or seg,
        )
    teacher = None
    if cfg.distill not in ("none", "inplace"):
        if not cfg.teacher:
            raise ValueError("distillation from a weights file needs the teacher's model spec")
        teacher = build.build_anchor(cfg.teacher, cfg.distill).to(device).eval()
    per_epoch = (len(train_set) // world) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"the training data has {len(train_set)} images: fewer than one batch of "
            f"{cfg.batch_size} per process ({world}); lower --batch-size"
        )
    total = cfg.epochs * per_epoch
    stop = total if cfg.max_steps is None else min(total, cfg.max_steps)
    batches = _Batches(len(train_set), cfg.batch_size, rank, world, cfg.seed, start, stop)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, num_workers=cfg.workers)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    log = (out / "log.jsonl").open("a") if rank == 0 else None
    amp = cfg.amp and device.type == "cuda"
    inplace = stitched is not None and cfg.distill == "inplace"
    teacher_id = len(stitched.anchors) - 1 if inplace else None
    model.train()
    usage = _Usage(device)
    bar = tqdm(
        total=stop, initial=start, desc=f"train {cfg.mode}", disable=not cfg.progress or rank != 0
    )
    step = start

    def checkpoint(path):
        states = [sampler.state_dict() if sampler else None]
        version, internal, gauss = patch_rng.getstate()
        rngs = [[version, list(internal), gauss]]
        if world > 1:
            states, rngs = _gather(states[0]), _gather(rngs[0])
        if rank == 0:
            meta_out = {"config": asdict(cfg), "step": step, "samplers": states, "patch_rngs": rngs}
            if plan is not None:
                meta_out["spt_plan"] = plan.to_dict()
            save_checkpoint(path, model, optimizer, meta_out)

    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr(cfg, step, total)
        sid = sampler.sample(step) if sampler else None
        patch = patch_rng.choice(cfg.patch_sizes) if cfg.patch_sizes else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, teacher_logits = step_module(images, sid, teacher_id, patch)
            # labels [B] or masks [B, H, W] (pixels of 255 ignored); argmax(1) is over classes
            loss = _task_loss(model, logits, labels, cfg, step, rank)
            if teacher_logits is not None:
                hard = teacher_logits.detach().argmax(1)
                loss = F.cross_entropy(teacher_logits.float(), labels, ignore_index=IGNORE_INDEX)
                loss = loss + F.cross_entropy(logits.float(), hard)
            elif teacher is not None:
                with torch.no_grad():
                    hard = teacher(images, patch_size=patch).argmax(1)
                loss = 0.5 * loss + 0.5 * F.cross_entropy(logits.float(), hard)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at step {step} (stitch {sid}); "
                "lower --lr or enable --clip-grad"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        if isinstance(sampler, ESTASampler):
            route = stitched.route_parameters(sid)
            score = snip_score(stitched.get_parameter(n) for n in route)
            for s, q in _gather((sid, score)) if world > 1 else [(sid, score)]:
                sampler.update(s, q)
        optimizer.step()
        usage.step_done()
        step += 1
        bar.update(1)
        if log is not None and (step % cfg.log_every == 0 or step == stop):
            record = {
                "step": step,
                "epoch": (step - 1) // per_epoch,
                "stitch": sid,
                "patch_size": patch,
                "loss": round(loss.item(), 6),
                "lr": optimizer.param_groups[0]["lr"],
                "time": round(time.time(), 3),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.3f}", stitch=sid)
        if cfg.save_every and step % cfg.save_every == 0 and step != stop:
            checkpoint(out / "checkpoint.safetensors")
    bar.close()
    checkpoint(out / "checkpoint.safetensors")
    if rank == 0:
        (out / "usage.json").write_text(json.dumps(usage.summary(model), indent=1))
        if plan is not None:
            spt_mode.finish(model, cfg, device)
    if log is not None:
        log.close()
    if world > 1:
        dist.barrier()
    return out / "checkpoint.safetensors"


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
    cfg = TrainConfig(**meta["config"]).resolved()
    model = build_model(cfg, with_weights=False)
    if cfg.mode == "spt":
        spt_mode.apply_saved(model, meta, cfg)
    model.load_state_dict(model_state)
    return model.to(device).eval(), cfg
