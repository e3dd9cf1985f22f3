// What every op's CUDA kernels share: the element-type tag, error strings, device queries,
// and the last step of a deterministic reduction over token ranges (sum_ranges.cu).
//
// No torch and no CUDA header here: tensors are raw pointers with element strides, the
// stream is a void* (a cudaStream_t), errors come back as cudaError_t codes (0 = success).
// An op's own header (lora.h, ...) includes this one.
#pragma once

#include <cstdint>

namespace stitchops {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A deterministic reduction's last step, for up to three fp32 partial buffers at once:
//   out_i[c] = scale_i · Σ_z part_i[z·n_i + c]   (z < ranges, c < n_i; out_i in dtype).
// Kernels that reduce over tokens write one partial per token range (no atomics); this sums
// them in order in one launch. Unused buffers have n = 0.
struct RangeSum {
  const float* part = nullptr;  // [ranges, n] contiguous
  void* out = nullptr;          // [n] contiguous, of the call's dtype
  int64_t n = 0;
  float scale = 1.f;
};
constexpr int kMaxRangeSums = 3;
struct RangeSumArgs {
  RangeSum sums[kMaxRangeSums];
  int64_t ranges = 0;
};

int sum_ranges(DType dtype, const RangeSumArgs& args, void* stream);
int device_multiprocessors(int* count);  // of the current device
const char* error_string(int code);

}  // namespace stitchops
