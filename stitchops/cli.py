"""Command line (also ``python -m stitchops``).

stitchops demo [NAME]   a method end to end on a laptop CPU (the demos below)
stitchops train         pretrain an anchor, train SN-Net / SN-Netv2 / ESTA, fine-tune with
                        SPT (torchrun for DDP); Ctrl-C saves, --resume continues
stitchops eval          evaluate a checkpoint (every stitch, or the one model) or a weights
                        file: table, Pareto frontier, plot
stitchops info          versions and which backends can run here
stitchops bench         run every benchmark (correctness first), save, report
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def _benchmarks_dir() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "benchmarks" / "runner.py").exists():
            return root / "benchmarks"
    return None


def info(_args) -> int:
    import torch

    import stitchops

    print(
        f"stitchops {stitchops.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    from stitchops import _backends, _dispatch, _runtime

    if _backends.cuda_extension_missing_reason() is None:
        archs = _backends.built_cuda_archs().split(";")
        print("stitchops._C: machine code for " + ", ".join(f"sm_{a}" for a in archs))
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        print(f"GPU: {torch.cuda.get_device_name()} (compute capability {major}.{minor})")
    if _backends.triton_missing_reason() is None:
        print(f"triton kernels: {_runtime.triton_tuning()}")
    for op in _dispatch.OPS.values():
        dtypes = ", ".join(str(d).removeprefix("torch.") for d in op.kernel_dtypes)
        print(f"op {op.name}: torch reference, triton and cuda kernels ({dtypes})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"backends on {device}:")
        for name, reason in stitchops.available_backends(device).items():
            print(f"  {name:7s} {'ready' if reason is None else 'unavailable: ' + reason}")
    return 0


def bench(args) -> int:
    folder = _benchmarks_dir()
    if folder is None:
        msg = (
            "stitchops bench runs the scripts in a source checkout's benchmarks/ folder: run "
            "it from the repository root (git clone, then pip install -e .)"
        )
        print(msg, file=sys.stderr)
        return 2
    scripts = sorted(folder.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if args.only in s.stem]
    extra = ["--no-save"] if args.no_save else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for script in scripts:
        print(f"== {script.name}", flush=True)
        code = subprocess.call([sys.executable, str(script), *extra], env=env)
        if code != 0:
            print(f"{script.name} failed with exit code {code}", file=sys.stderr)
            return code
    if not args.no_save:
        return subprocess.call([sys.executable, str(folder / "report.py")], env=env)
    return 0


def _demo_threads(args) -> None:
    """Demos train and time small models: one intra-op thread (stitchops.train.threads),
    unless --threads or OMP_NUM_THREADS says otherwise."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)
    print(f"[demo] cpu threads: {torch.get_num_threads()}", flush=True)


def demo(args) -> int:
    from stitchops.demos import demo as find

    _demo_threads(args)
    module = find(args.task)
    given = {"anchor_epochs": args.anchor_epochs, "stitch_epochs": args.stitch_epochs}
    for option, value in given.items():
        if value is not None and option not in module.OPTIONS:
            print(
                f"stitchops demo: warning: --{option.replace('_', '-')} ignored: demo "
                f"{args.task} does not take it",
                file=sys.stderr,
            )
    options = {k: v for k, v in given.items() if v is not None and k in module.OPTIONS}
    if args.out is not None:
        options["out"] = args.out
    module.run(**options, progress=not args.no_progress, seed=args.seed)
    return 0


PLUGIN_PREFIX = "mode_option__"  # argparse dest of a plugin mode's options


def _plugin_options(args) -> tuple[dict, list[str]]:
    """(the options given for the chosen plugin mode, the flags given for other modes)."""
    chosen, ignored = {}, []
    from stitchops.train import plugins

    for plugin in plugins.plugins():
        for option in (o for o in plugin.options if o.cli):
            value = getattr(args, PLUGIN_PREFIX + option.name, None)
            if value is None:
                continue
            if plugin.name == args.mode:
                chosen[option.name] = value
            else:
                ignored.append(option.name)
    return chosen, ignored


def train_cmd(args) -> int:
    from stitchops.train.loop import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["mode_options"], ignored_elsewhere = _plugin_options(args)
    values["progress"] = not args.no_progress
    values["amp"] = not args.no_amp
    values["nearest"] = not args.all_pairs
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in fields})
    main_process = int(os.environ.get("RANK", "0")) == 0  # say things once under torchrun
    if args.resume is None and main_process:
        ignored = TrainConfig(**vars(cfg)).resolved().ignored() + ignored_elsewhere
        if ignored:
            flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
            print(
                f"stitchops train: warning: {flags} ignored: mode {cfg.mode!r}, task "
                f"{cfg.task!r} does not use {'it' if len(ignored) == 1 else 'them'}",
                file=sys.stderr,
            )
    path = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if main_process:
        print(f"checkpoint: {path}")
    return 0


def eval_cmd(args) -> int:
    import torch

    from stitchops.train.loop import load_trained
    from stitchops.train.outdir import check_output_folder

    out = check_output_folder(args.out or Path(args.checkpoint).parent)
    device = _device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model is not None:  # plain weights (SPT's merged.safetensors, a timm file)
        table, title = _eval_weights(args, device), f"{args.model}"
    else:
        model, cfg = load_trained(args.checkpoint, device)
        if args.task is not None and args.task != cfg.task:
            raise ValueError(f"{args.checkpoint} is a {cfg.task} model, not {args.task}")
        table = (_eval_seg if cfg.task == "seg" else _eval_cls)(model, cfg, args, device)
        title = f"{cfg.mode}: every stitch" if len(table.rows) > 1 else cfg.mode
    print(table.format())
    print(
        f"(latency: median of {args.latency_repeats} timed batches after a warm-up, "
        f"{torch.get_num_threads()} CPU thread(s); {_load_note()})"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "stitches.json").write_text(table.to_json())
    from stitchops.train.evaluate import plot_stitches

    plot_stitches(table, out / "stitches.png", title=title)
    print(f"wrote {out / 'stitches.json'} and {out / 'stitches.png'}")
    return 0


def _load_note() -> str:
    """A word on the machine's load: latencies of a busy machine do not rank methods."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return "load unknown"
    cores = os.cpu_count() or 1
    if load > cores:
        return (
            f"WARNING: the machine was busy (load {load:.1f} on {cores} cores): the "
            "latencies are inflated and may not rank the stitches"
        )
    return f"load {load:.1f} on {cores} cores"


def _eval_weights(args, device):
    """The accuracy of a classifier from a weights file and its ``--model`` spec."""
    import torch

    from stitchops.train import build
    from stitchops.train.data import load_dataset
    from stitchops.train.evaluate import eval_classifier
    from stitchops.train.loop import check_data_fits

    if args.data is None:
        raise ValueError("--model evaluates a weights file: give its --data too")
    model = build.build_anchor(args.model, args.checkpoint).to(device)
    data = load_dataset(args.data, "val", model.cfg.img_size, model.cfg.in_chans)
    check_data_fits(data, model.cfg, args.data)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.workers)
    return eval_classifier(
        model,
        loader,
        args.patch_size,
        device,
        args.latency_repeats,
        name=Path(args.checkpoint).name,
    )


def _check_ids(ids, known: set[int], checkpoint) -> None:
    unknown = [i for i in ids or () if i not in known]
    if unknown:
        raise ValueError(
            f"--ids {unknown}: {checkpoint} has stitches {sorted(known)[:3]} to {max(known)}"
        )


def _eval_cls(model, cfg, args, device):
    import torch

    from stitchops.train.data import load_dataset
    from stitchops.train.evaluate import eval_stitches
    from stitchops.train.loop import check_data_fits

    first = model.anchors[0].cfg if hasattr(model, "stitches") else model.cfg
    data = load_dataset(args.data or cfg.data, "val", first.img_size, first.in_chans)
    check_data_fits(data, first, args.data or cfg.data)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.workers)
    if not hasattr(model, "stitches"):  # an anchor, an SPT-tuned or a plugin mode's model
        if args.ids:
            raise ValueError(f"--ids: {args.checkpoint} holds one model, not stitches")
        return _eval_single(model, cfg, loader, args, device)
    _check_ids(args.ids, {s.id for s in model.stitches}, args.checkpoint)
    return eval_stitches(
        model,
        loader,
        ids=args.ids,
        patch_size=args.patch_size,
        device=device,
        progress=not args.no_progress,
        latency_repeats=args.latency_repeats,
    )


def _eval_single(model, cfg, loader, args, device):
    """One model's row, after the rows of the models its mode shows beside it (SPViT: the
    dense model it pruned)."""
    from stitchops.train import plugins
    from stitchops.train.evaluate import combine_tables, eval_classifier

    plugin = plugins.find(cfg.mode)
    models = [
        *(plugin.companions(cfg, device) if plugin and plugin.companions else []),
        (f"{cfg.mode} model", model),
    ]
    tables = [
        eval_classifier(m, loader, args.patch_size, device, args.latency_repeats, name=name)
        for name, m in models
    ]
    return combine_tables(tables)


def _eval_seg(model, cfg, args, device):
    import torch

    from stitchops.train.evaluate import eval_seg_stitches
    from stitchops.train.segdata import load_seg_dataset

    backbone = model.backbone
    first = (backbone.anchors[0] if hasattr(backbone, "anchors") else backbone).cfg
    reduce = args.reduce_zero_label if args.reduce_zero_label is not None else cfg.reduce_zero_label
    data = load_seg_dataset(
        args.data or cfg.val_data or cfg.data, "val", first, model.num_classes, cfg.seed, reduce
    )
    # folder images differ in size: one at a time; generated ones stack
    batch = args.batch_size if (args.data or cfg.data) == "shapes" else 1
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=args.workers)
    if hasattr(backbone, "stitches"):
        _check_ids(args.ids, {s.id for s in backbone.stitches}, args.checkpoint)
    inference = {"mode": "whole"}
    if args.crop is not None or args.stride is not None:
        inference = {"mode": "slide", "crop": args.crop, "stride": args.stride}
        model.check_sliding(args.crop, args.stride, args.patch_size)  # before any work
    return eval_seg_stitches(
        model,
        loader,
        ids=args.ids,
        device=device,
        progress=not args.no_progress,
        latency_repeats=args.latency_repeats,
        inference=inference,
    )


def _device(name: str):
    """``name`` as a torch.device this machine has, else ValueError saying what it has."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: this machine has no CUDA GPU (torch "
                f"{torch.__version__}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


FASEG_KEYS = {
    "hidden": int,
    "heads": int,
    "queries": int,
    "layers": int,
    "ffn": int,
    "dfpq": "bool",
    "hrca": "hrca",
    "hrca_ratio": int,
    "mask_threshold": float,
    "first_pos": str,
    "hrca_pos": str,
    "hrca_windows": str,
    "key_pos": str,
    "points": int,
    "sampling": str,
}


def _faseg_options(text: str) -> dict:
    """'queries=20,dfpq=false,hrca=none' → {"queries": 20, "dfpq": False, "hrca": None}."""
    options = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        kind = FASEG_KEYS.get(key.strip())
        if kind is None or not value:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(FASEG_KEYS)}"
            )
        value = value.strip()
        if kind == "bool":
            if value.lower() not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"{key}={value}: expected true or false")
            options[key] = value.lower() == "true"
        elif kind == "hrca":
            options[key] = None if value == "none" else value
        else:
            try:
                options[key] = kind(value)
            except ValueError as err:
                raise argparse.ArgumentTypeError(f"{key}={value}: {err}") from None
            if kind is int and options[key] < 1:
                raise argparse.ArgumentTypeError(f"{key}={value}: must be >= 1")
    return options


def _budget(text: str) -> float:
    from stitchops.train.spt_mode import parse_budget

    try:
        return parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from exc


class _ShowDefaults(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help where X says something (not None or
    False) and the help does not already name its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


# train's numeric options: (flag, type, what it sets); the default shown is TrainConfig's.
_TRAIN_NUMBERS = (
    ("epochs", int, "passes over the training data"),
    ("max-steps", int, "stop after this many optimizer steps (the schedule keeps its epochs)"),
    ("batch-size", int, "images per step and process"),
    ("lr", float, "peak learning rate of AdamW"),
    ("min-lr", float, "learning rate at the end of the cosine schedule"),
    ("weight-decay", float, "AdamW weight decay"),
    ("warmup-steps", int, "linear warm-up steps before the cosine schedule"),
    ("clip-grad", float, "gradient norm clipping (0: off)"),
    ("seed", int, "seed of the weights, the data order and the stitch sampler"),
    ("ros-step", float, "ROS: width of a FLOPs interval in GFLOPs (none: from the space)"),
    ("esta-intervals", int, "ESTA: FLOPs intervals the sampler draws from"),
    ("esta-momentum", float, "ESTA: momentum of the stitch importance average"),
    ("esta-warmup", int, "ESTA: steps of uniform sampling before importance sampling"),
    ("kernel-size", int, "SN-Net: sliding-window size over block ids"),
    ("stride", int, "SN-Net: sliding-window stride"),
    ("rank", int, "LoRA rank of the stitching layers (0: fully trainable; -1: ESTA's d/4)"),
    ("alpha", float, "LoRA scale numerator (scale = alpha / rank)"),
    ("pst-rank", int, "ESTA: LoRA rank on the anchors' attention projections"),
    ("init-images", int, "images for the least-squares init of the stitching layers"),
    ("spt-rank", int, "SPT: rank of the structured modules (LoRA / adapter)"),
    ("spt-alpha", float, "SPT: a matrix goes structured at sensitive count >= its cost / alpha"),
    ("spt-beta", float, "SPT: a vector is tuned whole at sensitive count >= its length / beta"),
    ("spt-batches", int, "SPT: training batches of the sensitivity pass"),
    ("spt-dropout", float, "SPT: dropout on the LoRA branches' input (the official 0.1)"),
    ("spt-drop-path", float, "SPT: per-sample drop-path of the structured branches (official 0.1)"),
    (
        "save-every",
        int,
        "also save a checkpoint every N steps (it is saved at each epoch's "
        "end anyway, and on Ctrl-C)",
    ),
    ("save-minutes", float, "also save a checkpoint when this many minutes passed since the last"),
    ("log-every", int, "write log.jsonl every N steps"),
    ("workers", int, "data-loading processes"),
    (
        "threads",
        int,
        "CPU intra-op threads (none: chosen for the model's work, one for small models)",
    ),
)


def _default(name: str) -> str:
    from stitchops.train.config import MODE_DEFAULTS, TrainConfig

    key = name.replace("-", "_")
    value = TrainConfig.__dataclass_fields__[key].default
    per_mode = {mode: d[key] for mode, d in MODE_DEFAULTS.items() if key in d}
    if per_mode and value is None:
        return "by mode: " + ", ".join(f"{mode} {v}" for mode, v in per_mode.items())
    return "none" if value is None else str(value)


def _add_train_parser(sub) -> None:
    from stitchops.train import plugins
    from stitchops.train.build import SPEC_HELP
    from stitchops.train.config import MODES

    p = sub.add_parser(
        "train",
        help="pretrain an anchor, train SN-Net / SN-Netv2 / ESTA, or fine-tune with SPT",
        description="Pretrain an anchor or train a stitched ViT (torchrun for several "
        "processes). Defaults in brackets; 'by mode' ones follow --mode.",
        epilog=SPEC_HELP,
    )
    extra = "".join(f"; {plugin.name}: {plugin.help}" for plugin in plugins.plugins())
    p.add_argument(
        "--mode",
        choices=list(MODES),
        default="snnetv2",
        help="what to train; spt: sensitivity-aware sparse fine-tuning of one "
        f"pretrained model (--anchor-weights){extra} [snnetv2]",
    )
    for options in (
        _spt_options,
        _task_options,
        _model_and_data_options,
        _stitch_options,
        _run_options,
    ):
        options(p)
    for plugin in plugins.plugins():
        group = p.add_argument_group(f"mode {plugin.name}")
        for option in (o for o in plugin.options if o.cli):
            default = "none" if option.default is None else option.default
            group.add_argument(
                f"--{option.name.replace('_', '-')}",
                type=option.type,
                dest=f"{PLUGIN_PREFIX}{option.name}",
                metavar=option.name.upper(),
                help=f"{option.help} [{default}]",
            )
    p.set_defaults(fn=train_cmd)


def _spt_options(p) -> None:
    p.add_argument(
        "--budget",
        type=_budget,
        help="SPT: trainable parameters besides the head, e.g. 0.4M or 250k",
    )
    p.add_argument(
        "--spt-structured",
        choices=["lora", "adapter"],
        help=f"SPT: structured tuning of sensitive matrices [{_default('spt_structured')}]",
    )
    p.add_argument(
        "--spt-plan",
        metavar="PLAN",
        help="SPT: a plan.json to apply instead of "
        "the sensitivity pass, or 'lora-all' (LoRA on every matrix, the "
        "baseline)",
    )
    p.add_argument(
        "--spt-train-cls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SPT: the class token trains with the head (the official recipe) "
        f"[{_default('spt_train_cls')}]",
    )
    p.add_argument(
        "--spt-tau-search",
        choices=["exact", "official"],
        help="SPT: the largest tau within the budget, or the official tau sweep "
        f"(plans may exceed the budget) [{_default('spt_tau_search')}]",
    )
    p.add_argument(
        "--spt-split-fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SPT: rank a fused qkv as q, k and v, as the official code "
        f"[{_default('spt_split_fused')}]",
    )
    p.add_argument(
        "--spt-per-sample",
        action="store_true",
        default=None,
        help="SPT: sum per-sample squared gradients (the thesis's Algorithm 1)",
    )


def _task_options(p) -> None:
    p.add_argument(
        "--task",
        choices=["cls", "seg"],
        help="classification, or semantic segmentation with a Segmenter head [cls]",
    )
    p.add_argument(
        "--decoder",
        "--head",
        dest="decoder",
        choices=["linear", "mask", "setr", "faseg"],
        help="segmentation head: "
        "Segmenter's linear or mask transformer, SETR's naive, or FASeg's query "
        "decoder (Mask2Former + DFPQ + HRCA) [linear]",
    )
    p.add_argument(
        "--faseg",
        type=_faseg_options,
        metavar="KEY=VALUE,...",
        dest="decoder_options",
        help="FASeg head and loss settings, e.g. "
        "queries=20,layers=5,hidden=64,dfpq=false,hrca=none,points=1024 (keys: "
        f"{', '.join(FASEG_KEYS)})",
    )
    p.add_argument(
        "--schedule",
        choices=["cosine", "poly"],
        help="learning-rate decay [cosine for cls, poly for seg]",
    )


def _model_and_data_options(p) -> None:
    p.add_argument(
        "--anchors",
        nargs="+",
        metavar="SPEC",
        help="model specs, cheapest first, e.g. deit_small_patch16_224 or "
        "vit_small_test:embed_dim=64 (keys below)",
    )
    p.add_argument(
        "--anchor-weights",
        nargs="+",
        metavar="FILE",
        help="one .safetensors/.pth per anchor (timm or stitchops checkpoints)",
    )
    p.add_argument(
        "--data",
        help="'digits' (bundled) or an ImageFolder folder; with --task seg "
        "'shapes' (generated) or an ADE20K-layout or images/ + masks/ folder. "
        "Split: a folder's train/ and val/ (ADE20K: training/ and validation/) "
        "sub-folders, else --val-data for seg; without either, evaluation reads "
        "the training images, with a warning [digits; shapes for seg]",
    )
    p.add_argument(
        "--out",
        help="output folder: checkpoint, log.jsonl; a folder holding a run "
        "is refused (see --resume, --overwrite) [runs/stitchops; with --resume the "
        "checkpoint's folder]",
    )
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue a run exactly from it, in its folder unless --out says otherwise",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out folder "
        "that holds one (its checkpoint and log are removed)",
    )
    p.add_argument(
        "--val-data",
        help="seg: the evaluation folder, for data without a split "
        "of its own (images/ + masks/) [the data's validation split]",
    )
    p.add_argument(
        "--reduce-zero-label",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="seg: masks' 0 is 'other', ignored, and ids shift down by one "
        "(ADE20K; 255 stays ignored) [on for ADE20K's layout, off for "
        "images/ + masks/]",
    )
    for name, kind, what in _TRAIN_NUMBERS:
        p.add_argument(f"--{name}", type=kind, help=f"{what} [{_default(name)}]")


def _stitch_options(p) -> None:
    p.add_argument(
        "--sampler",
        choices=["uniform", "ros", "esta"],
        help=f"stitch sampling [{_default('sampler')}]",
    )
    p.add_argument(
        "--two-way",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"SN-Netv2's FS/SF/FSF/SFS space [{_default('two_way')}]",
    )
    p.add_argument(
        "--stitch-biases",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"ESTA's per-stitch biases [{_default('stitch_biases')}]",
    )
    p.add_argument(
        "--partial-windows",
        action="store_true",
        default=None,
        help="SN-Net: also stitch the partial windows at the end (the official code's reading)",
    )
    p.add_argument(
        "--all-pairs",
        action="store_true",
        help="stitch every anchor pair, not only neighbours (SN-Net's nearest stitching off)",
    )
    p.add_argument(
        "--patch-sizes",
        type=_ints,
        metavar="P,P,...",
        help="FlexiViT: a random patch size per step from these",
    )
    p.add_argument(
        "--distill",
        help="'inplace' (from the largest anchor) or a teacher's weights "
        f"file [{_default('distill')}]",
    )
    p.add_argument("--teacher", metavar="SPEC", help="model spec of the teacher for --distill FILE")


def _run_options(p) -> None:
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA: deterministic algorithms and cuBLAS workspace, so a resumed run "
        "equals an uninterrupted one [True]",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """argparse with a user's mistake on one line (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line: demo, train, eval, info, bench."""
    from stitchops.demos import DEMOS

    demos = "\n".join(f"  demo {name:<8} {what}" for name, what in DEMOS.items())
    parser = _Parser(
        prog="stitchops",
        description=f"{__doc__}\ndemos:\n{demos}",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(sub)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    sub.add_parser("info", help="versions and which backends can run here").set_defaults(fn=info)
    _add_bench_parser(sub)
    return parser


def _add_demo_parser(sub) -> None:
    from stitchops.demos import DEFAULT, DEMOS

    p = sub.add_parser(
        "demo",
        help="a method end to end on a laptop CPU: " + ", ".join(DEMOS),
        formatter_class=argparse.RawTextHelpFormatter,
        description="\n".join(f"{k:<8} {v}" for k, v in DEMOS.items()),
    )
    p.add_argument(
        "task",
        nargs="?",
        choices=list(DEMOS),
        default=DEFAULT,
        help=f"which demo (default: {DEFAULT})",
    )
    p.add_argument("--out", help="output folder (default: the demo's, named above)")
    p.add_argument(
        "--anchor-epochs",
        type=int,
        help="epochs of each pretrained model (default: the demo's own)",
    )
    p.add_argument(
        "--stitch-epochs",
        type=int,
        help="epochs of the second stage: the stitched "
        "model, or a fine-tuning (default: the demo's own)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of everything random")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU intra-op threads (default: 1, the demos' models are small: more only slows them)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=demo)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (every stitch, or the one model) or "
        "a weights file: table and plot",
        formatter_class=_ShowDefaults,
    )
    p.add_argument(
        "checkpoint",
        help="a training checkpoint (.safetensors: a stitched model, "
        "an anchor, a segmentation or SPT model), or with --model a weights file "
        "(SPT's merged.safetensors, timm weights)",
    )
    p.add_argument(
        "--model",
        metavar="SPEC",
        help="the model spec of a plain weights file "
        "(e.g. vit_small_test:embed_dim=48,depth=4,num_heads=3,num_classes=5); "
        "needs --data",
    )
    p.add_argument(
        "--task",
        choices=["cls", "seg"],
        help="what the checkpoint must be "
        "(default: whatever it is: accuracy for cls, mIoU for seg)",
    )
    p.add_argument(
        "--data",
        help="'digits' or an ImageFolder folder (default: the data the model was trained on)",
    )
    p.add_argument(
        "--ids",
        type=_ints,
        metavar="ID,ID,...",
        help="evaluate only these stitches (default: every one)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--patch-size", type=int, help="FlexiViT patch size (default: the model's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument(
        "--latency-repeats",
        type=int,
        default=5,
        help="timed forwards per stitch (median, after a warm-up)",
    )
    p.add_argument(
        "--out", help="folder for stitches.json and stitches.png (default: the checkpoint's)"
    )
    p.add_argument(
        "--crop",
        type=int,
        help="seg: sliding-window inference with crop x crop windows (default: whole images)",
    )
    p.add_argument("--stride", type=int, help="seg: the sliding windows' stride in pixels")
    p.add_argument(
        "--reduce-zero-label",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="seg: as train's (default: the checkpoint's setting)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=eval_cmd)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run every benchmark (correctness first), save, report",
        formatter_class=_ShowDefaults,
    )
    p.add_argument("--only", help="run only the benchmarks whose name contains this (default: all)")
    p.add_argument("--no-save", action="store_true", help="print only; leave results/ alone")
    p.set_defaults(fn=bench)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # the reader closed the pipe early (stitchops info | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as stop:  # a training loop saved and said how to resume
        if not hasattr(stop, "checkpoint"):
            print(f"stitchops {args.command}: interrupted", file=sys.stderr)
        return getattr(stop, "code", 130)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as exc:
        # Our errors explain themselves: no traceback from deep inside torch.
        print(f"stitchops {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
