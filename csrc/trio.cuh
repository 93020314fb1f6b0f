// The "trio" schedule: three warpgroups, three stages, no producer warpgroup (config.h).
//   scorer (warpgroup 0): Q's first 448 columns in registers (wgmma A fragments), its last two chunks in
//     shared memory; per page S = Q K^T (28 RS + 8 SS m64n64k16), mask, online softmax, P (bf16) into the
//     page's RoPE slot and the rescale factors into s.alpha[stage]; then straight on to the next page: it
//     never waits for a P V.
//   value warpgroups 1 and 2: output half h (256 columns) += P V_h (m64n256k16, SS), following the
//     scorer; after each page, one thread of warpgroup 1 reloads the stage with the page three places
//     ahead and the RoPE slot with the page two places ahead (TMA).
// The tensor pipe runs the value warpgroups' P V while the scorer does its softmax; S reads mostly Q from
// registers; three stages keep a page loading while two are in use.
#pragma once
#include <cmath>

#include "consumer.cuh"
#include "softmax.cuh"
#include "trace.cuh"

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
// EXPERIMENT variant bits (kOpt): kOptBox5 = a latent group as one TMA box of four chunks (the 5-D group
// map, launch.cu), kOptSplit = value warpgroup 2's lead loads group R itself after its own P V.
constexpr int kOptBox5 = 1, kOptSplit = 2;
// Latent group g (L = chunks 0..3, R = 4..7) of `page` into `stage`; the RoPE chunk of `page` into `slot`.
// kBox5: one box (64 columns, 64 tokens, 4 chunks) of the group map `tmap_g` lands the four swizzled chunks
// side by side, as four boxes of the chunk map do.
template <bool kBox5 = false>
__device__ __forceinline__ void trio_load_latents(const CUtensorMap* tmap, TrioStorage& s, int stage, int g, int page,
                                                  int head_kv, const CUtensorMap* tmap_g = nullptr) {
  if constexpr (kBox5) {
    constexpr auto kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
    uint64_t* bar = &s.full_bar[stage][g];
    FullBarrier::arrive_and_expect_tx(bar, 4 * kChunkBytes);
    cute::SM90_TMA_LOAD_5D::copy(tmap_g, bar, kHint, s.kv[stage] + 4 * g * kChunkBytes, 0, 0, 4 * g, head_kv, page);
  } else {
    trio_load_chunks(tmap, &s.full_bar[stage][g], s.kv[stage] + 4 * g * kChunkBytes, 4 * g, 4, page, head_kv);
  }
}
__device__ __forceinline__ void trio_load_rope(const CUtensorMap* tmap, TrioStorage& s, int slot, int page,
                                               int head_kv) {
  trio_load_chunks(tmap, &s.rope_full[slot], s.rope[slot], kNumChunksV, 1, page, head_kv);
}
// With two RoPE slots a page's RoPE chunk can be requested only one page before S needs it (its slot holds
// the page two places back until both value warpgroups have read that page's P): prefetch it into L2 when
// the page's latents are requested, so that the later load is an L2 hit.
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
// chunks 4..6, SS with A = Q chunk 7 from s.q_tail for chunk 7), then the RoPE chunk of `slot` (SS, A = Q
// chunk 8). Issues one wgmma group; the caller waits.
template <bool kTrace = false>
__device__ __forceinline__ void trio_qk(float (&sacc)[32], const uint32_t (&qa)[4 * kTrioQRegSteps], TrioStorage& s,
                                        int stage, int slot, uint32_t stage_parity, uint32_t slot_parity, int it = 0) {
  using namespace cute;
  const GMMA::DescriptorIterator dk{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.kv[stage], SmemLayoutQK{}), Shape<Int<kBlockN>, _16>{}, make_coord(0, 0)))};
  const GMMA::DescriptorIterator dr{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.rope[slot], SmemLayoutP{}), Shape<Int<kBlockN>, _16>{}, make_coord(0, 0)))};
  const GMMA::DescriptorIterator dq{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.q_tail, SmemLayoutQK{}), Shape<Int<kBlockM>, _16>{}, make_coord(0, 0)))};
  constexpr int kSteps = kChunkCols / 16;  // k-steps per chunk
#pragma unroll
  for (int g = 0; g < 2; ++g) {
    if (g == 1 && threadIdx.x == 0) trace_event<kTrace>(it, 17);
    wait_barrier(&s.full_bar[stage][g], stage_parity);
    if (threadIdx.x == 0) trace_event<kTrace>(it, 1 + g);
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
  if (threadIdx.x == 0) trace_event<kTrace>(it, 16);
  wait_barrier(&s.rope_full[slot], slot_parity);
  if (threadIdx.x == 0) trace_event<kTrace>(it, 3);
  warpgroup_arrive();
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    gmma<MmaQK64>(sacc, dq[qk_step(kSteps + kk)], dr[qk_step(kk)]);
  }
  warpgroup_commit_batch();
  if (threadIdx.x == 0) trace_event<kTrace>(it, 4);
}

// Warpgroup 0. s.fin[parity] holds a request's final row sums and maxima for the value warpgroups.
// kV = 4 (EXPERIMENT, session 16): the tree's two slots (RoPE(j), then P(j), in slot j % 2) with kV = 3's
// handoff: half 1 takes P(j) at once, half 0 only once S(j + 1) is issued (p_late).
// kV (EXPERIMENT): 0 = the tree (two RoPE slots, P into the page's slot); 1 = one RoPE slot (s.rope[0]) that
// the scorer's thread 0 reloads with the next page's RoPE chunk as soon as S is done, and a P tile
// (s.rope[1]) that P(j) enters once both value WGs are done with P(j-1) (s.p_free); 2 = as 1, but P(j) is
// handed over (p_full) only once S(j+1) is issued, so that the tensor pipe has S(j+1) ahead of P V(j); 3 = as 1,
// but only half 0's P V(j) waits for S(j+1)'s issue (s.p_late), half 1's goes at once.
template <int kV> constexpr bool kTwoSlots = kV == 0 || kV == 4;  // P(j) into page j's RoPE slot
template <int kV> constexpr bool kLateHalf0 = kV == 3 || kV == 4;  // half 0 takes P(j) after S(j + 1) issue
template <int kV, bool kTrace>
__device__ __forceinline__ void trio_score(const CUtensorMap* tmap, const DecodeParams& p, TrioStorage& s,
                                           const PartInfo& part, const ConsumerCtx& c) {
  uint32_t qa[4 * kTrioQRegSteps];  // Q's first 448 columns, A fragments (load_q_regs)
  float sacc[32];    // S of one page, then its probabilities
  int it = 0, nreq = 0;
  if constexpr (kV == 1 || kV == 2) {  // (kV = 3: value WG 2's lead loads the RoPE chunks)
    if (c.t == 0) {
      cursor_seek(s.next_rope, p, part, part.first_req);
      if (cursor_valid(s.next_rope, part)) {
        trio_load_rope(tmap, s, 0, s.next_rope.id, c.head_kv);
        cursor_next(s.next_rope, p, part);
      }
    }
  }
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
      const int stage = it % kTrioStages, slot = kTwoSlots<kV> ? it % kTrioRopeSlots : 0;
      if (c.t == 0) trace_event<kTrace>(it, 0);
      trio_qk<kTrace>(sacc, qa, s, stage, slot, (it / kTrioStages) & 1,
                      kTwoSlots<kV> ? (it / kTrioRopeSlots) & 1 : (it & 1), it);
      if constexpr (kV >= 2) {
        // P(it - 1) of this request, written in the previous iteration, goes to the (kV = 3: half-0) value
        // WGs now
        if (pg > lo) {
          EmptyBarrier::arrive(kV == 2 ? &s.p_full[(it - 1) % kTrioStages] : &s.p_late[(it - 1) % kTrioStages]);
          if (c.t == 0) trace_event<kTrace>(it - 1, 8);
        }
      }
      cute::warpgroup_wait<0>();
      fence_regs(sacc);
      if (c.t == 0) trace_event<kTrace>(it, 5);
      if constexpr (kV == 1 || kV == 2) {
        if (c.t == 0 && cursor_valid(s.next_rope, part)) {  // the RoPE slot is free: the next page's chunk
          cursor_ids_ready();
          trio_load_rope(tmap, s, 0, s.next_rope.id, c.head_kv);
          cursor_next(s.next_rope, p, part);
          trace_event<kTrace>(it, 9);
        }
      }
      if (pg * kPageSize + kPageSize > mask_from) {
        const KeyLimits lim = key_limits(p, c, len);
        mask_scores(sacc, pg * kPageSize + 2 * (c.lane & 3), lim.a, lim.b);
      }
      float mx_a, mx_b;
      row_max_local(sacc, mx_a, mx_b);
      float alpha_a, alpha_b;
      softmax_update(sacc, st, mx_a, mx_b, p.scale_log2, alpha_a, alpha_b);
      if (c.t == 0) trace_event<kTrace>(it, 6);
      if constexpr (!kTwoSlots<kV>) {
        if (it > 0) wait_barrier(&s.p_free, (it - 1) & 1);  // P V(it - 1) is done: the P tile is free
        if (c.t == 0) trace_event<kTrace>(it, 7);
        store_p(s.rope[1], sacc, 0, c.row_a, c.lane);
      } else {
        // S is done, so the page's RoPE slot is free: P goes there.
        store_p(s.rope[slot], sacc, 0, c.row_a, c.lane);
      }
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
      if (kV != 2 || pg + 1 == hi) {
        EmptyBarrier::arrive(&s.p_full[stage]);
        if (c.t == 0) trace_event<kTrace>(it, 8);
      }
      if (kLateHalf0<kV> && pg + 1 == hi) EmptyBarrier::arrive(&s.p_late[stage]);
    }
    ++nreq;
  }
}

// Warpgroups 1 and 2 (c.w = output half h). kIssuer (half 0): its thread t = 0 reloads, after page it, the
// stage with page it + 3 (group L once its own P V is done, group R once half 1 is done too: s.p_done) and
// (kV = 0) the RoPE slot with page it + 2 (once both have read P). Half 1 carries no load code.
template <bool kIssuer, int kV, int kOpt, bool kTrace>
__device__ __forceinline__ void trio_values(const CUtensorMap* tmap, const CUtensorMap* tmap_g, const DecodeParams& p,
                                            TrioStorage& s, const PartInfo& part, const ConsumerCtx& c) {
  constexpr bool kBox5 = (kOpt & kOptBox5) != 0, kSplit = (kOpt & kOptSplit) != 0;
  constexpr int h = kIssuer ? 0 : 1;
  constexpr NamedBarrierId own = kIssuer ? kBarValue0 : kBarValue1;
  const bool lead = c.t == 0;
  // in shared memory: registers are this warpgroup's scarcest resource
  PageCursor& next_stage = s.next_stage;
  PageCursor& next_rope = s.next_rope;
  if (kIssuer && lead) {
    cursor_seek(next_stage, p, part, part.first_req);
    if constexpr (kTwoSlots<kV>) cursor_seek(next_rope, p, part, part.first_req);
    for (int k = 0; k < kTrioStages && cursor_valid(next_stage, part); ++k) {
      cursor_ids_ready();
      trio_load_latents<kBox5>(tmap, s, k, 0, next_stage.id, c.head_kv, tmap_g);
      trio_load_latents<kBox5>(tmap, s, k, 1, next_stage.id, c.head_kv, tmap_g);
      if (k >= (kTwoSlots<kV> ? kTrioRopeSlots : 1)) trio_prefetch_rope(tmap, next_stage.id, c.head_kv);
      cursor_next(next_stage, p, part);
    }
    if constexpr (kTwoSlots<kV>) {
      for (int k = 0; k < kTrioRopeSlots && cursor_valid(next_rope, part); ++k) {
        cursor_ids_ready();
        trio_load_rope(tmap, s, k, next_rope.id, c.head_kv);
        cursor_next(next_rope, p, part);
      }
    }
  }
  // kSplit: value warpgroup 2's lead walks its own cursor, three pages behind the issuer's prologue
  PageCursor& next_r = s.next_stage_r;
  if (kSplit && !kIssuer && lead) {
    cursor_seek(next_r, p, part, part.first_req);
    for (int k = 0; k < kTrioStages && cursor_valid(next_r, part); ++k) {
      cursor_ids_ready();
      cursor_next(next_r, p, part);
    }
  }
  if (kV == 3 && !kIssuer && lead) {
    cursor_seek(next_rope, p, part, part.first_req);
    if (cursor_valid(next_rope, part)) {
      trio_load_rope(tmap, s, 0, next_rope.id, c.head_kv);
      cursor_next(next_rope, p, part);
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
      const int stage = it % kTrioStages, slot = it % kTrioRopeSlots;
      const uint32_t parity = (it / kTrioStages) & 1;
      uint8_t* kv = s.kv[stage];
      // kV = 3: half 0 takes P(it) only once S(it + 1) is issued (p_late), half 1 at once (p_full)
      wait_barrier(kLateHalf0<kV> && kIssuer ? &s.p_late[stage] : &s.p_full[stage], parity);
      if (lead) trace_event<kTrace>(it, kIssuer ? 10 : 14);
      if (kV == 3 && !kIssuer && lead && cursor_valid(next_rope, part)) {  // S(it) is done: the slot is free
        cursor_ids_ready();
        trio_load_rope(tmap, s, 0, next_rope.id, c.head_kv);
        cursor_next(next_rope, p, part);
        trace_event<kTrace>(it, 9);
      }
      if (pg * kPageSize + kPageSize > len) {
        zero_v_tail(kv, h, len - pg * kPageSize, c.t);
        cutlass::arch::fence_view_async_shared();
        own_warpgroup_sync(own);
      }
      const float alpha_a = s.alpha[stage][c.row_a];
      const float alpha_b = s.alpha[stage][c.row_a + 8];
      rescale_rows(o, alpha_a, alpha_b);
      pv_half(o, s.rope[kTwoSlots<kV> ? slot : 1], kv, h);
      own_warpgroup_sync(own);  // every warp's P V of this page is done
      if (lead) {
        trace_event<kTrace>(it, kIssuer ? 11 : 15);
        if constexpr (!kTwoSlots<kV>) EmptyBarrier::arrive(&s.p_free);
        if (!kIssuer) {
          if constexpr (kSplit) {  // group R of this stage is read by this warpgroup and S only: reload it now
            if (cursor_valid(next_r, part)) {
              cursor_ids_ready();
              trio_load_latents<kBox5>(tmap, s, stage, 1, next_r.id, c.head_kv, tmap_g);
              cursor_next(next_r, p, part);
            }
            trace_event<kTrace>(it, 18);
          }
          EmptyBarrier::arrive(&s.p_done[stage]);
        } else if constexpr (kV == 4) {
          // half 1 finished P V(it) long ago (it took P(it) one S earlier): RoPE(it + 2) first, S(it + 2)
          // needs it soonest; then both latent groups of page it + 3
          const bool more_stage = cursor_valid(next_stage, part), more_rope = cursor_valid(next_rope, part);
          cursor_ids_ready();
          if (more_stage || more_rope) wait_barrier(&s.p_done[stage], parity);
          trace_event<kTrace>(it, 12);
          if (more_rope) trio_load_rope(tmap, s, slot, next_rope.id, c.head_kv);
          if (more_stage) {
            trio_load_latents<kBox5>(tmap, s, stage, 0, next_stage.id, c.head_kv, tmap_g);
            trio_load_latents<kBox5>(tmap, s, stage, 1, next_stage.id, c.head_kv, tmap_g);
            trio_prefetch_rope(tmap, next_stage.id, c.head_kv);
          }
          if (more_stage) cursor_next(next_stage, p, part);
          if (more_rope) cursor_next(next_rope, p, part);
          trace_event<kTrace>(it, 13);
        } else {
          const bool more_stage = cursor_valid(next_stage, part);
          const bool more_rope = kTwoSlots<kV> && cursor_valid(next_rope, part);
          cursor_ids_ready();
          if (more_stage) {
            trio_load_latents<kBox5>(tmap, s, stage, 0, next_stage.id, c.head_kv, tmap_g);
            trio_prefetch_rope(tmap, next_stage.id, c.head_kv);
          }
          if (kSplit ? more_rope : (more_stage || more_rope)) wait_barrier(&s.p_done[stage], parity);
          trace_event<kTrace>(it, 12);
          if (!kSplit && more_stage) trio_load_latents<kBox5>(tmap, s, stage, 1, next_stage.id, c.head_kv, tmap_g);
          if (more_rope) trio_load_rope(tmap, s, slot, next_rope.id, c.head_kv);
          // the cursors move after every issue: their page-table copies land during the next page
          if (more_stage) cursor_next(next_stage, p, part);
          if (more_rope) cursor_next(next_rope, p, part);
          trace_event<kTrace>(it, 13);
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
