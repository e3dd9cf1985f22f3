"""Model specs (``name:key=value,...``) → anchors and stitched models; weight loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from stitchops.models.vit import MODELS, VisionTransformer, ViTConfig, create_model

# The keys a model spec may set, with what each takes (ViTConfig's fields).
SPEC_KEYS = {f.name: f.type for f in dataclasses.fields(ViTConfig)}
SPEC_HELP = (
    "model spec: NAME[:key=value,...], NAME one of "
    + ", ".join(sorted(MODELS))
    + "; keys: "
    + ", ".join(f"{name} ({kind})" for name, kind in SPEC_KEYS.items())
)


def _check_spec_value(key: str, value, spec: str):
    """``value`` (parsed as JSON) has the type ViTConfig's ``key`` takes, else ValueError."""
    kind = SPEC_KEYS[key]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "float | None": value is None
        or (isinstance(value, (int, float)) and not isinstance(value, bool)),
    }.get(kind, True)
    if not ok:
        raise ValueError(f"model option {key}={value!r} in {spec!r} must be {kind}")
    return value


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"deit_small_patch16_224:num_classes=100,img_size=192"`` → (name, overrides)."""
    name, _, rest = spec.partition(":")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} in {spec!r}; choose one of {sorted(MODELS)}")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"model option {item!r} in {spec!r} is not key=value")
        if key not in SPEC_KEYS:
            raise ValueError(
                f"unknown model option {key!r} in {spec!r}; the keys are {', '.join(SPEC_KEYS)}"
            )
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        overrides[key] = _check_spec_value(key, parsed, spec)
    return name, overrides


def load_weights(
    model: torch.nn.Module, path: str, prefix: str = "", new_head: bool = False
) -> None:
    """Load a state dict from .safetensors (timm's hub files, or a stitchops checkpoint,
    whose ``model.`` keys are used, a segmentation one's ``backbone.`` part for an anchor) or
    a torch .pth/.bin file (``model`` entry if present); ``prefix``: only the keys under it.
    ``new_head``: a classifier head (``head.*``) of another class count is left as the model
    initialised it (fine-tuning on a new task), said in one line."""
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
    if not prefix and "backbone.patch_embed.proj.weight" in state:
        prefix = "backbone."  # a segmentation checkpoint: its backbone is the anchor
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.state_dict()
    if new_head:
        other = {
            k: tuple(v.shape)
            for k, v in state.items()
            if k.startswith("head.") and k in own and own[k].shape != v.shape
        }
        if other:
            state = {k: v for k, v in state.items() if k not in other}
            ours = tuple(own["head.weight"].shape)
            print(
                f"{file.name}: head {other.get('head.weight')} does not fit the model's "
                f"{ours}: a new head is trained",
                flush=True,
            )
    for key, value in state.items():  # the first shape that does not fit, named
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            mismatched = sum(k in own and own[k].shape != v.shape for k, v in state.items())
            raise ValueError(
                f"weights in {file} do not fit the model: {key} is {tuple(value.shape)} in the "
                f"file but {tuple(own[key].shape)} in the model ({mismatched} tensors differ); "
                "check the model spec against the weights"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if new_head:
        missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(
            f"weights in {file} do not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def build_anchor(
    spec: str, weights: str | None = None, new_head: bool = False
) -> VisionTransformer:
    """The model of ``spec`` with ``weights`` (``new_head``: as for ``load_weights``)."""
    name, overrides = parse_spec(spec)
    try:
        model = create_model(name, **overrides)
    except TypeError as exc:
        raise ValueError(f"bad model option in {spec!r}: {exc}") from exc
    if weights:
        load_weights(model, weights, new_head=new_head)
    return model


def build_anchors(specs: list[str], weights: list[str] | None) -> list[VisionTransformer]:
    """One anchor per spec, with its weights file when ``weights`` is given."""
    weights = weights or [None] * len(specs)
    if len(weights) != len(specs):
        raise ValueError(f"got {len(weights)} anchor weight files for {len(specs)} anchors")
    return [build_anchor(s, w) for s, w in zip(specs, weights, strict=True)]
