// Epilogue of one (request, split): normalizes the output accumulator and writes either the final
// bf16 output and LSE (request handled by one split) or the fp32 partial output and partial LSE
// (request split across parts; the combine kernel merges them).
#pragma once
#include <cuda_bf16.h>

#include <cmath>

#include "config.h"
#include "traits.h"

namespace mla {

struct RowOut {
  float inv_l;  // 1 / row sum (0 for a row that saw no key)
  float lse;    // natural-log LSE; +inf (final) or -inf (partial) for a row that saw no key
};

__device__ __forceinline__ RowOut finish_row(float m, float l, float scale, bool final_out) {
  RowOut r;
  if (l > 0.f) {
    r.inv_l = 1.f / l;
    r.lse = m * scale + logf(l);
  } else {
    r.inv_l = 0.f;
    r.lse = final_out ? INFINITY : -INFINITY;
  }
  return r;
}

// Writes the 64 x 256 half tile `o` of warpgroup w. rg_a/rg_b: global row indices (within the KV
// head) of this thread's two rows; rows >= p.rows are padding and skipped.
__device__ __forceinline__ void write_output(const DecodeParams& p, const float (&o)[128], int req, int head_kv,
                                             int split_slot, bool direct, int w, int lane, int rg_a,
                                             const RowOut& ra, const RowOut& rb) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rg = rg_a + 8 * h;
    if (rg >= p.rows) continue;
    const RowOut& rr = h == 0 ? ra : rb;
    const int col0 = 256 * w + 2 * (lane & 3);
    if (direct) {
      const int sq = rg / p.group, head = head_kv * p.group + rg % p.group;
      uint16_t* dst = p.out + static_cast<int64_t>(req) * p.o_stride_b + static_cast<int64_t>(sq) * p.o_stride_s +
                      static_cast<int64_t>(head) * p.o_stride_h + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const __nv_bfloat162 v =
            __floats2bfloat162_rn(o[4 * j + 2 * h] * rr.inv_l, o[4 * j + 2 * h + 1] * rr.inv_l);
        *reinterpret_cast<__nv_bfloat162*>(dst + 8 * j) = v;
      }
      if (w == 0 && (lane & 3) == 0) {
        p.lse[(static_cast<int64_t>(req) * p.h_q + head) * p.s_q + sq] = rr.lse;
      }
    } else {
      const int64_t row = (static_cast<int64_t>(split_slot) * p.h_kv + head_kv) * p.rows + rg;
      float* dst = p.o_accum + row * kHeadDimV + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * h] * rr.inv_l, o[4 * j + 2 * h + 1] * rr.inv_l);
      }
      if (w == 0 && (lane & 3) == 0) p.lse_accum[row] = rr.lse;
    }
  }
}

}  // namespace mla
