// SPViT's head-mixed stencil: raw pointers only. The math is in
// stitchops/reference/head_mixed_conv.py:
//
//   out[b, prefix + q, d] = Σ_p Σ_h mix[h, p] · v[b, prefix + q + off_p, h, d]
//
// q a patch position i·gw + j of the gh × gw map, tap p = a + k·c at (dy, dx) =
// (a − k/2, c − k/2), zero outside the map; the prefix rows of out are the caller's.
#pragma once

#include <cstdint>

#include "common.h"

namespace stitchops {

struct HeadMixedConvArgs {
  const void* v = nullptr;  // [B, N, H, D], element strides
  int64_t stride_vb = 0, stride_vn = 0, stride_vh = 0, stride_vd = 0;
  const void* mix = nullptr;   // [H, k²] contiguous, the call's dtype
  const void* grad = nullptr;  // G [B, N, D] (backward), element strides
  int64_t stride_gb = 0, stride_gn = 0, stride_gd = 0;
  void* out = nullptr;    // forward: out [B, N, D]; dv: [B, N, H, D]; both contiguous
  float* part = nullptr;  // dmix: [B·blocks, H·k²] fp32 partials (sum_ranges adds them)
  int64_t batch = 0, heads = 0, dim = 0, gh = 0, gw = 0, prefix = 0, k = 0;
};

// Patch positions per block of the dmix partials: one thread per (h, p) sums them.
constexpr int kMixPositions = 16;

int head_mixed_conv_forward(DType dtype, const HeadMixedConvArgs& args, void* stream);
int head_mixed_conv_grad_v(DType dtype, const HeadMixedConvArgs& args, void* stream);
int head_mixed_conv_grad_mix(DType dtype, const HeadMixedConvArgs& args, void* stream);

}  // namespace stitchops
