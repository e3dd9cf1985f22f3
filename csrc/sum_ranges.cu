// A deterministic reduction's last step: per-range fp32 partials (LoRA's dA, dB, bias
// gradient and dW) summed over ranges, scaled and rounded to the output dtype, for up to
// three buffers in one launch (in PyTorch: a sum, a multiply and a cast per gradient). See
// common.h.
//
// One thread per output element; blocks take the elements of buffer 0 first, then 1, then
// 2. A thread reads its column of partials top to bottom, coalesced across the warp, with
// several loads in flight (unrolled). Memory-bound: 4·ranges·Σn bytes read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "convert.cuh"

namespace stitchops {
namespace {

constexpr int kThreads = 256;

__host__ __device__ int64_t blocks_of(int64_t n) { return (n + kThreads - 1) / kThreads; }

template <typename T>
__global__ void __launch_bounds__(kThreads) sum_ranges_kernel(RangeSumArgs a) {
  int64_t block = blockIdx.x;
  int i = 0;
  for (; i < kMaxRangeSums; ++i) {  // which buffer this block's elements belong to
    const int64_t blocks = blocks_of(a.sums[i].n);
    if (block < blocks) break;
    block -= blocks;
  }
  if (i == kMaxRangeSums) return;
  const float* part = a.sums[i].part;
  const int64_t n = a.sums[i].n;
  const int64_t c = block * kThreads + threadIdx.x;
  if (c >= n) return;
  float acc = 0.f;
#pragma unroll 8
  for (int64_t z = 0; z < a.ranges; ++z) acc += part[z * n + c];
  static_cast<T*>(a.sums[i].out)[c] = from_float<T>(acc * a.sums[i].scale);
}

template <typename T>
int launch(const RangeSumArgs& a, cudaStream_t stream) {
  int64_t blocks = 0;
  for (const RangeSum& s : a.sums) blocks += blocks_of(s.n);
  if (blocks == 0) return cudaSuccess;
  sum_ranges_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int sum_ranges(DType dtype, const RangeSumArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch<float>(args, s);
    case DType::kFloat16: return launch<__half>(args, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(args, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace stitchops
