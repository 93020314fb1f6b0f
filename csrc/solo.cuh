// The "solo S" consumer schedule: consumer 0 computes the whole S = Q K^T of a page
// (wgmma m64n64k16), runs the softmax and writes P and the row rescale factors; consumer 1 only does its
// half of P V, which overlaps consumer 0's next S on the tensor cores.
#pragma once
#include <cmath>

#include "consumer.cuh"
#include "softmax.cuh"

namespace mla {

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
        qk_full_issue(sacc, s, stage, (it / kNumStages) & 1);
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
        if (pg * kPageSize + kPageSize > len) zero_v_tail(s.kv[stage], 0, len - pg * kPageSize, c.t);
        cutlass::arch::fence_view_async_shared();
        consumer_sync(kBarP);
        rescale_rows(o, alpha_a, alpha_b);
        // (Measured, run 4: queueing the next page's S behind this P V before waiting for it was
        // slower on every row; see NOTES.md. Wait, release the stage, then load the next S.)
        pv_half(o, s.p, s.kv[stage], 0);
        EmptyBarrier::arrive(&s.empty_bar[stage][kGroupA]);
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
        wait_barrier(&s.full_bar[stage][kGroupB], (it / kNumStages) & 1);  // this WG's V half
        if (pg * kPageSize + kPageSize > len) {
          zero_v_tail(s.kv[stage], 1, len - pg * kPageSize, c.t);
          cutlass::arch::fence_view_async_shared();
        }
        consumer_sync(kBarP);  // P and the rescale factors are written
        const float alpha_a = s.row_max[0][c.row_a];
        const float alpha_b = s.row_max[0][c.row_a + 8];
        rescale_rows(o, alpha_a, alpha_b);
        pv_half(o, s.p, s.kv[stage], 1);
        EmptyBarrier::arrive(&s.empty_bar[stage][kGroupB]);
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

}  // namespace mla
