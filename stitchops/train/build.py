"""Model specs (``name:key=value,...``) → anchors and stitched models; weight loading."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stitchops.models.vit import MODELS, VisionTransformer, create_model


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"deit_small_patch16_224:num_classes=100,img_size=192"`` → (name, overrides)."""
    name, _, rest = spec.partition(":")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} in {spec!r}; choose one of {sorted(MODELS)}")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"model option {item!r} in {spec!r} is not key=value")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return name, overrides


def load_weights(model: torch.nn.Module, path: str, prefix: str = "") -> None:
    """Load a state dict from .safetensors (timm's hub files, or a stitchops checkpoint,
    whose ``model.`` keys are used) or a torch .pth/.bin file (``model`` entry if present)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"weights file {file} does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
        if any(k.startswith("model.") for k in state):
            state = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
    else:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        state = state.get("model", state)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {file} do not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def build_anchor(spec: str, weights: str | None = None) -> VisionTransformer:
    name, overrides = parse_spec(spec)
    try:
        model = create_model(name, **overrides)
    except TypeError as exc:
        raise ValueError(f"bad model option in {spec!r}: {exc}") from exc
    if weights:
        load_weights(model, weights)
    return model


def build_anchors(specs: list[str], weights: list[str] | None) -> list[VisionTransformer]:
    """One anchor per spec, with its weights file when ``weights`` is given."""
    weights = weights or [None] * len(specs)
    if len(weights) != len(specs):
        raise ValueError(f"got {len(weights)} anchor weight files for {len(specs)} anchors")
    return [build_anchor(s, w) for s, w in zip(specs, weights, strict=True)]
