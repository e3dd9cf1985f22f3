// stitchops._C: the torch side of the CUDA backend.
//
// Only this file and csrc/binding/ include torch; the kernels in csrc/*.cu include neither
// torch nor anything of this side, so nvcc compiles them against any CUDA toolkit. Each op's
// argument checks, outputs and launches sit in csrc/binding/bind_<op>.cpp, which registers
// the functions it adds to the module (STITCHOPS_BIND, csrc/binding/helpers.h); this file
// names no op: it defines the module and runs every registered definer.
#include <string>
#include <vector>

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

namespace stitchops::binding {

std::vector<Definer>& definers() {
  static std::vector<Definer> registered;
  return registered;
}

}  // namespace stitchops::binding

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stitchops CUDA kernels (raw-pointer kernels in csrc/*.cu, bound in csrc/binding/)";
  m.def("torch_version", [] { return std::string(STITCHOPS_TORCH_VERSION); });
  m.def("cuda_version", [] { return std::string(STITCHOPS_CUDA_VERSION); });
  m.def("cuda_archs", [] { return std::string(STITCHOPS_CUDA_ARCHS); });
  m.def("set_poison_outputs", [](bool on) { stitchops::binding::g_poison_outputs = on; });
  for (auto define : stitchops::binding::definers()) define(m);
}
