// The torch side of the sparse-delta linear's kernels (csrc/sparse_delta.h): argument
// checks, outputs, the token splits of the SDDMM, and the Python functions it adds to
// stitchops._C. The GEMMs around them are PyTorch's (stitchops/ops/sparse_delta.py).
#include <algorithm>

#include "binding/helpers.h"
#include "sparse_delta.h"

namespace stitchops::binding {
namespace {

// A split keeps at least this many tokens, so its fixed cost stays small against its work.
int64_t g_min_tokens_per_split = 256;

void check_index(const at::Tensor& index, const at::Tensor& like) {
  TORCH_CHECK(index.device() == like.device(), "index is on ", index.device(), " but x is on ",
              like.device());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index must be int64, got ",
                   index.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.is_contiguous(), "index must be contiguous [nnz]");
}

// W' = W + S(δ) as a new contiguous tensor.
at::Tensor sparse_delta_weight(const at::Tensor& weight, const at::Tensor& delta,
                               const at::Tensor& index, int64_t stream) {
  check_like(weight, "weight", weight);
  check_like(delta, "delta", weight);
  check_index(index, weight);
  TORCH_CHECK(delta.dim() == 1 && delta.numel() == index.numel(),
              "delta and index must both be [nnz]");
  auto w = weight.contiguous().clone();
  auto d = delta.contiguous();
  ScatterDeltaArgs a;
  a.w = w.data_ptr();
  a.delta = d.data_ptr();
  a.index = index.data_ptr<int64_t>();
  a.nnz = index.numel();
  check_status(scatter_delta(dtype_of(weight), a, stream_of(stream)), "delta scatter");
  return w;
}

// Token splits of the SDDMM: four blocks per multiprocessor, each split keeping at least
// g_min_tokens_per_split tokens.
int64_t token_splits(int64_t tokens, int64_t nnz) {
  const int64_t blocks = (nnz + kSddmmEntries - 1) / kSddmmEntries;
  const int64_t wanted = (4 * multiprocessors() + blocks - 1) / blocks;
  return std::max<int64_t>(1, std::min(wanted, tokens / g_min_tokens_per_split));
}

// dδ_j = Σ_t G[t, r_j]·x[t, c_j] for 2-D G [T, OUT] and x [T, IN] (any strides).
at::Tensor sparse_delta_grad(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& index,
                             int64_t stream) {
  TORCH_CHECK(grad_y.dim() == 2 && x.dim() == 2 && grad_y.size(0) == x.size(0),
              "grad_y [T, OUT] and x [T, IN] must be 2-D with the same T");
  check_like(x, "x", x);
  check_like(grad_y, "grad_y", x);
  check_index(index, x);
  const int64_t tokens = x.size(0), nnz = index.numel();
  if (nnz == 0 || tokens == 0) return at::zeros({nnz}, x.options());
  const int64_t wanted = token_splits(tokens, nnz);
  const int64_t per_split = (tokens + wanted - 1) / wanted;
  const int64_t splits = (tokens + per_split - 1) / per_split;
  auto part = new_output({splits, nnz}, x.options().dtype(at::kFloat));
  SddmmArgs a;
  a.grad = grad_y.data_ptr();
  a.stride_gt = grad_y.stride(0);
  a.stride_go = grad_y.stride(1);
  a.x = x.data_ptr();
  a.stride_xt = x.stride(0);
  a.stride_xi = x.stride(1);
  a.index = index.data_ptr<int64_t>();
  a.part = part.data_ptr<float>();
  a.nnz = nnz;
  a.tokens = tokens;
  a.in_features = x.size(1);
  a.tokens_per_split = per_split;
  a.splits = splits;
  check_status(sddmm_partials(dtype_of(x), a, stream_of(stream)), "delta gradient");
  return sum_ranges({{part, 1.0}}, x, stream)[0];
}

}  // namespace

STITCHOPS_BIND(sparse_delta) {
  m.def(
      "pin_min_tokens_per_split",
      [](int64_t tokens) {
        TORCH_CHECK(tokens >= 1, "tokens per split must be >= 1");
        return std::exchange(g_min_tokens_per_split, tokens);
      },
      "set the SDDMM's least tokens per split (tests: several splits at small T); returns the "
      "previous value");
  m.def("sparse_delta_weight", &sparse_delta_weight, "W + S(delta), the scratch weight");
  m.def("sparse_delta_grad", &sparse_delta_grad, "the delta gradient (SDDMM)");
}

}  // namespace stitchops::binding
