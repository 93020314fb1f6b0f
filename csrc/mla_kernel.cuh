// The split-KV paged MLA decode kernel (sm_90a).
//
// Grid (m_blocks, h_kv, num_parts); 384 threads. Warpgroup 2 is the producer: its first warp streams the
// part's pages through the page table with TMA (nine 64x64 boxes per page, 128B swizzle) into a
// two-stage ring.
// Warpgroups 0 and 1 are consumers (w = 0, 1); consumer w owns output columns
// 256w..256w+255 (O += P V with wgmma m64n256k16, V = first 512 columns of the K page already in
// smem, read transposed). Consumer schedule ("solo S"): consumer 0 computes the whole S (wgmma
// m64n64k16), runs the softmax and writes P and the row rescale factors; consumer 1 only does its half
// of P V, which overlaps consumer 0's next S = Q K^T on the tensor cores. Online softmax in fp32.
// (The split-S and seesaw schedules lost to this one on every measured row and were deleted; their
// measurements stay in NOTES.md.)
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

// ---- the consumer schedule (solo S) --------------------------------------------------------------
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
  consume_solo_s(p, s, part, c);
}

}  // namespace mla
