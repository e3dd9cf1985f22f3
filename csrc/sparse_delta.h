// Sparse-delta linear (SPT): the CUDA kernels around the GEMMs (which run on cuBLAS through
// the binding), raw pointers only. The math is in stitchops/reference/sparse_delta.py:
//
//   y = x · (W + S(δ))ᵀ + b,   dδ_j = Σ_t G[t, r_j] · x[t, c_j],   index_j = r_j · IN + c_j.
#pragma once

#include <cstdint>

#include "common.h"

namespace stitchops {

// W' = W + S(δ) in place on w (a contiguous copy of W): w[index[j]] += delta[j]. Indices are
// unique (the op checks), so no two threads write one element.
struct ScatterDeltaArgs {
  void* w = nullptr;               // [OUT·IN] contiguous
  const void* delta = nullptr;     // [nnz] contiguous
  const int64_t* index = nullptr;  // [nnz] contiguous
  int64_t nnz = 0;
};
int scatter_delta(DType dtype, const ScatterDeltaArgs& args, void* stream);

// part[s, j] = Σ_{t in split s} G[t, r_j] · x[t, c_j] in fp32, split s covering tokens
// [s·tokens_per_split, min((s + 1)·tokens_per_split, tokens)). sum_ranges (common.h) then
// adds the splits in order: deterministic, no atomics.
struct SddmmArgs {
  const void* grad = nullptr;  // G [T, OUT], element strides
  int64_t stride_gt = 0, stride_go = 0;
  const void* x = nullptr;  // [T, IN], element strides
  int64_t stride_xt = 0, stride_xi = 0;
  const int64_t* index = nullptr;  // [nnz] contiguous
  float* part = nullptr;           // [splits, nnz] contiguous
  int64_t nnz = 0, tokens = 0, in_features = 0, tokens_per_split = 0, splits = 0;
};
// A block takes kSddmmEntries consecutive entries; its kSddmmLanes warps take every
// kSddmmLanes-th token of the split.
constexpr int kSddmmEntries = 32;
constexpr int kSddmmLanes = 8;
int sddmm_partials(DType dtype, const SddmmArgs& args, void* stream);

}  // namespace stitchops
