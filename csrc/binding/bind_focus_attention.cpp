// The torch side of FASeg's focus cross-attention (csrc/focus_attention.h): the call's
// geometry, the output buffers and the order of the kernels, with the same entry points as
// the torch and triton backends (stitchops/reference/focus_attention.py has the math).
#include <tuple>
#include <vector>

#include "binding/helpers.h"
#include "focus_attention.h"

namespace stitchops::binding {
namespace {

using Four = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A call's geometry, its contiguous inputs and the index tables the kernels read.
struct FocusCall {
  FocusGeometry g;
  at::Tensor q, k, v, pos;
  std::vector<at::Tensor> tables;  // keeps the window table, mask and reset flags alive
};

FocusCall focus_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const OptTensor& mask, const OptTensor& windows, int64_t window_size,
                     int64_t map_width, const OptTensor& pos, double scale) {
  check_like(q, "q", q);
  check_like(k, "k", q);
  check_like(v, "v", q);
  if (pos.has_value()) check_like(*pos, "pos", q);
  FocusCall c;
  c.q = q.contiguous(), c.k = k.contiguous(), c.v = v.contiguous();
  c.pos = pos.has_value() ? pos->contiguous() : at::Tensor();
  FocusGeometry& g = c.g;
  g.batch = q.size(0), g.heads = q.size(1), g.queries = q.size(2), g.dim = q.size(3);
  g.keys = k.size(2), g.pos_dim = pos.has_value() ? pos->size(2) : 0;
  g.scale = float(scale);
  TORCH_CHECK(g.dim <= kFocusMaxDim && g.pos_dim <= kFocusMaxPos,
              "the cuda kernels take D <= 128 and P <= 256");
  g.slots = g.keys;
  if (windows.has_value()) {
    auto table = windows->to(at::kInt).contiguous();
    c.tables.push_back(table);
    g.mode = windows->size(1) > 1 ? 3 : 2;
    g.sets = windows->size(2), g.ws = window_size, g.map_width = map_width;
    g.slots = g.sets * window_size * window_size;
    g.windows = table.data_ptr<int32_t>();
  } else if (mask.has_value()) {
    auto blocked = mask->contiguous().view(at::kChar);
    auto reset = mask->all(-1).contiguous().view(at::kChar);
    c.tables = {blocked, reset};
    g.mode = 1, g.mask_heads = mask->size(1);
    g.mask = blocked.data_ptr<int8_t>(), g.reset = reset.data_ptr<int8_t>();
  }
  return c;
}

FocusTensors focus_tensors(const FocusCall& c) {
  FocusTensors t;
  t.q = c.q.data_ptr(), t.k = c.k.data_ptr(), t.v = c.v.data_ptr();
  t.pos = c.pos.defined() ? c.pos.data_ptr() : nullptr;
  return t;
}

at::TensorOptions f32(const at::Tensor& like) { return like.options().dtype(at::kFloat); }

Four focus_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const OptTensor& mask, const OptTensor& windows, int64_t window_size,
                             int64_t map_width, const OptTensor& pos, double scale,
                             bool return_scores, int64_t stream) {
  auto c = focus_call(q, k, v, mask, windows, window_size, map_width, pos, scale);
  const FocusGeometry& g = c.g;
  const DType dtype = dtype_of(q);
  auto t = focus_tensors(c);
  auto out = new_output(q.sizes(), q.options());
  auto lse = new_output({g.batch, g.heads, g.queries}, f32(q));
  check_status(focus_forward(dtype, g, t, out.data_ptr(), lse.data_ptr<float>(), stream_of(stream)),
               "focus attention");
  t.lse = lse.data_ptr<float>();
  auto pos_out = at::zeros({g.batch, g.queries, g.pos_dim}, q.options());
  if (pos.has_value()) {
    auto pos32 = new_output({g.batch, g.queries, g.pos_dim}, f32(q));
    check_status(focus_mean_pos(dtype, g, t, pos32.data_ptr<float>(), stream_of(stream)),
                 "focus attention pos");
    pos_out = pos32.to(q.scalar_type());
  }
  auto scores = at::zeros({g.batch, 0}, q.options());
  if (return_scores) {
    auto scores32 = new_output({g.batch, g.keys}, f32(q));
    check_status(
        focus_key_means(dtype, g, t, scores32.data_ptr<float>(), nullptr, stream_of(stream)),
        "focus attention scores");
    scores = scores32.to(q.scalar_type());
  }
  return {out, pos_out, scores, lse};
}

Four focus_attention_backward(const at::Tensor& dout, const at::Tensor& dpos_out,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const OptTensor& mask, const OptTensor& windows, int64_t window_size,
                              int64_t map_width, const OptTensor& pos, double scale,
                              const at::Tensor& out, const at::Tensor& lse, int64_t stream) {
  auto c = focus_call(q, k, v, mask, windows, window_size, map_width, pos, scale);
  check_like(dout, "dout", q);
  check_like(out, "out", q);
  const FocusGeometry& g = c.g;
  const DType dtype = dtype_of(q);
  auto dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  auto dpos_c = dpos_out.contiguous();
  auto t = focus_tensors(c);
  t.out = out_c.data_ptr(), t.dout = dout_c.data_ptr(), t.lse = lse_c.data_ptr<float>();
  t.dpos_out = pos.has_value() ? dpos_c.data_ptr() : nullptr;
  auto delta = new_output({g.batch, g.heads, g.queries}, f32(q));
  check_status(focus_delta(dtype, g, t, delta.data_ptr<float>(), stream_of(stream)),
               "focus attention delta");
  t.delta = delta.data_ptr<float>();
  auto dq = new_output(q.sizes(), q.options());
  check_status(focus_dq(dtype, g, t, dq.data_ptr(), stream_of(stream)), "focus attention dq");
  auto dk = new_output(k.sizes(), k.options()), dv = new_output(v.sizes(), v.options());
  check_status(focus_dkdv(dtype, g, t, dk.data_ptr(), dv.data_ptr(), stream_of(stream)),
               "focus attention dk, dv");
  auto dpos = at::zeros({g.batch, g.keys, 0}, q.options());
  if (pos.has_value()) {
    dpos = new_output(pos->sizes(), q.options());
    check_status(focus_key_means(dtype, g, t, nullptr, dpos.data_ptr(), stream_of(stream)),
                 "focus attention dpos");
  }
  return {dq, dk, dv, dpos};
}

}  // namespace

STITCHOPS_BIND(focus_attention) {
  m.def("focus_attention_forward", &focus_attention_forward, "FASeg focus cross-attention");
  m.def("focus_attention_backward", &focus_attention_backward, "its backward");
}

}  // namespace stitchops::binding
