"""Stitching spaces: which stitches a family of anchors admits (pure Python, no tensors).

Conventions (SN-Net's code and ../shared/seeds/README.md). A stitch point (f, e) from anchor a
to anchor b runs a's blocks up to and including f, the stitching layer a→b, then b's blocks
from e on. The least-squares target of that layer is b's input to block e.

* SN-Net, paired depths: a window of ``kernel_size`` block ids slides with ``stride``; every
  ordered pair (f, e) inside a full window not seen before is a stitch point, and the new
  points of one window share one stitching layer (depth 12, k 2, s 1: 34 points, 11 layers).
  The official code also takes the partial windows at the end (``partial_windows``).
* SN-Net, unpaired depths: the deeper anchor's block ids are mapped onto the shallower one's
  by nearest interpolation, m(i) = ⌊i·d_s/d_l⌋; a shallower front stitches (f, i) into every
  deeper block i with m(i) = f (except (0, 0)), a deeper front stitches (j, m(j)) from every
  deeper block j; one layer per shallower block.
* SN-Net: Fast-to-Slow (front anchor cheaper than end anchor), and with ``nearest`` only
  neighbouring anchors stitch; every stitch holds exactly one stitch point.
* SN-Netv2 two-way between a shallower anchor s (depth d_s) and a deeper l (d_l):
  FS (i, ⌈(i+1)·d_l/d_s⌉) for i < d_s − 1 with layer i; SF (j, m(j) + 1) for every deeper
  block j < d_l − 1 that is the last one mapped onto its shallow block, with layer m(j);
  FSF = FS then SF starting at or after the FS end, SFS = SF then FS likewise. DeiT3-S/L:
  2 anchors + 11 FS + 11 SF + 55 FSF + 55 SFS = 134.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Blocks [start, stop) of one anchor."""

    anchor: int
    start: int
    stop: int


@dataclass(frozen=True)
class StitchPoint:
    """A stitching layer ``layers[key][index]`` used between blocks ``front`` and ``end``."""

    key: str
    index: int
    front: int
    end: int


@dataclass(frozen=True)
class RawStitch:
    kind: str  # "anchor", "FS", "SF", "FSF", "SFS" or "stitch" (SN-Net)
    anchors: tuple[int, ...]  # anchors visited in order
    points: tuple[StitchPoint, ...]

    def route(self, depths: list[int]) -> tuple[Segment, ...]:
        segments, start = [], 0
        for anchor, point in zip(self.anchors, self.points, strict=False):
            segments.append(Segment(anchor, start, point.front + 1))
            start = point.end
        last = self.anchors[-1]
        segments.append(Segment(last, start, depths[last]))
        return tuple(segments)


def layer_key(front_anchor: int, end_anchor: int) -> str:
    return f"{front_anchor}to{end_anchor}"


def nearest_map(deep: int, shallow: int) -> list[int]:
    """Shallow block id of each deep block id (nearest interpolation, floor(i·d_s/d_l))."""
    return [i * shallow // deep for i in range(deep)]


def paired_points(
    depth: int, kernel_size: int, stride: int, partial_windows: bool = False
) -> list[tuple[int, int, int]]:
    """(front, end, layer) of SN-Net's sliding-window stitching over equal depths.

    By default only full windows slide (starts 0, s, 2s, ... up to depth − k), the paper's
    reading. ``partial_windows=True`` is the official code's: windows start at every multiple
    of s below the depth and are cut at the last block, so their new pairs stitch too. With
    k 2, s 1 both give the same 34 points at depth 12 (the last partial window holds no new
    pair); with k 3, s 2 the official reading adds the window [10, 11]'s (10, 11), (11, 10)
    and (11, 11) and a layer for them (44 points instead of 41; block 11 is stitched).
    """
    if kernel_size < 1 or stride < 1:
        raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size}, {stride}")
    if kernel_size > depth:
        raise ValueError(f"kernel_size {kernel_size} is larger than the anchors' depth {depth}")
    seen, points, layer = set(), [], 0
    last_start = depth - 1 if partial_windows else depth - kernel_size
    for start in range(0, last_start + 1, stride):
        ids = range(start, min(start + kernel_size, depth))
        new = [(f, e) for f in ids for e in ids if (f, e) not in seen]
        for f, e in new:
            seen.add((f, e))
            points.append((f, e, layer))
        layer += bool(new)
    return points


def unpaired_points(front_depth: int, end_depth: int) -> list[tuple[int, int, int]]:
    """(front, end, layer) of SN-Net's nearest-interpolation stitching over unequal depths."""
    if front_depth < end_depth:
        mapping = nearest_map(end_depth, front_depth)
        return [(f, i, f) for i, f in enumerate(mapping) if f < i]
    mapping = nearest_map(front_depth, end_depth)
    return [(j, e, e) for j, e in enumerate(mapping) if j > 0]


def snnet_space(
    depths: list[int], kernel_size=2, stride=1, nearest=True, partial_windows=False
) -> list[RawStitch]:
    """Anchors, then for each anchor pair (Fast-to-Slow, neighbours only with ``nearest``)
    its one-point stitches in window order (``partial_windows``: see ``paired_points``)."""
    stitches = [RawStitch("anchor", (a,), ()) for a in range(len(depths))]
    pairs = [(a, b) for a in range(len(depths)) for b in range(a + 1, len(depths))]
    if nearest:
        pairs = [(a, b) for a, b in pairs if b == a + 1]
    for a, b in pairs:
        if depths[a] == depths[b]:
            points = paired_points(depths[a], kernel_size, stride, partial_windows)
        else:
            points = unpaired_points(depths[a], depths[b])
        key = layer_key(a, b)
        for f, e, layer in points:
            stitches.append(RawStitch("stitch", (a, b), (StitchPoint(key, layer, f, e),)))
    return stitches


def two_way_pair(a: int, b: int, depth_a: int, depth_b: int) -> list[RawStitch]:
    """SN-Netv2's FS, SF, FSF, SFS stitches between a (shallower or equal) and b."""
    if depth_a > depth_b:
        raise ValueError(
            f"two-way stitching needs each anchor no deeper than the next one; anchor {a} has "
            f"{depth_a} blocks and anchor {b} has {depth_b}"
        )
    shallow_of = nearest_map(depth_b, depth_a)
    fs_key, sf_key = layer_key(a, b), layer_key(b, a)
    fs = [
        StitchPoint(fs_key, i, i, math.ceil((i + 1) * depth_b / depth_a))
        for i in range(depth_a - 1)
    ]
    sf = [
        StitchPoint(sf_key, shallow_of[j], j, shallow_of[j] + 1)
        for j in range(depth_b - 1)
        if shallow_of[j] != shallow_of[j + 1]
    ]
    out = [RawStitch("FS", (a, b), (p,)) for p in fs]
    out += [RawStitch("SF", (b, a), (p,)) for p in sf]
    out += [RawStitch("FSF", (a, b, a), (p, q)) for p in fs for q in sf if q.front >= p.end]
    out += [RawStitch("SFS", (b, a, b), (q, p)) for q in sf for p in fs if p.front >= q.end]
    return out


def two_way_space(depths: list[int], nearest=True) -> list[RawStitch]:
    """Anchors, then SN-Netv2's two-way stitches for each (neighbouring) anchor pair."""
    stitches = [RawStitch("anchor", (a,), ()) for a in range(len(depths))]
    pairs = [(a, b) for a in range(len(depths)) for b in range(a + 1, len(depths))]
    if nearest:
        pairs = [(a, b) for a, b in pairs if b == a + 1]
    for a, b in pairs:
        stitches += two_way_pair(a, b, depths[a], depths[b])
    return stitches


def layer_counts(stitches: list[RawStitch]) -> dict[str, int]:
    """Number of stitching layers per key (max index + 1)."""
    counts: dict[str, int] = {}
    for stitch in stitches:
        for p in stitch.points:
            counts[p.key] = max(counts.get(p.key, 0), p.index + 1)
    return counts
