"""Which backbones' patch tokens sit on another grid than the image's.

An expedited segmentation model (``stitchops.models.expedite(..., where="head")``) runs its
last blocks on h×w cluster centres, so the token maps its backbone hands the head are h×w,
not the image's gh×gw. ``expedite`` records the backbone's centre grid here and
``unexpedite`` forgets it; a backbone asks ``clustered_grid(self)`` when it turns tokens into
maps. The record lives here, keyed weakly by the backbone, not on the backbone's class.
"""

from __future__ import annotations

import weakref

from torch import nn

_GRIDS: weakref.WeakKeyDictionary[nn.Module, tuple[int, int]] = weakref.WeakKeyDictionary()


def clustered_grid(backbone: nn.Module) -> tuple[int, int] | None:
    """The (h, w) centre grid of ``backbone``'s clustered tokens, or None."""
    return _GRIDS.get(backbone)


def set_clustered_grid(backbone: nn.Module, grid: tuple[int, int] | None) -> None:
    """Record (or with None forget) the centre grid of ``backbone``'s clustered tokens."""
    if grid is None:
        _GRIDS.pop(backbone, None)
    else:
        _GRIDS[backbone] = tuple(grid)
