"""Command line (also ``python -m stitchops``).

stitchops demo     SN-Netv2 end to end on the bundled digits (the README's first command)
stitchops train    pretrain an anchor, or train SN-Net / SN-Netv2 / ESTA (torchrun for DDP)
stitchops eval     evaluate every stitch of a checkpoint: table, Pareto frontier, plot
stitchops info     versions and which backends can run here
stitchops bench    run every benchmark (correctness first), save, report
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
        msg = ("stitchops bench runs the scripts in a source checkout's benchmarks/ folder: run "
               "it from the repository root (git clone, then pip install -e .)")  # fmt: skip
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


def demo(args) -> int:
    from stitchops.train.demo import run_demo

    run_demo(out=args.out, anchor_epochs=args.anchor_epochs, stitch_epochs=args.stitch_epochs,
             progress=not args.no_progress, seed=args.seed)  # fmt: skip
    return 0


def train_cmd(args) -> int:
    from stitchops.train.loop import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["progress"] = not args.no_progress
    values["amp"] = not args.no_amp
    values["nearest"] = not args.all_pairs
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in fields})
    path = train(cfg, resume=args.resume)
    print(f"checkpoint: {path}")
    return 0


def eval_cmd(args) -> int:
    import torch

    from stitchops.train.data import load_dataset
    from stitchops.train.evaluate import eval_stitches, plot_stitches
    from stitchops.train.loop import load_trained

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_trained(args.checkpoint, device)
    if not hasattr(model, "stitches"):
        raise ValueError(f"{args.checkpoint} holds a single anchor, not a stitched model")
    first = model.anchors[0].cfg
    data = load_dataset(args.data or cfg.data, "val", first.img_size, first.in_chans)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.workers)
    table = eval_stitches(model, loader, patch_size=args.patch_size, device=device)
    print(table.format())
    out = Path(args.out or Path(args.checkpoint).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stitches.json").write_text(table.to_json())
    plot_stitches(table, out / "stitches.png", title=f"{cfg.mode}: every stitch")
    print(f"wrote {out / 'stitches.json'} and {out / 'stitches.png'}")
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from exc


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="pretrain an anchor, or train SN-Net / SN-Netv2 / ESTA")
    p.add_argument("--mode", choices=["anchor", "snnet", "snnetv2", "esta"], default="snnetv2")
    p.add_argument(
        "--anchors",
        nargs="+",
        metavar="SPEC",
        help="model specs, cheapest first: deit_small_patch16_224[:key=value,...]",
    )
    p.add_argument(
        "--anchor-weights",
        nargs="+",
        metavar="FILE",
        help="one .safetensors/.pth per anchor (timm or stitchops checkpoints)",
    )
    p.add_argument("--data", help="'digits' (bundled) or an ImageFolder-layout folder")
    p.add_argument("--out", help="output folder (checkpoint, log.jsonl, config.json)")
    p.add_argument("--resume", help="checkpoint to resume from (exactly)")
    for name, kind in (("epochs", int), ("max-steps", int), ("batch-size", int),
                       ("lr", float), ("min-lr", float), ("weight-decay", float),
                       ("warmup-steps", int), ("clip-grad", float), ("seed", int),
                       ("ros-step", float), ("esta-intervals", int), ("esta-momentum", float),
                       ("esta-warmup", int), ("kernel-size", int), ("stride", int),
                       ("rank", int), ("alpha", float), ("pst-rank", int),
                       ("init-images", int), ("save-every", int), ("log-every", int),
                       ("workers", int)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--sampler", choices=["uniform", "ros", "esta"])
    p.add_argument("--two-way", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--stitch-biases", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--partial-windows",
        action="store_true",
        default=None,
        help="SN-Net: also stitch the partial windows at the end (official code)",
    )
    p.add_argument("--all-pairs", action="store_true", help="stitch every anchor pair, not "
                   "only neighbours (SN-Net's nearest stitching off)")  # fmt: skip
    p.add_argument("--patch-sizes", type=_ints, help="FlexiViT: a random patch size per step")
    p.add_argument("--distill", help="'inplace' (from the largest anchor) or teacher weights")
    p.add_argument("--teacher", help="model spec of the external teacher for --distill FILE")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=train_cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stitchops", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="SN-Netv2 on the bundled digits: train, evaluate, plot")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--anchor-epochs", type=int, default=30)
    p.add_argument("--stitch-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=demo)
    _add_train_parser(sub)
    p = sub.add_parser("eval", help="evaluate every stitch of a checkpoint; table and plot")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="default: the data the model was trained on")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", help="folder for stitches.json and stitches.png")
    p.set_defaults(fn=eval_cmd)
    sub.add_parser("info", help="versions and which backends can run here").set_defaults(fn=info)
    p = sub.add_parser("bench", help="run every benchmark (correctness first), save, report")
    p.add_argument("--only", help="run only the benchmarks whose name contains this")
    p.add_argument("--no-save", action="store_true", help="print only; leave results/ alone")
    p.set_defaults(fn=bench)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as exc:
        # Our errors explain themselves: no traceback from deep inside torch.
        print(f"stitchops {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
