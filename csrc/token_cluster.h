// Expedit's token clustering and local reconstruction: the CUDA kernels of one band step
// (stitchops/reference/token_cluster.py has the math and the band structure; the Triton
// kernels in kernels/token_cluster.py compute the same three steps). Raw pointers only.
//
// A band is the pixels of one row of cells (whole pixel rows) and the centres of the 2r+1
// cell rows around it; a pixel's candidates are those within ±r cell columns of its own.
// Every step writes each output element from one thread and sums in a fixed order:
// deterministic, no atomics. Math in fp32.
#pragma once

#include <cstdint>

#include "common.h"

namespace stitchops {

struct BandTable {
  const int32_t* pixel_start = nullptr;   // [h] first flat pixel of each band
  const int32_t* pixel_count = nullptr;   // [h]
  const int32_t* centre_start = nullptr;  // [h] first flat centre of each band
  const int32_t* centre_count = nullptr;  // [h]
  const int32_t* cell_column = nullptr;   // [W] the cell column of each pixel column
  const int32_t* column_start = nullptr;  // [w + 1] first pixel column of each cell column, W
  int64_t grid_h = 0, grid_w = 0, width = 0, radius = 0;
  int64_t max_pixels = 0, max_centres = 0;
};

// a[b, p, q] = softmax over the band's candidates q of −‖x_p − s_q‖² / τ (0 elsewhere, and
// for q past the band): x [B, N, C] (dtype), s [B, M, C] fp32, a [B, N, max_centres] fp32.
struct AffinityArgs {
  const void* x = nullptr;
  const float* s = nullptr;
  float* a = nullptr;
  int64_t batch = 0, pixels = 0, centres = 0, channels = 0;
  float inv_temperature = 0.f;
};
int band_affinity(DType dtype, const BandTable& t, const AffinityArgs& args, void* stream);

// y[b, p, :] (+)= Σ_q a[b, p, q] · v[b, q0 + q, :]; v [B, M, D] fp32, y [B, N, D] fp32.
struct ApplyArgs {
  const float* a = nullptr;
  const float* v = nullptr;
  float* y = nullptr;
  int64_t batch = 0, pixels = 0, centres = 0, dim = 0;
  bool accumulate = false;
};
int band_apply(const BandTable& t, const ApplyArgs& args, void* stream);

// M-step: per centre, Σ_p a[b, p, q]·x[b, p, :] and T = Σ_p a[b, p, q] over the pixels that
// may pick it (its ≤ 2r+1 bands, the pixel columns of its ±r cell columns), in band order;
// the totals T [B, M] written; with m_step the mean, divided by max(T, total_floor) when
// total_floor > 0 (the official numerics), else by T (the previous value where T is 0);
// otherwise the plain sum. x [B, N, C] fp32.
struct GatherArgs {
  const float* a = nullptr;
  const float* x = nullptr;
  const float* previous = nullptr;  // [B, M, C] (m_step)
  float* out = nullptr;             // [B, M, C]
  float* totals = nullptr;          // [B, M]
  int64_t batch = 0, pixels = 0, channels = 0;
  bool m_step = false;
  float total_floor = 0.f;
};
int band_gather(const BandTable& t, const GatherArgs& args, void* stream);

// g[b, p, q] = dy[b, p, :] · v[b, q0 + q, :] over the band's candidates q (0 elsewhere and
// past the band): the adjoint of the weights of band_apply. dy [B, N, D], v [B, M, D],
// g [B, N, max_centres], all fp32.
struct BandDotArgs {
  const float* dy = nullptr;
  const float* v = nullptr;
  float* g = nullptr;
  int64_t batch = 0, pixels = 0, centres = 0, dim = 0;
};
int band_dots(const BandTable& t, const BandDotArgs& args, void* stream);

}  // namespace stitchops
