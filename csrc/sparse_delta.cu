// Sparse-delta linear (SPT): scatter of δ into the scratch W' and the SDDMM for dδ. See
// sparse_delta.h for the interface.
//
// SDDMM: block (entry block, token split) of kSddmmLanes warps. Lane tx of warp ty holds
// entry j = block·32 + tx and sums G[t, r_j]·x[t, c_j] over the split's tokens t ≡ ty
// (mod kSddmmLanes) in fp32. Sorted indices put a warp's 32 entries in one or a few rows of G
// (one broadcast load) and in nearby columns of x (few cache lines). The warps' sums meet in
// shared memory and are added in lane order by the first warp, which writes the split's
// partial: a fixed order, so results repeat bit for bit.
// FLOPs 2·T·nnz; bytes at least T·(IN + OUT)·s, the gathers touch 2·T·nnz elements.
#include <cuda_runtime.h>

#include "convert.cuh"
#include "sparse_delta.h"

namespace stitchops {
namespace {

constexpr int kScatterThreads = 256;
constexpr int kSddmmThreads = kSddmmEntries * kSddmmLanes;

template <typename T>
__global__ void __launch_bounds__(kScatterThreads) scatter_delta_kernel(ScatterDeltaArgs a) {
  const int64_t j = int64_t(blockIdx.x) * kScatterThreads + threadIdx.x;
  if (j >= a.nnz) return;
  T* w = static_cast<T*>(a.w);
  const int64_t at = a.index[j];
  const float sum = to_float(w[at]) + to_float(static_cast<const T*>(a.delta)[j]);
  w[at] = from_float<T>(sum);
}

template <typename T>
__global__ void __launch_bounds__(kSddmmThreads) sddmm_kernel(SddmmArgs a) {
  __shared__ float sums[kSddmmLanes][kSddmmEntries];
  const int tx = threadIdx.x % kSddmmEntries, ty = threadIdx.x / kSddmmEntries;
  const int64_t j = int64_t(blockIdx.x) * kSddmmEntries + tx;
  const int64_t split = blockIdx.y;
  const T* grad = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.x);
  float acc = 0.f;
  if (j < a.nnz) {
    const int64_t idx = a.index[j];
    const int64_t row = idx / a.in_features, col = idx - row * a.in_features;
    const T* g = grad + row * a.stride_go;
    const T* xc = x + col * a.stride_xi;
    const int64_t t_begin = split * a.tokens_per_split;
    const int64_t t_end =
        t_begin + a.tokens_per_split < a.tokens ? t_begin + a.tokens_per_split : a.tokens;
    for (int64_t t = t_begin + ty; t < t_end; t += kSddmmLanes)
      acc += to_float(g[t * a.stride_gt]) * to_float(xc[t * a.stride_xt]);
  }
  sums[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < a.nnz) {
    float total = 0.f;
    for (int lane = 0; lane < kSddmmLanes; ++lane) total += sums[lane][tx];
    a.part[split * a.nnz + j] = total;
  }
}

template <typename T>
int launch_scatter(const ScatterDeltaArgs& a, cudaStream_t stream) {
  if (a.nnz == 0) return cudaSuccess;
  const int64_t blocks = (a.nnz + kScatterThreads - 1) / kScatterThreads;
  scatter_delta_kernel<T><<<unsigned(blocks), kScatterThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
int launch_sddmm(const SddmmArgs& a, cudaStream_t stream) {
  if (a.nnz == 0 || a.splits == 0) return cudaSuccess;
  const int64_t blocks = (a.nnz + kSddmmEntries - 1) / kSddmmEntries;
  const dim3 grid(unsigned(blocks), unsigned(a.splits));
  sddmm_kernel<T><<<grid, kSddmmThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int scatter_delta(DType dtype, const ScatterDeltaArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch_scatter<float>(args, s);
    case DType::kFloat16: return launch_scatter<__half>(args, s);
    case DType::kBFloat16: return launch_scatter<__nv_bfloat16>(args, s);
  }
  return cudaErrorInvalidValue;
}

int sddmm_partials(DType dtype, const SddmmArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch_sddmm<float>(args, s);
    case DType::kFloat16: return launch_sddmm<__half>(args, s);
    case DType::kBFloat16: return launch_sddmm<__nv_bfloat16>(args, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace stitchops
