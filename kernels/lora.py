"""Fused LoRA stitching projection in Triton: forward, dx and the low-rank gradients.

    y = x · Wᵀ + b + b_s + scale · (x · Aᵀ) · Bᵀ        (SN-Netv2 LoRA SL, ESTA stitch bias)

Cost model (T tokens, IN → OUT, rank R; bf16 = 2 bytes):
  forward   FLOPs 2·T·IN·OUT + 2·T·R·(IN + OUT)       bytes ≥ 2·T·(IN + OUT)   (x in, y out)
  backward  FLOPs 2·T·IN·OUT (dx) + 2·T·R·(2·IN + 2·OUT)
            bytes ≥ 2·T·(OUT + IN) (dy in, dx out) + 2·T·IN (x, for dA) + 4·T·R (S)

Design (after LoRAFusion, specialised for stitching layers whose IN is small):
* ``_lowrank_matmul_kernel``: a program computes COLUMN_TILES [BLOCK_M, BLOCK_N] output
  tiles of one row tile in turn. The x tiles loaded for its first tile's main GEMM also feed
  S = x·Aᵀ ([BLOCK_M, R], fp32 registers), so S costs no extra pass over x, and S is reused
  for the group's other tiles; the low-rank term scale·S·Bᵀ is added to the fp32 accumulator
  in each tile's epilogue, and no [T, OUT] low-rank intermediate exists. Programs of the
  first column group store S for the backward. With HAS_LORA=False and a split-K grid the
  same kernel computes dW = dyᵀ·x.
* ``_lora_backward_kernel``: program (z, j) walks the row blocks of one token range z and one
  IN tile j. One pass over dy gives dx = dy·W + scale·(dy·B)·A and dS = dy·B; dA = scale·dSᵀ·x
  stays in registers across the range; the range's programs also fold dy into
  dB = scale·dyᵀ·S and the bias gradient Σ_t dy, each the columns of every (IN/BLOCK_N)-th
  K step, written to a per-range fp32 slice (no atomics: deterministic). The launcher sums
  the few per-range partials in one launch (kernels/partials.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from stitchops._runtime import new_output, triton_interpreting

from .partials import sum_ranges
from .tuning import Tiling, TilingSpace, TunedKernel, dot_precision, programs_to_fill

# The autotune space of both kernels. A forward tiling with column_tiles > 1 has a program
# cover that many BLOCK_N-wide output tiles of its row tile in turn: it computes S = x·Aᵀ
# with the first and reuses it, so the rank-R product costs R/(BLOCK_N·column_tiles) of the
# main GEMM's MMA work instead of R/BLOCK_N (12.5% at r 16 with 128-wide tiles, 3.1% over 4
# tiles). The backward ignores column_tiles: its wider reuse is a wider BLOCK_N.
TILINGS = (
    Tiling(128, 128, 64, 8, 3),
    Tiling(128, 256, 64, 8, 3),
    Tiling(64, 128, 64, 4, 4),
    Tiling(128, 64, 64, 4, 4),
    Tiling(64, 64, 64, 4, 4),
    Tiling(128, 128, 32, 8, 3),
    Tiling(32, 64, 32, 4, 3),
    Tiling(128, 128, 64, 8, 3, column_tiles=4),
    Tiling(128, 256, 64, 8, 3, column_tiles=2),
)
# Fallbacks, each checked by tests/test_triton_compile.py to compile and fit shared memory at
# rank 128 (the most) in fp32 and bf16, forward and backward; the other tilings do not all
# fit there (the fp32 backward at rank 128 needs 240-416 KB with them on sm_90, bf16
# 106-180 KB on the 99 KB GPUs). UNTUNED fits the 163 KB of sm_80 and the 227 KB of sm_90
# and sm_100; SMALL the 99 KB of sm_86, sm_89 and sm_120 (GeForce and workstation cards).
# Both also hold on Triton 3.6, which takes up to 30% more shared memory in fp32 (a 64-row
# SMALL needs 104 KB there) and cannot allocate registers for a 4-warp UNTUNED forward at
# rank 128 in bf16 on sm_100.
UNTUNED = Tiling(128, 128, 32, 8, 3)
SMALL = Tiling(32, 64, 32, 4, 3)
UNTUNED_MIN_SHARED = 163 * 1024  # bytes per block (opt-in) that UNTUNED is checked against
# Under the CPU interpreter: one small tiling (warps and stages mean nothing there), whose
# forward covers two column tiles per program so that every CPU test runs S's reuse.
INTERPRETED = Tiling(32, 32, 32, 4, 1, column_tiles=2)

SPACE = TilingSpace(
    name="lora",
    tilings=TILINGS,
    interpreted=INTERPRETED,
    fallbacks=((UNTUNED_MIN_SHARED, UNTUNED), (0, SMALL)),
)
pinned_tiling = SPACE.pinned


def _forward_meta(tiling: Tiling) -> dict:
    return {
        "BLOCK_M": tiling.block_m,
        "BLOCK_N": tiling.block_n,
        "BLOCK_K": tiling.block_k,
        "GROUP_M": 8,
        "COLUMN_TILES": tiling.column_tiles,
    }


def _backward_meta(tiling: Tiling) -> dict:
    return {"BLOCK_M": tiling.block_m, "BLOCK_N": tiling.block_n, "BLOCK_K": tiling.block_k}


# Token ranges of the backward (and dW's split-K ranges) are aligned to this many rows: on a
# GPU a multiple of every BLOCK_M, so that only a range's last row block is partial. The
# kernels mask by the range's end, so a tiling that breaks this (pinned_tiling under the
# interpreter) is still exact.
ROW_ALIGN = 32 if triton_interpreting() else 128


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, row_mask, col_mask):
    """The tile ptr[rows[:, None]·stride_row + cols[None, :]·stride_col], zero outside the
    masks: every operand tile the kernels below read (inlined, so pipelining is unchanged)."""
    return tl.load(
        ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    )


@triton.jit
def _lowrank_matmul_kernel(
    x_ptr,
    w_ptr,
    l1_ptr,
    l2_ptr,
    bias_ptr,
    bias2_ptr,
    out_ptr,
    s_ptr,
    M,
    N,
    K,
    R,
    scale,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_l1k,
    stride_l1r,
    stride_l2r,
    stride_l2n,
    stride_oz,
    stride_om,
    stride_on,
    stride_sm,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BIAS2: tl.constexpr,
    STORE_S: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    COLUMN_TILES: tl.constexpr,
):
    """out[z] = X[:, Kz]·Wt[Kz, :] + scale·(X·L1)·L2 + bias + bias2, K split into ranges Kz.

    X [M, K], Wt [K, N], L1 [K, R], L2 [R, N] are addressed through strides, so the forward
    passes Wt = Wᵀ, L1 = Aᵀ, L2 = Bᵀ as views and the dW pass X = dyᵀ, Wt = x.
    A program covers one row tile and COLUMN_TILES column tiles, one after the other; it
    computes S = X·L1 [M, R] (fp32) in its first column tile's K loop and reuses it for the
    rest. The programs of the first column group store S when STORE_S.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(tl.cdiv(N, BLOCK_N), COLUMN_TILES)  # column groups
    # Grouped ordering: GROUP_M row tiles share each W column group while it is in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    k_begin = split * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)

    s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for t in tl.static_range(COLUMN_TILES):
        n_begin = (pid_n * COLUMN_TILES + t) * BLOCK_N
        if n_begin < N:  # the last group's later tiles may lie past N
            offs_n = n_begin + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(k_begin, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < k_end
                x = _load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, mask_m, mask_k)
                w = _load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, mask_k, mask_n)
                acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
                if HAS_LORA and t == 0:
                    l1 = _load_tile(l1_ptr, offs_k, offs_r, stride_l1k, stride_l1r, mask_k, mask_r)
                    s = tl.dot(x, l1, s, input_precision=DOT_PRECISION)

            if HAS_LORA:
                if STORE_S and t == 0:
                    if pid_n == 0:
                        s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :]
                        tl.store(s_ptrs, s, mask=mask_m[:, None] & mask_r[None, :])
                l2 = _load_tile(l2_ptr, offs_r, offs_n, stride_l2r, stride_l2n, mask_r, mask_n)
                low = tl.dot(s.to(l2.dtype), l2, input_precision=DOT_PRECISION)
                acc += tl.cast(scale, tl.float32) * low
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS2:
                acc += tl.load(bias2_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            out_ptrs = (
                out_ptr
                + split * stride_oz
                + offs_m[:, None] * stride_om
                + offs_n[None, :] * stride_on
            )
            out_mask = mask_m[:, None] & mask_n[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _lora_backward_kernel(
    dy_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    s_ptr,
    x_ptr,
    dx_ptr,
    da_part_ptr,
    db_part_ptr,
    dbias_part_ptr,
    M,
    IN,
    OUT,
    R,
    scale,
    rows_per_range,
    stride_dym,
    stride_dyo,
    stride_wo,
    stride_wi,
    stride_ar,
    stride_ai,
    stride_bo,
    stride_br,
    stride_sm,
    stride_xm,
    stride_xi,
    stride_dxm,
    stride_dxi,
    HAS_LORA: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DA: tl.constexpr,
    NEED_DB: tl.constexpr,
    NEED_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One pass over dy for the token range z = program_id(0), IN tile j = program_id(1).

    Writes dx[rows, j] and da_part[z, :, j] (unscaled dSᵀ·x). The reductions over tokens,
    db_part[z] = dyᵀ·S [OUT, R] and dbias_part[z] = Σ_rows dy [OUT] (each range owns its
    slice), are dealt out over the IN tiles by K step: the program of IN tile j folds in the
    dy columns of steps j, j + IN/BLOCK_N, ..., so every program of a range does an equal
    share and the slowest does no more than the rest.
    """
    z = tl.program_id(0)
    j = tl.program_id(1)
    offs_i = j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_i = offs_i < IN
    mask_r = offs_r < R
    row_begin = z * rows_per_range
    row_end = tl.minimum(M, row_begin + rows_per_range)
    in_tiles = tl.cdiv(IN, BLOCK_N)
    # Masks are block comparisons against limits (a scalar bool in a mask breaks the
    # interpreter): a program that owns some K step reads S rows below row_end, others none.
    s_row_end = tl.where(j < tl.cdiv(OUT, BLOCK_K), row_end, 0)

    da = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_begin, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        # The first row block of a range overwrites its partials, later ones accumulate.
        prev_end = tl.where(m0 != row_begin, OUT, 0)
        if HAS_LORA and NEED_DB:
            s_rows = tl.load(
                s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :],
                mask=(offs_m < s_row_end)[:, None] & mask_r[None, :],
                other=0.0,
            )
        else:
            s_rows = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, OUT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < OUT
            dy = _load_tile(dy_ptr, offs_m, offs_k, stride_dym, stride_dyo, mask_m, mask_k)
            if NEED_DX:
                w = _load_tile(w_ptr, offs_k, offs_i, stride_wo, stride_wi, mask_k, mask_i)
                acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
            if HAS_LORA:
                b = _load_tile(b_ptr, offs_k, offs_r, stride_bo, stride_br, mask_k, mask_r)
                ds = tl.dot(dy, b, ds, input_precision=DOT_PRECISION)
            if (k0 // BLOCK_K) % in_tiles == j:  # this program's share of the reductions
                # Read-modify-write of this range's own slice; as the first row block
                # overwrites, a relaunch (autotuning) starts clean.
                if HAS_LORA and NEED_DB:
                    part = tl.dot(tl.trans(dy), s_rows.to(dy.dtype), input_precision=DOT_PRECISION)
                    ptrs = db_part_ptr + z * OUT * R + offs_k[:, None] * R + offs_r[None, :]
                    mask = mask_k[:, None] & mask_r[None, :]
                    prev = tl.load(ptrs, mask=mask & (offs_k < prev_end)[:, None], other=0.0)
                    tl.store(ptrs, prev + part, mask=mask)
                if NEED_BIAS:
                    col = tl.sum(dy.to(tl.float32), axis=0)
                    ptrs = dbias_part_ptr + z * OUT + offs_k
                    prev = tl.load(ptrs, mask=offs_k < prev_end, other=0.0)
                    tl.store(ptrs, prev + col, mask=mask_k)
        if NEED_DX:
            if HAS_LORA:
                a = _load_tile(a_ptr, offs_r, offs_i, stride_ar, stride_ai, mask_r, mask_i)
                scaled = (ds * tl.cast(scale, tl.float32)).to(a.dtype)
                acc = tl.dot(scaled, a, acc, input_precision=DOT_PRECISION)
            dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_i[None, :] * stride_dxi
            tl.store(
                dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_i[None, :]
            )
        if HAS_LORA and NEED_DA:
            x = _load_tile(x_ptr, offs_m, offs_i, stride_xm, stride_xi, mask_m, mask_i)
            da = tl.dot(tl.trans(ds.to(x.dtype)), x, da, input_precision=DOT_PRECISION)
    if HAS_LORA and NEED_DA:
        da_ptrs = da_part_ptr + z * R * IN + offs_r[:, None] * IN + offs_i[None, :]
        tl.store(da_ptrs, da, mask=mask_r[:, None] & mask_i[None, :])


LOWRANK_MATMUL = TunedKernel(
    _lowrank_matmul_kernel,
    SPACE,
    key=["N", "K", "BLOCK_R", "HAS_LORA", "SPLIT_K"],
    meta=_forward_meta,
)
LORA_BACKWARD = TunedKernel(
    _lora_backward_kernel,
    SPACE,
    key=["IN", "OUT", "BLOCK_R", "HAS_LORA", "NEED_DX", "NEED_DA", "NEED_DB"],
    meta=_backward_meta,
)
KERNELS = (LOWRANK_MATMUL, LORA_BACKWARD)


# ----------------------------------------------------------------------------- launchers


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(max(rank, 1)))


def _column_groups(columns: int, meta: dict) -> int:
    """Programs per row tile of the forward kernel: its column tiles in groups of COLUMN_TILES."""
    return triton.cdiv(triton.cdiv(columns, meta["BLOCK_N"]), meta["COLUMN_TILES"])


def _dummy(t: torch.Tensor) -> torch.Tensor:
    return t  # a pointer the kernel never dereferences (its HAS_* flag is off)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    extra_bias: torch.Tensor | None,
    save_s: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, IN] (any strides) → (y [T, OUT] contiguous, S [T, R] fp32 or [0, 0])."""
    tokens, in_features = x.shape
    out_features = weight.shape[0]
    has_lora = lora_a is not None
    rank = lora_a.shape[0] if has_lora else 0
    keep_s = save_s and has_lora
    y = new_output(tokens, out_features, device=x.device, dtype=x.dtype)
    s = new_output(
        tokens if keep_s else 0, rank if keep_s else 0, device=x.device, dtype=torch.float32
    )
    if tokens == 0:
        return y, s
    a = lora_a if has_lora else _dummy(weight)
    b = lora_b if has_lora else _dummy(weight)

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_M"]) * _column_groups(out_features, meta), 1)

    LOWRANK_MATMUL.launch(
        grid,
        x.device,
        x,
        weight,
        a,
        b,
        bias if bias is not None else _dummy(weight),
        extra_bias if extra_bias is not None else _dummy(weight),
        y,
        s if s.numel() else _dummy(y),
        tokens,
        out_features,
        in_features,
        rank,
        scale,
        max(in_features, 1),
        x.stride(0),
        x.stride(1),
        weight.stride(1),
        weight.stride(0),
        a.stride(1),
        a.stride(0),
        b.stride(1),
        b.stride(0),
        0,
        y.stride(0),
        y.stride(1),
        max(rank, 1),
        HAS_LORA=has_lora,
        HAS_BIAS=bias is not None,
        HAS_BIAS2=extra_bias is not None,
        STORE_S=bool(s.numel()),
        SPLIT_K=False,
        BLOCK_R=_block_r(rank),
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return y, s


def weight_grad(grad_y: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dW = dyᵀ · x [OUT, IN], split over tokens so that a small [OUT, IN] still fills the GPU."""
    tokens, out_features = grad_y.shape
    in_features = x.shape[1]
    if tokens == 0:
        return torch.zeros(out_features, in_features, device=x.device, dtype=dtype)
    tiles = triton.cdiv(out_features, 128) * triton.cdiv(in_features, 128)
    splits = max(1, min(programs_to_fill(x.device) // tiles, triton.cdiv(tokens, 512)))
    k_per_split = triton.cdiv(triton.cdiv(tokens, splits), ROW_ALIGN) * ROW_ALIGN
    splits = triton.cdiv(tokens, k_per_split)
    partial = new_output(splits, out_features, in_features, device=x.device, dtype=torch.float32)

    def grid(meta):
        return (
            triton.cdiv(out_features, meta["BLOCK_M"]) * _column_groups(in_features, meta),
            splits,
        )

    LOWRANK_MATMUL.launch(
        grid,
        x.device,
        grad_y,
        x,
        x,
        x,
        x,
        x,
        partial,
        partial,
        out_features,
        in_features,
        tokens,
        0,
        1.0,
        k_per_split,
        grad_y.stride(1),
        grad_y.stride(0),
        x.stride(0),
        x.stride(1),
        0,
        0,
        0,
        0,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        1,
        HAS_LORA=False,
        HAS_BIAS=False,
        HAS_BIAS2=False,
        STORE_S=False,
        SPLIT_K=True,
        BLOCK_R=16,
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return sum_ranges([(partial, 1.0)], dtype)[0]


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    s: torch.Tensor,
    scale: float,
    needs: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dx, dW, dA, dB, dbias) for 2-D tensors, each where its flag in ``needs``
    (same order) is set; None where not asked for.

    ``s`` (the forward's S, fp32 [T, R]) is read only for dB.
    """
    need_x, need_weight, need_a, need_b, need_bias = needs
    tokens, in_features = x.shape
    out_features = weight.shape[0]
    has_lora = lora_a is not None
    need_a, need_b = need_a and has_lora, need_b and has_lora
    rank = lora_a.shape[0] if has_lora else 0
    dw = weight_grad(grad_y, x, weight.dtype) if need_weight else None
    if not (need_x or need_a or need_b or need_bias):
        return None, dw, None, None, None

    per_range = triton.cdiv(max(tokens, 1), _ranges_wanted(x.device, in_features))
    rows_per_range = triton.cdiv(per_range, ROW_ALIGN) * ROW_ALIGN
    ranges = triton.cdiv(tokens, rows_per_range)
    # Every range writes its whole slice of the partials, so none needs zeroing.
    f32 = {"device": x.device, "dtype": torch.float32}
    dx = new_output(tokens, in_features, device=x.device, dtype=x.dtype) if need_x else None
    da_part = new_output(ranges, rank, in_features, **f32) if need_a else None
    db_part = new_output(ranges, out_features, rank, **f32) if need_b else None
    dbias_part = new_output(ranges, out_features, **f32) if need_bias else None
    if ranges > 0:  # the op guarantees IN, OUT >= 1
        a = lora_a if has_lora else _dummy(weight)
        b = lora_b if has_lora else _dummy(weight)
        s_arg = s if need_b else _dummy(grad_y)
        dx_arg = dx if need_x else _dummy(grad_y)

        def grid(meta):
            return (ranges, triton.cdiv(in_features, meta["BLOCK_N"]))

        parts = [p if p is not None else _dummy(grad_y) for p in (da_part, db_part, dbias_part)]
        tensors = (grad_y, weight, a, b, s_arg, x, dx_arg, *parts)
        sizes = (tokens, in_features, out_features, rank, scale, rows_per_range)
        strides = (*grad_y.stride(), *weight.stride(), *a.stride(), *b.stride(), max(rank, 1),
                   *x.stride(), *dx_arg.stride())  # fmt: skip
        flags = dict(HAS_LORA=has_lora, NEED_DX=need_x, NEED_DA=need_a, NEED_DB=need_b,
                     NEED_BIAS=need_bias, BLOCK_R=_block_r(rank),
                     DOT_PRECISION=dot_precision(x.dtype))  # fmt: skip
        LORA_BACKWARD.launch(grid, x.device, *tensors, *sizes, *strides, **flags)
    da, db, dbias = sum_ranges(
        [
            (da_part, scale) if need_a else None,
            (db_part, scale) if need_b else None,
            (dbias_part, 1.0) if need_bias else None,
        ],
        x.dtype,
    )
    return dx, dw, da, db, dbias


def _ranges_wanted(device: torch.device, in_features: int) -> int:
    """Token ranges for the backward: enough programs to fill the device, few partials."""
    in_tiles = triton.cdiv(in_features, 128)
    return max(1, programs_to_fill(device) // max(in_tiles, 1))
