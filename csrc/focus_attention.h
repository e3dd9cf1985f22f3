// FASeg's focus cross-attention: the CUDA kernels (stitchops/reference/focus_attention.py has
// the math; kernels/focus_attention.py the Triton version). Raw pointers only.
//
// Modes: 0 full, 1 mask (int8 [B, mask_heads, Q, N], 1 = blocked; reset [B, mask_heads, Q]
// marks all-blocked rows, which attend every key), 2 one window set per batch element,
// 3 a set per query (windows int32 [B, 1 or Q, sets]). A query attends ``slots`` slots:
// every key (0, 1) or the sets·ws² keys of its windows (2, 3).
//
// SIMT fp32, deterministic everywhere (each output element has one writer, loops run in a
// fixed order): a thread per query row (forward, Ā·pos, Δ, dq) or per key (dk, dv, and over
// queries and heads the key scores and dpos; in window modes a key's thread finds the
// queries whose sets hold its window, so repeats across queries need no atomics).
#pragma once

#include <cstdint>

#include "common.h"

namespace stitchops {

constexpr int64_t kFocusMaxDim = 128;  // head dim D
constexpr int64_t kFocusMaxPos = 256;  // pos width P

struct FocusGeometry {
  int64_t batch = 0, heads = 0, queries = 0, keys = 0, dim = 0, pos_dim = 0;
  int64_t slots = 0;
  int64_t sets = 0;  // windows per set (modes 2, 3)
  int64_t ws = 1, map_width = 1;
  int64_t mask_heads = 1;
  int mode = 0;
  float scale = 1.f;
  const int32_t* windows = nullptr;
  const int8_t* mask = nullptr;
  const int8_t* reset = nullptr;
};

// Inputs in the call's dtype unless marked; outputs as marked.
struct FocusTensors {
  const void* q = nullptr;         // [B, H, Q, D]
  const void* k = nullptr;         // [B, H, N, D]
  const void* v = nullptr;         // [B, H, N, D]
  const void* pos = nullptr;       // [B, N, P] or null
  const void* out = nullptr;       // [B, H, Q, D] (backward)
  const void* dout = nullptr;      // [B, H, Q, D] (backward)
  const void* dpos_out = nullptr;  // [B, Q, P] (backward, with pos)
  const float* lse = nullptr;      // [B, H, Q]
  const float* delta = nullptr;    // [B, H, Q] (backward)
};

// out (dtype) and lse (fp32): the online softmax of every query row.
int focus_forward(DType dtype, const FocusGeometry& g, const FocusTensors& t, void* out, float* lse,
                  void* stream);
// pos_out [B, Q, P] fp32 = Ā·pos, Ā the heads' average attention.
int focus_mean_pos(DType dtype, const FocusGeometry& g, const FocusTensors& t, float* pos_out,
                   void* stream);
// Per key, over queries and heads: scores [B, N] fp32 = Σ_q Ā (if non-null) and dpos [B, N, P]
// (dtype) = Σ_q Ā·dpos_out (if non-null).
int focus_key_means(DType dtype, const FocusGeometry& g, const FocusTensors& t, float* scores,
                    void* dpos, void* stream);
// delta [B, H, Q] fp32 = rowsum(dout ∘ out) + dpos_out·(A_h·pos) / H.
int focus_delta(DType dtype, const FocusGeometry& g, const FocusTensors& t, float* delta,
                void* stream);
// dq [B, H, Q, D] (dtype).
int focus_dq(DType dtype, const FocusGeometry& g, const FocusTensors& t, void* dq, void* stream);
// dk, dv [B, H, N, D] (dtype); zero for keys no query attends.
int focus_dkdv(DType dtype, const FocusGeometry& g, const FocusTensors& t, void* dk, void* dv,
               void* stream);

}  // namespace stitchops
