// Online softmax over one page, in fp32, for the two rows a consumer thread owns.
//
// Register fragment of a 64 x N wgmma accumulator (per thread of a warpgroup): element 4j+e is
// (row = 16*warp + lane/4 + 8*(e/2), col = 8j + 2*(lane%4) + e%2). Each thread therefore owns two
// rows ("a" and "b") and 2 columns of every 8-column group.
#pragma once
#include <cmath>

#include "config.h"

namespace mla {

struct RowState {
  float m[2];  // running max of raw scores (rows a, b); -inf until a key is visible
  float l[2];  // running sum of exp(scale*(s - m)) over this thread's columns only
};

__device__ __forceinline__ RowState empty_row_state() {
  RowState st;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.f;
  return st;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Sets scores of keys >= limit (per row) to -inf. key0: key index of this thread's column 0.
template <int N>
__device__ __forceinline__ void mask_scores(float (&s)[N], int key0, int limit_a, int limit_b) {
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = key0 + 8 * j + e;
      if (key >= limit_a) s[4 * j + e] = -INFINITY;
      if (key >= limit_b) s[4 * j + 2 + e] = -INFINITY;
    }
  }
}

template <int N>
__device__ __forceinline__ void row_max_local(const float (&s)[N], float& mx_a, float& mx_b) {
  mx_a = -INFINITY;
  mx_b = -INFINITY;
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    mx_a = fmaxf(mx_a, fmaxf(s[4 * j], s[4 * j + 1]));
    mx_b = fmaxf(mx_b, fmaxf(s[4 * j + 2], s[4 * j + 3]));
  }
  mx_a = quad_max(mx_a);
  mx_b = quad_max(mx_b);
}

// Given the row max over all 64 keys of the page, turns scores into probabilities in place, updates the
// running state, and returns the factors by which the output accumulator rows must be rescaled.
template <int N>
__device__ __forceinline__ void softmax_update(float (&s)[N], RowState& st, float page_max_a, float page_max_b,
                                               float scale_log2, float& alpha_a, float& alpha_b) {
  const float m_new_a = fmaxf(st.m[0], page_max_a);
  const float m_new_b = fmaxf(st.m[1], page_max_b);
  // A row that has seen no key yet keeps m = -inf: use 0 as the base so nothing becomes NaN.
  const float base_a = m_new_a == -INFINITY ? 0.f : m_new_a * scale_log2;
  const float base_b = m_new_b == -INFINITY ? 0.f : m_new_b * scale_log2;
  alpha_a = exp2f(st.m[0] * scale_log2 - base_a);  // m_old = -inf -> 0; both -inf -> exp2(-inf) = 0
  alpha_b = exp2f(st.m[1] * scale_log2 - base_b);
  float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    s[4 * j + 0] = exp2f(fmaf(s[4 * j + 0], scale_log2, -base_a));
    s[4 * j + 1] = exp2f(fmaf(s[4 * j + 1], scale_log2, -base_a));
    s[4 * j + 2] = exp2f(fmaf(s[4 * j + 2], scale_log2, -base_b));
    s[4 * j + 3] = exp2f(fmaf(s[4 * j + 3], scale_log2, -base_b));
    sum_a += s[4 * j + 0] + s[4 * j + 1];
    sum_b += s[4 * j + 2] + s[4 * j + 3];
  }
  st.l[0] = st.l[0] * alpha_a + sum_a;
  st.l[1] = st.l[1] * alpha_b + sum_b;
  st.m[0] = m_new_a;
  st.m[1] = m_new_b;
}

// O rows *= their factors, skipped when every factor in the warp is exactly 1 (no row max of the warp moved;
// exp2f(0) is exactly 1).
template <int N>
__device__ __forceinline__ void rescale_rows(float (&o)[N], float alpha_a, float alpha_b) {
  if (!__any_sync(0xffffffffu, alpha_a != 1.f || alpha_b != 1.f)) return;
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    o[4 * j + 0] *= alpha_a;
    o[4 * j + 1] *= alpha_a;
    o[4 * j + 2] *= alpha_b;
    o[4 * j + 3] *= alpha_b;
  }
}

}  // namespace mla
