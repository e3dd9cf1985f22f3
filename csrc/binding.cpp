// stitchops._C: the torch side of the CUDA backend, one translation unit.
//
// Only this file and csrc/binding/ include torch; the kernels in csrc/*.cu include neither
// torch nor anything of this side, so nvcc compiles them against any CUDA toolkit. Each op's
// argument checks, outputs and launches sit in csrc/binding/bind_<op>.h, which adds its functions
// to the module here; csrc/binding/helpers.h holds what they share.
#include <torch/extension.h>

#include <string>

#include "binding/bind_focus_attention.h"
#include "binding/bind_lora.h"
#include "binding/bind_sparse_delta.h"
#include "binding/bind_token_cluster.h"
#include "binding/helpers.h"

#ifndef STITCHOPS_TORCH_VERSION
#define STITCHOPS_TORCH_VERSION "unknown"
#endif
#ifndef STITCHOPS_CUDA_VERSION
#define STITCHOPS_CUDA_VERSION "unknown"
#endif
#ifndef STITCHOPS_CUDA_ARCHS  // the machine code in the module, e.g. "80;90a"
#define STITCHOPS_CUDA_ARCHS "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stitchops CUDA kernels (raw-pointer kernels in csrc/*.cu, bound in csrc/binding/)";
  m.def("torch_version", [] { return std::string(STITCHOPS_TORCH_VERSION); });
  m.def("cuda_version", [] { return std::string(STITCHOPS_CUDA_VERSION); });
  m.def("cuda_archs", [] { return std::string(STITCHOPS_CUDA_ARCHS); });
  m.def("set_poison_outputs", [](bool on) { stitchops::binding::g_poison_outputs = on; });
  stitchops::binding::define_lora(m);
  stitchops::binding::define_sparse_delta(m);
  stitchops::binding::define_token_cluster(m);
  stitchops::binding::define_focus_attention(m);
}
