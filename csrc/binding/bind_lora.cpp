// The torch side of the fused LoRA stitching projection (csrc/lora.h): argument checks,
// outputs, launch sizes, and the Python functions it adds to stitchops._C.
//
//   y = x · Wᵀ + b + b_s + scale · (x · Aᵀ) · Bᵀ        (SN-Netv2 LoRA SL, ESTA stitch bias)
#include <algorithm>
#include <vector>

#include "binding/helpers.h"
#include "lora.h"

namespace stitchops::binding {
namespace {

// Tests pin this to run every forward launch with that many column tiles per block (0: the
// choice below).
int64_t g_pinned_column_tiles = 0;

// Output column tiles per forward block (lora.h: LowRankMatmulArgs::column_tiles). Each
// extra tile saves a recompute of S, R / kBlockN of the tile's MMA work, but the grid
// shrinks: take 4 or 2 while the grid keeps 8 blocks per multiprocessor (several waves, so
// the last one's tail stays short), else 1. At 256×197 tokens, OUT 1024 on 132 SMs: 788 row
// blocks × 4 groups of 4 tiles = 3,152 blocks.
int64_t forward_column_tiles(int64_t tokens, int64_t out_f, int64_t rank) {
  if (g_pinned_column_tiles > 0) return g_pinned_column_tiles;
  if (rank == 0) return 1;
  const int64_t row_blocks = (tokens + kBlockM - 1) / kBlockM;
  const int64_t tiles = (out_f + kBlockN - 1) / kBlockN;
  const int64_t wanted = 8 * multiprocessors();
  for (int64_t c : {4, 2})
    if (tiles >= c && row_blocks * ((tiles + c - 1) / c) >= wanted) return c;
  return 1;
}

// out = x · Wᵀ + bias + extra_bias + scale · (x · Aᵀ) · Bᵀ for 2-D x; returns {y, S}.
std::vector<at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const OptTensor& bias, const OptTensor& lora_a,
                                     const OptTensor& lora_b, double scale,
                                     const OptTensor& extra_bias, bool save_s, int64_t stream) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "x and weight must be 2-D");
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1),
              " features but weight has IN = ", weight.size(1));
  check_like(x, "x", x);
  check_like(weight, "weight", x);
  const bool has_lora = lora_a.has_value();
  TORCH_CHECK(has_lora == lora_b.has_value(), "lora_a and lora_b must be given together");
  const int64_t tokens = x.size(0), in_f = x.size(1), out_f = weight.size(0);
  const int64_t rank = has_lora ? lora_a->size(0) : 0;
  TORCH_CHECK(rank <= kMaxRank, "rank ", rank, " > ", kMaxRank);
  if (has_lora) {
    check_like(*lora_a, "lora_a", x);
    check_like(*lora_b, "lora_b", x);
    TORCH_CHECK(lora_a->size(1) == in_f && lora_b->size(0) == out_f && lora_b->size(1) == rank,
                "lora_a must be [R, IN] and lora_b [OUT, R]");
  }
  for (const auto* vec : {&bias, &extra_bias})
    if (vec->has_value()) {
      check_like(**vec, "bias", x);
      TORCH_CHECK((*vec)->numel() == out_f && (*vec)->stride(0) == 1,
                  "biases must be contiguous [OUT]");
    }

  auto y = new_output({tokens, out_f}, x.options());
  const bool keep_s = save_s && has_lora;
  auto s = new_output({keep_s ? tokens : 0, keep_s ? rank : 0}, x.options().dtype(at::kFloat));
  LowRankMatmulArgs a;
  a.x = x.data_ptr();
  a.stride_xm = x.stride(0);
  a.stride_xk = x.stride(1);
  a.w = weight.data_ptr();
  a.stride_wk = weight.stride(1);
  a.stride_wn = weight.stride(0);
  if (has_lora) {
    a.l1 = lora_a->data_ptr();
    a.stride_l1k = lora_a->stride(1);
    a.stride_l1r = lora_a->stride(0);
    a.l2 = lora_b->data_ptr();
    a.stride_l2r = lora_b->stride(1);
    a.stride_l2n = lora_b->stride(0);
  }
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.bias2 = extra_bias.has_value() ? extra_bias->data_ptr() : nullptr;
  a.out = y.data_ptr();
  a.stride_om = y.stride(0);
  a.stride_on = y.stride(1);
  a.s_out = keep_s ? s.data_ptr<float>() : nullptr;
  a.stride_sm = std::max<int64_t>(rank, 1);
  a.M = tokens;
  a.N = out_f;
  a.K = in_f;
  a.R = rank;
  a.scale = static_cast<float>(scale);
  a.k_per_split = std::max<int64_t>(in_f, 1);
  a.column_tiles = static_cast<int>(forward_column_tiles(tokens, out_f, rank));
  check_status(stitchops::lowrank_matmul(dtype_of(x), a, stream_of(stream)), "lora forward");
  return {y, s};
}

// dW = dyᵀ · x [OUT, IN], split over tokens so a small [OUT, IN] still fills the device.
at::Tensor weight_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                       int64_t stream) {
  const int64_t tokens = x.size(0), in_f = x.size(1), out_f = dy.size(1);
  if (tokens == 0) return at::zeros_like(weight);
  const int64_t tiles = ((out_f + 63) / 64) * ((in_f + 63) / 64);
  int64_t splits =
      std::max<int64_t>(1, std::min<int64_t>(2 * multiprocessors() / tiles, (tokens + 511) / 512));
  const int64_t k_per_split = (tokens + splits - 1) / splits;
  splits = (tokens + k_per_split - 1) / k_per_split;
  auto partial = new_output({splits, out_f, in_f}, x.options().dtype(at::kFloat));
  LowRankMatmulArgs a;
  a.x = dy.data_ptr();
  a.stride_xm = dy.stride(1);
  a.stride_xk = dy.stride(0);
  a.w = x.data_ptr();
  a.stride_wk = x.stride(0);
  a.stride_wn = x.stride(1);
  a.out = partial.data_ptr();
  a.out_fp32 = true;
  a.stride_oz = partial.stride(0);
  a.stride_om = partial.stride(1);
  a.stride_on = partial.stride(2);
  a.M = out_f;
  a.N = in_f;
  a.K = tokens;
  a.k_per_split = k_per_split;
  a.splits = static_cast<int>(splits);
  check_status(stitchops::lowrank_matmul(dtype_of(x), a, stream_of(stream)), "lora weight grad");
  return sum_ranges({{partial, 1.0}}, x, stream)[0];  // weight has x's dtype (checked)
}

// Returns {dx, dW, dA, dB, dbias}, each where its flag in ``needs`` (same order) is set; a
// gradient not asked for is an empty tensor.
std::vector<at::Tensor> lora_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                      const at::Tensor& weight, const OptTensor& lora_a,
                                      const OptTensor& lora_b, const at::Tensor& s, double scale,
                                      const std::vector<bool>& needs, int64_t stream) {
  TORCH_CHECK(needs.size() == 5, "needs must be 5 flags (x, weight, lora_a, lora_b, bias)");
  const bool need_x = needs[0], need_weight = needs[1], need_bias = needs[4];
  check_like(grad_y, "grad_y", x);
  check_like(weight, "weight", x);
  const bool has_lora = lora_a.has_value();
  const bool need_a = needs[2] && has_lora, need_b = needs[3] && has_lora;
  const int64_t tokens = x.size(0), in_f = x.size(1), out_f = weight.size(0);
  const int64_t rank = has_lora ? lora_a->size(0) : 0;
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == tokens && grad_y.size(1) == out_f,
              "grad_y must be [T, OUT]");
  TORCH_CHECK(
      !need_b || (s.dim() == 2 && s.size(0) == tokens && s.size(1) == rank && s.is_contiguous()),
      "S saved by the forward must be a contiguous [T, R] float32 tensor");
  auto empty = at::empty({0}, x.options());
  at::Tensor dw = need_weight ? weight_grad(grad_y, x, weight, stream) : empty;
  if (!(need_x || need_a || need_b || need_bias)) return {empty, dw, empty, empty, empty};

  const int64_t in_tiles = (in_f + kBlockN - 1) / kBlockN;
  const int64_t wanted =
      std::max<int64_t>(1, 2 * multiprocessors() / std::max<int64_t>(in_tiles, 1));
  const int64_t per_range = (std::max<int64_t>(tokens, 1) + wanted - 1) / wanted;
  const int64_t rows_per_range = (per_range + kBlockM - 1) / kBlockM * kBlockM;
  const int64_t ranges = (tokens + rows_per_range - 1) / rows_per_range;
  auto f32 = x.options().dtype(at::kFloat);
  // Every range writes its whole slice of the partials, so none needs zeroing.
  at::Tensor dx = need_x ? new_output({tokens, in_f}, x.options()) : empty;
  at::Tensor da_part = need_a ? new_output({ranges, rank, in_f}, f32) : empty;
  at::Tensor db_part = need_b ? new_output({ranges, out_f, rank}, f32) : empty;
  at::Tensor dbias_part = need_bias ? new_output({ranges, out_f}, f32) : empty;
  TORCH_CHECK(in_f > 0 && out_f > 0, "IN and OUT must be >= 1");

  LoraBackwardArgs a;
  a.dy = grad_y.data_ptr();
  a.stride_dym = grad_y.stride(0);
  a.stride_dyo = grad_y.stride(1);
  a.w = weight.data_ptr();
  a.stride_wo = weight.stride(0);
  a.stride_wi = weight.stride(1);
  if (has_lora) {
    check_like(*lora_a, "lora_a", x);
    check_like(*lora_b, "lora_b", x);
    a.a = lora_a->data_ptr();
    a.stride_ar = lora_a->stride(0);
    a.stride_ai = lora_a->stride(1);
    a.b = lora_b->data_ptr();
    a.stride_bo = lora_b->stride(0);
    a.stride_br = lora_b->stride(1);
  }
  if (need_a) a.da_part = da_part.data_ptr<float>();
  if (need_b) {
    a.s = s.data_ptr<float>();
    a.stride_sm = s.stride(0);
    a.db_part = db_part.data_ptr<float>();
  }
  a.x = x.data_ptr();
  a.stride_xm = x.stride(0);
  a.stride_xi = x.stride(1);
  if (need_x) {
    a.dx = dx.data_ptr();
    a.stride_dxm = dx.stride(0);
    a.stride_dxi = dx.stride(1);
  }
  a.dbias_part = need_bias ? dbias_part.data_ptr<float>() : nullptr;
  a.M = tokens;
  a.IN = in_f;
  a.OUT = out_f;
  a.R = rank;
  a.scale = static_cast<float>(scale);
  a.rows_per_range = rows_per_range;
  a.ranges = static_cast<int>(ranges);
  check_status(stitchops::lora_backward(dtype_of(x), a, stream_of(stream)), "lora backward");

  auto sums = sum_ranges({{need_a ? da_part : at::Tensor(), scale},
                          {need_b ? db_part : at::Tensor(), scale},
                          {need_bias ? dbias_part : at::Tensor(), 1.0}},
                         x, stream);
  return {dx, dw, sums[0], sums[1], sums[2]};
}

}  // namespace

STITCHOPS_BIND(lora) {
  m.def(
      "pin_column_tiles",
      [](int64_t tiles) {
        TORCH_CHECK_VALUE(tiles >= 0 && tiles <= 64, "column tiles must be in 0..64, got ", tiles);
        const int64_t previous = g_pinned_column_tiles;
        g_pinned_column_tiles = tiles;
        return previous;
      },
      "run every forward with this many column tiles per block (0: choose per call); "
      "returns the pin it replaces");
  m.def("forward_column_tiles", &forward_column_tiles,
        "column tiles per block a forward of [tokens, OUT] at this rank runs");
  m.def("lora_forward", &lora_forward, "fused LoRA stitching projection, forward");
  m.def("lora_backward", &lora_backward, "fused LoRA stitching projection, backward");
}

}  // namespace stitchops::binding
