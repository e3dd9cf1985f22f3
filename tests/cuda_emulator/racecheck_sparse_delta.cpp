// Race check of the sparse-delta kernels of csrc/sparse_delta.cu: the scatter of δ into W'
// (one thread per entry; indices unique, so no two threads share an element) and the SDDMM
// over several token splits (its warps meet in shared memory), against float64 loops. The
// split partials are summed here, not by sum_ranges.cu. Registered with racecheck.cpp.
#include <random>

#include "racecheck.h"
#include "sparse_delta.h"

namespace {

using racecheck::check;
using racecheck::Dtype;
using racecheck::narrow;
using racecheck::widen;

struct Problem {
  int64_t tokens, in_f, out_f, nnz, tokens_per_split;
};

template <typename E>
bool run(const Problem& p) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  auto rnd = [&](int64_t n) {
    std::vector<float> v(n);
    for (auto& e : v) e = normal(rng);
    return v;
  };
  const int64_t T = p.tokens, I = p.in_f, O = p.out_f;
  // nnz distinct sorted flat indices (nnz <= O·I), spread over the matrix.
  std::vector<int64_t> index(p.nnz);
  for (int64_t j = 0; j < p.nnz; ++j) index[j] = (j * O * I) / p.nnz;
  auto x = rnd(T * I), w = rnd(O * I), delta = rnd(p.nnz), dy = rnd(T * O);
  const auto x_t = narrow<E>(x), dy_t = narrow<E>(dy), delta_t = narrow<E>(delta);
  auto w_t = narrow<E>(w);

  std::vector<double> w_ref(w.begin(), w.end()), dd_ref(p.nnz, 0.0);
  for (int64_t j = 0; j < p.nnz; ++j) {
    w_ref[index[j]] += delta[j];
    const int64_t r = index[j] / I, c = index[j] % I;
    for (int64_t t = 0; t < T; ++t) dd_ref[j] += double(dy[t * O + r]) * x[t * I + c];
  }

  stitchops::ScatterDeltaArgs s;
  s.w = w_t.data(), s.delta = delta_t.data(), s.index = index.data(), s.nnz = p.nnz;
  if (stitchops::scatter_delta(Dtype<E>::id, s, nullptr) != 0) return false;

  const int64_t splits = (T + p.tokens_per_split - 1) / p.tokens_per_split;
  std::vector<float> part(splits * p.nnz, NAN);
  stitchops::SddmmArgs a;
  a.grad = dy_t.data(), a.stride_gt = O, a.stride_go = 1;
  a.x = x_t.data(), a.stride_xt = I, a.stride_xi = 1;
  a.index = index.data(), a.part = part.data();
  a.nnz = p.nnz, a.tokens = T, a.in_features = I;
  a.tokens_per_split = p.tokens_per_split, a.splits = splits;
  if (stitchops::sddmm_partials(Dtype<E>::id, a, nullptr) != 0) return false;
  std::vector<float> dd(p.nnz, 0.f);
  for (int64_t z = 0; z < splits; ++z)
    for (int64_t j = 0; j < p.nnz; ++j) dd[j] += part[z * p.nnz + j];

  const std::string where = "T=" + std::to_string(T) + " IN=" + std::to_string(I) +
                            " OUT=" + std::to_string(O) + " nnz=" + std::to_string(p.nnz);
  bool ok = check<E>(where, "W'", widen(w_t), w_ref);
  ok &= check<E>(where, "ddelta", dd, dd_ref);
  return ok;
}

bool run_sparse_delta() {
  bool ok = true;
  // Odd sizes over three splits (the last ragged); entries past one block; a single entry.
  for (const Problem& p :
       {Problem{77, 50, 130, 37, 30}, Problem{40, 9, 11, 70, 16}, Problem{20, 3, 5, 1, 20}}) {
    ok &= run<float>(p);
    ok &= run<__half>(p);
    ok &= run<__nv_bfloat16>(p);
  }
  return ok;
}

const racecheck::Register registered("sparse_delta_linear", run_sparse_delta);

}  // namespace
