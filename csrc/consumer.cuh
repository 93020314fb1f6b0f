// The consumer schedule's frame around its page loop: the per-thread context, causal key limits, and a
// request piece's begin (Q tile) and end (normalize, write output or partials).
#pragma once
#include <cstdint>

#include "config.h"
#include "epilogue.cuh"
#include "mainloop.cuh"
#include "primitives.cuh"
#include "tile_scheduler.h"
#include "traits.h"

namespace mla {

// w: the output half (256 columns) this warpgroup owns; ct: thread index over both halves (solo's Q load);
// t: index in the warpgroup; row_a / row_a + 8: this thread's accumulator rows (rg_*: within the KV head).
struct ConsumerCtx {
  int w, ct, t, lane, row_a, rg_a, rg_b, m_block, head_kv;
};
__device__ __forceinline__ ConsumerCtx consumer_ctx(int w, int m_block, int head_kv) {
  ConsumerCtx c;
  c.w = w;
  c.ct = threadIdx.x;
  c.t = threadIdx.x & 127;
  c.lane = threadIdx.x & 31;
  c.row_a = (c.t >> 5) * 16 + (c.lane >> 2);
  c.rg_a = m_block * kBlockM + c.row_a;
  c.rg_b = c.rg_a + 8;
  c.m_block = m_block;
  c.head_kv = head_kv;
  return c;
}

// Keys visible to this thread's two rows: [0, a) and [0, b); pages past `min` need no mask.
struct KeyLimits {
  int a, b, min;
};
__device__ __forceinline__ KeyLimits key_limits(const DecodeParams& p, const ConsumerCtx& c, int len) {
  KeyLimits k{len, len, len};
  if (p.causal) {  // keys < len - s_q + sq + 1 are visible to query token sq
    k.a = min(len, len - p.s_q + c.rg_a / p.group + 1);
    k.b = min(len, len - p.s_q + c.rg_b / p.group + 1);
    k.min = min(k.a, k.b);
  }
  return k;
}

__device__ __forceinline__ void begin_request(const DecodeParams& p, SharedStorage& s, const ConsumerCtx& c,
                                              int req, float (&o)[128]) {
  consumer_sync(kBarQ);  // the previous request's S = Q K^T are done
  load_q_chunks<0, kNumChunksQK, kConsumerThreads>(p, s.q, req, c.m_block, c.head_kv, c.ct);
  cute::cp_async_wait<0>();
  cutlass::arch::fence_view_async_shared();
  consumer_sync(kBarQ);
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
}

__device__ __forceinline__ void end_request(const DecodeParams& p, const ConsumerCtx& c, const PartInfo& part,
                                            int req, const float (&o)[128], float m_a, float m_b, float l_a,
                                            float l_b) {
  const int first_split = p.num_splits[req];
  const int nsplit = p.num_splits[req + 1] - first_split;
  const bool direct = nsplit <= 1;
  const int slot = first_split + (req == part.first_req ? part.first_split : 0);
  const RowOut out_a = finish_row(m_a, l_a, p.scale, direct);
  const RowOut out_b = finish_row(m_b, l_b, p.scale, direct);
  write_output(p, o, req, c.head_kv, slot, direct, c.w, c.lane, c.rg_a, out_a, out_b);
}

}  // namespace mla
