// The "duet" schedule: two warpgroups, no producer warpgroup (256 threads). The pages of a request piece
// alternate between them in pairs: page k of the piece is the pair's "even" page when k is even (page buffer
// 0) and its "odd" page otherwise (buffer 1).
//   warpgroup 0 (output half 0, columns 0..255) computes S and the softmax of the even pages,
//   warpgroup 1 (half 1, columns 256..511) those of the odd pages;
// each adds every page to its own half: the page whose S it computed with P from registers (wgmma RS),
// the other one with P from shared memory. One running row max M, in shared memory, moves twice per pair:
//   WG 0:  M_e = max(M, rowmax S_e), a = 2^((M - M_e)s):     O_0 = a O_0 + P_e V_e,0
//   WG 1:  M_o = max(M_e, rowmax S_o), b = 2^((M_e - M_o)s): O_1 = ab O_1 + P_o V_o,1 + (b P_e) V_e,1
//   WG 0:                                                     O_0 = b O_0 + P_o V_o,0
// (s = scale_log2, P_e = 2^(S_e s - M_e s), P_o = 2^(S_o s - M_o s)), so one warpgroup's softmax always
// has the other's tensor work queued behind it: WG 0's softmax runs under WG 1's S, WG 1's under WG 0's
// P V, and the four P V halves and the next two S follow back to back.
// Each buffer's nine 64-column chunks have their own TMA barrier and are refilled in two halves, each as
// soon as its last reader is done: chunks 0..3 (V columns 0..255) by warpgroup 0 after its P V of that
// page, chunks 4..8 (V columns 256..511 and RoPE) by warpgroup 1 after its own. The next S of a buffer
// reads first the half that was refilled first (buffer 0: chunks 0..3, then 4..8; buffer 1: 4..8, then
// 0..3), so that it starts while the other half is still loading.
// Q: columns 0..511 in shared memory (both warpgroups' S read them), the RoPE chunk as A fragments in
// registers, so that the Q tile and both P tiles fit beside the two buffers.
#pragma once
#include <cmath>

#include "consumer.cuh"
#include "softmax.cuh"

namespace mla {

// Named barriers of the duet kernel (CUTLASS user ids; no other schedule runs in this kernel). The
// four cross-warpgroup ones are arrive (one warpgroup) / sync (the other) pairs over all 256 threads.
enum DuetBarrier : uint32_t {
  kBarEvenMax = 0,  // WG 0 -> 1: M_e and a written (row_max, scale_even)
  kBarOddMax = 1,   // WG 1 -> 0: M_o and b written (row_max, scale_odd)
  kBarPEven = 2,    // WG 0 -> 1: b P_e written (p_even)
  kBarPOdd = 3,     // WG 1 -> 0: P_o written (p_odd)
  kBarOwn0 = 4,     // warpgroup 0's own threads: a zeroed V tail is written
  kBarOwn1 = 5,     // warpgroup 1's own threads
};
__device__ __forceinline__ void duet_arrive(uint32_t id) { cutlass::arch::NamedBarrier::arrive(kDuetThreads, id); }
__device__ __forceinline__ void duet_sync(uint32_t id) { cutlass::arch::NamedBarrier::sync(kDuetThreads, id); }

// One thread: chunks [c0, c1) of physical page `page` (head head_kv) into buffer `buf`, each on its barrier.
__device__ __forceinline__ void duet_load(const CUtensorMap* tmap, DuetStorage& s, int buf, int c0, int c1, int page,
                                          int head_kv) {
  for (int c = c0; c < c1; ++c) {
    FullBarrier::arrive_and_expect_tx(&s.full[buf][c], kChunkBytes);
    load_page_chunk(tmap, &s.full[buf][c], s.kv[buf] + c * kChunkBytes, c, page, head_kv);
  }
}

// S (+)= Q K^T over chunks [kC0, kC1) of buffer `buf` (kFirst: its first k-step overwrites S), one wgmma group
// per chunk, each issued once that chunk's bytes have landed (phase: the buffer's page parity). Q chunks
// 0..7 from s.q, chunk 8 (RoPE) from the A fragments qr. The caller waits.
template <int kC0, int kC1, bool kFirst>
__device__ __forceinline__ void duet_qk(float (&sacc)[32], const uint32_t (&qr)[16], DuetStorage& s, int buf,
                                        uint32_t phase) {
  using namespace cute;
  const GMMA::DescriptorIterator dq{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.q, SmemLayoutQK{}), Shape<Int<kBlockM>, _16>{}, make_coord(0, 0)))};
  const GMMA::DescriptorIterator dk{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.kv[buf], SmemLayoutQK{}), Shape<Int<kBlockN>, _16>{}, make_coord(0, 0)))};
  constexpr int kSteps = kChunkCols / 16;  // k-steps per chunk
#pragma unroll
  for (int c = kC0; c < kC1; ++c) {
    wait_barrier(&s.full[buf][c], phase);
    warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      const int k = c * kSteps + kk;
      const auto scale = kFirst && c == kC0 && kk == 0 ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
      if (c < kNumChunksV) {
        gmma<MmaQK64>(sacc, dq[qk_step(k)], dk[qk_step(k)], scale);
      } else {
        gmma_rs<MmaQK64RS>(sacc, qr[4 * kk], qr[4 * kk + 1], qr[4 * kk + 2], qr[4 * kk + 3], dk[qk_step(k)], scale);
      }
    }
    warpgroup_commit_batch();
  }
}

// Masks S of page pg (absolute in the request) when keys past a row's limit fall in it.
__device__ __forceinline__ void duet_mask(float (&sacc)[32], const DecodeParams& p, const ConsumerCtx& c, int len,
                                          int mask_from, int pg) {
  if (pg * kPageSize + kPageSize > mask_from) {
    const KeyLimits lim = key_limits(p, c, len);
    mask_scores(sacc, pg * kPageSize + 2 * (c.lane & 3), lim.a, lim.b);
  }
}

// Zeroes this warpgroup's V half of page pg's slots past the request's end (the last page only), then makes
// the zeros visible to its wgmma.
__device__ __forceinline__ void duet_zero_tail(uint8_t* kv, const ConsumerCtx& c, int len, int pg, uint32_t own) {
  if (pg * kPageSize + kPageSize > len) {
    zero_v_tail(kv, c.w, len - pg * kPageSize, c.t);
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(128, own);
  }
}

// Where warpgroup `w` is in its piece: the piece's page ids, its length, and the row-max state.
struct DuetPiece {
  const int* ids;  // block-table entries of the piece's pages (ids[k] = page k)
  int lo, n;       // first page (in the request) and page count
  int len, mask_from;
};

// Warpgroup 0: the even pages. On entry buffer 0 holds (or is loading) page 0 and buffer 1 page 1.
__device__ __forceinline__ void duet_even(const CUtensorMap* tmap, const DecodeParams& p, DuetStorage& s,
                                          const ConsumerCtx& c, const DuetPiece& pc, const uint32_t (&qr)[16],
                                          float (&o)[128], RowState& st, uint32_t& phase) {
  float sacc[32];  // S of the even page, then its probabilities
  duet_qk<0, 4, true>(sacc, qr, s, 0, phase);
  duet_qk<4, kNumChunksQK, false>(sacc, qr, s, 0, phase);
  cute::warpgroup_wait<0>();
  fence_regs(sacc);
  phase ^= 1;
  for (int k = 0; k < pc.n; k += 2) {
    const bool has_odd = k + 1 < pc.n, next_even = k + 2 < pc.n, next_odd = k + 3 < pc.n;
    const int pg = pc.lo + k;
    const int id_even = next_even ? __ldg(pc.ids + k + 2) : 0, id_odd = next_odd ? __ldg(pc.ids + k + 3) : 0;
    duet_mask(sacc, p, c, pc.len, pc.mask_from, pg);
    float mx_a, mx_b, a_a, a_b;
    row_max_local(sacc, mx_a, mx_b);
    softmax_update(sacc, st, mx_a, mx_b, p.scale_log2, a_a, a_b);  // st: M -> M_e, row sums on M_e
    if ((c.lane & 3) == 0) {
      s.row_max[c.row_a] = st.m[0];
      s.row_max[c.row_a + 8] = st.m[1];
      s.scale_even[c.row_a] = a_a;
      s.scale_even[c.row_a + 8] = a_b;
    }
    duet_arrive(kBarEvenMax);
    rescale_rows(o, a_a, a_b);
    uint32_t pa[16];
    pack_p(sacc, pa);
    duet_zero_tail(s.kv[0], c, pc.len, pg, kBarOwn0);
    pv_issue_rs(o, pa, s.kv[0], 0);
    cute::warpgroup_wait<0>();
    fence_regs(o);
    fence_regs(pa);
    if (next_even && c.t == 0) duet_load(tmap, s, 0, 0, 4, id_even, c.head_kv);  // V_e,0 read: refill
    duet_sync(kBarOddMax);
    const float b_a = s.scale_odd[c.row_a], b_b = s.scale_odd[c.row_a + 8];
    st.m[0] = s.row_max[c.row_a];
    st.m[1] = s.row_max[c.row_a + 8];
    st.l[0] *= b_a;
    st.l[1] *= b_b;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      sacc[4 * j] *= b_a;
      sacc[4 * j + 1] *= b_a;
      sacc[4 * j + 2] *= b_b;
      sacc[4 * j + 3] *= b_b;
    }
    store_p(s.p_even, sacc, 0, c.row_a, c.lane);
    cutlass::arch::fence_view_async_shared();
    duet_arrive(kBarPEven);
    rescale_rows(o, b_a, b_b);
    duet_sync(kBarPOdd);
    if (has_odd) {
      duet_zero_tail(s.kv[1], c, pc.len, pg + 1, kBarOwn0);
      pv_issue(o, s.p_odd, s.kv[1], 0);
    }
    if (next_even) duet_qk<0, 4, true>(sacc, qr, s, 0, phase);
    if (next_odd) {
      cute::warpgroup_wait<4>();  // this warpgroup's P V of the odd page is done: refill V_o,0
      if (c.t == 0) duet_load(tmap, s, 1, 0, 4, id_odd, c.head_kv);
    }
    if (next_even) duet_qk<4, kNumChunksQK, false>(sacc, qr, s, 0, phase);
    cute::warpgroup_wait<0>();
    fence_regs(o);
    fence_regs(sacc);
    if (next_even) phase ^= 1;
  }
}

// Warpgroup 1: the odd pages.
__device__ __forceinline__ void duet_odd(const CUtensorMap* tmap, const DecodeParams& p, DuetStorage& s,
                                         const ConsumerCtx& c, const DuetPiece& pc, const uint32_t (&qr)[16],
                                         float (&o)[128], RowState& st, uint32_t& phase) {
  float sacc[32];  // S of the odd page, then its probabilities
  if (pc.n > 1) {
    duet_qk<4, kNumChunksQK, true>(sacc, qr, s, 1, phase);
    duet_qk<0, 4, false>(sacc, qr, s, 1, phase);
    cute::warpgroup_wait<0>();
    fence_regs(sacc);
    phase ^= 1;
  }
  for (int k = 0; k < pc.n; k += 2) {
    const bool has_odd = k + 1 < pc.n, next_even = k + 2 < pc.n, next_odd = k + 3 < pc.n;
    const int pg = pc.lo + k;
    const int id_even = next_even ? __ldg(pc.ids + k + 2) : 0, id_odd = next_odd ? __ldg(pc.ids + k + 3) : 0;
    if (has_odd) duet_mask(sacc, p, c, pc.len, pc.mask_from, pg + 1);
    duet_sync(kBarEvenMax);
    const float a_a = s.scale_even[c.row_a], a_b = s.scale_even[c.row_a + 8];
    st.m[0] = s.row_max[c.row_a];
    st.m[1] = s.row_max[c.row_a + 8];
    st.l[0] *= a_a;  // row sums on M_e
    st.l[1] *= a_b;
    float b_a = 1.f, b_b = 1.f;
    if (has_odd) {
      float mx_a, mx_b;
      row_max_local(sacc, mx_a, mx_b);
      softmax_update(sacc, st, mx_a, mx_b, p.scale_log2, b_a, b_b);  // st: M_e -> M_o
    }
    if ((c.lane & 3) == 0) {
      s.row_max[c.row_a] = st.m[0];
      s.row_max[c.row_a + 8] = st.m[1];
      s.scale_odd[c.row_a] = b_a;
      s.scale_odd[c.row_a + 8] = b_b;
    }
    duet_arrive(kBarOddMax);
    rescale_rows(o, a_a * b_a, a_b * b_b);
    uint32_t pa[16];
    if (has_odd) {
      store_p(s.p_odd, sacc, 0, c.row_a, c.lane);
      cutlass::arch::fence_view_async_shared();
      pack_p(sacc, pa);
      duet_zero_tail(s.kv[1], c, pc.len, pg + 1, kBarOwn1);
      pv_issue_rs(o, pa, s.kv[1], 1);
    }
    duet_arrive(kBarPOdd);
    duet_sync(kBarPEven);
    duet_zero_tail(s.kv[0], c, pc.len, pg, kBarOwn1);
    pv_issue(o, s.p_even, s.kv[0], 1);
    if (next_odd) {
      cute::warpgroup_wait<1>();  // P V of the odd page done: refill its V_o,1 and RoPE
      if (c.t == 0) duet_load(tmap, s, 1, 4, kNumChunksQK, id_odd, c.head_kv);
    }
    cute::warpgroup_wait<0>();
    fence_regs(o);
    if (has_odd) fence_regs(pa);
    if (next_even && c.t == 0) duet_load(tmap, s, 0, 4, kNumChunksQK, id_even, c.head_kv);
    if (next_odd) {
      duet_qk<4, kNumChunksQK, true>(sacc, qr, s, 1, phase);
      duet_qk<0, 4, false>(sacc, qr, s, 1, phase);
      cute::warpgroup_wait<0>();
      fence_regs(sacc);
      phase ^= 1;
    }
  }
}

// Both warpgroups: the part's request pieces in order; per piece the Q tile, the first two pages, the pairs,
// and the epilogue (row sums added over the two warpgroups; both end on the same M).
__device__ __forceinline__ void duet_consume(const CUtensorMap* tmap, const DecodeParams& p, DuetStorage& s,
                                             const PartInfo& part, const ConsumerCtx& c) {
  uint32_t phase = 0;  // parity of the pages this warpgroup's buffer has delivered
  uint32_t qr[16];     // Q's RoPE chunk, A fragments (load_q_frags)
  float o[128];
  for (int req = part.first_req; req <= part.last_req; ++req) {
    DuetPiece pc;
    pc.len = p.seqlens[req];
    int hi;
    if (!part_pages(part, req, pc.len, pc.lo, hi)) continue;
    pc.n = hi - pc.lo;
    pc.ids = p.block_table + static_cast<int64_t>(req) * p.bt_stride_b + pc.lo;
    pc.mask_from = key_limits(p, c, pc.len).min;
    __syncthreads();  // the previous piece is done with Q, both buffers, the P tiles and row_max
    if (threadIdx.x == 0) {
      duet_load(tmap, s, 0, 0, kNumChunksQK, __ldg(pc.ids), c.head_kv);
      if (pc.n > 1) duet_load(tmap, s, 1, 0, kNumChunksQK, __ldg(pc.ids + 1), c.head_kv);
    }
    load_q_chunks<0, kNumChunksV, kDuetThreads>(p, s.q, req, c.m_block, c.head_kv, threadIdx.x);
    load_q_frags<kNumChunksV * kChunkCols / 16, 4>(p, c, req, qr);
    cute::cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    fence_regs(qr);
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    RowState st = empty_row_state();
    if (c.w == 0) {
      duet_even(tmap, p, s, c, pc, qr, o, st, phase);
    } else {
      duet_odd(tmap, p, s, c, pc, qr, o, st, phase);
    }
    const float l_a = quad_sum(st.l[0]), l_b = quad_sum(st.l[1]);
    if ((c.lane & 3) == 0) {
      s.row_sum[c.w][c.row_a] = l_a;
      s.row_sum[c.w][c.row_a + 8] = l_b;
    }
    __syncthreads();
    const float sum_a = s.row_sum[0][c.row_a] + s.row_sum[1][c.row_a];
    const float sum_b = s.row_sum[0][c.row_a + 8] + s.row_sum[1][c.row_a + 8];
    end_request(p, c, part, req, o, st.m[0], st.m[1], sum_a, sum_b);
  }
}

}  // namespace mla
