"""Triton kernels of Expedit's token clustering and local reconstruction
(stitchops/reference/token_cluster.py has the math and the band structure).

The pixels of one row of cells (a band: whole pixel rows) only ever pick centres in the
2r+1 rows of cells around it, Q ≤ (2r+1)·w of them. Four kernels, all deterministic (no
atomics: every output element has one writer, and every sum runs in a fixed order):

- ``_affinity_kernel`` (E-step): a[b, p, q] = softmax over the band's candidates q of
  −‖x_p − s_q‖²/τ (0 off the ±r columns), two passes over the band's centres (online max
  and sum, then the weights), distances as ‖x̃‖² − 2x̃·s̃ᵀ + ‖s̃‖² from [BLOCK_P, BLOCK_C] ×
  [BLOCK_C, BLOCK_Q] dots of tokens and centres centred on the image's mean token (against
  cancellation). Writes [B, N, Q_max] fp32: 0.9 MB at N = 1600, Q = 140.
- ``_gather_kernel`` (M-step): per centre, Σ_p a_pq·x_p and Σ_p a_pq over the pixels that
  may pick it (its ≤ 2r+1 bands × the pixel columns of its ±r cell columns), then the mean
  in either numerics; also the reconstruction backward's dv = Σ_p a_pq·dy_p and the centre
  gradient's Σ_p g_pq·x̃_p.
- ``_apply_kernel``: y[b, p, :] (+)= Σ_q a[b, p, q]·v[b, q0 + q, :]: the local reconstruction,
  the clustering backward's dx = Σ_q a_pq·g_q/D_q and the weight backward's Σ_q g_pq·s̃_q.
- ``_band_dot_kernel``: g[b, p, q] = dy_p·v_q over the candidates, the reconstruction
  weights' adjoint (the weight backward, ``reference.distance_gradient``).

Per clustering iteration, with K ≤ (2r+1)² candidates per pixel and Q ≈ (2r+1)·w:
- FLOPs: 2·N·Q·C for the distances (every centre of the band's rows, masked to ±r columns:
  (2r+1)/w of the dense N·M·C, on the dot units) + 2·N·K·C for the M-step sums (the local
  count: the gather reads only the pixels a centre can hold).
- Bytes (the floor, from DRAM): x read twice (E-step, M-step; the M-step's (2r+1)² visits
  of a pixel beyond the first come from L2, x being ≤ 26 MB at B = 8 ViT-L/16 640²), a
  written and read (N·Q·4·2), the centres read twice and written once (M·C·4·3).
- Not one pass over x: a pixel's weights need its full-C distances to every candidate
  before any M-step sum can use them, and a centre's sum spans pixels of 2r+1 bands, so one
  read of x per iteration would need the E-step of a tile of cells plus a halo of r cells
  recomputed by each program ((1 + 2r/T)² the distance FLOPs for T×T-cell tiles) or
  atomics in the M-step; both are left until a GPU can measure them against this.
Everything in fp32 with exact fp32 dot products (``input_precision="ieee"``): distances are
differences of large norms, and tf32 would move them by more than τ allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from stitchops.kernels.tuning import launch_sizes

from stitchops._runtime import new_output
from stitchops.reference import token_cluster as reference

BLOCK_P = 32  # pixels per program
BLOCK_Q = 32  # centres per step
BLOCK_C = 32  # channels per step
GATHER_BLOCK_W = 1  # centres per M-step program
# Triton's CPU interpreter: few, large programs.
INTERPRETED = {"BLOCK_P": 64, "BLOCK_Q": 128, "BLOCK_C": 32, "BLOCK_W": 32}


def blocks() -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_Q, BLOCK_C) of this process's launches."""
    sizes = launch_sizes({"BLOCK_P": BLOCK_P, "BLOCK_Q": BLOCK_Q, "BLOCK_C": BLOCK_C}, INTERPRETED)
    return sizes["BLOCK_P"], sizes["BLOCK_Q"], sizes["BLOCK_C"]


@dataclass(frozen=True)
class BandTable:
    """The bands of one call as device arrays (int32), and their extents."""

    pixel_start: torch.Tensor  # [h] first flat pixel of each band
    pixel_count: torch.Tensor  # [h]
    centre_start: torch.Tensor  # [h] first flat centre of each band
    centre_count: torch.Tensor  # [h]
    cell_column: torch.Tensor  # [W] the cell column of each pixel column
    column_start: torch.Tensor  # [w + 1] the first pixel column of each cell column, then W
    width: int
    max_pixels: int
    max_centres: int


def band_table(hw_in, grid, window, device) -> BandTable:
    bands = reference.bands(hw_in, grid, window, "cpu")
    i32 = {"dtype": torch.int32, "device": device}
    starts = torch.tensor([b.pixels.start for b in bands], **i32)
    counts = torch.tensor([b.pixels.stop - b.pixels.start for b in bands], **i32)
    centre_starts = torch.tensor([b.centres.start for b in bands], **i32)
    centre_counts = torch.tensor([b.centres.stop - b.centres.start for b in bands], **i32)
    columns = reference.cell_index(hw_in[1], grid[1])
    column_start = torch.searchsorted(columns, torch.arange(grid[1] + 1))
    return BandTable(
        starts,
        counts,
        centre_starts,
        centre_counts,
        columns.to(**i32),
        column_start.to(**i32),
        hw_in[1],
        int(counts.max()),
        int(centre_counts.max()),
    )


@triton.jit
def _distances(
    x_ptr,
    s_ptr,
    mean_ptr,
    rows,
    cols,
    mask_p,
    mask_q,
    channels,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """[BLOCK_P, BLOCK_Q] ‖x_p − s_q‖² for pixel rows ``rows`` of x and centre rows ``cols``
    of s (both [*, channels] contiguous rows, int64 offsets), both centred on the image's
    mean token (``mean_ptr``: its [channels] fp32 row) before the products."""
    cross = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    x_norm = tl.zeros((BLOCK_P,), dtype=tl.float32)
    s_norm = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < channels
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)[None, :]
        mask_x = mask_p[:, None] & mask_c[None, :]
        mask_s = mask_q[:, None] & mask_c[None, :]
        xc = tl.load(x_ptr + rows[:, None] * channels + offs_c[None, :], mask=mask_x, other=0.0).to(
            tl.float32
        )
        sc = tl.load(s_ptr + cols[:, None] * channels + offs_c[None, :], mask=mask_s, other=0.0)
        xc = tl.where(mask_x, xc - mean, 0.0)
        sc = tl.where(mask_s, sc - mean, 0.0)
        cross = tl.dot(xc, tl.trans(sc), cross, input_precision="ieee")
        x_norm += tl.sum(xc * xc, axis=1)
        s_norm += tl.sum(sc * sc, axis=1)
    return tl.maximum(x_norm[:, None] - 2.0 * cross + s_norm[None, :], 0.0)


@triton.jit
def _band_pixels(
    pixel_start_ptr,
    pixel_count_ptr,
    centre_start_ptr,
    centre_count_ptr,
    grid_h,
    pixels,
    BLOCK_P: tl.constexpr,
):
    """This program's band and pixel block (axes 0 and 1): (batch, flat pixel offset of the
    band, local pixel indices, their mask, flat row indices, first centre, centre count)."""
    batch, band = tl.program_id(0) // grid_h, tl.program_id(0) % grid_h
    p0 = tl.load(pixel_start_ptr + band)
    local = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = local < tl.load(pixel_count_ptr + band)
    rows = batch.to(tl.int64) * pixels + p0 + local
    return (
        batch,
        p0,
        local,
        mask_p,
        rows,
        tl.load(centre_start_ptr + band),
        tl.load(centre_count_ptr + band),
    )


@triton.jit
def _affinity_kernel(
    x_ptr,
    s_ptr,
    mean_ptr,
    a_ptr,
    pixel_start_ptr,
    pixel_count_ptr,
    centre_start_ptr,
    centre_count_ptr,
    cell_column_ptr,
    grid_h,
    pixels,
    centres,
    channels,
    width,
    grid_w,
    radius,
    max_centres,
    inv_temperature,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (b·h + band, pixel block): the softmax weights of the block's pixels over the
    band's centres, 0 off their ±r columns; a [B·N, max_centres]."""
    batch, p0, local, mask_p, rows, q0, q_count = _band_pixels(
        pixel_start_ptr,
        pixel_count_ptr,
        centre_start_ptr,
        centre_count_ptr,
        grid_h,
        pixels,
        BLOCK_P,
    )
    cell_col = tl.load(cell_column_ptr + (p0 + local) % width, mask=mask_p, other=0)
    s_base = s_ptr + batch.to(tl.int64) * centres * channels
    mean = mean_ptr + batch.to(tl.int64) * channels
    inv_t = tl.cast(inv_temperature, tl.float32)
    row_max = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for start in range(0, q_count, BLOCK_Q):  # pass 1: each pixel's max and sum
        offs_q = start + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < q_count
        d = _distances(
            x_ptr,
            s_base,
            mean,
            rows,
            q0 + offs_q,
            mask_p,
            mask_q,
            channels,
            BLOCK_P,
            BLOCK_Q,
            BLOCK_C,
        )
        near = tl.abs(cell_col[:, None] - ((q0 + offs_q) % grid_w)[None, :]) <= radius
        logits = tl.where(near & mask_q[None, :], -d * inv_t, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), 1)
        row_max = new_max
    for start in range(0, max_centres, BLOCK_Q):  # pass 2: the weights (0 past the band)
        offs_q = start + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < q_count
        d = _distances(
            x_ptr,
            s_base,
            mean,
            rows,
            q0 + offs_q,
            mask_p,
            mask_q,
            channels,
            BLOCK_P,
            BLOCK_Q,
            BLOCK_C,
        )
        near = tl.abs(cell_col[:, None] - ((q0 + offs_q) % grid_w)[None, :]) <= radius
        allowed = near & mask_q[None, :]
        a = tl.exp(tl.where(allowed, -d * inv_t, float("-inf")) - row_max[:, None])
        a = tl.where(allowed, a / row_sum[:, None], 0.0)
        tl.store(
            a_ptr + rows[:, None] * max_centres + offs_q[None, :],
            a,
            mask=mask_p[:, None] & (offs_q < max_centres)[None, :],
        )


@triton.jit
def _band_dot_kernel(
    dy_ptr,
    v_ptr,
    g_ptr,
    pixel_start_ptr,
    pixel_count_ptr,
    centre_start_ptr,
    centre_count_ptr,
    cell_column_ptr,
    grid_h,
    pixels,
    centres,
    dim,
    width,
    grid_w,
    radius,
    max_centres,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (b·h + band, pixel block): g[p, q] = dy_p · v_{q0+q} over the band's
    candidates (0 off them and past the band), the weights' adjoint of ``_apply_kernel``;
    g [B·N, max_centres] fp32, dy [B·N, D] and v [B·M, D] fp32."""
    batch, p0, local, mask_p, rows, q0, q_count = _band_pixels(
        pixel_start_ptr,
        pixel_count_ptr,
        centre_start_ptr,
        centre_count_ptr,
        grid_h,
        pixels,
        BLOCK_P,
    )
    cell_col = tl.load(cell_column_ptr + (p0 + local) % width, mask=mask_p, other=0)
    v_base = v_ptr + batch.to(tl.int64) * centres * dim
    for start in range(0, max_centres, BLOCK_Q):
        offs_q = start + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < q_count
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < dim
            dy = tl.load(
                dy_ptr + rows[:, None] * dim + offs_d[None, :],
                mask=mask_p[:, None] & mask_d[None, :],
                other=0.0,
            )
            v = tl.load(
                v_base + (q0 + offs_q)[:, None].to(tl.int64) * dim + offs_d[None, :],
                mask=mask_q[:, None] & mask_d[None, :],
                other=0.0,
            )
            acc = tl.dot(dy, tl.trans(v), acc, input_precision="ieee")
        near = tl.abs(cell_col[:, None] - ((q0 + offs_q) % grid_w)[None, :]) <= radius
        acc = tl.where(near & mask_q[None, :], acc, 0.0)
        tl.store(
            g_ptr + rows[:, None] * max_centres + offs_q[None, :],
            acc,
            mask=mask_p[:, None] & (offs_q < max_centres)[None, :],
        )


@triton.jit
def _apply_kernel(
    a_ptr,
    v_ptr,
    y_ptr,
    pixel_start_ptr,
    pixel_count_ptr,
    centre_start_ptr,
    centre_count_ptr,
    grid_h,
    pixels,
    centres,
    dim,
    max_centres,
    ACCUMULATE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (b·h + band, pixel block, column block): y[p] (+)= Σ_q a[p, q]·v[q0 + q]."""
    batch, _p0, _local, mask_p, rows, q0, q_count = _band_pixels(
        pixel_start_ptr,
        pixel_count_ptr,
        centre_start_ptr,
        centre_count_ptr,
        grid_h,
        pixels,
        BLOCK_P,
    )
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    v_base = v_ptr + batch.to(tl.int64) * centres * dim
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for start in range(0, q_count, BLOCK_Q):
        offs_q = start + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < q_count
        a = tl.load(
            a_ptr + rows[:, None] * max_centres + offs_q[None, :],
            mask=mask_p[:, None] & mask_q[None, :],
            other=0.0,
        )
        v = tl.load(
            v_base + (q0 + offs_q)[:, None].to(tl.int64) * dim + offs_d[None, :],
            mask=mask_q[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(a, v, acc, input_precision="ieee")
    out = y_ptr + rows[:, None] * dim + offs_d[None, :]
    mask = mask_p[:, None] & mask_d[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0)
    tl.store(out, acc, mask=mask)


@triton.jit
def _gather_kernel(
    a_ptr,
    x_ptr,
    prev_ptr,
    out_ptr,
    totals_ptr,
    pixel_start_ptr,
    pixel_count_ptr,
    column_start_ptr,
    grid_h,
    grid_w,
    radius,
    width,
    pixels,
    channels,
    max_centres,
    total_floor,
    M_STEP: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (b·h + cell row, block of BLOCK_W centres of the row, channel block): per
    centre, Σ_p a[p, q]·x[p] and T = Σ_p a[p, q] over the pixels that may pick it (its
    ≤ 2r+1 bands, the pixel columns of its ±r cell columns), bands in order; the totals T
    stored; with M_STEP the sum divided by max(T, total_floor) where total_floor > 0 (the
    official numerics), else by T (the previous value where T is 0), otherwise the plain
    sum. out [B, M, C] fp32."""
    batch, iy = tl.program_id(0) // grid_h, tl.program_id(0) % grid_h
    ix = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_w = ix < grid_w
    column_lo = tl.load(column_start_ptr + tl.maximum(ix - radius, 0), mask=mask_w, other=0)
    column_hi = tl.load(
        column_start_ptr + tl.minimum(ix + radius + 1, grid_w), mask=mask_w, other=0
    )
    band_span = column_hi - column_lo  # pixel columns per centre
    columns = tl.maximum(band_span, 1)
    widest = tl.max(band_span, axis=0)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    total = tl.zeros((BLOCK_W, BLOCK_P), dtype=tl.float32)
    for band in range(tl.maximum(iy - radius, 0), tl.minimum(iy + radius + 1, grid_h)):
        q = (iy - tl.maximum(band - radius, 0)) * grid_w + ix  # [BLOCK_W]
        band_rows = tl.load(pixel_count_ptr + band) // width
        p0 = tl.load(pixel_start_ptr + band) + column_lo  # [BLOCK_W]
        for start in range(0, band_rows * widest, BLOCK_P):
            local = start + tl.arange(0, BLOCK_P)
            mask = mask_w[:, None] & (local[None, :] < (band_rows * band_span)[:, None])
            pixel = (
                p0[:, None]
                + (local[None, :] // columns[:, None]) * width
                + (local[None, :] % columns[:, None])
            )
            rows = batch.to(tl.int64) * pixels + pixel  # [BLOCK_W, BLOCK_P]
            a = tl.load(a_ptr + rows * max_centres + q[:, None], mask=mask, other=0.0)
            x = tl.load(
                x_ptr + rows[:, :, None] * channels + offs_c[None, None, :],
                mask=mask[:, :, None] & mask_c[None, None, :],
                other=0.0,
            )
            acc += tl.sum(a[:, :, None] * x.to(tl.float32), axis=1)
            total += a
    centre = (batch * grid_h + iy).to(tl.int64) * grid_w + ix  # [BLOCK_W]
    out = centre[:, None] * channels + offs_c[None, :]
    mask_out = mask_w[:, None] & mask_c[None, :]
    weight = tl.sum(total, axis=1)
    if M_STEP:
        floor = tl.cast(total_floor, tl.float32)
        previous = tl.load(prev_ptr + out, mask=mask_out, other=0.0)
        divisor = tl.maximum(weight, floor)[:, None]  # 0 only for T = 0 in exact numerics
        empty = divisor == 0.0
        divisor = tl.where(empty, 1.0, divisor)
        acc = tl.where(empty, previous, acc / divisor)
    if tl.program_id(2) == 0:
        tl.store(totals_ptr + centre, weight, mask=mask_w)
    tl.store(out_ptr + out, acc, mask=mask_out)


def affinities(x3, s3, mean, table, width, grid, radius, temperature) -> torch.Tensor:
    """a [B, N, max_centres] fp32 for x3 [B, N, C] and centres s3 [B, M, C] fp32 (both
    contiguous), distances taken from ``mean`` [B, C] fp32."""
    b, n, c = x3.shape
    block_p, block_q, block_c = blocks()
    a = new_output(b, n, table.max_centres, device=x3.device, dtype=torch.float32)
    launch = (b * grid[0], triton.cdiv(table.max_pixels, block_p))
    if a.numel():
        _affinity_kernel[launch](
            x3,
            s3,
            mean,
            a,
            table.pixel_start,
            table.pixel_count,
            table.centre_start,
            table.centre_count,
            table.cell_column,
            grid[0],
            n,
            s3.shape[1],
            c,
            width,
            grid[1],
            radius,
            table.max_centres,
            1.0 / temperature,
            BLOCK_P=block_p,
            BLOCK_Q=block_q,
            BLOCK_C=block_c,
        )
    return a


def band_dots(dy, v3, table, width, grid, radius) -> torch.Tensor:
    """g [B, N, max_centres] fp32: dy_p · v_q over each pixel's candidates (dy [B, N, D],
    v3 [B, M, D], fp32 contiguous)."""
    b, n, dim = dy.shape
    block_p, block_q, block_c = blocks()
    g = new_output(b, n, table.max_centres, device=dy.device, dtype=torch.float32)
    if g.numel():
        _band_dot_kernel[(b * grid[0], triton.cdiv(table.max_pixels, block_p))](
            dy,
            v3,
            g,
            table.pixel_start,
            table.pixel_count,
            table.centre_start,
            table.centre_count,
            table.cell_column,
            grid[0],
            n,
            v3.shape[1],
            dim,
            width,
            grid[1],
            radius,
            table.max_centres,
            BLOCK_P=block_p,
            BLOCK_Q=block_q,
            BLOCK_D=block_c,
        )
    return g


def apply(a, v3, table, grid_h, out=None) -> torch.Tensor:
    """y [B, N, D] fp32: y[p] = Σ_q a[p, q]·v[q0 + q] (added to ``out`` when given)."""
    b, n, _ = a.shape
    dim = v3.shape[2]
    block_p, block_q, block_c = blocks()
    y = out if out is not None else new_output(b, n, dim, device=a.device, dtype=torch.float32)
    launch = (b * grid_h, triton.cdiv(table.max_pixels, block_p), triton.cdiv(dim, block_c))
    if y.numel():
        _apply_kernel[launch](
            a,
            v3,
            y,
            table.pixel_start,
            table.pixel_count,
            table.centre_start,
            table.centre_count,
            grid_h,
            n,
            v3.shape[1],
            dim,
            table.max_centres,
            ACCUMULATE=out is not None,
            BLOCK_P=block_p,
            BLOCK_Q=block_q,
            BLOCK_D=block_c,
        )
    return y


def gather(a, x3, previous, table, grid, radius, m_step: bool, total_floor: float = 0.0):
    """(out [B, M, C] fp32, totals [B, M] fp32): each centre's Σ_p a·x and Σ_p a over the
    pixels that may pick it; with ``m_step`` the M-step's mean (``reference.divide_totals``:
    by max(total, total_floor) when total_floor > 0, else ``previous`` where the total is 0).
    """
    b, m, c = previous.shape
    f32 = {"device": a.device, "dtype": torch.float32}
    out = new_output(b, m, c, **f32)
    totals = new_output(b, m, **f32)
    if b * m:
        block_p, _, block_c = blocks()
        block_w = launch_sizes({"BLOCK_W": GATHER_BLOCK_W}, INTERPRETED)["BLOCK_W"]
        launch = (b * grid[0], triton.cdiv(grid[1], block_w), max(1, triton.cdiv(c, block_c)))
        _gather_kernel[launch](
            a,
            x3,
            previous,
            out,
            totals,
            table.pixel_start,
            table.pixel_count,
            table.column_start,
            grid[0],
            grid[1],
            radius,
            table.width,
            x3.shape[1],
            c,
            table.max_centres,
            total_floor,
            M_STEP=m_step,
            BLOCK_W=block_w,
            BLOCK_P=block_p,
            BLOCK_C=block_c,
        )
    return out, totals


def _floor(numerics: str) -> float:
    return reference.OFFICIAL_TOTAL_FLOOR if numerics == "official" else 0.0


def _mean(x3: torch.Tensor) -> torch.Tensor:
    """[B, C] fp32 contiguous: each image's mean token."""
    return reference.mean_token(x3.float())[:, 0].contiguous()


def _iterate(x3, table, width, grid, window, iters, temperature, numerics, keep: bool):
    """The clustering's EM iterations from the pooled start; the centres, and with ``keep``
    each iteration's weights and totals."""
    b, n, c = x3.shape
    start = reference.initial_centres(x3.float().view(b, n // width, width, c), grid)
    s = start.reshape(b, grid[0] * grid[1], c).contiguous()
    mean = _mean(x3)
    history = []
    for _ in range(iters):
        a = affinities(x3, s, mean, table, width, grid, window // 2, temperature)
        s, totals = gather(a, x3, s, table, grid, window // 2, True, _floor(numerics))
        if keep:
            history.append((a, totals))
    return s, history


# Entry points (the torch backend's, stitchops/reference/token_cluster.py, take the same).


def token_cluster_forward(x, grid, window, iters, temperature, numerics) -> torch.Tensor:
    b, height, width, c = x.shape
    x3 = x.reshape(b, height * width, c).contiguous()
    table = band_table((height, width), grid, window, x.device)
    s, _ = _iterate(x3, table, width, grid, window, iters, temperature, numerics, keep=False)
    return s.reshape(b, *grid, c).to(x.dtype)


def token_cluster_backward(grad, x, grid, window, iters, temperature, numerics) -> torch.Tensor:
    """dx with constant affinities (the reference's adjoint): per iteration, backwards,
    dx += a·(g / D) over the updated centres; in exact numerics kept centres pass g to the
    step before, and at the start to the pooling."""
    b, height, width, c = x.shape
    x3 = x.reshape(b, height * width, c).contiguous()
    table = band_table((height, width), grid, window, x.device)
    _, history = _iterate(x3, table, width, grid, window, iters, temperature, numerics, keep=True)
    g = grad.reshape(b, grid[0] * grid[1], c).float()
    dx = torch.zeros(b, height * width, c, device=x.device, dtype=torch.float32)
    for a, totals in reversed(history):
        per_centre, g = reference.split_centre_gradient(g, totals, numerics)
        dx = apply(a, per_centre.contiguous(), table, grid[0], out=dx)
    dx += reference.pooling_backward(g, x3.float(), (height, width), grid)
    return dx.reshape(x.shape).to(x.dtype)


def _reconstruction_weights(x, centres, window, temperature):
    """(band table, weights a [B, N, max_centres], x3, s3 fp32, mean [B, C]) of a call."""
    b, height, width, c = x.shape
    grid = tuple(centres.shape[1:3])
    table = band_table((height, width), grid, window, x.device)
    x3 = x.reshape(b, height * width, c).contiguous()
    s3 = centres.reshape(b, grid[0] * grid[1], c).float().contiguous()
    mean = _mean(x3)
    a = affinities(x3, s3, mean, table, width, grid, window // 2, temperature)
    return table, a, x3, s3, mean


def token_reconstruct_forward(
    x, centres, values, window, temperature, mode, k, numerics
) -> torch.Tensor:
    b, height, width, _ = x.shape
    grid = tuple(centres.shape[1:3])
    table, a, *_ = _reconstruction_weights(x, centres, window, temperature)
    v3 = values.reshape(b, grid[0] * grid[1], values.shape[-1]).float().contiguous()
    y = apply(a, v3, table, grid[0])
    return y.reshape(b, height, width, values.shape[-1]).to(values.dtype)


def token_reconstruct_backward(grad, x, centres, values, window, temperature, mode, k, numerics):
    b, height, width, _ = x.shape
    grid = tuple(centres.shape[1:3])
    table, a, *_ = _reconstruction_weights(x, centres, window, temperature)
    dy = grad.reshape(b, height * width, values.shape[-1]).float().contiguous()
    like = torch.empty(b, grid[0] * grid[1], values.shape[-1], device=x.device)
    dv, _ = gather(a, dy, like, table, grid, window // 2, m_step=False)
    return dv.reshape(values.shape).to(values.dtype)


def token_reconstruct_weight_backward(
    grad, x, centres, values, window, temperature, mode, k, numerics
):
    """(dx, d centres) through the local weights (``reference.distance_gradient``): g from
    the band dots dy·vᵀ, then dx = 2(x̃·Σ_q g − Σ_q g·s̃) by the apply kernel and
    ds = −2(Σ_p g·x̃ − s̃·Σ_p g) by the gather kernel, x̃ and s̃ centred."""
    b, height, width, _ = x.shape
    grid = tuple(centres.shape[1:3])
    table, a, x3, s3, mean = _reconstruction_weights(x, centres, window, temperature)
    dy = grad.reshape(b, height * width, values.shape[-1]).float().contiguous()
    v3 = values.reshape(b, grid[0] * grid[1], values.shape[-1]).float().contiguous()
    dots = band_dots(dy, v3, table, width, grid, window // 2)
    g = reference.distance_gradient(a, dots, temperature).contiguous()
    xc = (x3.float() - mean[:, None]).contiguous()
    sc = (s3 - mean[:, None]).contiguous()
    dx = 2 * (xc * g.sum(-1, keepdim=True) - apply(g, sc, table, grid[0]))
    sums, totals = gather(g, xc, sc, table, grid, window // 2, m_step=False)
    ds = -2 * (sums - sc * totals[..., None])
    return dx.reshape(x.shape).to(x.dtype), ds.reshape(centres.shape).to(centres.dtype)
