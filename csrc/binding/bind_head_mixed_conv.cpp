// The torch side of SPViT's head-mixed stencil (csrc/head_mixed_conv.h): argument checks,
// outputs, and the Python functions it adds to stitchops._C (the same entry points as the
// torch and triton backends: stitchops/reference/head_mixed_conv.py has the math).
#include <cmath>
#include <tuple>
#include <vector>

#include "binding/helpers.h"
#include "head_mixed_conv.h"

namespace stitchops::binding {
namespace {

HeadMixedConvArgs make_args(const at::Tensor& v, const at::Tensor& mix, int64_t gh, int64_t gw,
                            int64_t prefix) {
  TORCH_CHECK(v.dim() == 4, "v must be [B, N, H, D]");
  TORCH_CHECK(mix.dim() == 2 && mix.size(0) == v.size(2), "mix must be [H, k²]");
  TORCH_CHECK(v.size(1) == prefix + gh * gw, "v has ", v.size(1), " tokens, not prefix + gh·gw");
  check_like(v, "v", v);
  check_like(mix, "mix", v);
  const auto k = int64_t(std::lround(std::sqrt(double(mix.size(1)))));
  TORCH_CHECK(k * k == mix.size(1) && k % 2 == 1, "mix must have k² columns, k odd");
  HeadMixedConvArgs a;
  a.v = v.data_ptr();
  a.stride_vb = v.stride(0);
  a.stride_vn = v.stride(1);
  a.stride_vh = v.stride(2);
  a.stride_vd = v.stride(3);
  a.batch = v.size(0);
  a.heads = v.size(2);
  a.dim = v.size(3);
  a.gh = gh;
  a.gw = gw;
  a.prefix = prefix;
  a.k = k;
  return a;
}

at::Tensor head_mixed_conv_forward(const at::Tensor& v, const at::Tensor& mix, int64_t gh,
                                   int64_t gw, int64_t prefix, int64_t stream) {
  auto a = make_args(v, mix, gh, gw, prefix);
  auto mix_c = mix.contiguous();
  a.mix = mix_c.data_ptr();
  auto out = new_output({v.size(0), v.size(1), v.size(3)}, v.options());
  out.narrow(1, 0, prefix).zero_();
  a.out = out.data_ptr();
  check_status(stitchops::head_mixed_conv_forward(dtype_of(v), a, stream_of(stream)),
               "head-mixed conv");
  return out;
}

std::tuple<OptTensor, OptTensor> head_mixed_conv_backward(const at::Tensor& grad,
                                                          const at::Tensor& v,
                                                          const at::Tensor& mix, int64_t gh,
                                                          int64_t gw, int64_t prefix,
                                                          std::vector<bool> needs, int64_t stream) {
  TORCH_CHECK(needs.size() == 2, "needs: [v, mix]");
  auto a = make_args(v, mix, gh, gw, prefix);
  check_like(grad, "grad", v);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == v.size(0) && grad.size(1) == v.size(1) &&
                  grad.size(2) == v.size(3),
              "grad must be [B, N, D]");
  auto mix_c = mix.contiguous();
  a.mix = mix_c.data_ptr();
  a.grad = grad.data_ptr();
  a.stride_gb = grad.stride(0);
  a.stride_gn = grad.stride(1);
  a.stride_gd = grad.stride(2);
  OptTensor dv, dmix;
  if (needs[0]) {
    dv = new_output(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
    dv->narrow(1, 0, prefix).zero_();
    a.out = dv->data_ptr();
    check_status(stitchops::head_mixed_conv_grad_v(dtype_of(v), a, stream_of(stream)),
                 "head-mixed conv dv");
  }
  if (needs[1]) {
    const int64_t blocks = v.size(0) * ((gh * gw + kMixPositions - 1) / kMixPositions);
    auto part = new_output({blocks, mix.numel()}, v.options().dtype(at::kFloat));
    a.part = part.data_ptr<float>();
    check_status(stitchops::head_mixed_conv_grad_mix(dtype_of(v), a, stream_of(stream)),
                 "head-mixed conv dmix");
    dmix = blocks > 0 ? sum_ranges({{part, 1.0}}, mix, stream)[0].view(mix.sizes())
                      : at::zeros_like(mix);
  }
  return {dv, dmix};
}

}  // namespace

STITCHOPS_BIND(head_mixed_conv) {
  m.def("head_mixed_conv_forward", &head_mixed_conv_forward, "SPViT's head-mixed stencil");
  m.def("head_mixed_conv_backward", &head_mixed_conv_backward, "its gradients (dv, dmix)");
}

}  // namespace stitchops::binding
