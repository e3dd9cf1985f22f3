// Host emulation of __half for tests/cuda_emulator (IEEE binary16, round to nearest even).
#pragma once

#include "cuda_runtime.h"

struct __half {
  _Float16 value;
};

inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
