// Device queries and error strings for every op's binding (common.h).
#include <cuda_runtime.h>

#include "common.h"

namespace stitchops {

int device_multiprocessors(int* count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace stitchops
