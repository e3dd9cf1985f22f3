// SPViT's head-mixed stencil: forward, dv and the dmix partials. See head_mixed_conv.h.
//
// SIMT, fp32 accumulation, deterministic (no atomics):
// - forward: a thread per output element (b, q, d) sums k²·H products, the taps' positions
//   shifted inside the map (zero padding: a tap outside adds nothing, no padded copy);
//   neighbouring threads take neighbouring d, so every load of a warp is one row segment.
// - dv: a thread per (b, q, h, d) sums the outputs whose tap p reads position q.
// - dmix: a block per (b, kMixPositions positions), a thread per (h, p) sums G·v over its
//   positions and channels into the block's fp32 partial; sum_ranges adds the partials.
// FLOPs: forward B·P·k²·H·D multiply-adds (P = gh·gw), the backward twice that.
#include <cuda_runtime.h>

#include "convert.cuh"
#include "head_mixed_conv.h"

namespace stitchops {
namespace {

constexpr int kThreads = 256;

// The patch position of q shifted by sign·(dy, dx) of tap p, or -1 outside the map.
__device__ __forceinline__ int64_t shifted(int64_t q, int64_t p, int sign,
                                           const HeadMixedConvArgs& a) {
  const int64_t dy = sign * (p % a.k - a.k / 2), dx = sign * (p / a.k - a.k / 2);
  const int64_t row = q / a.gw + dy, col = q % a.gw + dx;
  if (row < 0 || row >= a.gh || col < 0 || col >= a.gw) return -1;
  return row * a.gw + col;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(HeadMixedConvArgs a) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t positions = a.gh * a.gw;
  if (i >= a.batch * positions * a.dim) return;
  const int64_t d = i % a.dim, q = (i / a.dim) % positions, b = i / (a.dim * positions);
  const T* v = static_cast<const T*>(a.v) + b * a.stride_vb + d * a.stride_vd;
  const T* mix = static_cast<const T*>(a.mix);
  float acc = 0.f;
  for (int64_t p = 0; p < a.k * a.k; ++p) {
    const int64_t src = shifted(q, p, 1, a);
    if (src < 0) continue;
    const T* row = v + (a.prefix + src) * a.stride_vn;
    for (int64_t h = 0; h < a.heads; ++h)
      acc += to_float(mix[h * a.k * a.k + p]) * to_float(row[h * a.stride_vh]);
  }
  static_cast<T*>(a.out)[(b * (a.prefix + positions) + a.prefix + q) * a.dim + d] =
      from_float<T>(acc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_v_kernel(HeadMixedConvArgs a) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t positions = a.gh * a.gw;
  if (i >= a.batch * positions * a.heads * a.dim) return;
  const int64_t d = i % a.dim, h = (i / a.dim) % a.heads;
  const int64_t q = (i / (a.dim * a.heads)) % positions, b = i / (a.dim * a.heads * positions);
  const T* g = static_cast<const T*>(a.grad) + b * a.stride_gb + d * a.stride_gd;
  const T* mix = static_cast<const T*>(a.mix) + h * a.k * a.k;
  float acc = 0.f;
  for (int64_t p = 0; p < a.k * a.k; ++p) {
    const int64_t dst = shifted(q, p, -1, a);  // the output whose tap p reads q
    if (dst >= 0) acc += to_float(mix[p]) * to_float(g[(a.prefix + dst) * a.stride_gn]);
  }
  const int64_t n = a.prefix + positions;
  static_cast<T*>(a.out)[((b * n + a.prefix + q) * a.heads + h) * a.dim + d] = from_float<T>(acc);
}

template <typename T>
__global__ void grad_mix_kernel(HeadMixedConvArgs a) {
  const int64_t pairs = a.heads * a.k * a.k;
  const int64_t blocks = (a.gh * a.gw + kMixPositions - 1) / kMixPositions;
  const int64_t b = blockIdx.x / blocks, first = (blockIdx.x % blocks) * kMixPositions;
  for (int64_t pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
    const int64_t h = pair / (a.k * a.k), p = pair % (a.k * a.k);
    const T* g = static_cast<const T*>(a.grad) + b * a.stride_gb;
    const T* v = static_cast<const T*>(a.v) + b * a.stride_vb + h * a.stride_vh;
    float acc = 0.f;
    for (int64_t q = first; q < first + kMixPositions && q < a.gh * a.gw; ++q) {
      const int64_t src = shifted(q, p, 1, a);
      if (src < 0) continue;
      const T* g_row = g + (a.prefix + q) * a.stride_gn;
      const T* v_row = v + (a.prefix + src) * a.stride_vn;
      for (int64_t d = 0; d < a.dim; ++d)
        acc += to_float(g_row[d * a.stride_gd]) * to_float(v_row[d * a.stride_vd]);
    }
    a.part[int64_t(blockIdx.x) * pairs + pair] = acc;
  }
}

template <typename T>
int launch_forward(const HeadMixedConvArgs& a, cudaStream_t stream) {
  const int64_t total = a.batch * a.gh * a.gw * a.dim;
  if (total == 0) return cudaSuccess;
  forward_kernel<T><<<unsigned((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
int launch_grad_v(const HeadMixedConvArgs& a, cudaStream_t stream) {
  const int64_t total = a.batch * a.gh * a.gw * a.heads * a.dim;
  if (total == 0) return cudaSuccess;
  grad_v_kernel<T><<<unsigned((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
int launch_grad_mix(const HeadMixedConvArgs& a, cudaStream_t stream) {
  const int64_t blocks = a.batch * ((a.gh * a.gw + kMixPositions - 1) / kMixPositions);
  if (blocks == 0) return cudaSuccess;
  const int64_t pairs = a.heads * a.k * a.k;
  const int threads = pairs < kThreads ? int((pairs + 31) / 32 * 32) : kThreads;
  grad_mix_kernel<T><<<unsigned(blocks), threads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <template <typename> class Launch>
int dispatch(DType dtype, const HeadMixedConvArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return Launch<float>::run(args, s);
    case DType::kFloat16: return Launch<__half>::run(args, s);
    case DType::kBFloat16: return Launch<__nv_bfloat16>::run(args, s);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct Forward {
  static int run(const HeadMixedConvArgs& a, cudaStream_t s) { return launch_forward<T>(a, s); }
};
template <typename T>
struct GradV {
  static int run(const HeadMixedConvArgs& a, cudaStream_t s) { return launch_grad_v<T>(a, s); }
};
template <typename T>
struct GradMix {
  static int run(const HeadMixedConvArgs& a, cudaStream_t s) { return launch_grad_mix<T>(a, s); }
};

}  // namespace

int head_mixed_conv_forward(DType dtype, const HeadMixedConvArgs& args, void* stream) {
  return dispatch<Forward>(dtype, args, stream);
}

int head_mixed_conv_grad_v(DType dtype, const HeadMixedConvArgs& args, void* stream) {
  return dispatch<GradV>(dtype, args, stream);
}

int head_mixed_conv_grad_mix(DType dtype, const HeadMixedConvArgs& args, void* stream) {
  return dispatch<GradMix>(dtype, args, stream);
}

}  // namespace stitchops
