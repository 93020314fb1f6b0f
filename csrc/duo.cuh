// The pair consumer schedule ("duo", compute-bound tiles: s_q * h_q / h_kv >= 128).
//
// A request piece's pages go in pairs (a, b): a in stage 0, owned by warpgroup 0; b in stage 1, owned by
// warpgroup 1. Each warpgroup computes S = Q K^T of its own page, so one warpgroup's softmax runs while
// the other's S or P V keeps the tensor cores busy. Both add every page to their own 256 output columns
// (WG0: 0..255, WG1: 256..511) on one running row max m:
//   WG0: softmax of a on m -> m_a; publishes m_a and P_a (s.p, kBarPA); O += P_a V_a[:, 0:256] with P_a
//        straight from registers (wgmma RS); once WG1 published m_b and P_b (kBarPB), rescales O to m_b and
//        adds P_b V_b[:, 0:256] with P_b from page b's RoPE chunk; then issues S of the next a.
//   WG1: once m_a and P_a are there, rescales O to m_a and adds P_a V_a[:, 256:512] (from s.p) while it runs
//        the softmax of b on m_a -> m_b; publishes m_b and P_b (into page b's RoPE chunk, which nothing reads
//        once S_b is done); rescales O to m_b, O += P_b V_b[:, 256:512] (RS); then issues S of the next b.
// So page a is done (both halves) early in the pair, and the next a loads during the rest of it; the next
// b's load is covered by WG0's work on the next a. Each chunk group of a stage is released by the
// warpgroup that reads it last (config.h: group A = V columns 0..255 + RoPE chunk, by WG0 -- also for page
// b, whose RoPE chunk holds P_b; group B by WG1), as soon as its P V is done.
// With p.duo_s_after_a, WG1 issues S of the next b only once WG0's S of the next a is done (kBarSA): the
// tensor cores then finish S_a first, so WG0's softmax of a (which WG1's softmax waits for) starts
// earlier, and the next b -- whose stage frees last -- gets that much longer to load.
// Every wgmma group is waited for inside the step that issues it (none is in flight across the loop's
// back edge, which would make ptxas serialize every wgmma of the kernel).
// Named-barrier reuse is safe: between two arrivals of one warpgroup on kBarPA or kBarPB it waits for the
// other's arrival that follows the other's wait. Shared-memory reuse: s.p (P_a) is rewritten only after
// WG0's S of the next a, whose group B loads after WG1 released it, after its P_a V_a; page b's RoPE chunk
// only after WG0 released group A after its P_b V_b; the row maxima after the other's barrier.
#pragma once
#include <cmath>

#include "consumer.cuh"
#include "softmax.cuh"

namespace mla {

// Page b's RoPE chunk, where WG1 puts P_b.
__device__ __forceinline__ uint8_t* rope_chunk(SharedStorage& s, int stage) {
  return s.kv[stage] + (kNumChunksQK - 1) * kChunkBytes;
}

// Masking and row maxima of S for page pg (keys pg*64 ..).
__device__ __forceinline__ void page_max(float (&sacc)[32], const ConsumerCtx& c, const KeyLimits& lim, int pg,
                                         float& mx_a, float& mx_b) {
  if (pg * kPageSize + kPageSize > lim.min) mask_scores(sacc, pg * kPageSize + 2 * (c.lane & 3), lim.a, lim.b);
  row_max_local(sacc, mx_a, mx_b);
}

// Unused slots of a request's last page: this warpgroup's V half of those rows becomes 0 (see zero_v_tail).
__device__ __forceinline__ void zero_tail_if_last(SharedStorage& s, const ConsumerCtx& c, int stage, int pg, int len) {
  if (pg * kPageSize + kPageSize > len) {
    zero_v_tail(s, stage, c.w, len - pg * kPageSize, c.t);
    cutlass::arch::fence_view_async_shared();
  }
}

__device__ __forceinline__ void publish_max(float (&row_max)[kBlockM], const ConsumerCtx& c, const RowState& st) {
  if ((c.lane & 3) == 0) {
    row_max[c.row_a] = st.m[0];
    row_max[c.row_a + 8] = st.m[1];
  }
}

// This warpgroup is done with a stage's chunk group. Without a cluster: all 128 threads arrive on the local
// empty barrier. In a cluster the group's next load is multicast into every CTA, so each warp (once all its
// lanes are past their wgmma wait) arrives on the barrier of every CTA of the cluster (4 warps x kCluster).
template <int kCluster>
__device__ __forceinline__ void release_group(uint64_t* bar, int lane) {
  if constexpr (kCluster == 1) {
    EmptyBarrier::arrive(bar);
  } else {
    __syncwarp();
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kCluster; ++r) cutlass::arch::ClusterBarrier::arrive(bar, r, 1u);
    }
  }
}
constexpr int empty_arrivals(int cluster) { return cluster == 1 ? 128 : 4 * cluster; }

// Warpgroup 0's part of one pair. On entry sacc = S_a (complete); on exit sacc = S of the next a (complete)
// if there is one.
template <int kCluster>
__device__ __forceinline__ void duo_pair_wg0(const DecodeParams& p, SharedStorage& s, const ConsumerCtx& c,
                                             const KeyLimits& lim, int len, int pa, int hi, uint32_t parities,
                                             float (&sacc)[32], float (&o)[128], RowState& st) {
  const bool has_b = pa + 1 < hi;
  const uint32_t par0 = stage_parity(parities, 0), par1 = stage_parity(parities, 1);
  float mx_a, mx_b, f_a, f_b;
  page_max(sacc, c, lim, pa, mx_a, mx_b);
  softmax_update(sacc, st, mx_a, mx_b, p.scale_log2, f_a, f_b);  // sacc = P_a on m_a
  publish_max(s.row_max[0], c, st);
  store_p(s.p, sacc, 0, c.row_a, c.lane);
  cutlass::arch::fence_view_async_shared();
  consumer_arrive(kBarPA);
  rescale_rows(o, f_a, f_b);
  uint32_t pfrag[16];
  pack_p(sacc, pfrag);
  zero_tail_if_last(s, c, 0, pa, len);
  pv_half_issue_rs(o, pfrag, s, 0, 0);  // O += P_a V_a[:, 0:256]
  cute::warpgroup_wait<0>();
  fence_regs(o);
  fence_regs(pfrag);
  release_group<kCluster>(&s.empty_bar[0][kGroupA], c.lane);  // the next a's group A loads from here on
  if (!has_b) return;

  consumer_sync(kBarPB);
  float g_a, g_b;  // m_a -> m_b
  advance_max(st, s.row_max[1][c.row_a], s.row_max[1][c.row_a + 8], p.scale_log2, g_a, g_b);
  rescale_rows(o, g_a, g_b);
  wait_barrier(&s.full_bar[1][kGroupA], par1);  // page b's V columns 0..255 (visibility for this WG)
  zero_tail_if_last(s, c, 1, pa + 1, len);
  pv_half_issue(o, rope_chunk(s, 1), s, 1, 0);  // O += P_b V_b[:, 0:256]
  // Release page b's group A (with its RoPE chunk, P_b) before waiting for the next a: the next b's
  // loads must not queue behind the next a's arrival.
  cute::warpgroup_wait<0>();
  fence_regs(o);
  release_group<kCluster>(&s.empty_bar[1][kGroupA], c.lane);
  if (pa + 2 < hi) {
    qk_full_issue(sacc, s, 0, par0 ^ 1);
    cute::warpgroup_wait<0>();
    fence_regs(sacc);
    if (p.duo_s_after_a) consumer_arrive(kBarSA);
  }
}

// Warpgroup 1's part of one pair. On entry sacc = S_b (complete) if b exists; on exit sacc = S of the next b.
template <int kCluster>
__device__ __forceinline__ void duo_pair_wg1(const DecodeParams& p, SharedStorage& s, const ConsumerCtx& c,
                                             const KeyLimits& lim, int len, int pa, int hi, uint32_t parities,
                                             float (&sacc)[32], float (&o)[128], RowState& st) {
  const bool has_b = pa + 1 < hi;
  const uint32_t par0 = stage_parity(parities, 0), par1 = stage_parity(parities, 1);
  float mx_a = -INFINITY, mx_b = -INFINITY;
  if (has_b) page_max(sacc, c, lim, pa + 1, mx_a, mx_b);
  consumer_sync(kBarPA);
  float f_a, f_b;  // m -> m_a
  advance_max(st, s.row_max[0][c.row_a], s.row_max[0][c.row_a + 8], p.scale_log2, f_a, f_b);
  rescale_rows(o, f_a, f_b);
  wait_barrier(&s.full_bar[0][kGroupB], par0);  // page a's V columns 256..511 (visibility for this WG)
  zero_tail_if_last(s, c, 0, pa, len);
  pv_half_issue(o, s.p, s, 0, 1);  // O += P_a V_a[:, 256:512], overlapping the softmax of b
  if (!has_b) {
    cute::warpgroup_wait<0>();
    fence_regs(o);
    release_group<kCluster>(&s.empty_bar[0][kGroupB], c.lane);
    return;
  }
  float g_a, g_b;  // m_a -> m_b
  softmax_update(sacc, st, mx_a, mx_b, p.scale_log2, g_a, g_b);  // sacc = P_b on m_b
  publish_max(s.row_max[1], c, st);
  store_p(rope_chunk(s, 1), sacc, 0, c.row_a, c.lane);
  cutlass::arch::fence_view_async_shared();
  consumer_arrive(kBarPB);
  uint32_t pfrag[16];
  pack_p(sacc, pfrag);
  cute::warpgroup_wait<0>();
  fence_regs(o);
  release_group<kCluster>(&s.empty_bar[0][kGroupB], c.lane);
  rescale_rows(o, g_a, g_b);
  zero_tail_if_last(s, c, 1, pa + 1, len);
  pv_half_issue_rs(o, pfrag, s, 1, 1);  // O += P_b V_b[:, 256:512]
  cute::warpgroup_wait<0>();
  fence_regs(o);
  fence_regs(pfrag);
  release_group<kCluster>(&s.empty_bar[1][kGroupB], c.lane);
  if (pa + 2 < hi && p.duo_s_after_a) consumer_sync(kBarSA);  // the next S_a first, then this S_b
  if (pa + 3 < hi) {  // S of the next b: group B (released just now) first
    qk_group_issue(sacc, s, 1, kGroupB, par1 ^ 1, true);
    qk_group_issue(sacc, s, 1, kGroupA, par1 ^ 1, false);
    cute::warpgroup_wait<0>();
    fence_regs(sacc);
  }
}

template <int kCluster>
__device__ __forceinline__ void consume_duo(const DecodeParams& p, SharedStorage& s, const PartInfo& part,
                                            const ConsumerCtx& c) {
  float o[128];
  float sacc[32];
  uint32_t parities = 0;  // bit s: fill parity of stage s
  for (int req = part.first_req; req <= part.last_req; ++req) {
    const int len = p.seqlens[req];
    int lo, hi;
    if (!part_pages(part, req, len, lo, hi)) continue;
    begin_request(p, s, c, req, o);
    const KeyLimits lim = key_limits(p, c, len);
    RowState st = empty_row_state();
    if (c.w == 1 && p.duo_s_after_a) consumer_sync(kBarSA);
    if (lo + c.w < hi) {  // S of the first page of this warpgroup's stage
      qk_full_issue(sacc, s, c.w, stage_parity(parities, c.w));
      cute::warpgroup_wait<0>();
      fence_regs(sacc);
    }
    if (c.w == 0 && p.duo_s_after_a) consumer_arrive(kBarSA);
    for (int pa = lo; pa < hi; pa += 2) {
      if (c.w == 0) {
        duo_pair_wg0<kCluster>(p, s, c, lim, len, pa, hi, parities, sacc, o, st);
      } else {
        duo_pair_wg1<kCluster>(p, s, c, lim, len, pa, hi, parities, sacc, o, st);
      }
      parities ^= pa + 1 < hi ? 3u : 1u;
    }
    // Row sums: each warpgroup summed its own pages' P (on the common final max); add the two.
    const float l_a = quad_sum(st.l[0]), l_b = quad_sum(st.l[1]);
    if ((c.lane & 3) == 0) {
      s.row_sum[c.w][c.row_a] = l_a;
      s.row_sum[c.w][c.row_a + 8] = l_b;
    }
    consumer_sync(kBarMax);
    const float tot_a = s.row_sum[0][c.row_a] + s.row_sum[1][c.row_a];
    const float tot_b = s.row_sum[0][c.row_a + 8] + s.row_sum[1][c.row_a + 8];
    end_request(p, c, part, req, o, st.m[0], st.m[1], tot_a, tot_b);
  }
}

}  // namespace mla
