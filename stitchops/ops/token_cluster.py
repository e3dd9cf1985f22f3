"""``stitchops.token_cluster`` and ``stitchops.token_reconstruct``: Expedit's token clustering
and reconstruction layers (NeurIPS 2022, Eq. 2-4), for dense prediction without fine-tuning.

Registered as ``stitchops::token_cluster`` / ``stitchops::token_reconstruct`` (forward),
their ``_backward`` ops and ``token_reconstruct_weight_backward``, each with a fake
implementation for torch.compile, tied together with ``torch.library.register_autograd``.
The math, shapes, costs, both numerics and where we differ from the official code are in
``stitchops.reference.token_cluster``.

Gradients, as the official code: the clustering affinities are constants, so
``token_cluster``'s gradient reaches x through the last M-step (``affinity_grad=True``
differentiates through every iteration instead, on the torch reference under autograd);
the reconstruction weights are differentiable in x and the centres (the explicit adjoint,
every backend), unless ``weight_grad=False``.

Declared to the shared dispatch as ``TOKEN_CLUSTER`` (both ops). Backend choice for CUDA
tensors: triton (kernels/token_cluster.py: band softmax, band sums and their reduction, no
atomics), then cuda (csrc/token_cluster.cu: the same steps in SIMT fp32, one thread per
output element), then torch. topk mode (the only one with official numerics) runs on the
torch backend on every device (the kernels refuse it).
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from stitchops import _dispatch
from stitchops._runtime import constant_shapes
from stitchops.ops import _checks
from stitchops.reference import token_cluster as reference

MODES = ("local", "topk")
NUMERICS = reference.NUMERICS

TOKEN_CLUSTER = _dispatch.register(
    _dispatch.Op(
        name="token_cluster",
        entries=(
            "token_cluster_forward",
            "token_cluster_backward",
            "token_reconstruct_forward",
            "token_reconstruct_backward",
            "token_reconstruct_weight_backward",
        ),
        reference="stitchops.reference.token_cluster",
        triton="stitchops.kernels.token_cluster",
        kernel_dtypes=(torch.float16, torch.bfloat16, torch.float32),
    )
)


def kernel_limits(mode: str = "local") -> list[str]:
    """Why the kernels refuse a call: topk mode (a GEMM and a top-k over all centres, the
    only mode with official numerics) runs on the torch backend."""
    if mode == "local":
        return []
    return [
        f"mode {mode!r} runs on the torch backend (a GEMM and topk over all centres, "
        "chunked over pixels)"
    ]


def _entry(tensors: list[torch.Tensor], function: str, mode: str = "local"):
    backend = TOKEN_CLUSTER.choose(tensors, limits=kernel_limits(mode))
    return TOKEN_CLUSTER.entry(backend, function)


@torch.library.custom_op("stitchops::token_cluster", mutates_args=())
def _cluster_op(
    x: torch.Tensor, h: int, w: int, window: int, iters: int, temperature: float, numerics: str
) -> torch.Tensor:
    return _entry([x], "token_cluster_forward")(x, (h, w), window, iters, temperature, numerics)


@_cluster_op.register_fake
def _(x, h, w, window, iters, temperature, numerics):
    return x.new_empty(x.shape[0], h, w, x.shape[3])


@torch.library.custom_op("stitchops::token_cluster_backward", mutates_args=())
def _cluster_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    h: int,
    w: int,
    window: int,
    iters: int,
    temperature: float,
    numerics: str,
) -> torch.Tensor:
    backward = _entry([grad, x], "token_cluster_backward")
    return backward(grad.contiguous(), x, (h, w), window, iters, temperature, numerics)


@_cluster_backward_op.register_fake
def _(grad, x, h, w, window, iters, temperature, numerics):
    return torch.empty_like(x)


def _cluster_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.args = inputs[1:]


def _cluster_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    dx = torch.ops.stitchops.token_cluster_backward(grad, x, *ctx.args)
    return (dx, *[None] * len(ctx.args))


torch.library.register_autograd(
    "stitchops::token_cluster", _cluster_backward, setup_context=_cluster_setup
)


@torch.library.custom_op("stitchops::token_reconstruct", mutates_args=())
def _reconstruct_op(
    x: torch.Tensor,
    centres: torch.Tensor,
    values: torch.Tensor,
    window: int,
    temperature: float,
    mode: str,
    k: int,
    numerics: str,
) -> torch.Tensor:
    forward = _entry([values, x, centres], "token_reconstruct_forward", mode)
    return forward(x, centres, values, window, temperature, mode, k, numerics)


@_reconstruct_op.register_fake
def _(x, centres, values, window, temperature, mode, k, numerics):
    return values.new_empty(*x.shape[:3], values.shape[-1])


@torch.library.custom_op("stitchops::token_reconstruct_backward", mutates_args=())
def _reconstruct_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    centres: torch.Tensor,
    values: torch.Tensor,
    window: int,
    temperature: float,
    mode: str,
    k: int,
    numerics: str,
) -> torch.Tensor:
    backward = _entry([grad, x, centres], "token_reconstruct_backward", mode)
    return backward(grad.contiguous(), x, centres, values, window, temperature, mode, k, numerics)


@_reconstruct_backward_op.register_fake
def _(grad, x, centres, values, window, temperature, mode, k, numerics):
    return torch.empty_like(values)


@torch.library.custom_op("stitchops::token_reconstruct_weight_backward", mutates_args=())
def _weight_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    centres: torch.Tensor,
    values: torch.Tensor,
    window: int,
    temperature: float,
    mode: str,
    k: int,
    numerics: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    backward = _entry([grad, x, centres, values], "token_reconstruct_weight_backward", mode)
    return backward(grad.contiguous(), x, centres, values, window, temperature, mode, k, numerics)


@_weight_backward_op.register_fake
def _(grad, x, centres, values, window, temperature, mode, k, numerics):
    return torch.empty_like(x), torch.empty_like(centres)


def _reconstruct_setup(ctx, inputs, output):
    x, centres, values, *args = inputs
    ctx.save_for_backward(x, centres, values)
    ctx.args = args


def _reconstruct_backward(ctx, grad):
    x, centres, values = ctx.saved_tensors
    dx = dcentres = dv = None
    if ctx.needs_input_grad[2]:
        dv = torch.ops.stitchops.token_reconstruct_backward(grad, x, centres, values, *ctx.args)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        dx, dcentres = torch.ops.stitchops.token_reconstruct_weight_backward(
            grad, x, centres, values, *ctx.args
        )
    return (dx, dcentres, dv, *[None] * len(ctx.args))


torch.library.register_autograd(
    "stitchops::token_reconstruct", _reconstruct_backward, setup_context=_reconstruct_setup
)


def _check_window(window: object) -> int:
    window = _checks.int_at_least("window", window, 1)
    if window % 2 == 0:
        raise ValueError(f"window must be odd (a ±window//2 neighbourhood), got {window}")
    return window


def _check_temperature(temperature: object) -> float:
    value = _checks.finite_float("temperature", temperature)
    if value <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return value


def _check_map(name: str, t: object) -> torch.Tensor:
    _checks.tensor(name, t, ndim=4)
    return t


def _check_grid(grid: object, x: torch.Tensor) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be a pair (h, w) of ints, got {grid!r}")
    h, w = (_checks.int_at_least(f"grid[{i}]", g, 1) for i, g in enumerate(grid))
    height, width = x.shape[1:3]
    if h > height or w > width:
        raise ValueError(
            f"grid {(h, w)} is larger than the map {(height, width)} of x "
            "[B, H, W, C]: need 1 <= h <= H and 1 <= w <= W"
        )
    return h, w


def _check_numerics(numerics: object) -> str:
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    return numerics


def token_cluster(
    x: torch.Tensor,
    grid: tuple[int, int],
    *,
    window: int = 5,
    iters: int = 5,
    temperature: float = 50.0,
    numerics: str = "exact",
    affinity_grad: bool = False,
) -> torch.Tensor:
    """Cluster the H×W patch tokens into h×w centres by local soft k-means (Expedit Eq. 2-3).

    Args:
        x: [B, H, W, C] patch tokens, channels last (no class token).
        grid: (h, w), 1 <= h <= H, 1 <= w <= W: the clustered map.
        window: odd; a pixel's candidate centres are the cells within ±window//2 rows and
            columns of its own (cut at the borders).
        iters: EM iterations (0: the adaptive-average-pooled initial centres).
        temperature: τ, dividing the squared distances (the official configs' 0.02 = 1/50).
        numerics: ``"exact"`` (Σ a·x / Σ a; a centre that loses every pixel keeps its
            value) or ``"official"`` (the official M-step: Σ a·x / max(Σ a, 1e−16), which
            pulls centres with a tiny total towards 0 and zeroes those with none).
        affinity_grad: differentiate through the affinities too (torch reference only).

    Returns:
        [B, h, w, C] centres in x's dtype (float32 math for float16 / bfloat16).
    """
    with constant_shapes():
        _check_map("x", x)
        grid = _check_grid(grid, x)
        window = _check_window(window)
        iters = _checks.int_at_least("iters", iters, 0)
        temperature = _check_temperature(temperature)
        numerics = _check_numerics(numerics)
    if affinity_grad:
        return reference.token_cluster(
            x, grid, window, iters, temperature, affinity_grad=True, numerics=numerics
        )
    return torch.ops.stitchops.token_cluster(x, *grid, window, iters, temperature, numerics)


def _check_reconstruct(x, centres, values, mode, k, numerics) -> None:
    _check_map("x", x)
    _check_map("centres", centres)
    _check_map("values", values)
    b, _, _, c = x.shape
    h, w = centres.shape[1:3]
    if centres.shape[0] != b or centres.shape[3] != c:
        raise ValueError(
            f"centres must be [B, h, w, C] = [{b}, h, w, {c}] like x, got {tuple(centres.shape)}"
        )
    _check_grid((h, w), x)
    if values.shape[:3] != centres.shape[:3]:
        raise ValueError(
            f"values must be [B, h, w, D] with [B, h, w] = "
            f"{list(centres.shape[:3])} of centres, got "
            f"{tuple(values.shape)}"
        )
    _checks.same_dtype_and_device("x", {"x": x, "centres": centres, "values": values})
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    k = _checks.int_at_least("k", k, 1)
    if mode == "topk" and k > h * w:
        raise ValueError(f"k = {k} is more than the h·w = {h * w} centres")
    if _check_numerics(numerics) == "official" and mode != "topk":
        raise ValueError(
            "numerics='official' is the official code's reconstruction, "
            "mode='topk'; the paper's local mode has only exact numerics"
        )


def token_reconstruct(
    x: torch.Tensor,
    centres: torch.Tensor,
    values: torch.Tensor,
    *,
    window: int = 5,
    temperature: float = 50.0,
    mode: str = "local",
    k: int = 20,
    numerics: str = "exact",
    weight_grad: bool = True,
) -> torch.Tensor:
    """Spread per-centre ``values`` back to the H×W tokens (Expedit Eq. 4).

    Args:
        x: [B, H, W, C] the tokens that were clustered.
        centres: [B, h, w, C] what ``token_cluster`` returned for them.
        values: [B, h, w, D] what to spread back (refined tokens, or a head's logits).
        window, temperature: as for ``token_cluster``.
        mode: ``"local"`` (the paper's Eq. 4 over the same window: a softmax) or ``"topk"``
            (the official code: the k largest exp(−d/τ) over all centres, L2-normalised).
        k: topk mode's count, 1 <= k <= h·w.
        numerics: topk mode only: ``"official"`` is exp(−d/τ) / max(‖·‖, 1e−12) as the
            official code evaluates it (rows far from every centre are scaled down, and in
            float32 become 0); ``"exact"`` normalises every row.
        weight_grad: the weights are differentiable in ``x`` and ``centres`` (the official
            code); False: constants, only ``values`` gets a gradient.

    Returns:
        [B, H, W, D] in values' dtype.
    """
    with constant_shapes():
        _check_reconstruct(x, centres, values, mode, k, numerics)
        window = _check_window(window)
        temperature = _check_temperature(temperature)
    if not weight_grad:
        x, centres = x.detach(), centres.detach()
    return torch.ops.stitchops.token_reconstruct(
        x, centres, values, window, temperature, mode, k, numerics
    )


def local_flops(tokens: int, channels: int, window: int, iters: int) -> int:
    """FLOPs of one clustering: per iteration 3·N·K·C (distances) + 2·N·K·C (M-step sums),
    K = window² (an upper bound: border pixels have fewer candidates)."""
    return iters * 5 * tokens * window * window * channels


def dense_flops(tokens: int, centres: int, channels: int, iters: int) -> int:
    """The same for the official code's dense N × M distances and sums."""
    return iters * 5 * tokens * centres * channels


# FLOPs for torch.utils.flop_counter (2 per multiply-add): the local cost, as the paper's
# counter, whatever the backend executes.
@register_flop_formula(torch.ops.stitchops.token_cluster)
def _cluster_flops(x_shape, h, w, window, iters, temperature, numerics, **kwargs):
    return x_shape[0] * local_flops(x_shape[1] * x_shape[2], x_shape[3], window, iters)


@register_flop_formula(torch.ops.stitchops.token_reconstruct)
def _reconstruct_flops(
    x_shape, centres_shape, values_shape, window, temperature, mode, k, numerics, **kwargs
):
    tokens = math.prod(x_shape[:3])
    candidates = centres_shape[1] * centres_shape[2] if mode == "topk" else window * window
    return tokens * candidates * (3 * x_shape[3] + 2 * values_shape[3])
