"""``TrainConfig``: everything a training run needs, saved in every checkpoint.

The fields are flat (a checkpoint's ``config`` is this dataclass as a dict), grouped below by
who reads them: every run; the task and data; the stitched modes (SN-Net, SN-Netv2, ESTA);
segmentation; SPT. ``resolved()`` fills the per-mode defaults, checks every value, and
returns the options the run's mode and task ignore (``ignored``) so the command line can say
so in one line instead of dropping them silently.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from stitchops.train import plugins

# The built-in modes, then the plugin modes (stitchops/train/mode_<name>.py).
BUILT_IN_MODES = ("anchor", "snnet", "snnetv2", "esta", "spt")
MODES = (*BUILT_IN_MODES, *plugins.names())
SINGLE_MODEL_MODES = ("anchor", "spt")  # and every plugin mode: one model
TASKS = ("cls", "seg")
SCHEDULES = ("cosine", "poly")
STITCHED_MODES = ("snnet", "snnetv2", "esta")
SAMPLER_NAMES = ("uniform", "ros", "esta")
DECODER_NAMES = ("linear", "mask", "setr", "faseg")
MODE_DEFAULTS = {
    "snnet": dict(two_way=False, rank=0, sampler="uniform"),
    "snnetv2": dict(two_way=True, rank=16, sampler="ros"),
    "esta": dict(two_way=False, rank=-1, sampler="esta", stitch_biases=True),
}
DEFAULT_OUT = "runs/stitchops"

# Which runs read an option (the rest ignore it): a predicate of the resolved config.
_STITCHED = (
    "sampler",
    "ros_step",
    "esta_intervals",
    "esta_momentum",
    "esta_warmup",
    "kernel_size",
    "stride",
    "partial_windows",
    "nearest",
    "two_way",
    "rank",
    "alpha",
    "stitch_biases",
    "pst_rank",
    "init_images",
)
_SPT = (
    "budget",
    "spt_structured",
    "spt_rank",
    "spt_alpha",
    "spt_beta",
    "spt_batches",
    "spt_per_sample",
    "spt_plan",
    "spt_dropout",
    "spt_drop_path",
    "spt_train_cls",
    "spt_tau_search",
    "spt_split_fused",
)
_SEG = ("decoder", "decoder_options", "head_weights", "val_data", "reduce_zero_label")


@dataclass
class TrainConfig:
    """Everything a run needs; saved in every checkpoint. ``rank = -1``: ESTA's d_out / 4."""

    # ---- every run
    mode: str = "snnetv2"
    anchors: list[str] = field(default_factory=list)
    anchor_weights: list[str] | None = None
    out: str | None = None  # default DEFAULT_OUT; a resumed run: the checkpoint's folder
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 0
    schedule: str | None = None  # "cosine" or "poly" (default: cosine for cls, poly for seg)
    clip_grad: float | None = 1.0
    amp: bool = True
    seed: int = 0
    patch_sizes: list[int] | None = None  # FlexiViT: a random patch size per step
    distill: str = "none"  # "none", "inplace" or the path of a teacher anchor's weights
    teacher: str | None = None  # model spec of an external teacher
    save_every: int = 0  # also save every N steps (0: the epochs' ends and save_minutes)
    save_minutes: float = 10.0  # also save when this long has passed since the last save
    log_every: int = 1
    workers: int = 0
    threads: int | None = None  # CPU intra-op threads (default: chosen for the work)
    deterministic: bool = True  # CUDA: deterministic algorithms and cuBLAS workspace
    progress: bool = True
    # ---- the task and its data
    task: str = "cls"  # "cls" (classification) or "seg" (semantic segmentation)
    data: str = "digits"
    # ---- the stitched modes (SN-Net, SN-Netv2, ESTA)
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
    init_images: int = 100
    # ---- segmentation (task "seg")
    decoder: str = "linear"  # Segmenter's "linear" or "mask", SETR's "setr", or "faseg"
    # decoder "faseg": the head's keyword arguments (FASegHead) and the set loss's (points,
    # sampling)
    decoder_options: dict = field(default_factory=dict)
    head_weights: str | None = None  # a segmentation checkpoint whose decoder to start from
    val_data: str | None = None  # the evaluation folder where ``data`` has no split of its own
    reduce_zero_label: bool | None = None  # None: the layout's (ADE20K on, plain off)
    # ---- SPT (mode "spt", stitchops/train/spt_mode.py): trainable parameters without the head
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
    # ---- a plugin mode's own options (stitchops/train/plugins.py), by name
    mode_options: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """A config saved by any version of this class (unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"the checkpoint's config has options this stitchops does not "
                f"know: {', '.join(unknown)}"
            )
        return cls(**data)

    def _check_spt(self) -> None:
        from stitchops.spt.allocate import SPTPlan

        if self.task != "cls":
            raise ValueError("mode 'spt' fine-tunes classifiers (task cls)")
        if self.spt_plan is None and not (self.budget and self.budget > 0):
            raise ValueError(
                "mode 'spt' needs --budget (trainable parameters, e.g. 0.4M) or --spt-plan"
            )
        if self.spt_structured not in ("lora", "adapter"):
            raise ValueError(
                f"spt_structured must be 'lora' or 'adapter', got {self.spt_structured!r}"
            )
        if self.spt_batches < 1 or self.spt_rank < 1:
            raise ValueError("spt_batches and spt_rank must be >= 1")
        for name in ("spt_dropout", "spt_drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.spt_tau_search not in ("exact", "official"):
            raise ValueError(
                f"spt_tau_search must be 'exact' or 'official', got {self.spt_tau_search!r}"
            )
        if self.spt_plan not in (None, "lora-all"):
            SPTPlan.load(self.spt_plan)  # a foreign or broken file: refused before any work

    def _check_plugin(self, plugin) -> None:
        """A plugin mode's options: known names, its defaults filled in, its own checks."""
        unknown = sorted(set(self.mode_options) - {o.name for o in plugin.options})
        if unknown:
            raise ValueError(f"mode {self.mode!r} has no option {', '.join(unknown)}")
        self.mode_options = {**plugin.defaults(), **self.mode_options}
        plugin.check(self)

    def _check_models(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.anchors:
            raise ValueError("give at least one model spec in anchors")
        if self.mode in (*SINGLE_MODEL_MODES, *plugins.names()) and len(self.anchors) != 1:
            raise ValueError(f"mode {self.mode!r} trains one model: give exactly one spec")
        if self.mode in STITCHED_MODES and len(self.anchors) < 2:
            raise ValueError(f"mode {self.mode!r} stitches anchors: give at least two specs")

    def _check_task(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "seg":
            if self.decoder not in DECODER_NAMES:
                raise ValueError(f"decoder must be one of {DECODER_NAMES}, got {self.decoder!r}")
            if self.decoder == "faseg" and self.distill != "none":
                raise ValueError(
                    "distillation compares per-pixel logits; the FASeg head is "
                    "trained with its set loss only (distill 'none')"
                )
            if self.data == "digits":
                self.data = "shapes"
        self.schedule = self.schedule or ("poly" if self.task == "seg" else "cosine")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def resolved(self) -> TrainConfig:
        """The config with its mode's defaults filled in and every value checked."""
        self._check_models()
        if self.mode == "spt":
            self._check_spt()
        plugin = plugins.find(self.mode)
        if plugin is not None:
            self._check_plugin(plugin)
        for key, value in MODE_DEFAULTS.get(self.mode, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.sampler is not None and self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {list(SAMPLER_NAMES)}, got {self.sampler!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_minutes <= 0:
            raise ValueError(f"save_minutes must be > 0, got {self.save_minutes}")
        self._check_task()
        self.out = self.out or DEFAULT_OUT
        return self

    def ignored(self) -> list[str]:
        """The options set away from their defaults that this run's mode and task ignore."""
        defaults = {
            f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(self)
        }
        unused = []
        if self.mode not in STITCHED_MODES:
            unused += [n for n in _STITCHED if n not in MODE_DEFAULTS.get(self.mode, {})]
        if self.mode != "spt":
            unused += list(_SPT)
        if self.task != "seg":
            unused += list(_SEG)
        elif self.decoder != "faseg":
            unused.append("decoder_options")
        return [n for n in dict.fromkeys(unused) if getattr(self, n) != defaults[n]]
