// The "trio" schedule: three warpgroups, three stages, no producer warpgroup (config.h).
//   scorer (warpgroup 0): Q's first 448 columns in registers (wgmma A fragments), its last two chunks in
//     shared memory; per page S = Q K^T (28 RS + 8 SS m64n64k16), mask, online softmax, P (bf16) into the
//     P tile (once both value warpgroups are done with the previous P) and the rescale factors into
//     s.alpha[stage].
//   value warpgroups 1 and 2: output half h (256 columns) += P V_h (m64n256k16, SS). Warpgroup 2 (half 1)
//     takes P(j) as soon as it is written, so its P V shares the tensor pipe with S(j+1); warpgroup 1
//     (half 0) takes it only once S(j+1) is issued (s.p_late), so that its P V queues behind S(j+1) and
//     runs during the scorer's softmax(j+1). Warpgroup 2's lead reloads the one RoPE slot with page j+1's
//     chunk once it has P(j) (S(j) is done); warpgroup 1's lead reloads the stage with page j+3 (one TMA
//     box per latent group).
// With both P V halves issued beside S(j+1), S(j+1) finishes later (the pipe interleaves the three warpgroups'
// wgmmas); holding one half back keeps S's share and fills the softmax gap (traced: csrc/NOTES.md, session 16).
#pragma once
#include <cmath>

#include "consumer.cuh"
#include "softmax.cuh"

namespace mla {

// The part's pages in order (PageCursor, in shared memory, walked by one thread). When the cursor moves to
// the next page of the same request, the page id comes from the page table by cp.async (cursor_next), so
// the walking thread does not stall on that load: it calls cursor_ids_ready() before it next reads an id,
// one page step later, when the load has long landed (a plain load stalled the lead thread of value
// warpgroup 1 for one global-load latency a page, and with it that warpgroup's next P V: NOTES, session 12).
__device__ __forceinline__ bool cursor_valid(const PageCursor& cur, const PartInfo& part) {
  return cur.req <= part.last_req;
}
__device__ __forceinline__ void cursor_ids_ready() { cute::cp_async_wait<0>(); }
// Moves to the first page of the first request at or after r that has pages in this part (synchronous).
__device__ __forceinline__ void cursor_seek(PageCursor& cur, const DecodeParams& p, const PartInfo& part, int r) {
  int req = r, lo = 0, hi = 0;
  for (; req <= part.last_req; ++req) {
    if (part_pages(part, req, p.seqlens[req], lo, hi)) break;
  }
  cur.req = req;
  cur.pg = lo;
  cur.hi = hi;
  if (req <= part.last_req) cur.id = __ldg(p.block_table + static_cast<int64_t>(req) * p.bt_stride_b + lo);
}
__device__ __forceinline__ void cursor_next(PageCursor& cur, const DecodeParams& p, const PartInfo& part) {
  const int pg = cur.pg + 1;
  if (pg < cur.hi) {
    cur.pg = pg;
    const int* id = p.block_table + static_cast<int64_t>(cur.req) * p.bt_stride_b + pg;
    cute::SM80_CP_ASYNC_CACHEALWAYS<int>::copy(*id, cur.id);
    cute::cp_async_fence();
  } else {
    cursor_ids_ready();  // no copy may land on cur.id after the seek's store
    cursor_seek(cur, p, part, cur.req + 1);
  }
}

// Latent group g (L = chunks 0..3, R = 4..7) of `page` into `stage`: one box (64 columns, 64 tokens, 4 chunks)
// of the group map `tmap_g` (launch.cu), which lands the four swizzled chunks side by side (with four boxes of
// the chunk map instead this schedule measured 4-5% more cycles: NOTES, session 16).
__device__ __forceinline__ void trio_load_latents(const CUtensorMap* tmap_g, TrioStorage& s, int stage, int g, int page,
                                                  int head_kv) {
  constexpr auto kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
  uint64_t* bar = &s.full_bar[stage][g];
  constexpr int n = kTrioGroupChunks;
  FullBarrier::arrive_and_expect_tx(bar, n * kChunkBytes);
  cute::SM90_TMA_LOAD_5D::copy(tmap_g, bar, kHint, s.kv[stage] + n * g * kChunkBytes, 0, 0, n * g, head_kv, page);
}
// The RoPE chunk of `page` into the RoPE slot (chunk map `tmap`).
__device__ __forceinline__ void trio_load_rope(const CUtensorMap* tmap, TrioStorage& s, int page, int head_kv) {
  FullBarrier::arrive_and_expect_tx(&s.rope_full, kChunkBytes);
  load_page_chunk(tmap, &s.rope_full, s.rope, kNumChunksV, page, head_kv);
}
// A page's RoPE chunk can be requested only once S of the page before is done (one slot): prefetch it into
// L2 when the page's latents are requested, so that the later load is an L2 hit.
__device__ __forceinline__ void trio_prefetch_rope(const CUtensorMap* tmap, int page, int head_kv) {
  cute::SM90_TMA_LOAD_4D::PREFETCH::copy(tmap, kNumChunksV * kChunkCols, 0, head_kv, page);
}

// The scorer's A fragments of Q's first 448 columns for request `req`: register 4k + e holds, for k-step k
// (columns 16k..16k+15), (row a, 16k + 2q), (row b, 16k + 2q), (row a, 16k + 8 + 2q), (row b, 16k + 8 + 2q)
// for e = 0..3, two bf16 each, q = lane % 4 (the m64n64 accumulator layout, softmax.cuh). Padding rows
// (>= p.rows) are zero.
constexpr int kTrioQRegSteps = kTrioQRegChunks * kChunkCols / 16;  // 28 k-steps
__device__ __forceinline__ void load_q_regs(const DecodeParams& p, const ConsumerCtx& c, int req,
                                            uint32_t (&qa)[4 * kTrioQRegSteps]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rg = h == 0 ? c.rg_a : c.rg_b;
    const bool valid = rg < p.rows;
    const int sq = valid ? rg / p.group : 0, head = c.head_kv * p.group + (valid ? rg % p.group : 0);
    const uint32_t* row = reinterpret_cast<const uint32_t*>(
        p.q + static_cast<int64_t>(req) * p.q_stride_b + static_cast<int64_t>(sq) * p.q_stride_s +
        static_cast<int64_t>(head) * p.q_stride_h + 2 * (c.lane & 3));
#pragma unroll
    for (int k = 0; k < kTrioQRegSteps; ++k) {
      qa[4 * k + h] = valid ? __ldg(row + 8 * k) : 0u;
      qa[4 * k + 2 + h] = valid ? __ldg(row + 8 * k + 4) : 0u;
    }
  }
}

// S(64 x 64) = Q K^T of page it: latent group L as RS k-steps (A = qa) once its bytes land, group R (RS for
// chunks 4..6, SS with A = Q chunk 7 from s.q_tail for chunk 7), then the RoPE chunk in the slot (SS, A = Q
// chunk 8). Issues one wgmma group; the caller waits.
__device__ __forceinline__ void trio_qk(float (&sacc)[32], const uint32_t (&qa)[4 * kTrioQRegSteps], TrioStorage& s,
                                        int stage, uint32_t stage_parity, uint32_t rope_parity) {
  using namespace cute;
  const GMMA::DescriptorIterator dk{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.kv[stage], SmemLayoutQK{}), Shape<Int<kBlockN>, _16>{}, make_coord(0, 0)))};
  const GMMA::DescriptorIterator dr{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.rope, SmemLayoutP{}), Shape<Int<kBlockN>, _16>{}, make_coord(0, 0)))};
  const GMMA::DescriptorIterator dq{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.q_tail, SmemLayoutQK{}), Shape<Int<kBlockM>, _16>{}, make_coord(0, 0)))};
  constexpr int kSteps = kChunkCols / 16;  // k-steps per chunk
#pragma unroll
  for (int g = 0; g < 2; ++g) {
    wait_barrier(&s.full_bar[stage][g], stage_parity);
    warpgroup_arrive();
#pragma unroll
    for (int k = 4 * g * kSteps; k < 4 * (g + 1) * kSteps; ++k) {
      if (k < kTrioQRegSteps) {
        gmma_rs<MmaQK64RS>(sacc, qa[4 * k], qa[4 * k + 1], qa[4 * k + 2], qa[4 * k + 3], dk[qk_step(k)],
                           k == 0 ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One);
      } else {
        gmma<MmaQK64>(sacc, dq[qk_step(k - kTrioQRegSteps)], dk[qk_step(k)]);
      }
    }
  }
  wait_barrier(&s.rope_full, rope_parity);
  warpgroup_arrive();
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    gmma<MmaQK64>(sacc, dq[qk_step(kSteps + kk)], dr[qk_step(kk)]);
  }
  warpgroup_commit_batch();
}

// Warpgroup 0. Per page j: S(j) (waits for its latents and the RoPE slot's chunk), then P(j - 1) to value
// warpgroup 1 (s.p_late: S(j) is now ahead of its P V in the pipe), softmax(j), P(j) into the P tile once
// both value warpgroups are done with P(j - 1) (s.p_free), then P(j) to value warpgroup 2 (s.p_full). A
// request's last P goes to both at once. s.fin[parity] holds a request's final row sums and maxima.
__device__ __forceinline__ void trio_score(const DecodeParams& p, TrioStorage& s, const PartInfo& part,
                                           const ConsumerCtx& c) {
  uint32_t qa[4 * kTrioQRegSteps];  // Q's first 448 columns, A fragments (load_q_regs)
  float sacc[32];    // S of one page, then its probabilities
  int it = 0, nreq = 0;
  for (int req = part.first_req; req <= part.last_req; ++req) {
    const int len = p.seqlens[req];
    int lo, hi;
    if (!part_pages(part, req, len, lo, hi)) continue;
    // The previous request's S are all done (each page waits for its own): Q may be replaced.
    load_q_chunks<kTrioQRegChunks, kTrioQTailChunks, 128>(p, s.q_tail, req, c.m_block, c.head_kv, c.t);
    load_q_regs(p, c, req, qa);
    cute::cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    own_warpgroup_sync(kBarScorer);
    fence_regs(qa);
    const int mask_from = key_limits(p, c, len).min;  // pages past it need a mask (limits recomputed there)
    RowState st = empty_row_state();
    for (int pg = lo; pg < hi; ++pg, ++it) {
      const int stage = it % kTrioStages;
      trio_qk(sacc, qa, s, stage, (it / kTrioStages) & 1, it & 1);
      if (pg > lo) EmptyBarrier::arrive(&s.p_late[(it - 1) % kTrioStages]);  // P(it - 1): value warpgroup 1
      cute::warpgroup_wait<0>();
      fence_regs(sacc);
      if (pg * kPageSize + kPageSize > mask_from) {
        const KeyLimits lim = key_limits(p, c, len);
        mask_scores(sacc, pg * kPageSize + 2 * (c.lane & 3), lim.a, lim.b);
      }
      float mx_a, mx_b;
      row_max_local(sacc, mx_a, mx_b);
      float alpha_a, alpha_b;
      softmax_update(sacc, st, mx_a, mx_b, p.scale_log2, alpha_a, alpha_b);
      if (it > 0) wait_barrier(&s.p_free, (it - 1) & 1);  // both P V(it - 1) are done: the P tile is free
      store_p(s.p_tile, sacc, 0, c.row_a, c.lane);
      if ((c.lane & 3) == 0) {
        s.alpha[stage][c.row_a] = alpha_a;
        s.alpha[stage][c.row_a + 8] = alpha_b;
      }
      if (pg + 1 == hi) {
        const float l_a = quad_sum(st.l[0]), l_b = quad_sum(st.l[1]);
        const int par = nreq & 1;
        wait_barrier(&s.fin_free[par], ((nreq >> 1) & 1) ^ 1);  // request nreq - 2's values were read
        if ((c.lane & 3) == 0) {
          s.fin[par][0][c.row_a] = l_a;
          s.fin[par][0][c.row_a + 8] = l_b;
          s.fin[par][1][c.row_a] = st.m[0];
          s.fin[par][1][c.row_a + 8] = st.m[1];
        }
      }
      cutlass::arch::fence_view_async_shared();
      EmptyBarrier::arrive(&s.p_full[stage]);
      if (pg + 1 == hi) EmptyBarrier::arrive(&s.p_late[stage]);  // no S of this request follows
    }
    ++nreq;
  }
}

// Warpgroups 1 and 2 (c.w = output half h). kIssuer (half 0, warpgroup 1) takes P(it) from s.p_late, and its
// thread t = 0 reloads, after page it, the stage with page it + 3 (group L once its own P V is done, group R
// once half 1 is done too: s.p_done). Half 1 (warpgroup 2) takes P(it) from s.p_full, and its thread t = 0
// then loads page it + 1's RoPE chunk into the slot (S(it) is done with it).
template <bool kIssuer>
__device__ __forceinline__ void trio_values(const CUtensorMap* tmap, const CUtensorMap* tmap_g, const DecodeParams& p,
                                            TrioStorage& s, const PartInfo& part, const ConsumerCtx& c) {
  constexpr int h = kIssuer ? 0 : 1;
  constexpr NamedBarrierId own = kIssuer ? kBarValue0 : kBarValue1;
  const bool lead = c.t == 0;
  // in shared memory: registers are this warpgroup's scarcest resource
  PageCursor& next_stage = s.next_stage;  // walked by warpgroup 1's lead
  PageCursor& next_rope = s.next_rope;    // walked by warpgroup 2's lead
  if (lead) {
    if (kIssuer) {
      cursor_seek(next_stage, p, part, part.first_req);
      for (int k = 0; k < kTrioStages && cursor_valid(next_stage, part); ++k) {
        cursor_ids_ready();
        trio_load_latents(tmap_g, s, k, 0, next_stage.id, c.head_kv);
        trio_load_latents(tmap_g, s, k, 1, next_stage.id, c.head_kv);
        if (k > 0) trio_prefetch_rope(tmap, next_stage.id, c.head_kv);
        cursor_next(next_stage, p, part);
      }
    } else {
      cursor_seek(next_rope, p, part, part.first_req);
      if (cursor_valid(next_rope, part)) {
        trio_load_rope(tmap, s, next_rope.id, c.head_kv);
        cursor_next(next_rope, p, part);
      }
    }
  }
  __syncwarp();
  float o[128];
  int it = 0, nreq = 0;
  for (int req = part.first_req; req <= part.last_req; ++req) {
    const int len = p.seqlens[req];
    int lo, hi;
    if (!part_pages(part, req, len, lo, hi)) continue;
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    for (int pg = lo; pg < hi; ++pg, ++it) {
      const int stage = it % kTrioStages;
      const uint32_t parity = (it / kTrioStages) & 1;
      uint8_t* kv = s.kv[stage];
      wait_barrier(kIssuer ? &s.p_late[stage] : &s.p_full[stage], parity);
      if (!kIssuer && lead && cursor_valid(next_rope, part)) {  // S(it) is done: the RoPE slot is free
        cursor_ids_ready();
        trio_load_rope(tmap, s, next_rope.id, c.head_kv);
        cursor_next(next_rope, p, part);
      }
      if (pg * kPageSize + kPageSize > len) {
        zero_v_tail(kv, h, len - pg * kPageSize, c.t);
        cutlass::arch::fence_view_async_shared();
        own_warpgroup_sync(own);
      }
      const float alpha_a = s.alpha[stage][c.row_a];
      const float alpha_b = s.alpha[stage][c.row_a + 8];
      rescale_rows(o, alpha_a, alpha_b);
      pv_half(o, s.p_tile, kv, h);
      own_warpgroup_sync(own);  // every warp's P V of this page is done
      if (lead) {
        EmptyBarrier::arrive(&s.p_free);
        if (!kIssuer) {
          EmptyBarrier::arrive(&s.p_done[stage]);
        } else if (cursor_valid(next_stage, part)) {
          cursor_ids_ready();
          trio_load_latents(tmap_g, s, stage, 0, next_stage.id, c.head_kv);
          trio_prefetch_rope(tmap, next_stage.id, c.head_kv);
          wait_barrier(&s.p_done[stage], parity);
          trio_load_latents(tmap_g, s, stage, 1, next_stage.id, c.head_kv);
          // the cursor moves after the issue: its page-table copy lands during the next page
          cursor_next(next_stage, p, part);
        }
      }
      __syncwarp();
      if (pg + 1 == hi) {
        const int par = nreq & 1;
        const float l_a = s.fin[par][0][c.row_a], l_b = s.fin[par][0][c.row_a + 8];
        const float m_a = s.fin[par][1][c.row_a], m_b = s.fin[par][1][c.row_a + 8];
        EmptyBarrier::arrive(&s.fin_free[par]);
        end_request(p, c, part, req, o, m_a, m_b, l_a, l_b);
      }
    }
    ++nreq;
  }
}

}  // namespace mla
