// Fused LoRA stitching projection: plain C++ interface of the CUDA kernels in lora.cu.
//
//   y = x · Wᵀ + b + b_s + scale · (x · Aᵀ) · Bᵀ        (SN-Netv2 LoRA SL, ESTA stitch bias)
//
// No torch and no CUDA header here: raw pointers, element strides, a void* stream and
// cudaError_t codes, as common.h describes.
#pragma once

#include <cstdint>

#include "common.h"

namespace stitchops {

constexpr int kMaxRank = 128;

// out[z] = X[:, Kz] · Wt[Kz, :] + scale · (X · L1) · L2 + bias + bias2, for K split into
// ranges Kz of k_per_split (blockIdx.z = z). X [M, K], Wt [K, N], L1 [K, R], L2 [R, N].
// The forward passes Wt = Wᵀ, L1 = Aᵀ, L2 = Bᵀ as strided views; dW passes X = dyᵀ, Wt = x.
struct LowRankMatmulArgs {
  const void* x = nullptr;
  int64_t stride_xm = 0, stride_xk = 0;
  const void* w = nullptr;
  int64_t stride_wk = 0, stride_wn = 0;
  const void* l1 = nullptr;  // nullptr: no low-rank term
  int64_t stride_l1k = 0, stride_l1r = 0;
  const void* l2 = nullptr;
  int64_t stride_l2r = 0, stride_l2n = 0;
  const void* bias = nullptr;   // [N] or nullptr
  const void* bias2 = nullptr;  // [N] or nullptr
  void* out = nullptr;          // element type of x, or float when out_fp32
  bool out_fp32 = false;
  int64_t stride_oz = 0, stride_om = 0, stride_on = 0;
  float* s_out = nullptr;  // [M, R] fp32 (row stride stride_sm) or nullptr
  int64_t stride_sm = 0;
  int64_t M = 0, N = 0, K = 0, R = 0;
  float scale = 1.f;
  int64_t k_per_split = 0;
  int splits = 1;
  // Output column tiles (kBlockN wide) one block covers in turn: blockIdx.y covers tiles
  // blockIdx.y·column_tiles .. + column_tiles − 1. The block computes S = X·L1 with its first
  // tile and reuses it for the others, so the rank-R work is R / (kBlockN·column_tiles) of
  // the main product's instead of R / kBlockN (25% → 6.25% at R 16 with 4 tiles).
  // No effect without a low-rank term, nor above rank 64 in fp16 / bf16 (no room to keep S
  // in the tensor-core kernel's 48 KB of static shared memory).
  int column_tiles = 1;
};

// Backward over token ranges: range z covers rows [z·rows_per_range, min(M, ...)) and one
// block column j covers IN features. One pass over dy gives
//   dx = dy·W + scale·dS·A,  dS = dy·B,  da_part[z] = dSᵀ·x  (unscaled),
// and db_part[z] = dyᵀ·S (unscaled) and dbias_part[z] = Σ_rows dy, whose OUT rows are dealt
// out over the block columns by K step (each column's blocks write the steps they own).
struct LoraBackwardArgs {
  const void* dy = nullptr;
  int64_t stride_dym = 0, stride_dyo = 0;
  const void* w = nullptr;
  int64_t stride_wo = 0, stride_wi = 0;
  const void* a = nullptr;  // nullptr: no LoRA
  int64_t stride_ar = 0, stride_ai = 0;
  const void* b = nullptr;
  int64_t stride_bo = 0, stride_br = 0;
  const float* s = nullptr;  // [M, R] fp32, read only with db_part
  int64_t stride_sm = 0;
  const void* x = nullptr;
  int64_t stride_xm = 0, stride_xi = 0;
  void* dx = nullptr;  // [M, IN] or nullptr when x needs no gradient
  int64_t stride_dxm = 0, stride_dxi = 0;
  float* da_part = nullptr;     // [ranges, R, IN] or nullptr when A needs no gradient
  float* db_part = nullptr;     // [ranges, OUT, R] or nullptr when B needs no gradient
  float* dbias_part = nullptr;  // [ranges, OUT] or nullptr
  int64_t M = 0, IN = 0, OUT = 0, R = 0;
  float scale = 1.f;
  int64_t rows_per_range = 0;
  int ranges = 0;
};

// Tile sizes of the launches (the backward's rows_per_range must be a multiple of kBlockM).
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

int lowrank_matmul(DType dtype, const LowRankMatmulArgs& args, void* stream);
int lora_backward(DType dtype, const LoraBackwardArgs& args, void* stream);

}  // namespace stitchops
