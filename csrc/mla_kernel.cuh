// The split-KV paged MLA decode kernel (sm_90a).
//
// Grid (m_blocks, h_kv, num_parts); 384 threads. Warpgroup 2 is the producer: its first warp streams the
// part's pages through the page table with TMA (nine 64x64 boxes per page, 128B swizzle) into a
// two-stage ring.
// Warpgroups 0 and 1 are consumers (w = 0, 1); consumer w owns output columns
// 256w..256w+255 (O += P V with wgmma m64n256k16, V = first 512 columns of the K page already in
// smem, read transposed). Three consumer schedules (kSchedule):
//   kSplitS: consumer w computes S for keys 32w..32w+31 (wgmma m64n32k16); the two exchange row
//            maxima through smem and each writes half of P.
//   kSoloS:  consumer 0 computes the whole S (wgmma m64n64k16), runs the softmax and writes P and the
//            row rescale factors; consumer 1 only does its half of P V, which overlaps consumer 0's
//            next S = Q K^T on the tensor cores.
//   kSeesaw: the pages alternate between the consumers; each computes S and the softmax of its own
//            pages and both add every page to their output half (see the section below).
// Online softmax in fp32.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "config.h"
#include "epilogue.cuh"
#include "mainloop.cuh"
#include "primitives.cuh"
#include "softmax.cuh"
#include "tile_scheduler.h"
#include "traits.h"

namespace mla {

enum Schedule : int { kSplitS = 0, kSoloS = 1, kSeesaw = 2 };

struct ConsumerCtx {
  int w, ct, t, lane, row_a, rg_a, rg_b, m_block, head_kv;
};

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
  load_q_tile(p, s, req, c.m_block, c.head_kv, c.ct);
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

// end_request for schedules in which each consumer holds a partial row sum (its columns of S, or its
// own pages) on a common running max: this thread's columns -> quad -> both consumers.
__device__ __forceinline__ void end_request_summed(const DecodeParams& p, SharedStorage& s, const ConsumerCtx& c,
                                                   const PartInfo& part, int req, const float (&o)[128],
                                                   const RowState& st) {
  const float l_a = quad_sum(st.l[0]), l_b = quad_sum(st.l[1]);
  if ((c.lane & 3) == 0) {
    s.row_sum[c.w][c.row_a] = l_a;
    s.row_sum[c.w][c.row_a + 8] = l_b;
  }
  consumer_sync(kBarMax);
  const float lt_a = l_a + s.row_sum[1 - c.w][c.row_a];
  const float lt_b = l_b + s.row_sum[1 - c.w][c.row_a + 8];
  end_request(p, c, part, req, o, st.m[0], st.m[1], lt_a, lt_b);
}

// ---- schedule kSplitS ---------------------------------------------------------------------------
__device__ __forceinline__ void consume_split_s(const DecodeParams& p, SharedStorage& s, const PartInfo& part,
                                                const ConsumerCtx& c) {
  float o[128];
  float sacc[16];
  int it = 0;  // pages consumed so far (stage = it % 2)
  for (int req = part.first_req; req <= part.last_req; ++req) {
    const int len = p.seqlens[req];
    int lo, hi;
    if (!part_pages(part, req, len, lo, hi)) continue;
    const KeyLimits lim = key_limits(p, c, len);
    begin_request(p, s, c, req, o);
    RowState st = empty_row_state();

    for (int pg = lo; pg < hi; ++pg, ++it) {
      const int stage = it % kNumStages;
      wait_barrier(&s.full_bar[stage], (it / kNumStages) & 1);
      qk_half(sacc, s, stage, c.w);
      if (pg * kPageSize + kPageSize > lim.min) {
        mask_scores(sacc, pg * kPageSize + 32 * c.w + 2 * (c.lane & 3), lim.a, lim.b);
      }
      float mx_a, mx_b;
      row_max_local(sacc, mx_a, mx_b);
      if ((c.lane & 3) == 0) {
        s.row_max[c.w][c.row_a] = mx_a;
        s.row_max[c.w][c.row_a + 8] = mx_b;
      }
      consumer_sync(kBarMax);
      mx_a = fmaxf(mx_a, s.row_max[1 - c.w][c.row_a]);
      mx_b = fmaxf(mx_b, s.row_max[1 - c.w][c.row_a + 8]);
      float alpha_a, alpha_b;
      softmax_update(sacc, st, mx_a, mx_b, p.scale_log2, alpha_a, alpha_b);
      store_p(s.p, sacc, 32 * c.w, c.row_a, c.lane);
      if (pg * kPageSize + kPageSize > len) zero_v_tail(s, stage, c.w, len - pg * kPageSize, c.t);
      cutlass::arch::fence_view_async_shared();
      consumer_sync(kBarP);
      rescale_rows(o, alpha_a, alpha_b);
      pv_half(o, s, stage, c.w);
      EmptyBarrier::arrive(&s.empty_bar[stage]);
    }

    end_request_summed(p, s, c, part, req, o, st);
  }
}

// ---- schedule kSoloS ----------------------------------------------------------------------------
// s.row_max[0][row]: rescale factor of the current page (consumer 0 -> 1);
// s.row_sum[0][row] / s.row_sum[1][row]: final row sum / row max of a request (consumer 0 -> 1).
__device__ __forceinline__ void consume_solo_s(const DecodeParams& p, SharedStorage& s, const PartInfo& part,
                                               const ConsumerCtx& c) {
  float o[128];
  // Pages this CTA consumes in all: consumer 1 signals "P free" after every page but the last.
  int total_pages = 0;
  for (int req = part.first_req; req <= part.last_req; ++req) {
    int lo, hi;
    if (part_pages(part, req, p.seqlens[req], lo, hi)) total_pages += hi - lo;
  }
  if (total_pages == 0) return;
  if (c.w == 1) consumer_arrive(kBarPFree);  // P starts free

  int it = 0;
  for (int req = part.first_req; req <= part.last_req; ++req) {
    const int len = p.seqlens[req];
    int lo, hi;
    if (!part_pages(part, req, len, lo, hi)) continue;
    begin_request(p, s, c, req, o);
    float m_a, m_b, l_a, l_b;  // final row max and row sum of this thread's rows

    if (c.w == 0) {
      float sacc[32];
      const KeyLimits lim = key_limits(p, c, len);
      RowState st = empty_row_state();
      for (int pg = lo; pg < hi; ++pg, ++it) {
        const int stage = it % kNumStages;
        wait_barrier(&s.full_bar[stage], (it / kNumStages) & 1);
        qk_full_issue(sacc, s, stage);
        cute::warpgroup_wait<0>();
        fence_regs(sacc);
        if (pg * kPageSize + kPageSize > lim.min) {
          mask_scores(sacc, pg * kPageSize + 2 * (c.lane & 3), lim.a, lim.b);
        }
        float mx_a, mx_b;
        row_max_local(sacc, mx_a, mx_b);
        float alpha_a, alpha_b;
        softmax_update(sacc, st, mx_a, mx_b, p.scale_log2, alpha_a, alpha_b);
        consumer_sync(kBarPFree);  // consumer 1 is done with the previous P
        store_p(s.p, sacc, 0, c.row_a, c.lane);
        if ((c.lane & 3) == 0) {
          s.row_max[0][c.row_a] = alpha_a;
          s.row_max[0][c.row_a + 8] = alpha_b;
        }
        if (pg * kPageSize + kPageSize > len) zero_v_tail(s, stage, 0, len - pg * kPageSize, c.t);
        cutlass::arch::fence_view_async_shared();
        consumer_sync(kBarP);
        rescale_rows(o, alpha_a, alpha_b);
        // (Measured, run 4: queueing the next page's S behind this P V before waiting for it was
        // slower on every row; see NOTES.md. Wait, release the stage, then load the next S.)
        pv_half(o, s, stage, 0);
        EmptyBarrier::arrive(&s.empty_bar[stage]);
      }
      l_a = quad_sum(st.l[0]);
      l_b = quad_sum(st.l[1]);
      m_a = st.m[0];
      m_b = st.m[1];
      if ((c.lane & 3) == 0) {
        s.row_sum[0][c.row_a] = l_a;
        s.row_sum[0][c.row_a + 8] = l_b;
        s.row_sum[1][c.row_a] = m_a;
        s.row_sum[1][c.row_a + 8] = m_b;
      }
      consumer_sync(kBarMax);
    } else {
      for (int pg = lo; pg < hi; ++pg, ++it) {
        const int stage = it % kNumStages;
        wait_barrier(&s.full_bar[stage], (it / kNumStages) & 1);
        if (pg * kPageSize + kPageSize > len) {
          zero_v_tail(s, stage, 1, len - pg * kPageSize, c.t);
          cutlass::arch::fence_view_async_shared();
        }
        consumer_sync(kBarP);  // P and the rescale factors are written
        const float alpha_a = s.row_max[0][c.row_a];
        const float alpha_b = s.row_max[0][c.row_a + 8];
        rescale_rows(o, alpha_a, alpha_b);
        pv_half(o, s, stage, 1);
        EmptyBarrier::arrive(&s.empty_bar[stage]);
        if (it + 1 < total_pages) consumer_arrive(kBarPFree);
      }
      consumer_sync(kBarMax);
      l_a = s.row_sum[0][c.row_a];
      l_b = s.row_sum[0][c.row_a + 8];
      m_a = s.row_sum[1][c.row_a];
      m_b = s.row_sum[1][c.row_a + 8];
    }
    end_request(p, c, part, req, o, m_a, m_b, l_a, l_b);
  }
}

// Waits for this consumer's P V wgmmas (none other in flight) and releases the stage they read.
__device__ __forceinline__ void release_after_pv(SharedStorage& s, float (&o)[128], int stage) {
  cute::warpgroup_wait<0>();
  fence_regs(o);
  EmptyBarrier::arrive(&s.empty_bar[stage]);
}

// ---- schedule kSeesaw ---------------------------------------------------------------------------
// The pages of a request alternate owners: consumer (j % 2) computes S = Q K^T of the request's page j,
// its softmax, and writes P_j into that page's RoPE chunk (free once S_j is done) and the running row
// max M_j into s.row_max[j % 2]. Both consumers add every page to their output half in page order,
// O = O * exp(M_{j-1} - M_j) + P_j V_j, so both halves stay on one running max and no P is rescaled.
// A consumer issues its own S_j first and the other's P_{j-1} V_{j-1} behind it, runs its softmax while
// that P V (and the other consumer's S_{j+1}) keep the tensor cores busy: the two softmaxes alternate.
// Stage release: each consumer arrives on a page's empty barrier once its own P V of that page is done.
__device__ __forceinline__ void seesaw_other_page(const DecodeParams& p, SharedStorage& s, const ConsumerCtx& c,
                                                  float (&o)[128], RowState& st, int j, int it, int pg,
                                                  int len) {
  const int stage = it % kNumStages;
  consumer_sync(static_cast<NamedBarrierId>(kBarPReady + (j & 1)));  // P_j and M_j are written
  wait_barrier(&s.full_bar[stage], (it / kNumStages) & 1);           // (complete: orders the TMA writes)
  float alpha_a, alpha_b;
  rebase_rows(st, s.row_max[j & 1][c.row_a], s.row_max[j & 1][c.row_a + 8], p.scale_log2, alpha_a, alpha_b);
  if (pg * kPageSize + kPageSize > len) {
    zero_v_tail(s, stage, c.w, len - pg * kPageSize, c.t);
    cutlass::arch::fence_view_async_shared();
  }
  rescale_rows(o, alpha_a, alpha_b);
  pv_issue(o, s, stage, c.w, rope_chunk(s, stage));
}

// One of this consumer's own pages j (ring position it): S_j, then (kOther) the other consumer's page
// j - 1 queued behind it on the tensor cores, the softmax of S_j while that P V runs, P_j published, and
// this half's P_j V_j. Every wgmma group is waited for inside (ptxas serializes all wgmmas of a kernel
// whose accumulators stay in flight across divergent control flow).
template <bool kOther>
__device__ __forceinline__ void seesaw_own_page(const DecodeParams& p, SharedStorage& s, const ConsumerCtx& c,
                                                const KeyLimits& lim, float (&o)[128], float (&sacc)[32],
                                                RowState& st, int j, int it, int pg, int len) {
  const int stage = it % kNumStages;
  wait_barrier(&s.full_bar[stage], (it / kNumStages) & 1);
  qk_full_issue(sacc, s, stage);
  if constexpr (kOther) {
    seesaw_other_page(p, s, c, o, st, j - 1, it - 1, pg - 1, len);
    cute::warpgroup_wait<1>();  // S_j done; the other page's P V may still run
  } else {
    cute::warpgroup_wait<0>();
  }
  fence_regs(sacc);
  if (pg * kPageSize + kPageSize > lim.min) mask_scores(sacc, pg * kPageSize + 2 * (c.lane & 3), lim.a, lim.b);
  float mx_a, mx_b;
  row_max_local(sacc, mx_a, mx_b);
  float alpha_a, alpha_b;
  softmax_update(sacc, st, mx_a, mx_b, p.scale_log2, alpha_a, alpha_b);
  store_p(rope_chunk(s, stage), sacc, 0, c.row_a, c.lane);
  if ((c.lane & 3) == 0) {
    s.row_max[j & 1][c.row_a] = st.m[0];
    s.row_max[j & 1][c.row_a + 8] = st.m[1];
  }
  if (pg * kPageSize + kPageSize > len) zero_v_tail(s, stage, c.w, len - pg * kPageSize, c.t);
  cutlass::arch::fence_view_async_shared();
  consumer_arrive(static_cast<NamedBarrierId>(kBarPReady + (j & 1)));
  if constexpr (kOther) {  // the other page's P V is done: release its stage
    release_after_pv(s, o, (it - 1) % kNumStages);
  }
  rescale_rows(o, alpha_a, alpha_b);
  pv_issue(o, s, stage, c.w, rope_chunk(s, stage));
  release_after_pv(s, o, stage);
}

__device__ __forceinline__ void consume_seesaw(const DecodeParams& p, SharedStorage& s, const PartInfo& part,
                                               const ConsumerCtx& c) {
  float o[128];
  float sacc[32];
  int it0 = 0;  // pages of earlier requests in this part (ring position of page 0)
  for (int req = part.first_req; req <= part.last_req; ++req) {
    const int len = p.seqlens[req];
    int lo, hi;
    if (!part_pages(part, req, len, lo, hi)) continue;
    const int n = hi - lo;
    begin_request(p, s, c, req, o);
    const KeyLimits lim = key_limits(p, c, len);
    RowState st = empty_row_state();
    // own pages: consumer 0 pages 0, 2, 4, ... (page 0 has no other page before it); consumer 1 pages 1, 3, ...
    if (c.w == 0) seesaw_own_page<false>(p, s, c, lim, o, sacc, st, 0, it0, lo, len);
    for (int j = c.w == 0 ? 2 : 1; j < n; j += 2) {
      seesaw_own_page<true>(p, s, c, lim, o, sacc, st, j, it0 + j, lo + j, len);
    }
    if (((n - 1) & 1) != c.w) {  // the request's last page is the other consumer's
      seesaw_other_page(p, s, c, o, st, n - 1, it0 + n - 1, lo + n - 1, len);
      release_after_pv(s, o, (it0 + n - 1) % kNumStages);
    }

    end_request_summed(p, s, c, part, req, o, st);
    it0 += n;
  }
}

template <int kSchedule>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_kernel(const __grid_constant__ CUtensorMap tmap,
                                                                 const __grid_constant__ DecodeParams p) {
  extern __shared__ uint8_t smem_raw[];
  SharedStorage& s = *reinterpret_cast<SharedStorage*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                                       ~static_cast<uintptr_t>(1023));
  const int m_block = blockIdx.x, head_kv = blockIdx.y, part_idx = blockIdx.z;

  if (threadIdx.x == 0) {
    for (int i = 0; i < kNumStages; ++i) {
      FullBarrier::init(&s.full_bar[i], 1);
      EmptyBarrier::init(&s.empty_bar[i], kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
    cute::prefetch_tma_descriptor(&tmap);
  }
  __syncthreads();
  // Let the combine kernel launch now; it waits (griddepcontrol.wait) for this grid's writes.
  cutlass::arch::launch_dependent_grids();
  const PartInfo part = load_part(p.tile_metadata, part_idx);

  if (threadIdx.x >= kConsumerThreads) {  // warpgroup 2: the producer (its first warp issues)
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x < kConsumerThreads + 32) produce_pages(&tmap, p, part, s, head_kv);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();

  ConsumerCtx c;
  c.w = threadIdx.x / 128;
  c.ct = threadIdx.x;
  c.t = threadIdx.x & 127;
  c.lane = threadIdx.x & 31;
  c.row_a = (c.t >> 5) * 16 + (c.lane >> 2);  // this thread's rows: row_a, row_a + 8
  c.rg_a = m_block * kBlockM + c.row_a;
  c.rg_b = c.rg_a + 8;
  c.m_block = m_block;
  c.head_kv = head_kv;
  if constexpr (kSchedule == kSoloS) {
    consume_solo_s(p, s, part, c);
  } else if constexpr (kSchedule == kSeesaw) {
    consume_seesaw(p, s, part, c);
  } else {
    consume_split_s(p, s, part, c);
  }
}

}  // namespace mla
