"""Training modes in their own files: ``stitchops/train/mode_<name>.py`` defines ``MODE``, a
``ModePlugin``, and the config, the loop, evaluation and the command line find it here.

A plugin mode names its command-line options (``Option``: ``--<name>``, stored in
``TrainConfig.mode_options``), checks them, runs the whole training (usually one or more
phases of the shared loop, ``loop.run_phase``, with its ``Hooks``), and rebuilds a trained
model from a checkpoint for evaluation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Option:
    """One of a plugin mode's options: ``--name`` (underscores as dashes) on the command line,
    ``mode_options[name]`` in the config; ``type`` parses the command line's text."""

    name: str
    type: Callable
    default: object
    help: str
    cli: bool = True  # False: set by the mode itself (e.g. between its phases), not a flag


@dataclass(frozen=True)
class ModePlugin:
    name: str
    help: str
    options: tuple[Option, ...]
    check: Callable  # (cfg) -> None: ValueError on a bad option, before any work
    train: Callable  # (cfg, resume, overwrite) -> the final checkpoint's path
    load: Callable  # (model, meta, cfg) -> the model a checkpoint's state loads into
    # (cfg, device) -> [(name, model)]: models `stitchops eval` shows beside a trained one
    companions: Callable | None = None

    def defaults(self) -> dict:
        return {option.name: option.default for option in self.options}


def names() -> list[str]:
    """The plugin modes' names, from the files (nothing imported)."""
    return sorted(p.stem.removeprefix("mode_") for p in HERE.glob("mode_*.py"))


def find(name: str) -> ModePlugin | None:
    """The plugin mode called ``name`` (imported now), or None for a built-in mode."""
    if name not in names():
        return None
    return importlib.import_module(f"stitchops.train.mode_{name}").MODE


def plugins() -> list[ModePlugin]:
    return [find(name) for name in names()]
