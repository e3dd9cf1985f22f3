// The torch side of Expedit's token clustering and local reconstruction (csrc/token_cluster.h):
// the band table, the EM iterations and the backward adjoints around the band kernels, and
// the Python functions it adds to stitchops._C (the same entry points as the torch and triton
// backends: stitchops/reference/token_cluster.py has the math).
#include <optional>
#include <string>
#include <vector>

#include "binding/helpers.h"
#include "token_cluster.h"

namespace stitchops::binding {
namespace {

// The source index of each of ``out`` positions under PyTorch's nearest interpolation from
// ``in`` (taken from ATen's own upsample_nearest1d).
at::Tensor cell_index(int64_t out, int64_t in) {
  auto source = at::arange(in, at::TensorOptions().dtype(at::kFloat)).view({1, 1, in});
  const std::vector<int64_t> size{out};
  return at::upsample_nearest1d(source, at::IntArrayRef(size)).view({out}).to(at::kLong);
}

struct Bands {
  std::vector<at::Tensor> arrays;  // keeps the device arrays of ``table`` alive
  BandTable table;
};

Bands make_bands(int64_t height, int64_t width, int64_t h, int64_t w, int64_t window,
                 const at::Tensor& like) {
  const int64_t r = window / 2;
  auto cy = cell_index(height, h), cx = cell_index(width, w);
  const auto* rows = cy.data_ptr<int64_t>();
  const auto* columns = cx.data_ptr<int64_t>();
  std::vector<int32_t> column_start(w + 1);  // the first pixel column of cell column >= j
  for (int64_t j = 0, col = 0; j <= w; ++j) {
    while (col < width && columns[col] < j) ++col;
    column_start[j] = int32_t(col);
  }
  std::vector<int32_t> pixel_start(h), pixel_count(h), centre_start(h), centre_count(h);
  int64_t max_pixels = 0, max_centres = 0;
  for (int64_t row = 0, y = 0; row < h; ++row) {
    const int64_t first = y;
    while (y < height && rows[y] == row) ++y;
    const int64_t low = row - r > 0 ? row - r : 0, high = row + r + 1 < h ? row + r + 1 : h;
    pixel_start[row] = int32_t(first * width);
    pixel_count[row] = int32_t((y - first) * width);
    centre_start[row] = int32_t(low * w);
    centre_count[row] = int32_t((high - low) * w);
    max_pixels = std::max<int64_t>(max_pixels, pixel_count[row]);
    max_centres = std::max<int64_t>(max_centres, centre_count[row]);
  }
  auto on_device = [&](const std::vector<int32_t>& v) {
    return at::tensor(v, at::TensorOptions().dtype(at::kInt)).to(like.device());
  };
  Bands b;
  b.arrays = {on_device(pixel_start),
              on_device(pixel_count),
              on_device(centre_start),
              on_device(centre_count),
              cx.to(at::kInt).to(like.device()),
              on_device(column_start)};
  b.table.pixel_start = b.arrays[0].data_ptr<int32_t>();
  b.table.pixel_count = b.arrays[1].data_ptr<int32_t>();
  b.table.centre_start = b.arrays[2].data_ptr<int32_t>();
  b.table.centre_count = b.arrays[3].data_ptr<int32_t>();
  b.table.cell_column = b.arrays[4].data_ptr<int32_t>();
  b.table.column_start = b.arrays[5].data_ptr<int32_t>();
  b.table.grid_h = h;
  b.table.grid_w = w;
  b.table.width = width;
  b.table.radius = r;
  b.table.max_pixels = max_pixels;
  b.table.max_centres = max_centres;
  return b;
}

at::TensorOptions fp32_like(const at::Tensor& t) { return t.options().dtype(at::kFloat); }

// a [B, N, max_centres] fp32: each pixel's softmax weights over its band's candidates.
at::Tensor affinities(const at::Tensor& x3, const at::Tensor& s3, const Bands& bands,
                      double temperature, int64_t stream) {
  auto a = new_output({x3.size(0), x3.size(1), bands.table.max_centres}, fp32_like(x3));
  AffinityArgs g;
  g.x = x3.data_ptr();
  g.s = s3.data_ptr<float>();
  g.a = a.data_ptr<float>();
  g.batch = x3.size(0);
  g.pixels = x3.size(1);
  g.centres = s3.size(1);
  g.channels = x3.size(2);
  g.inv_temperature = float(1.0 / temperature);
  check_status(band_affinity(dtype_of(x3), bands.table, g, stream_of(stream)), "band weights");
  return a;
}

// Σ_q a·v per pixel (added to ``into`` when given): [B, N, D] fp32.
at::Tensor apply_weights(const at::Tensor& a, const at::Tensor& v3, const Bands& bands,
                         int64_t stream, const OptTensor& into = std::nullopt) {
  auto y = into.has_value() ? *into : new_output({a.size(0), a.size(1), v3.size(2)}, a.options());
  ApplyArgs g;
  g.a = a.data_ptr<float>();
  g.v = v3.data_ptr<float>();
  g.y = y.data_ptr<float>();
  g.batch = a.size(0);
  g.pixels = a.size(1);
  g.centres = v3.size(1);
  g.dim = v3.size(2);
  g.accumulate = into.has_value();
  check_status(band_apply(bands.table, g, stream_of(stream)), "band apply");
  return y;
}

// The official M-step's floor on Σ_p a (``reference.OFFICIAL_TOTAL_FLOOR``), else 0.
float total_floor(const std::string& numerics) {
  TORCH_CHECK(numerics == "exact" || numerics == "official",
              "numerics must be 'exact' or 'official', got '", numerics, "'");
  return numerics == "official" ? 1e-16f : 0.f;
}

// Each centre's Σ_p a·x and Σ_p a over the pixels that may pick it: (out [B, M, C] fp32,
// totals [B, M]); with m_step the M-step's mean (by max(total, floor) when floor > 0, else
// ``previous`` where no pixel weighs on the centre).
std::pair<at::Tensor, at::Tensor> sums(const at::Tensor& a, const at::Tensor& x3f,
                                       const at::Tensor& previous, const Bands& bands, bool m_step,
                                       int64_t stream, float floor = 0.f) {
  auto out = new_output(previous.sizes(), a.options());
  auto totals = new_output({a.size(0), previous.size(1)}, a.options());
  GatherArgs g;
  g.a = a.data_ptr<float>();
  g.x = x3f.data_ptr<float>();
  g.previous = previous.data_ptr<float>();
  g.out = out.data_ptr<float>();
  g.totals = totals.data_ptr<float>();
  g.batch = a.size(0);
  g.pixels = a.size(1);
  g.channels = x3f.size(2);
  g.m_step = m_step;
  g.total_floor = floor;
  check_status(band_gather(bands.table, g, stream_of(stream)), "band sums");
  return {out, totals};
}

// g [B, N, max_centres] fp32: dy_p · v_q over each pixel's candidates.
at::Tensor dots(const at::Tensor& dy, const at::Tensor& v3, const Bands& bands, int64_t stream) {
  auto g = new_output({dy.size(0), dy.size(1), bands.table.max_centres}, dy.options());
  BandDotArgs args;
  args.dy = dy.data_ptr<float>();
  args.v = v3.data_ptr<float>();
  args.g = g.data_ptr<float>();
  args.batch = dy.size(0);
  args.pixels = dy.size(1);
  args.centres = v3.size(1);
  args.dim = dy.size(2);
  check_status(band_dots(bands.table, args, stream_of(stream)), "band dots");
  return g;
}

void check_grid(const at::Tensor& x, const std::vector<int64_t>& grid) {
  check_like(x, "x", x);
  TORCH_CHECK(x.dim() == 4, "x must be [B, H, W, C]");
  TORCH_CHECK(grid.size() == 2 && grid[0] >= 1 && grid[1] >= 1 && grid[0] <= x.size(1) &&
                  grid[1] <= x.size(2),
              "grid must be (h, w) with 1 <= h <= H and 1 <= w <= W");
}

// The EM iterations from the pooled start; with ``keep`` every iteration's (a, totals).
at::Tensor iterate(const at::Tensor& x3, const at::Tensor& x3f, const Bands& bands, int64_t height,
                   int64_t width, double temperature, int64_t iters, float floor, int64_t stream,
                   std::vector<std::pair<at::Tensor, at::Tensor>>* keep) {
  const int64_t batch = x3.size(0), channels = x3.size(2);
  const int64_t h = bands.table.grid_h, w = bands.table.grid_w;
  auto s = at::adaptive_avg_pool2d(x3f.view({batch, height, width, channels}).permute({0, 3, 1, 2}),
                                   {h, w})
               .permute({0, 2, 3, 1})
               .reshape({batch, h * w, channels})
               .contiguous();
  for (int64_t i = 0; i < iters; ++i) {
    auto a = affinities(x3, s, bands, temperature, stream);
    auto [next, totals] = sums(a, x3f, s, bands, /*m_step=*/true, stream, floor);
    if (keep) keep->emplace_back(a, totals);
    s = next;
  }
  return s;
}

at::Tensor token_cluster_forward(const at::Tensor& x, const std::vector<int64_t>& grid,
                                 int64_t window, int64_t iters, double temperature,
                                 const std::string& numerics, int64_t stream) {
  check_grid(x, grid);
  const float floor = total_floor(numerics);
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  auto x3 = x.reshape({batch, height * width, channels}).contiguous();
  auto bands = make_bands(height, width, grid[0], grid[1], window, x);
  auto s = iterate(x3, x3.to(at::kFloat), bands, height, width, temperature, iters, floor, stream,
                   nullptr);
  return s.view({batch, grid[0], grid[1], channels}).to(x.scalar_type());
}

at::Tensor token_cluster_backward(const at::Tensor& grad, const at::Tensor& x,
                                  const std::vector<int64_t>& grid, int64_t window, int64_t iters,
                                  double temperature, const std::string& numerics, int64_t stream) {
  check_grid(x, grid);
  check_like(grad, "grad", x);
  const float floor = total_floor(numerics);
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  auto x3 = x.reshape({batch, height * width, channels}).contiguous();
  auto x3f = x3.to(at::kFloat);
  auto bands = make_bands(height, width, grid[0], grid[1], window, x);
  std::vector<std::pair<at::Tensor, at::Tensor>> history;
  iterate(x3, x3f, bands, height, width, temperature, iters, floor, stream, &history);
  auto g = grad.reshape({batch, grid[0] * grid[1], channels}).to(at::kFloat);
  auto dx = at::zeros({batch, height * width, channels}, fp32_like(x));
  for (auto it = history.rbegin(); it != history.rend(); ++it) {
    const auto& [a, totals] = *it;
    at::Tensor per_centre;
    if (floor > 0.f) {  // official: every centre divides by max(T, floor), none is kept
      per_centre = g / totals.clamp_min(floor).unsqueeze(-1);
      g = at::zeros_like(g);
    } else {
      auto kept = (totals == 0).unsqueeze(-1);
      per_centre =
          at::where(kept, at::zeros_like(g),
                    g / at::where(kept, at::ones_like(totals.unsqueeze(-1)), totals.unsqueeze(-1)));
      g = at::where(kept, g, at::zeros_like(g));
    }
    dx = apply_weights(a, per_centre.contiguous(), bands, stream, dx);
  }
  auto pooled = g.view({batch, grid[0], grid[1], channels}).permute({0, 3, 1, 2});
  auto source = x3f.view({batch, height, width, channels}).permute({0, 3, 1, 2});
  dx += at::_adaptive_avg_pool2d_backward(pooled, source)
            .permute({0, 2, 3, 1})
            .reshape({batch, height * width, channels});
  return dx.view(x.sizes()).to(x.scalar_type());
}

void check_reconstruct(const at::Tensor& x, const at::Tensor& centres, const at::Tensor& values,
                       const std::string& mode, const std::string& numerics) {
  check_like(x, "x", x);
  check_like(centres, "centres", x);
  check_like(values, "values", x);
  TORCH_CHECK(mode == "local", "the cuda kernels take mode 'local' only, got '", mode, "'");
  TORCH_CHECK(numerics == "exact", "mode 'local' has only exact numerics, got '", numerics, "'");
  TORCH_CHECK(x.dim() == 4 && centres.dim() == 4 && values.dim() == 4,
              "x, centres and values must be 4-D");
}

// The band table and the reconstruction weights of a call: (bands, a [B, N, max_centres]).
std::pair<Bands, at::Tensor> reconstruction_weights(const at::Tensor& x, const at::Tensor& centres,
                                                    int64_t window, double temperature,
                                                    int64_t stream) {
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  const int64_t h = centres.size(1), w = centres.size(2);
  auto bands = make_bands(height, width, h, w, window, x);
  auto x3 = x.reshape({batch, height * width, channels}).contiguous();
  auto s3 = centres.reshape({batch, h * w, channels}).to(at::kFloat).contiguous();
  auto a = affinities(x3, s3, bands, temperature, stream);
  return {std::move(bands), a};
}

at::Tensor token_reconstruct_forward(const at::Tensor& x, const at::Tensor& centres,
                                     const at::Tensor& values, int64_t window, double temperature,
                                     const std::string& mode, int64_t k,
                                     const std::string& numerics, int64_t stream) {
  check_reconstruct(x, centres, values, mode, numerics);
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2);
  const int64_t h = centres.size(1), w = centres.size(2), dim = values.size(3);
  auto [bands, a] = reconstruction_weights(x, centres, window, temperature, stream);
  auto v3 = values.reshape({batch, h * w, dim}).to(at::kFloat).contiguous();
  return apply_weights(a, v3, bands, stream)
      .view({batch, height, width, dim})
      .to(values.scalar_type());
}

at::Tensor token_reconstruct_backward(const at::Tensor& grad, const at::Tensor& x,
                                      const at::Tensor& centres, const at::Tensor& values,
                                      int64_t window, double temperature, const std::string& mode,
                                      int64_t k, const std::string& numerics, int64_t stream) {
  check_reconstruct(x, centres, values, mode, numerics);
  check_like(grad, "grad", x);
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2);
  const int64_t h = centres.size(1), w = centres.size(2), dim = values.size(3);
  auto [bands, a] = reconstruction_weights(x, centres, window, temperature, stream);
  auto dy = grad.reshape({batch, height * width, dim}).to(at::kFloat).contiguous();
  auto like = at::empty({batch, h * w, dim}, fp32_like(x));
  auto dv = sums(a, dy, like, bands, /*m_step=*/false, stream).first;
  return dv.view(values.sizes()).to(values.scalar_type());
}

// (dx, d centres) through the local weights: g = −(a/τ)(G − Σ_q a·G) from the band dots
// G = dy·vᵀ, then dx = 2(x̃·Σ_q g − Σ_q g·s̃) and ds = −2(Σ_p g·x̃ − s̃·Σ_p g), x̃ and s̃
// centred on the image's mean token (reference.token_reconstruct_weight_backward).
std::tuple<at::Tensor, at::Tensor> token_reconstruct_weight_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& centres,
    const at::Tensor& values, int64_t window, double temperature, const std::string& mode,
    int64_t k, const std::string& numerics, int64_t stream) {
  check_reconstruct(x, centres, values, mode, numerics);
  check_like(grad, "grad", x);
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  const int64_t h = centres.size(1), w = centres.size(2), dim = values.size(3);
  auto [bands, a] = reconstruction_weights(x, centres, window, temperature, stream);
  auto dy = grad.reshape({batch, height * width, dim}).to(at::kFloat).contiguous();
  auto v3 = values.reshape({batch, h * w, dim}).to(at::kFloat).contiguous();
  auto weighted = dots(dy, v3, bands, stream);
  auto g = ((weighted - (a * weighted).sum(-1, true)) * a / -temperature).contiguous();
  auto x3 = x.reshape({batch, height * width, channels}).to(at::kFloat);
  auto mean = x3.mean(1, true);
  auto xc = (x3 - mean).contiguous();
  auto sc = (centres.reshape({batch, h * w, channels}).to(at::kFloat) - mean).contiguous();
  auto dx = 2 * (xc * g.sum(-1, true) - apply_weights(g, sc, bands, stream));
  auto [sum, totals] = sums(g, xc, sc, bands, /*m_step=*/false, stream);
  auto ds = -2 * (sum - sc * totals.unsqueeze(-1));
  return {dx.view(x.sizes()).to(x.scalar_type()),
          ds.view(centres.sizes()).to(centres.scalar_type())};
}

}  // namespace

STITCHOPS_BIND(token_cluster) {
  m.def("token_cluster_forward", &token_cluster_forward, "Expedit token clustering");
  m.def("token_cluster_backward", &token_cluster_backward, "its backward (constant weights)");
  m.def("token_reconstruct_forward", &token_reconstruct_forward, "local reconstruction");
  m.def("token_reconstruct_backward", &token_reconstruct_backward, "its backward (d values)");
  m.def("token_reconstruct_weight_backward", &token_reconstruct_weight_backward,
        "its backward through the weights (dx, d centres)");
}

}  // namespace stitchops::binding
