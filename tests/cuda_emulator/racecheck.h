// What every op's race-check driver shares (racecheck.cpp runs them): element types with
// their conversions and tolerances, rounding helpers, the float64 comparison, and the
// registry each racecheck_<op>.cpp adds its check to.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace racecheck {

// An element type with its conversions and the relative error its rounding allows
// (outputs, and S / dS, are rounded to it once).
template <typename T>
struct Dtype;
template <>
struct Dtype<float> {
  static constexpr auto id = stitchops::DType::kFloat32;
  static constexpr const char* name = "fp32";
  static constexpr double tolerance = 1e-5;
  static float from(float v) { return v; }
  static float to(float v) { return v; }
};
template <>
struct Dtype<__half> {
  static constexpr auto id = stitchops::DType::kFloat16;
  static constexpr const char* name = "fp16";
  static constexpr double tolerance = 2e-3;
  static __half from(float v) { return __float2half_rn(v); }
  static float to(__half v) { return __half2float(v); }
};
template <>
struct Dtype<__nv_bfloat16> {
  static constexpr auto id = stitchops::DType::kBFloat16;
  static constexpr const char* name = "bf16";
  static constexpr double tolerance = 1e-2;
  static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
};

template <typename T>
inline std::vector<T> narrow(std::vector<float>& v) {  // rounds v in place, returns it as T
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    out[i] = Dtype<T>::from(v[i]);
    v[i] = Dtype<T>::to(out[i]);
  }
  return out;
}

template <typename T>
inline std::vector<float> widen(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Dtype<T>::to(v[i]);
  return out;
}

inline double max_rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double err = 0, scale = 1e-30;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    err = std::max(err, std::abs(got[i] - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  return err / scale;
}

// Prints one line (``where``: the problem, ``what``: the result) and whether ``got`` is
// within T's tolerance of the float64 ``want``.
template <typename T>
bool check(const std::string& where, const char* what, const std::vector<float>& got,
           const std::vector<double>& want) {
  const double err = max_rel_err(got, want);
  std::printf("%s %s %-6s rel err %.2e\n", Dtype<T>::name, where.c_str(), what, err);
  return err < Dtype<T>::tolerance;
}

// Each op's driver (racecheck_<op>.cpp) registers one check at static initialisation: it
// runs that op's kernels at a few shapes in every dtype, against float64 loops.
using Check = bool (*)();
inline std::vector<std::pair<const char*, Check>>& registered() {
  static std::vector<std::pair<const char*, Check>> checks;
  return checks;
}
struct Register {
  Register(const char* op, Check run) { registered().emplace_back(op, run); }
};

}  // namespace racecheck
