"""Expedit's token clustering and reconstruction in plain PyTorch (NeurIPS 2022, Sec. 3,
Eq. 2-4): the spec the kernels follow and the CPU path.

Shapes: x [B, H, W, C] patch tokens (channels last, no class token), N = H·W pixels;
centres s [B, h, w, C], M = h·w; values v [B, h, w, D].

Cells and candidates. Pixel p = (y, x) falls in cell (cy, cx): the (h, w) index that
``F.interpolate(size=(H, W), mode="nearest")`` maps it to (PyTorch's float rule, which is
not always floor(y·h/H)). Its candidate centres are the cells within ±r rows and columns of
its own, r = window // 2, cut at the borders: K ≤ (2r+1)² of them.

Clustering (Eq. 2-3): s⁰ = adaptive_avg_pool2d(x, (h, w)); then ``iters`` times
    a_pi = softmax_{i ∈ cand(p)} (−‖x_p − s_i‖² / τ)          (E-step)
    s_i  = Σ_p a_pi x_p / D_i,  T_i = Σ_p a_pi                 (M-step)
with D_i by ``numerics``:
* ``"official"`` (Expedit-Segmenter's ``cluster.py``): D_i = max(T_i, 1e−16). A centre whose
  total affinity falls below 1e−16 is scaled towards the origin (Σ_p a_pi x_p / 1e−16), one
  with T_i = 0 becomes 0, and stays there in later iterations.
* ``"exact"``: D_i = T_i; a centre with T_i = 0 keeps its previous value.
The two differ only where some T_i < 1e−16, which real ViT tokens reach (squared norms in
the thousands against τ = 50). As in the official code the affinities are constants for
the gradient (computed under no_grad), so the gradient reaches x through the last M-step
(and, in exact numerics, through the pooling for centres never updated);
``affinity_grad=True`` differentiates through every step.

Reconstruction (Eq. 4), weights W [N, M], y_p = Σ_i W_pi v_i:
* ``mode="local"`` (the paper): W_p = softmax over cand(p) of −‖x_p − s_i‖²/τ.
* ``mode="topk"`` (the official code): e_pi = exp(−d_pi/τ) over all M centres, the entries
  ≥ the row's k-th largest kept (ties kept), W_p = e_p / max(‖e_p‖₂, 1e−12) (an L2 norm,
  not a convex combination). ``numerics="official"`` evaluates exactly that, in the
  accumulation dtype: once a row's nearest d exceeds ≈ 27.6·τ its norm is below the floor
  and the row is scaled down (by e^(−(d_min − 27.6τ)/τ)), and in float32 every e of a row
  with d_min > ≈ 87·τ underflows to 0, giving y_p = 0. ``"exact"`` divides e by its row
  maximum first (e_pi = exp(−(d_pi − min_j d_pj)/τ)), so the norm is ≥ 1 and the floor
  never acts: the pure L2 normalisation at every scale.
Both weights are differentiable in x and in the centres (the official code's autograd
graph), by the explicit adjoint ``token_reconstruct_weight_backward``; detached they are
constants and only ``values`` gets a gradient.

Numerics of the distances. ‖x_p − s_i‖² is computed as ‖x‖² − 2x·s + ‖s‖² (a GEMM), which
cancels catastrophically when the tokens sit far from the origin (ViT features share large
components). Every backend therefore works on tokens and centres centred on the image's
mean token μ (distances are translation invariant, so this changes nothing in exact
arithmetic): on tokens with mean 30 and spread 0.5 at C = 1024, float32 centres move from
1e−5 to 3e−8 of float64. The M-step sums use the uncentred x, as the official one does.

Cost per clustering iteration: 3·N·K·C FLOPs for the distances and 2·N·K·C for the M-step
sums (≈ 0.4 GMAC at N = 1600, K = 25, C = 1024, 5 iterations), against the official code's
dense N × M distances (≈ 14 GMAC there).

This implementation works by bands: the pixels of one row of cells only ever pick centres in
the 2r+1 rows of cells around it, so each band is two small GEMMs (distances to the band's
(2r+1)·w centres, masked to ±r columns, and the M-step sums aᵀx), N·(2r+1)·w·C
multiply-adds per step: between the local count and the dense one, on the GEMM units, with
[pixels of a band, (2r+1)·w] weights as the only intermediate.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stitchops._runtime import cpu_threads_for

NUMERICS = ("exact", "official")
OFFICIAL_TOTAL_FLOOR = 1e-16  # the official M-step: A.sum(2).clamp_(min=1e-16)
OFFICIAL_NORM_FLOOR = 1e-12  # the official reconstruction: F.normalize's eps

# Pixels per chunk of topk mode's [B, pixels, M] weights (and of its sparse product, whose
# chunk's weights and products stay smaller than the output).
_CHUNK_ELEMENTS = 1 << 22
_SPARSE_CHUNK_ELEMENTS = 1 << 20


def cell_index(size_out: int, size_in: int, device=None) -> torch.Tensor:
    """[size_out] int64: the source index of each output position under PyTorch's nearest
    interpolation from ``size_in`` to ``size_out`` (taken from F.interpolate itself)."""
    source = torch.arange(size_in, dtype=torch.float32, device=device).view(1, 1, size_in)
    return F.interpolate(source, size=size_out, mode="nearest").view(size_out).long()


@dataclass(frozen=True)
class Band:
    """The pixels of one row of cells and the centres they may pick."""

    pixels: slice  # flat pixel indices (whole pixel rows: the mapping is monotone)
    centres: slice  # flat centre indices: the cell rows within ±r, every column
    allowed: torch.Tensor  # [pixels, centres] bool: also within ±r columns


def bands(hw_in: tuple[int, int], grid: tuple[int, int], window: int, device=None) -> list[Band]:
    """The bands of an H × W map clustered to h × w (every cell row has pixels: h <= H)."""
    (height, width), (h, w), r = hw_in, grid, window // 2
    cy = cell_index(height, h, device)
    cx = cell_index(width, w, device)
    near_columns = (cx[:, None] - torch.arange(w, device=device)[None, :]).abs() <= r  # [W, w]
    out = []
    for row in range(h):
        ys = (cy == row).nonzero().flatten()
        first, last = int(ys[0]), int(ys[-1]) + 1
        low, high = max(0, row - r), min(h, row + r + 1)
        allowed = near_columns.repeat(last - first, high - low)
        out.append(Band(slice(first * width, last * width), slice(low * w, high * w), allowed))
    return out


def check_numerics(numerics: str) -> str:
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    return numerics


def mean_token(x3: torch.Tensor) -> torch.Tensor:
    """μ [B, 1, C]: each image's mean token, the origin the distances are taken from."""
    return x3.mean(dim=1, keepdim=True) if x3.shape[1] else torch.zeros_like(x3[:, :1])


@dataclass(frozen=True)
class Tokens:
    """Tokens prepared once per call: x [B, N, C] in the accumulation dtype, μ [B, 1, C] and
    the squared norms of x − μ [B, N]; ``centred(rows)`` gives x − μ of some pixels (made
    when needed, so no centred copy of the whole map is held)."""

    x: torch.Tensor
    mu: torch.Tensor
    norms: torch.Tensor

    @classmethod
    def of(cls, x3: torch.Tensor) -> Tokens:
        mu = mean_token(x3)
        step = _chunk_size(x3.shape[0], x3.shape[2])
        norms = torch.cat(
            [(x3[:, i : i + step] - mu).square().sum(-1) for i in range(0, x3.shape[1], step)], 1
        )
        return cls(x3, mu, norms)

    def centred(self, rows) -> torch.Tensor:
        """x − μ [B, n, C] of the pixels ``rows`` (a slice, or per image an index)."""
        return self.x[:, rows] - self.mu

    def centre(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s − μ, ‖s − μ‖²) of centres s [B, M, C]."""
        sc = s - self.mu
        return sc, sc.square().sum(-1)


def squared_distances(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[B, n, m] ‖x_p − s_i‖² for x [B, n, C] and s [B, m, C], as ‖x‖² − 2x·sᵀ + ‖s‖² (a GEMM;
    clamped at 0 against rounding). Pass centred tokens (module docstring)."""
    cross = x @ s.transpose(1, 2)
    return (
        x.square().sum(-1, keepdim=True) - 2 * cross + s.square().sum(-1)[:, None, :]
    ).clamp_min(0)


def band_weights(
    tokens: Tokens, sc: torch.Tensor, sn: torch.Tensor, band: Band, temperature: float
) -> torch.Tensor:
    """[B, pixels, centres] softmax over each pixel's candidates of −‖x_p − s_i‖²/τ (0 off
    them) for the band's pixels and its centres of sc [B, M, C] (centred; sn their squared
    norms [B, M])."""
    pixels, centres = band.pixels, band.centres
    cross = torch.baddbmm(
        sn[:, None, centres], tokens.centred(pixels), sc[:, centres].transpose(1, 2), alpha=-2.0
    )
    d = (cross + tokens.norms[:, pixels, None]).clamp_min(0)
    logits = (d / -temperature).masked_fill(~band.allowed, float("-inf"))
    return torch.softmax(logits, dim=-1)


def divide_totals(
    numer: torch.Tensor, totals: torch.Tensor, previous: torch.Tensor, numerics: str
) -> torch.Tensor:
    """The M-step's Σ_p a x / D (module docstring): [B, M, C] from numer [B, M, C] and
    totals [B, M]."""
    if numerics == "official":
        return numer / totals.clamp_min(OFFICIAL_TOTAL_FLOOR)[..., None]
    empty = totals == 0  # NaN stays NaN: a NaN pixel reaches its centres
    if not bool(empty.any()):
        return numer / totals[..., None]
    safe = torch.where(empty, torch.ones_like(totals), totals)
    return torch.where(empty[..., None], previous, numer / safe[..., None])


def m_step(tokens: Tokens, s, band_list, temperature, frozen: bool, numerics: str):
    """One EM iteration: (new centres [B, M, C], weights of every band, totals Σ_p a_pi [B, M]);
    ``frozen``: the weights are constants."""
    numer = torch.zeros_like(s)
    totals = s.new_zeros(s.shape[:2])
    weights = []
    sc, sn = tokens.centre(s)
    for band in band_list:
        with torch.no_grad() if frozen else contextlib.nullcontext():
            a = band_weights(tokens, sc, sn, band, temperature)
        weights.append(a)
        numer[:, band.centres] += a.transpose(1, 2) @ tokens.x[:, band.pixels]
        totals[:, band.centres] += a.sum(1)
    return divide_totals(numer, totals, s, numerics), weights, totals


def initial_centres(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """s⁰ [B, h, w, C]: adaptive average pooling of x [B, H, W, C] (PyTorch's bins)."""
    return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)


def accumulation(dtype: torch.dtype) -> torch.dtype:
    """What the math runs in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _iterate(flat, grid, width, band_list, temperature, iters, frozen, numerics, keep=True):
    """The EM iterations from the pooled start: (centres [B, M, C], [(weights, totals)] of
    every iteration when ``keep``)."""
    b, n, c = flat.shape
    tokens = Tokens.of(flat)
    s = initial_centres(flat.view(b, n // width, width, c), grid).reshape(b, grid[0] * grid[1], c)
    history = []
    for _ in range(iters):
        s, weights, totals = m_step(tokens, s, band_list, temperature, frozen, numerics)
        if keep:
            history.append((weights, totals))
    return s, history


def token_cluster(
    x: torch.Tensor,
    grid: tuple[int, int],
    window: int = 5,
    iters: int = 5,
    temperature: float = 50.0,
    affinity_grad: bool = False,
    numerics: str = "exact",
) -> torch.Tensor:
    """Centres [B, h, w, C] of x [B, H, W, C] (module docstring), differentiable by autograd;
    computed in float32 (float64 for float64), returned in x's dtype."""
    b, height, width, c = x.shape
    band_list = bands((height, width), grid, window, x.device)
    flat = x.reshape(b, height * width, c).to(accumulation(x.dtype))
    s, _ = _iterate(
        flat,
        grid,
        width,
        band_list,
        temperature,
        iters,
        not affinity_grad,
        check_numerics(numerics),
        keep=False,
    )
    return s.reshape(b, grid[0], grid[1], c).to(x.dtype)


def _exp_weights(xc, xn, sc, sn, temperature, numerics):
    """[B, n, M] e = exp(−d/τ) (official) or exp(−(d − min_j d_j)/τ) (exact) for centred
    tokens xc [B, n, C] (squared norms xn [B, n]) and centres sc [B, M, C] (sn [B, M])."""
    d = (
        torch.baddbmm(sn[:, None, :], xc, sc.transpose(1, 2), alpha=-2.0) + xn[..., None]
    ).clamp_min(0)
    if numerics == "exact":
        d = d - d.min(dim=-1, keepdim=True).values
    return torch.exp(d / -temperature)


def _topk_chunk(xc, xn, sc, sn, k, temperature, numerics):
    """(W [B, n, M], floored [B, n, 1] bool): the top-k weights (module docstring), ties with
    the k-th kept; ``floored``: the row's norm was below the official floor (W = e / 1e−12)."""
    e = _exp_weights(xc, xn, sc, sn, temperature, numerics)
    kth = e.topk(k, dim=-1).values[..., -1:]
    e = e.masked_fill(e < kth, 0.0)
    norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    floored = norm <= OFFICIAL_NORM_FLOOR
    return e / norm.clamp_min(OFFICIAL_NORM_FLOOR), floored


def _chunk_size(batch: int, centres: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(centres * max(batch, 1), 1))


def topk_chunks(x3, s3, k, temperature, numerics):
    """Yield (pixel slice, W [B, n, M], floored [B, n, 1]) over chunks of pixels."""
    tokens = Tokens.of(x3)
    sc, sn = tokens.centre(s3)
    n = x3.shape[1]
    step = _chunk_size(x3.shape[0], s3.shape[1])
    for start in range(0, n, step):
        part = slice(start, min(n, start + step))
        yield (
            part,
            *_topk_chunk(
                tokens.centred(part), tokens.norms[:, part], sc, sn, k, temperature, numerics
            ),
        )


def topk_weights(
    x: torch.Tensor, s: torch.Tensor, k: int, temperature: float, numerics: str = "exact"
) -> torch.Tensor:
    """[B, N, M] the official code's weights (module docstring) for x [B, N, C], s [B, M, C]."""
    parts = [w for _, w, _ in topk_chunks(x, s, k, temperature, numerics)]
    return torch.cat(parts, dim=1) if parts else x.new_zeros(x.shape[0], x.shape[1], s.shape[1])


def _exp_weights_in_place(xc, xn, sc, sn, temperature, numerics):
    """``_exp_weights`` without autograd, in place on the one [B, n, M] buffer; the GEMM on
    the threads its size earns (``cpu_threads_for``)."""
    with cpu_threads_for(xc, 2 * xc.shape[0] * xc.shape[1] * sc.shape[1] * xc.shape[2]):
        d = torch.baddbmm(sn[:, None, :], xc, sc.transpose(1, 2), alpha=-2.0)
    d.add_(xn[..., None]).clamp_min_(0)
    if numerics == "exact":
        d.sub_(d.min(dim=-1, keepdim=True).values)
    return d.mul_(-1.0 / temperature).exp_()


def _sparse_rows(e: torch.Tensor, k: int):
    """One image's top-k weights as a CSR matrix [n, M] (k entries a row, normalised), and the
    rows whose (k+1)-th value ties with a positive k-th (these keep more than k entries:
    their dense weights are needed), for e [n, M] ≥ 0."""
    n, m = e.shape
    values, index = e.topk(min(k + 1, m), dim=-1)
    kth = values[:, k - 1]
    tied = (values[:, k] == kth) & (kth > 0) if k < m else torch.zeros_like(kth, dtype=bool)
    values, index = values[:, :k], index[:, :k]
    norm = torch.linalg.vector_norm(values, dim=-1, keepdim=True)
    values = (values / norm.clamp_min(OFFICIAL_NORM_FLOOR)).masked_fill_(tied[:, None], 0.0)
    rows = torch.arange(0, n * k + 1, k, device=e.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        matrix = torch.sparse_csr_tensor(
            rows, index.flatten(), values.flatten(), (n, m), check_invariants=False
        )
    return matrix, tied.nonzero().flatten()


def topk_apply(x3, s3, operand, k, temperature, numerics, transpose: bool) -> torch.Tensor:
    """W·v ([B, N, D] from v [B, M, D]) or, ``transpose``, Wᵀ·dy ([B, M, D] from dy
    [B, N, D]) for the top-k weights W, without autograd: per image and chunk of pixels, W's
    k entries a row as a sparse matrix (2·k·D FLOPs a pixel instead of the dense 2·M·D); rows
    with positive ties (more than k entries) densely."""
    tokens = Tokens.of(x3)
    sc, sn = tokens.centre(s3)
    (b, n, _), m = x3.shape, s3.shape[1]
    step = max(1, _SPARSE_CHUNK_ELEMENTS // max(m, operand.shape[-1], 1))
    out = operand.new_empty(b, m if transpose else n, operand.shape[-1])
    if transpose:
        out.zero_()
    for i in range(b):
        for start in range(0, n, step):
            part = slice(start, min(n, start + step))
            xc = tokens.x[i : i + 1, part] - tokens.mu[i : i + 1]
            xn = tokens.norms[i : i + 1, part]
            e = _exp_weights_in_place(xc, xn, sc[i : i + 1], sn[i : i + 1], temperature, numerics)[
                0
            ]
            matrix, tied = _sparse_rows(e, k)
            dense = None
            if tied.numel():
                dense = _topk_chunk(
                    xc[:, tied], xn[:, tied], sc[i : i + 1], sn[i : i + 1], k, temperature, numerics
                )[0][0]
            if transpose:
                out[i] += matrix.t() @ operand[i, part]
                if dense is not None:
                    out[i] += dense.t() @ operand[i, part][tied]
                continue
            out[i, part] = matrix @ operand[i]
            if dense is not None:
                out[i, start + tied] = dense @ operand[i]
    return out


def _flat(x, centres, values):
    """(x [B, N, C], s [B, M, C], v [B, M, D]) in the accumulation dtype, and the grid."""
    b, height, width, c = x.shape
    grid = tuple(centres.shape[1:3])
    m, acc = grid[0] * grid[1], accumulation(x.dtype)
    return (
        x.reshape(b, height * width, c).to(acc),
        centres.reshape(b, m, c).to(acc),
        values.reshape(b, m, values.shape[-1]).to(acc),
        grid,
    )


def token_reconstruct(
    x: torch.Tensor,
    centres: torch.Tensor,
    values: torch.Tensor,
    window: int = 5,
    temperature: float = 50.0,
    mode: str = "local",
    k: int = 20,
    numerics: str = "exact",
) -> torch.Tensor:
    """y [B, H, W, D] from x [B, H, W, C], centres [B, h, w, C], values [B, h, w, D] (module
    docstring), differentiable by autograd in all three; computed in float32 (float64 for
    float64), returned in values' dtype."""
    b, height, width, _ = x.shape
    flat, s, v, grid = _flat(x, centres, values)
    check_numerics(numerics)
    if mode == "topk":
        y = torch.cat([w @ v for _, w, _ in topk_chunks(flat, s, k, temperature, numerics)], 1)
    else:
        tokens = Tokens.of(flat)
        sc, sn = tokens.centre(s)
        parts = [
            band_weights(tokens, sc, sn, band, temperature) @ v[:, band.centres]
            for band in bands((height, width), grid, window, x.device)
        ]
        y = torch.cat(parts, dim=1)
    return y.reshape(b, height, width, v.shape[-1]).to(values.dtype)


# The entry points of the torch backend (the triton and cuda kernels take the same
# arguments). They run below autograd (inside the registered ops): the backwards are the
# explicit adjoints. On the CPU their steps (a band's GEMMs, 0.1-1 ms each) are too small to
# share between cores: they run on the intra-op threads ``cpu_threads_for`` gives.


def _steps(x: torch.Tensor, centres: int, rows: int):
    """The thread choice for steps of ``rows`` pixels against ``centres`` centres."""
    return cpu_threads_for(x, 2 * x.shape[0] * rows * centres * x.shape[-1])


def token_cluster_forward(x, grid, window, iters, temperature, numerics) -> torch.Tensor:
    with torch.no_grad(), _steps(x, (window | 1) * grid[1], x.shape[2] * 2):
        return token_cluster(x, grid, window, iters, temperature, numerics=numerics)


def token_cluster_backward(grad, x, grid, window, iters, temperature, numerics) -> torch.Tensor:
    """dx for centres = token_cluster(x) with constant affinities: walking the iterations
    back, a centre updated at step t passes g_i / D_i to its pixels (weights a_pi); in exact
    numerics one that kept its value (T_i = 0) passes g_i on to step t − 1, and at the start
    to the pooling."""
    b, height, width, c = x.shape
    band_list = bands((height, width), grid, window, x.device)
    flat = x.reshape(b, height * width, c).to(accumulation(x.dtype))
    with _steps(x, (window | 1) * grid[1], width * 2):
        _, history = _iterate(flat, grid, width, band_list, temperature, iters, True, numerics)
        g = grad.reshape(b, grid[0] * grid[1], c).to(flat.dtype)
        dx = torch.zeros_like(flat)
        for weights, totals in reversed(history):
            per_centre, g = split_centre_gradient(g, totals, numerics)
            for band, a in zip(band_list, weights, strict=True):
                dx[:, band.pixels] += a @ per_centre[:, band.centres]
        dx += pooling_backward(g, flat, (height, width), grid)
    return dx.reshape(x.shape).to(x.dtype)


def split_centre_gradient(g, totals, numerics):
    """One M-step backwards: (g / D [B, M, C] for the pixels, the gradient passed on to the
    previous centres: g where a centre kept its value, else 0)."""
    if numerics == "official":
        return g / totals.clamp_min(OFFICIAL_TOTAL_FLOOR)[..., None], torch.zeros_like(g)
    kept = (totals == 0)[..., None]
    per_centre = torch.where(kept, 0.0, g / torch.where(kept, 1.0, totals[..., None]))
    return per_centre, torch.where(kept, g, 0.0)


def pooling_backward(g, flat, hw, grid):
    """[B, N, C]: the adjoint of the initial adaptive average pooling, for g [B, M, C]."""
    (b, _, c), (height, width) = flat.shape, hw
    pooled = g.reshape(b, *grid, c).permute(0, 3, 1, 2)
    source = flat.view(b, height, width, c).permute(0, 3, 1, 2)
    grad = torch.ops.aten._adaptive_avg_pool2d_backward(pooled, source)
    return grad.permute(0, 2, 3, 1).reshape(b, height * width, c)


def _reconstruction_steps(x, centres, mode, window):
    """topk: the elementwise steps and the top-k on one thread (its GEMMs choose their own,
    ``_exp_weights_in_place``); local: the band steps'."""
    if mode == "topk":
        return cpu_threads_for(x, 0)
    return _steps(x, (window | 1) * centres.shape[2], x.shape[2] * 2)


def token_reconstruct_forward(
    x, centres, values, window, temperature, mode, k, numerics
) -> torch.Tensor:
    with torch.no_grad(), _reconstruction_steps(x, centres, mode, window):
        if mode != "topk":
            return token_reconstruct(x, centres, values, window, temperature, mode, k, numerics)
        flat, s, v, _ = _flat(x, centres, values)
        y = topk_apply(flat, s, v, k, temperature, numerics, transpose=False)
    return y.reshape(*x.shape[:3], v.shape[-1]).to(values.dtype)


def _weights_by_part(flat, s, hw, grid, window, temperature, mode, k, numerics):
    """Yield (pixel slice, centre slice, W [B, n, m], floored or None) over the bands (local)
    or pixel chunks (topk) of a reconstruction."""
    if mode == "topk":
        everything = slice(0, s.shape[1])
        for part, w, floored in topk_chunks(flat, s, k, temperature, numerics):
            yield part, everything, w, floored
        return
    tokens = Tokens.of(flat)
    sc, sn = tokens.centre(s)
    for band in bands(hw, grid, window, flat.device):
        yield band.pixels, band.centres, band_weights(tokens, sc, sn, band, temperature), None


def token_reconstruct_backward(grad, x, centres, values, window, temperature, mode, k, numerics):
    """d values = Wᵀ·dy, W the reconstruction weights [N, M]."""
    b, height, width, _ = x.shape
    flat, s, v, grid = _flat(x, centres, values)
    dy = grad.reshape(b, height * width, values.shape[-1]).to(flat.dtype)
    with torch.no_grad(), _reconstruction_steps(x, centres, mode, window):
        if mode == "topk":
            dv = topk_apply(flat, s, dy, k, temperature, numerics, transpose=True)
            return dv.reshape(values.shape).to(values.dtype)
        dv = torch.zeros_like(v)
        for pixels, cols, w, _ in _weights_by_part(
            flat, s, (height, width), grid, window, temperature, mode, k, numerics
        ):
            dv[:, cols] += w.transpose(1, 2) @ dy[:, pixels]
    return dv.reshape(values.shape).to(values.dtype)


def distance_gradient(w, dots, temperature, floored=None):
    """∂L/∂d [B, n, m] from the weights W and G = dy·vᵀ (both [B, n, m]): for the softmax
    (local) −(W/τ)(G − Σ_j W_j G_j); for the L2-normalised top-k −(W/τ)(G − W·Σ_j W_j G_j),
    or −(W/τ)G where the row's norm was floored (``floored`` [B, n, 1], topk only)."""
    inner = (w * dots).sum(-1, keepdim=True)
    if floored is not None:
        inner = torch.where(floored, 0.0, w * inner)
    return (dots - inner) * w / -temperature


def token_reconstruct_weight_backward(
    grad, x, centres, values, window, temperature, mode, k, numerics
):
    """(dx [B, H, W, C], d centres [B, h, w, C]) through the reconstruction weights: with
    g = ∂L/∂d (``distance_gradient``), dx_p = 2 Σ_i g_pi (x_p − s_i) and
    ds_i = −2 Σ_p g_pi (x_p − s_i), on the centred tokens."""
    b, height, width, _ = x.shape
    flat, s, v, grid = _flat(x, centres, values)
    dy = grad.reshape(b, height * width, values.shape[-1]).to(flat.dtype)
    tokens = Tokens.of(flat)
    xc, (sc, _) = tokens.centred(slice(None)), tokens.centre(s)
    dx, ds = torch.zeros_like(flat), torch.zeros_like(s)
    with torch.no_grad(), _reconstruction_steps(x, centres, mode, window):
        for pixels, cols, w, floored in _weights_by_part(
            flat, s, (height, width), grid, window, temperature, mode, k, numerics
        ):
            g = distance_gradient(
                w, dy[:, pixels] @ v[:, cols].transpose(1, 2), temperature, floored
            )
            dx[:, pixels] += 2 * (xc[:, pixels] * g.sum(-1, keepdim=True) - g @ sc[:, cols])
            ds[:, cols] -= 2 * (
                g.transpose(1, 2) @ xc[:, pixels] - sc[:, cols] * g.sum(1)[..., None]
            )
    return dx.reshape(x.shape).to(x.dtype), ds.reshape(centres.shape).to(centres.dtype)
