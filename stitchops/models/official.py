"""The official SN-Net and SN-Netv2 code's stitch numbering and checkpoint layout.

Readings of the authors' public code (facts, none of its code):

* SN-Net (``stitching_deit``): anchors are numbered first, then for each stitched anchor pair
  (all pairs, or neighbours only with nearest stitching) the sliding-window points in window
  order, the windows including the partial ones at the end. Stitching layers are
  ``stitch_layers.{pair index}.{layer}.transform.{weight,bias}``, the pair index counting
  the stitched pairs in that order. Its stitched routes end with ``forward_head`` straight
  after the blocks: no final LayerNorm (anchors keep theirs), which
  ``StitchedViT(final_norm_on_stitches=False)`` reproduces.
* SN-Netv2 (``classification``, two anchors, small depth d_s, large d_l): anchors 0 and 1;
  then the FS stitches (small → large) after every small block, the last one included
  (it is built but never sampled); the SF stitches (large → small); then large → small →
  large (our SFS); then small → large → small (our FSF). Stitching layers are
  ``stitch_layers.0.{i}`` (FS, d_s of them) and ``stitch_layers.1.{i}`` (SF), each
  ``transform.{weight,bias,lora_A,lora_B}`` (scale lora_alpha / r, alpha 1), unmerged in a
  training checkpoint. Its anchors are DeiT-III's own models, whose LayerScale parameters
  are ``gamma_1`` / ``gamma_2`` (timm: ``ls1.gamma`` / ``ls2.gamma``).

With DeiT3-S/L (12 and 24 blocks) official ids 0-12 are ours, 13 (FS after the small
anchor's last block) is not a stitch of our space, 14-24 are our 13-23 (SF), 25-79 our
79-133 (SFS) and 80-134 our 24-78 (FSF).
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stitchops.models.space import nearest_map

# A stitch as both numberings see it: the anchors visited and the (front, end) block pairs.
Key = tuple[tuple[int, ...], tuple[tuple[int, int], ...]]


def _official_windows(depth: int, kernel_size: int, stride: int) -> list[tuple[int, int]]:
    """SN-Net's paired points in its window order, partial windows included."""
    seen: list[tuple[int, int]] = []
    for start in range(0, depth, stride):
        ids = range(start, min(start + kernel_size, depth))
        seen += [(f, e) for f in ids for e in ids if (f, e) not in seen]
    return seen


def _snnet_order(depths, kernel_size, stride, nearest) -> list[Key]:
    if len(set(depths)) != 1:
        raise ValueError(f"the official SN-Net code stitches anchors of one depth, got {depths}")
    pairs = list(itertools.combinations(range(len(depths)), 2))
    if nearest:
        pairs = [(a, b) for a, b in pairs if b == a + 1]
    order: list[Key] = [((a,), ()) for a in range(len(depths))]
    points = _official_windows(depths[0], kernel_size, stride)
    for a, b in pairs:
        order += [((a, b), (p,)) for p in points]
    return order


def _snnetv2_order(depths) -> list[Key]:
    if len(depths) != 2 or depths[1] % depths[0]:
        raise ValueError(
            "the official SN-Netv2 code stitches two anchors whose depths divide, got "
            f"{list(depths)}"
        )
    small, large = depths
    ratio = large // small
    shallow_of = nearest_map(large, small)
    fs = [(i, (i + 1) * ratio) for i in range(small)]
    sf = [(i, shallow_of[i] + 1) for i in range(large - 1) if large == small or i % 2 == 1]
    sfs = [(q, p) for q in sf for p in fs[:-1] if p[0] >= q[1]]  # its FS layer d_s−1 left out
    fsf = [(p, q) for p in fs for q in sf if q[0] >= p[1]]
    return (
        [((0,), ()), ((1,), ())]
        + [((0, 1), (p,)) for p in fs]
        + [((1, 0), (q,)) for q in sf]
        + [((1, 0, 1), pair) for pair in sfs]
        + [((0, 1, 0), pair) for pair in fsf]
    )


def official_order(raw, depths, options: dict) -> list[Key]:
    """The official code's stitches in its id order, for a space built with ``options``."""
    if options["two_way"]:
        return _snnetv2_order(depths)
    return _snnet_order(depths, options["kernel_size"], options["stride"], options["nearest"])


def key_of(raw) -> Key:
    return raw.anchors, tuple((p.front, p.end) for p in raw.points)


def official_ids(raw, depths, options: dict) -> list[int]:
    """The official id of each of our stitches (by position in ``raw``)."""
    index = {key: i for i, key in enumerate(official_order(raw, depths, options))}
    ids = []
    for stitch in raw:
        if key_of(stitch) not in index:
            raise ValueError(
                f"stitch {key_of(stitch)} has no official id: the official code does not build "
                "it (SN-Net: build with partial_windows=True, as the official code)"
            )
        ids.append(index[key_of(stitch)])
    return ids


class StitchNumbering:
    """Both numberings of a space's stitches: ours (positions in ``StitchedViT.stitches``)
    and the official code's ids (``official_ids``)."""

    def __init__(self, official: list[int]) -> None:
        self.official = official

    def official_id(self, position: int) -> int:
        """The official code's id of our stitch at ``position``."""
        return self.official[position]

    def position(self, official: int) -> int:
        """Our position of the official code's stitch ``official``."""
        if official not in self.official:
            raise ValueError(
                f"official stitch {official} is not in this space: the official code builds it "
                "but never samples it (SN-Netv2's FS after the small anchor's last block), or "
                "the space's options differ from the checkpoint's"
            )
        return self.official.index(official)


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class OfficialLoad:
    """What ``load_official_checkpoint`` did: the family, and the official tensors it did not
    use (SN-Netv2's FS layer after the small anchor's last block: no stitch of ours uses it)."""

    family: str
    ignored: list[str] = field(default_factory=list)


def _read(source) -> dict[str, torch.Tensor]:
    """A state dict from a dict, or a .pth/.bin (``model`` entry if present) or .safetensors."""
    if isinstance(source, dict):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"official checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # The official main.py saves its argparse Namespace beside the weights: allowed,
            # nothing else that is not a tensor or a container.
            with torch.serialization.safe_globals([argparse.Namespace]):
                try:
                    state = torch.load(str(path), map_location="cpu", weights_only=True)
                except Exception as exc:
                    raise ValueError(f"cannot read official checkpoint {path}: {exc}") from exc
    state = state.get("model", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def _anchor_key(rest: str) -> str:
    """DeiT-III's own LayerScale names → timm's."""
    for old, new in ((".gamma_1", ".ls1.gamma"), (".gamma_2", ".ls2.gamma")):
        if rest.endswith(old):
            return rest[: -len(old)] + new
    return rest


def _layer_keys(model) -> dict[str, str]:
    """Official stitching-layer prefix → ours, for this model's space."""
    counts = {key: len(layers) for key, layers in model.stitch_layers.items()}
    if model.options["two_way"]:
        official = {0: "0to1", 1: "1to0"}
    else:
        pairs = list(itertools.combinations(range(len(model.anchors)), 2))
        if model.options["nearest"]:
            pairs = [(a, b) for a, b in pairs if b == a + 1]
        official = {i: f"{a}to{b}" for i, (a, b) in enumerate(pairs)}
    return {
        f"stitch_layers.{i}.{j}.transform.": f"stitch_layers.{ours}.{j}."
        for i, ours in official.items()
        for j in range(counts.get(ours, 0))
    }


def load_official_checkpoint(model, source, compat: bool = True) -> OfficialLoad:
    """Load an official SN-Net / SN-Netv2 checkpoint (a path or a state dict) into ``model``,
    a ``StitchedViT`` built with the same anchors and space options.

    Every tensor of the model must come from the checkpoint (else ValueError listing the
    first missing ones); official tensors with no counterpart are reported in
    ``OfficialLoad.ignored``. With ``compat`` (default), an SN-Net model is switched to the
    official forward, with no final LayerNorm on stitched routes (``final_norm_on_stitches``).
    """
    state = _read(source)
    family = "snnetv2" if model.options["two_way"] else "snnet"
    layers = _layer_keys(model)
    converted, ignored = {}, []
    for key, value in state.items():
        if key.startswith("anchors."):
            converted[_anchor_key(key)] = value
            continue
        prefix = next((p for p in layers if key.startswith(p)), None)
        if prefix is None:
            ignored.append(key)
        else:
            converted[layers[prefix] + key[len(prefix) :]] = value
    own = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(params - set(converted))
    if missing:
        raise ValueError(
            f"the official {family} checkpoint lacks {len(missing)} of the model's tensors, "
            f"e.g. {missing[:3]}: build the StitchedViT with the checkpoint's anchors and options"
        )
    for key, value in converted.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(
                f"official {key} is {tuple(value.shape)} but the model's is "
                f"{tuple(own[key].shape)}: build the StitchedViT with the checkpoint's anchors"
            )
    unknown = sorted(set(converted) - set(own))
    model.load_state_dict({**own, **{k: v for k, v in converted.items() if k in own}})
    if compat and family == "snnet":
        model.final_norm_on_stitches = False
    return OfficialLoad(family, sorted(ignored + unknown))
