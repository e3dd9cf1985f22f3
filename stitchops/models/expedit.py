"""Expedited ViTs (Expedit, NeurIPS 2022, Sec. 3 and Fig. 2): a trained plain ViT runs its
first α blocks at full resolution, clusters the H×W patch tokens into h×w
(``stitchops.token_cluster``), runs the next β blocks on the clustered tokens, reconstructs
H×W tokens (``stitchops.token_reconstruct``) and runs the remaining γ blocks; no weight is
changed or copied, and no fine-tuning is needed.

``expedite(model, alpha, grid)`` does this in place with forward hooks, so the model keeps
its modules, parameter names and state dict, and ``unexpedite(model)`` (or leaving the
``expedited(...)`` block) restores the plain forward. The class token (and any other prefix
token) bypasses clustering and reconstruction and goes through the β blocks with the
centres. ``method="pool"`` is the paper's baseline (Tables 4-5): adaptive average pooling to
h×w, bilinear upsampling back.

The defaults reproduce Expedit-Segmenter's inference (its ``HourglassVisionTransformer``
and ``EncoderDecoder.encode_decode``): on a segmentation model ``where="head"`` (γ = 0: the
β blocks run to the end, the head reads the clustered tokens as an h×w map and its logits
are reconstructed to H×W, then upsampled to the image), ``reconstruct="topk"`` with k = 20
and ``numerics="official"`` (the official M-step's clamp and the official normalisation's
floor; ``stitchops.reference.token_cluster`` says where they act). The paper's local
reconstruction (``reconstruct="local"``) and the exact numerics are opt-in variants; on a
model without a head, ``where`` is ``"tokens"`` (the tokens are reconstructed after β
blocks, then γ blocks run). Gradients follow the official code too: the clustering's
affinities are constants, the reconstruction weights are differentiable in the clustered
tokens and the centres (``weight_grad=False`` makes them constants).

Works on any ViT with timm's attribute names: ``blocks``, ``patch_embed`` (its input is the
images, its optional second argument a patch size as in FlexiViT, else its ``patch_size``)
and ``num_prefix_tokens``: stitchops' VisionTransformer and FlexiViT, a timm
VisionTransformer, a ``StitchedViT`` (the route of its active stitch: α and β count the
route's blocks, the stitching layers between them see the clustered tokens), and a
``Segmenter`` (its backbone). The token grid is read off each forward's images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from stitchops.models.token_grid import set_clustered_grid
from stitchops.ops.token_cluster import MODES, NUMERICS, token_cluster, token_reconstruct

METHODS = ("cluster", "pool")
PLACES = ("auto", "tokens", "head")
_ATTR = "_stitchops_expedit"


@dataclass(frozen=True)
class Route:
    """The blocks a model's forward runs, in order, and where its tokens come from."""

    backbone: nn.Module
    blocks: tuple[nn.Module, ...]
    patch_embed: nn.Module
    prefix: int  # class (and other prefix) tokens ahead of the patch tokens
    stitch: int | None  # a StitchedViT's active stitch (its position), else None


def route_of(model: nn.Module) -> Route:
    """The route to expedite: the model's (or a segmentation model's ``backbone``'s) blocks;
    for a StitchedViT, those of its active stitch, across anchors."""
    vit = getattr(model, "backbone", model)
    if hasattr(vit, "stitches") and hasattr(vit, "anchors"):
        stitch = vit.stitches[vit.active]
        first = vit.anchors[stitch.route[0].anchor]
        blocks = tuple(
            vit.anchors[seg.anchor].blocks[i]
            for seg in stitch.route
            for i in range(seg.start, seg.stop)
        )
        return Route(vit, blocks, first.patch_embed, first.num_prefix_tokens, vit.active)
    missing = [a for a in ("blocks", "patch_embed") if not hasattr(vit, a)]
    if missing:
        raise TypeError(
            f"expedite needs a ViT with timm's attribute names; "
            f"{type(vit).__name__} has no {', '.join(missing)}"
        )
    return Route(
        vit, tuple(vit.blocks), vit.patch_embed, getattr(vit, "num_prefix_tokens", 1), None
    )


@dataclass
class Expedition:
    """One model's expedite settings, hook handles and the current forward's state."""

    alpha: int
    beta: int
    grid: tuple[int, int]
    window: int = 5
    iters: int = 5
    temperature: float = 50.0
    reconstruct: str = "topk"
    k: int = 20
    method: str = "cluster"
    where: str = "head"
    numerics: str = "official"
    weight_grad: bool = True
    route: Route | None = None
    handles: list = field(default_factory=list)
    token_grid: tuple[int, int] | None = None  # of the running forward
    saved: tuple[torch.Tensor, torch.Tensor] | None = None  # (tokens, centres)

    def cluster(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, P + H·W, C] → [B, P + h·w, C]."""
        self._check_stitch()
        prefix = self.route.prefix
        b, _, c = tokens.shape
        x = tokens[:, prefix:].reshape(b, *self.token_grid, c)
        if self.method == "pool":
            centres = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), self.grid).permute(0, 2, 3, 1)
        else:
            centres = token_cluster(
                x,
                self.grid,
                window=self.window,
                iters=self.iters,
                temperature=self.temperature,
                numerics=self.numerics,
            )
        self.saved = (x, centres)
        return torch.cat([tokens[:, :prefix], centres.reshape(b, -1, c)], dim=1)

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """[B, h, w, D] → [B, H, W, D]: the refined centres (or a head's per-centre outputs)
        back on the token grid, by the clustering's weights (or bilinearly for "pool")."""
        if self.saved is None:
            raise RuntimeError(
                "expedite: the reconstruction ran without a clustering in this forward"
            )
        x, centres = self.saved
        self.saved = None
        if self.method == "pool":
            upsampled = F.interpolate(
                values.permute(0, 3, 1, 2),
                size=self.token_grid,
                mode="bilinear",
                align_corners=False,
            )
            return upsampled.permute(0, 2, 3, 1)
        numerics = self.numerics if self.reconstruct == "topk" else "exact"
        k = min(self.k, self.grid[0] * self.grid[1])  # fewer centres than k: all of them
        return token_reconstruct(
            x,
            centres,
            values,
            window=self.window,
            temperature=self.temperature,
            mode=self.reconstruct,
            k=k,
            numerics=numerics,
            weight_grad=self.weight_grad,
        )

    def reconstruct_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, P + h·w, C] → [B, P + H·W, C] from the refined centres."""
        prefix = self.route.prefix
        b, _, c = tokens.shape
        y = self.spread(tokens[:, prefix:].reshape(b, *self.grid, c))
        return torch.cat([tokens[:, :prefix], y.reshape(b, -1, c)], dim=1)

    def reconstruct_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """A head's [B, K, h, w] → [B, K, H, W]."""
        return self.spread(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _check_stitch(self) -> None:
        if self.route.stitch is not None and self.route.backbone.active != self.route.stitch:
            raise RuntimeError(
                "this StitchedViT was expedited on another stitch; select() "
                "changed the route: call expedite again"
            )


def _patch_size(patch_embed: nn.Module, args: tuple) -> tuple[int, int]:
    size = args[1] if len(args) > 1 and args[1] is not None else patch_embed.patch_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _is_segmentation_model(model: nn.Module, route: Route) -> bool:
    return hasattr(model, "decoder") and route.backbone is not model


def _check_settings(model, route, alpha, beta, grid, method, where) -> int:
    """β after the checks (default: to the end of the route); ``where`` resolved."""
    depth = len(route.blocks)
    if isinstance(alpha, bool) or not isinstance(alpha, int) or not 0 <= alpha < depth:
        raise ValueError(
            f"alpha must be an int in [0, {depth - 1}] (the model has {depth} "
            f"blocks), got {alpha!r}"
        )
    if where not in PLACES:
        raise ValueError(f"where must be one of {PLACES}, got {where!r}")
    if where == "head":
        if beta not in (None, depth - alpha):
            raise ValueError(
                f"beta must run to the end ({depth - alpha} blocks) with where='head', got {beta!r}"
            )
        if not _is_segmentation_model(model, route):
            raise TypeError(
                f"where='head' needs a segmentation model with a backbone and a "
                f"decoder (a Segmenter), got {type(model).__name__}"
            )
    beta = depth - alpha if beta is None else beta
    if isinstance(beta, bool) or not isinstance(beta, int) or not 1 <= beta <= depth - alpha:
        raise ValueError(
            f"beta must be an int in [1, {depth - alpha}] (alpha + beta <= "
            f"{depth} blocks), got {beta!r}"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be a pair (h, w) of ints, got {grid!r}")
    return beta


def _check_variant(reconstruct: str, numerics: str) -> None:
    if reconstruct not in MODES:
        raise ValueError(f"reconstruct must be one of {MODES}, got {reconstruct!r}")
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")


def expedite(
    model: nn.Module,
    alpha: int,
    grid: tuple[int, int],
    *,
    beta: int | None = None,
    window: int = 5,
    iters: int = 5,
    temperature: float = 50.0,
    reconstruct: str = "topk",
    k: int = 20,
    numerics: str = "official",
    weight_grad: bool = True,
    method: str = "cluster",
    where: str = "auto",
) -> nn.Module:
    """Make ``model`` cluster after block ``alpha`` (blocks 0..alpha-1 at full resolution),
    run ``beta`` blocks (default: to the end) on the ``grid`` centres, then reconstruct the
    tokens (``where="tokens"``) or the segmentation head's logits (``where="head"``; ``"auto"``:
    the head on a segmentation model, else the tokens); in place, returned.

    The defaults are Expedit-Segmenter's (module docstring). ``window``, ``iters``,
    ``temperature`` (τ; the official configs' 0.02 = 1/50) and ``numerics`` are
    ``token_cluster``'s; ``reconstruct`` (the mode), ``k``, ``numerics`` (topk mode) and
    ``weight_grad`` are ``token_reconstruct``'s; ``method="pool"`` is the paper's pooling and
    bilinear baseline."""
    route = route_of(model)
    if where == "auto":
        where = "head" if _is_segmentation_model(model, route) else "tokens"
    beta = _check_settings(model, route, alpha, beta, grid, method, where)
    unexpedite(model)
    _check_variant(reconstruct, numerics)
    state = Expedition(
        alpha,
        beta,
        tuple(grid),
        window=window,
        iters=iters,
        temperature=temperature,
        reconstruct=reconstruct,
        k=k,
        method=method,
        where=where,
        numerics=numerics,
        weight_grad=weight_grad,
        route=route,
    )

    def read_grid(module, args):
        ph, pw = _patch_size(module, args)
        height, width = args[0].shape[-2:]
        state.token_grid = (height // ph, width // pw)

    def before(module, args):
        return (state.cluster(args[0]), *args[1:])

    def after_block(module, args, output):
        return state.reconstruct_tokens(output)

    def after_head(module, args, output):
        return state.reconstruct_logits(output)

    state.handles = [
        route.patch_embed.register_forward_pre_hook(read_grid),
        route.blocks[alpha].register_forward_pre_hook(before),
    ]
    if where == "tokens":
        state.handles.append(route.blocks[alpha + beta - 1].register_forward_hook(after_block))
    else:
        set_clustered_grid(route.backbone, state.grid)
        state.handles.append(model.decoder.register_forward_hook(after_head))
    setattr(model, _ATTR, state)
    return model


def unexpedite(model: nn.Module) -> nn.Module:
    """The plain forward again (no-op on a model that is not expedited)."""
    state = getattr(model, _ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        if state.where == "head":
            set_clustered_grid(state.route.backbone, None)
        delattr(model, _ATTR)
    return model


def expedition(model: nn.Module) -> Expedition | None:
    """The settings ``model`` is expedited with, or None."""
    return getattr(model, _ATTR, None)


@contextlib.contextmanager
def expedited(model: nn.Module, alpha: int, grid: tuple[int, int], **kwargs) -> Iterator[nn.Module]:
    """``with expedited(model, alpha, grid): ...`` runs the block expedited, then restores."""
    expedite(model, alpha, grid, **kwargs)
    try:
        yield model
    finally:
        unexpedite(model)
