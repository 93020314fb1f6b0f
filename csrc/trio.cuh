// The "trio" schedule: three warpgroups, three stages, no producer warpgroup (config.h).
//   scorer (warpgroup 0): Q's chunks 1..6 in registers (wgmma A fragments), chunks 0 and 7 loaded into 16
//     more for each page (one after the other), the RoPE chunk in shared memory; per page S = Q K^T (32 RS +
//     4 SS m64n64k16), mask, online softmax, P (bf16) into the page's RoPE slot and the rescale factors into
//     s.alpha[stage]; then straight on to the next page: it never waits for a P V.
//   value warpgroups 1 and 2: output half h (256 columns) += P V_h (m64n256k16, SS), following the
//     scorer; after each page, one thread of warpgroup 1 reloads the page's stage and RoPE slot with the
//     page three places ahead (TMA).
// The tensor pipe runs the value warpgroups' P V while the scorer does its softmax; S reads mostly Q from
// registers; three stages keep a page loading while two are in use. With three RoPE slots a page's slot is
// its own from its load to the end of its P V, so S never waits for a slot that a P V still holds.
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

// One thread: loads `n` 64-column chunks of physical page `page` (head head_kv), starting at chunk c0, into
// `dst` (consecutive swizzled chunks), on full barrier `bar`.
__device__ __forceinline__ void trio_load_chunks(const CUtensorMap* tmap, uint64_t* bar, uint8_t* dst, int c0, int n,
                                                 int page, int head_kv) {
  FullBarrier::arrive_and_expect_tx(bar, n * kChunkBytes);
  for (int i = 0; i < n; ++i) load_page_chunk(tmap, bar, dst + i * kChunkBytes, c0 + i, page, head_kv);
}
// Latent group g (L = chunks 0..3, R = 4..7) of `page` into `stage`; the RoPE chunk of `page` into `slot`.
__device__ __forceinline__ void trio_load_latents(const CUtensorMap* tmap, TrioStorage& s, int stage, int g, int page,
                                                  int head_kv) {
  trio_load_chunks(tmap, &s.full_bar[stage][g], s.kv[stage] + 4 * g * kChunkBytes, 4 * g, 4, page, head_kv);
}
__device__ __forceinline__ void trio_load_rope(const CUtensorMap* tmap, TrioStorage& s, int slot, int page,
                                               int head_kv) {
  trio_load_chunks(tmap, &s.rope_full[slot], s.rope[slot], kNumChunksV, 1, page, head_kv);
}
// The scorer's A fragments of Q's k-steps k0 .. k0 + n - 1 (columns 16 k0 .. 16 (k0 + n) - 1) for request
// `req`: register 4k + e holds, for k-step k0 + k, (row a, 16k + 2q), (row b, 16k + 2q), (row a, 16k + 8 + 2q),
// (row b, 16k + 8 + 2q) for e = 0..3, two bf16 each, q = lane % 4 (the m64n64 accumulator layout,
// softmax.cuh). Padding rows (>= p.rows) are zero.
constexpr int kChunkSteps = kChunkCols / 16;                         // k-steps per chunk
constexpr int kTrioQHeldFirst = kChunkSteps;                         // chunk 0 is loaded per page
constexpr int kTrioQHeldSteps = kTrioQHeldChunks * kChunkSteps;      // 24 k-steps, held for a request piece
// This thread's two Q rows (a, b) of request `req` as 32-bit words from column 2q; a padding row (>= p.rows)
// points at row 0 and reads as zero (valid_a / valid_b).
struct QRows {
  const uint32_t* a;
  const uint32_t* b;
};
__device__ __forceinline__ const uint32_t* q_row(const DecodeParams& p, const ConsumerCtx& c, int req, int rg) {
  const bool valid = rg < p.rows;
  const int sq = valid ? rg / p.group : 0, head = c.head_kv * p.group + (valid ? rg % p.group : 0);
  return reinterpret_cast<const uint32_t*>(p.q + static_cast<int64_t>(req) * p.q_stride_b +
                                           static_cast<int64_t>(sq) * p.q_stride_s +
                                           static_cast<int64_t>(head) * p.q_stride_h + 2 * (c.lane & 3));
}
__device__ __forceinline__ QRows q_rows(const DecodeParams& p, const ConsumerCtx& c, int req) {
  return QRows{q_row(p, c, req, c.rg_a), q_row(p, c, req, c.rg_b)};
}
template <int k0, int n>
__device__ __forceinline__ void load_q_frags(const DecodeParams& p, const ConsumerCtx& c, const QRows& rows,
                                             uint32_t (&qa)[4 * n]) {
  const bool valid_a = c.rg_a < p.rows, valid_b = c.rg_b < p.rows;
#pragma unroll
  for (int k = 0; k < n; ++k) {
    qa[4 * k + 0] = valid_a ? __ldg(rows.a + 8 * (k0 + k)) : 0u;
    qa[4 * k + 1] = valid_b ? __ldg(rows.b + 8 * (k0 + k)) : 0u;
    qa[4 * k + 2] = valid_a ? __ldg(rows.a + 8 * (k0 + k) + 4) : 0u;
    qa[4 * k + 3] = valid_b ? __ldg(rows.b + 8 * (k0 + k) + 4) : 0u;
  }
}

// S(64 x 64) = Q K^T of page it, all RS but the RoPE chunk: Q chunk 0 from qt (loaded here), chunks 1..6 from
// qa, then once chunk 0's k-steps are done (wait for all but the last group) chunk 7 into the same qt, then
// the RoPE chunk of `slot` (SS, A = Q chunk 8 from s.q_tail). Latent groups L (chunks 0..3) and R (4..7) wait
// for their own bytes. Leaves one wgmma group in flight; the caller waits.
__device__ __forceinline__ void trio_qk(float (&sacc)[32], const uint32_t (&qa)[4 * kTrioQHeldSteps],
                                        uint32_t (&qt)[4 * kChunkSteps], const DecodeParams& p, const ConsumerCtx& c,
                                        const QRows& qrows, TrioStorage& s, int stage, int slot,
                                        uint32_t stage_parity, uint32_t slot_parity) {
  using namespace cute;
  const GMMA::DescriptorIterator dk{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.kv[stage], SmemLayoutQK{}), Shape<Int<kBlockN>, _16>{}, make_coord(0, 0)))};
  const GMMA::DescriptorIterator dr{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.rope[slot], SmemLayoutP{}), Shape<Int<kBlockN>, _16>{}, make_coord(0, 0)))};
  const GMMA::DescriptorIterator dq{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.q_tail, SmemLayoutQK{}), Shape<Int<kBlockM>, _16>{}, make_coord(0, 0)))};
  constexpr int kLatentSteps = kNumChunksV * kChunkSteps;  // 32
  static_assert(kTrioQHeldFirst == kChunkSteps && kTrioQHeldFirst + kTrioQHeldSteps == kLatentSteps - kChunkSteps,
                "S's latent k-steps: chunk 0 (qt), the held chunks 1..6 (qa), chunk 7 (qt)");
  load_q_frags<0, kChunkSteps>(p, c, qrows, qt);
  fence_regs(qt);
  wait_barrier(&s.full_bar[stage][0], stage_parity);
  warpgroup_arrive();
#pragma unroll
  for (int k = 0; k < kChunkSteps; ++k) {
    gmma_rs<MmaQK64RS>(sacc, qt[4 * k], qt[4 * k + 1], qt[4 * k + 2], qt[4 * k + 3], dk[qk_step(k)],
                       k == 0 ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One);
  }
  warpgroup_commit_batch();
#pragma unroll
  for (int k = kTrioQHeldFirst; k < kTrioQHeldFirst + kTrioQHeldSteps; ++k) {
    if (k == 4 * kChunkSteps) {
      wait_barrier(&s.full_bar[stage][1], stage_parity);
      warpgroup_arrive();
    }
    const int kh = k - kTrioQHeldFirst;
    gmma_rs<MmaQK64RS>(sacc, qa[4 * kh], qa[4 * kh + 1], qa[4 * kh + 2], qa[4 * kh + 3], dk[qk_step(k)],
                       GMMA::ScaleOut::One);
  }
  warpgroup_commit_batch();
  cute::warpgroup_wait<1>();  // chunk 0's k-steps are done: qt may take chunk 7
  fence_regs(qt);
  load_q_frags<kLatentSteps - kChunkSteps, kChunkSteps>(p, c, qrows, qt);
  fence_regs(qt);
  warpgroup_arrive();
#pragma unroll
  for (int k = kLatentSteps - kChunkSteps; k < kLatentSteps; ++k) {
    const int kt = k - (kLatentSteps - kChunkSteps);
    gmma_rs<MmaQK64RS>(sacc, qt[4 * kt], qt[4 * kt + 1], qt[4 * kt + 2], qt[4 * kt + 3], dk[qk_step(k)],
                       GMMA::ScaleOut::One);
  }
  wait_barrier(&s.rope_full[slot], slot_parity);
  warpgroup_arrive();
#pragma unroll
  for (int kk = 0; kk < kChunkSteps; ++kk) {
    gmma<MmaQK64>(sacc, dq[qk_step(kk)], dr[qk_step(kk)]);
  }
  warpgroup_commit_batch();
}

// Warpgroup 0. s.fin[parity] holds a request's final row sums and maxima for the value warpgroups.
__device__ __forceinline__ void trio_score(const DecodeParams& p, TrioStorage& s, const PartInfo& part,
                                           const ConsumerCtx& c) {
  uint32_t qa[4 * kTrioQHeldSteps];  // Q's columns 64..447 (chunks 1..6), A fragments (load_q_frags)
  uint32_t qt[4 * kChunkSteps];      // Q's chunk 0, then chunk 7, for each page's S (trio_qk)
  float sacc[32];    // S of one page, then its probabilities
  int it = 0, nreq = 0;
  for (int req = part.first_req; req <= part.last_req; ++req) {
    const int len = p.seqlens[req];
    int lo, hi;
    if (!part_pages(part, req, len, lo, hi)) continue;
    // The previous request's S are all done (each page waits for its own): Q may be replaced.
    load_q_chunks<kNumChunksV, kTrioQTailChunks, 128>(p, s.q_tail, req, c.m_block, c.head_kv, c.t);
    const QRows qrows = q_rows(p, c, req);
    load_q_frags<kTrioQHeldFirst, kTrioQHeldSteps>(p, c, qrows, qa);
    cute::cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    own_warpgroup_sync(kBarScorer);
    fence_regs(qa);
    const int mask_from = key_limits(p, c, len).min;  // pages past it need a mask (limits recomputed there)
    RowState st = empty_row_state();
    for (int pg = lo; pg < hi; ++pg, ++it) {
      const int stage = it % kTrioStages, slot = it % kTrioRopeSlots;
      trio_qk(sacc, qa, qt, p, c, qrows, s, stage, slot, (it / kTrioStages) & 1, (it / kTrioRopeSlots) & 1);
      cute::warpgroup_wait<0>();
      fence_regs(sacc);
      fence_regs(qt);  // S has read them: the next page's loads may overwrite them
      if (pg * kPageSize + kPageSize > mask_from) {
        const KeyLimits lim = key_limits(p, c, len);
        mask_scores(sacc, pg * kPageSize + 2 * (c.lane & 3), lim.a, lim.b);
      }
      float mx_a, mx_b;
      row_max_local(sacc, mx_a, mx_b);
      float alpha_a, alpha_b;
      softmax_update(sacc, st, mx_a, mx_b, p.scale_log2, alpha_a, alpha_b);
      // S is done, so the page's RoPE slot is free: P goes there.
      store_p(s.rope[slot], sacc, 0, c.row_a, c.lane);
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
    }
    ++nreq;
  }
}

// Warpgroups 1 and 2 (c.w = output half h). kIssuer (half 0): its thread t = 0 reloads, after page it, the
// page's stage and RoPE slot with page it + 3 (group L once its own P V is done; group R and the RoPE chunk,
// which holds P, once half 1 is done too: s.p_done). Half 1 carries no load code.
template <bool kIssuer>
__device__ __forceinline__ void trio_values(const CUtensorMap* tmap, const DecodeParams& p, TrioStorage& s,
                                            const PartInfo& part, const ConsumerCtx& c) {
  constexpr int h = kIssuer ? 0 : 1;
  constexpr NamedBarrierId own = kIssuer ? kBarValue0 : kBarValue1;
  const bool lead = c.t == 0;
  // in shared memory: registers are this warpgroup's scarcest resource
  PageCursor& next = s.next_page;
  static_assert(kTrioRopeSlots == kTrioStages, "a page's stage and RoPE slot are refilled together");
  if (kIssuer && lead) {
    cursor_seek(next, p, part, part.first_req);
    for (int k = 0; k < kTrioStages && cursor_valid(next, part); ++k) {
      cursor_ids_ready();
      trio_load_latents(tmap, s, k, 0, next.id, c.head_kv);
      trio_load_latents(tmap, s, k, 1, next.id, c.head_kv);
      trio_load_rope(tmap, s, k, next.id, c.head_kv);
      cursor_next(next, p, part);
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
      const int stage = it % kTrioStages;  // = the page's RoPE slot
      const uint32_t parity = (it / kTrioStages) & 1;
      uint8_t* kv = s.kv[stage];
      wait_barrier(&s.p_full[stage], parity);
      if (pg * kPageSize + kPageSize > len) {
        zero_v_tail(kv, h, len - pg * kPageSize, c.t);
        cutlass::arch::fence_view_async_shared();
        own_warpgroup_sync(own);
      }
      const float alpha_a = s.alpha[stage][c.row_a];
      const float alpha_b = s.alpha[stage][c.row_a + 8];
      rescale_rows(o, alpha_a, alpha_b);
      pv_half(o, s.rope[stage], kv, h);
      own_warpgroup_sync(own);  // every warp's P V of this page is done
      if (lead) {
        if (!kIssuer) {
          EmptyBarrier::arrive(&s.p_done[stage]);
        } else {
          if (cursor_valid(next, part)) {
            cursor_ids_ready();
            trio_load_latents(tmap, s, stage, 0, next.id, c.head_kv);
            wait_barrier(&s.p_done[stage], parity);
            trio_load_latents(tmap, s, stage, 1, next.id, c.head_kv);
            trio_load_rope(tmap, s, stage, next.id, c.head_kv);
            // the cursor moves after the issues: its page-table copy lands during the next page
            cursor_next(next, p, part);
          }
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
