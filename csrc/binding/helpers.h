// The torch side every op's binding shares: how a binding registers itself, tensor checks,
// dtype mapping, poisoned output allocation, status checks, device queries and the
// range-sum step (common.h).
//
// Each csrc/binding/bind_<op>.cpp is its own translation unit (setup.py compiles every one it
// finds) and adds its functions to stitchops._C with ``STITCHOPS_BIND(<op>) { m.def(...); }``:
// a static registrar that csrc/binding.cpp runs when the module is imported, so no shared
// file names an op. The stream comes from Python as an integer
// (torch.cuda.current_stream().cuda_stream, passed by stitchops._cuda with a device guard),
// so nothing here needs a CUDA header; ATen and torch's pybind11 casters are all the torch
// it takes (lighter to compile than torch/extension.h).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "common.h"

// tests/cuda_emulator builds the binding with -DSTITCHOPS_HOST_EMULATION against CPU torch,
// linked with the kernels compiled for host threads: there the "device" tensors are CPU ones.
#ifdef STITCHOPS_HOST_EMULATION
constexpr bool kHostEmulation = true;
#else
constexpr bool kHostEmulation = false;
#endif

namespace stitchops::binding {

// The functions that add each op's entry points to the module, in registration order
// (defined in csrc/binding.cpp; a function-local static, so any static initialiser may use it).
using Definer = void (*)(pybind11::module_&);
std::vector<Definer>& definers();

struct Registrar {
  explicit Registrar(Definer define) { definers().push_back(define); }
};

using OptTensor = std::optional<at::Tensor>;

// Tests set this to fill every buffer a kernel must overwrite with NaN (stitchops._runtime).
inline bool g_poison_outputs = false;

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return g_poison_outputs ? at::full(sizes, std::numeric_limits<float>::quiet_NaN(), options)
                          : at::empty(sizes, options);
}

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "stitchops CUDA kernels take float16, bfloat16 or float32, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;
}

// ``t`` is a device tensor on x's device with x's dtype.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(kHostEmulation ? t.is_cpu() : t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(),
                   " but x has ", x.scalar_type());
}

inline void check_status(int code, const char* what) {
  TORCH_CHECK(code == 0, "stitchops CUDA ", what, " failed: ", error_string(code));
}

inline void* stream_of(int64_t stream) { return reinterpret_cast<void*>(stream); }

inline int64_t multiprocessors() {
  int count = 0;
  check_status(device_multiprocessors(&count), "device query");
  return count;
}

// scale_i · parts[i].sum(0) in like's dtype, for fp32 partials [ranges, ...] (undefined:
// skipped, an empty result), in one launch of sum_ranges.cu.
inline std::vector<at::Tensor> sum_ranges(const std::vector<std::pair<at::Tensor, double>>& parts,
                                          const at::Tensor& like, int64_t stream) {
  TORCH_CHECK(parts.size() <= kMaxRangeSums, "sum_ranges: too many buffers");
  RangeSumArgs args;
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& [part, scale] = parts[i];
    if (!part.defined()) {
      outs.push_back(at::empty({0}, like.options()));
      continue;
    }
    TORCH_CHECK(part.scalar_type() == at::kFloat && part.is_contiguous() && part.dim() >= 1,
                "sum_ranges: partials must be contiguous float32 [ranges, ...]");
    args.ranges = part.size(0);
    auto out = new_output(part.sizes().slice(1), like.options());
    args.sums[i] = {part.data_ptr<float>(), out.data_ptr(), out.numel(), float(scale)};
    outs.push_back(out);
  }
  check_status(stitchops::sum_ranges(dtype_of(like), args, stream_of(stream)), "partial sums");
  return outs;
}

}  // namespace stitchops::binding

// ``STITCHOPS_BIND(op) { m.def(...); }``: the body runs on ``m``, the stitchops._C module,
// when it is imported.
#define STITCHOPS_BIND(op)                                                                      \
  static void stitchops_define_##op(pybind11::module_& m);                                      \
  static const ::stitchops::binding::Registrar stitchops_registrar_##op(stitchops_define_##op); \
  static void stitchops_define_##op(pybind11::module_& m)
