// The "halves" schedule: trio's three warpgroups and three latent stages (trio.cuh), with S and P in 32-key
// halves of a page, so that the scorer's softmax of one half runs while the tensor pipe computes S of the next:
//   scorer (warpgroup 0): Q's first 448 columns in registers, two S accumulators of 64 x 32 (16 registers each,
//     the 32 of trio's one 64 x 64). Per half page x of page j: wait for S_x(j), mask, online softmax, P_x(j)
//     (bf16) into the P half tile once both value warpgroups are done with the previous half (s.p_free), the
//     rescale factors into s.alpha, then issue S_x(j + 1) into the accumulator just freed. S_b(j) is in the pipe
//     during softmax_a(j), S_a(j + 1) during softmax_b(j).
//   value warpgroups 1 and 2: output half h += P_x V_x,h (two m64n256k16 k-steps) per half page. Warpgroup 2's
//     lead loads the RoPE halves (half k of the part into slot k % 3, once S of half k - 3 is done: three
//     halves ahead); warpgroup 1's lead reloads the stage with page j + 3 (one TMA box per latent group).
// Registers as trio (184 / 160 / 160); shared memory: trio's RoPE chunk slot and P tile (16 KB) become three
// RoPE half slots and a P half tile.
#pragma once

#include "trio.cuh"

namespace mla {

// RoPE half u (tokens 32u .. 32u + 31) of `page` into RoPE slot `slot`: one box of the half-chunk map tmap_r
// (64 columns x 32 tokens, launch.cu).
__device__ __forceinline__ void halves_load_rope(const CUtensorMap* tmap_r, HalvesStorage& s, int slot, int page,
                                                 int u, int head_kv) {
  constexpr auto kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
  const int col = kHeadDimV;  // the RoPE columns
  FullBarrier::arrive_and_expect_tx(&s.rope_full[slot], kHalfChunkBytes);
  cute::SM90_TMA_LOAD_4D::copy(tmap_r, &s.rope_full[slot], kHint, s.rope[slot], col, u * kHalfKeys, head_kv, page);
}
// Warpgroup 2's lead: RoPE half k of the part (the cursor's) into slot k % 3, then the cursor moves on.
__device__ __forceinline__ void halves_next_rope(const CUtensorMap* tmap_r, const DecodeParams& p, HalvesStorage& s,
                                                 const PartInfo& part, int k, int head_kv) {
  cursor_ids_ready();
  halves_load_rope(tmap_r, s, k % kHalvesRopeSlots, s.next_rope.id, s.next_rope_half, head_kv);
  if (s.next_rope_half == 0) {
    s.next_rope_half = 1;
  } else {
    s.next_rope_half = 0;
    cursor_next(s.next_rope, p, part);
  }
}

// S_x(64 x 32) = Q K_x^T of half x of the page in `stage`: latent group L, then R (28 RS + 4 SS k-steps), then the
// RoPE half in `slot` (4 SS). Issues one wgmma group; the caller waits.
// After k-step k, hook(k) (the interleaved softmax of the other half, below; a no-op otherwise).
template <int X, class Hook>
__device__ __forceinline__ void halves_qk(float (&sacc)[16], const uint32_t (&qa)[4 * kTrioQRegSteps],
                                          HalvesStorage& s, int stage, uint32_t stage_parity, int slot,
                                          uint32_t rope_parity, Hook&& hook) {
  using namespace cute;
  const GMMA::DescriptorIterator dk{GMMA::make_gmma_desc<GMMA::Major::K>(local_tile(
      smem_tensor(s.kv[stage], SmemLayoutQK{}), Shape<Int<kHalfKeys>, _16>{}, make_coord(X, 0)))};
  const GMMA::DescriptorIterator dr{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.rope[slot], SmemLayoutRopeHalf{}), Shape<Int<kHalfKeys>, _16>{}, make_coord(0, 0)))};
  const GMMA::DescriptorIterator dq{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.q_tail, SmemLayoutQK{}), Shape<Int<kBlockM>, _16>{}, make_coord(0, 0)))};
  constexpr int kSteps = kChunkCols / 16;  // k-steps per chunk
  fence_regs(sacc);
#pragma unroll
  for (int g = 0; g < 2; ++g) {
    wait_barrier(&s.full_bar[stage][g], stage_parity);
    warpgroup_arrive();
#pragma unroll
    for (int k = 4 * g * kSteps; k < 4 * (g + 1) * kSteps; ++k) {
      if (k < kTrioQRegSteps) {
        gmma_rs<MmaQK32RS>(sacc, qa[4 * k], qa[4 * k + 1], qa[4 * k + 2], qa[4 * k + 3], dk[qk_step(k)],
                           k == 0 ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One);
      } else {
        gmma<MmaQK32>(sacc, dq[qk_step(k - kTrioQRegSteps)], dk[qk_step(k)]);
      }
      hook(k);
    }
  }
  wait_barrier(&s.rope_full[slot], rope_parity);
  warpgroup_arrive();
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    gmma<MmaQK32>(sacc, dq[qk_step(kSteps + kk)],
                  dr[desc_step(cute::get_nonswizzle_portion(SmemLayoutRopeHalf{})(0, 16 * kk))]);
  }
  warpgroup_commit_batch();
}
// halves_qk for half x of the part's page `it` (stage it % 3, RoPE slot (2 it + x) % 3).
template <int X, class Hook>
__device__ __forceinline__ void halves_issue(float (&sacc)[16], const uint32_t (&qa)[4 * kTrioQRegSteps],
                                             HalvesStorage& s, int it, Hook&& hook) {
  const int k = 2 * it + X;
  halves_qk<X>(sacc, qa, s, it % kTrioStages, (it / kTrioStages) & 1, k % kHalvesRopeSlots,
               (k / kHalvesRopeSlots) & 1, hook);
}
struct NoHook {
  __device__ __forceinline__ void operator()(int) const {}
};

// The online softmax of one half in seven steps (step i after k-step 2i + 1 of the S being issued, when
// interleaved): 0 local row maxima, 1 quad maxima and the factors, 2..5 four columns' exponentials each, 6 the
// running state. (softmax_update, split.)
struct HalfSoftmax {
  float (&s)[16];
  RowState& st;
  float scale_log2;
  float mx_a, mx_b, base_a, base_b, alpha_a, alpha_b, sum_a, sum_b;
  __device__ __forceinline__ void step(int i) {
    if (i == 0) {
      mx_a = mx_b = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        mx_a = fmaxf(mx_a, fmaxf(s[4 * j], s[4 * j + 1]));
        mx_b = fmaxf(mx_b, fmaxf(s[4 * j + 2], s[4 * j + 3]));
      }
    } else if (i == 1) {
      const float m_new_a = next_row_max(st.m[0], quad_max(mx_a), scale_log2);
      const float m_new_b = next_row_max(st.m[1], quad_max(mx_b), scale_log2);
      base_a = m_new_a == -INFINITY ? 0.f : m_new_a * scale_log2;
      base_b = m_new_b == -INFINITY ? 0.f : m_new_b * scale_log2;
      alpha_a = exp2f(st.m[0] * scale_log2 - base_a);
      alpha_b = exp2f(st.m[1] * scale_log2 - base_b);
      st.m[0] = m_new_a;
      st.m[1] = m_new_b;
      sum_a = sum_b = 0.f;
    } else if (i >= 2 && i <= 5) {
      const int j = i - 2;
      s[4 * j + 0] = exp2f(fmaf(s[4 * j + 0], scale_log2, -base_a));
      s[4 * j + 1] = exp2f(fmaf(s[4 * j + 1], scale_log2, -base_a));
      s[4 * j + 2] = exp2f(fmaf(s[4 * j + 2], scale_log2, -base_b));
      s[4 * j + 3] = exp2f(fmaf(s[4 * j + 3], scale_log2, -base_b));
      sum_a += s[4 * j + 0] + s[4 * j + 1];
      sum_b += s[4 * j + 2] + s[4 * j + 3];
    } else if (i == 6) {
      st.l[0] = st.l[0] * alpha_a + sum_a;
      st.l[1] = st.l[1] * alpha_b + sum_b;
    }
  }
  __device__ __forceinline__ void all() {
#pragma unroll
    for (int i = 0; i < 7; ++i) step(i);
  }
};
// The hook that runs a HalfSoftmax's steps between the k-steps of an S issue.
struct SoftmaxHook {
  HalfSoftmax& sm;
  __device__ __forceinline__ void operator()(int k) const {
    if ((k & 1) && k < 14) sm.step(k >> 1);
  }
};

// Half x of page pg's scores: the causal / length mask (before its softmax).
template <int X>
__device__ __forceinline__ void halves_mask(float (&sacc)[16], const DecodeParams& p, const ConsumerCtx& c, int len,
                                            int mask_from, int pg) {
  const int key0 = pg * kPageSize + X * kHalfKeys;
  if (key0 + kHalfKeys > mask_from) {
    const KeyLimits lim = key_limits(p, c, len);
    mask_scores(sacc, key0 + 2 * (c.lane & 3), lim.a, lim.b);
  }
}
// After half x of page pg (the part's page `it`)'s softmax: P_x into the P half tile (after both value
// warpgroups are done with the previous half), the factors, and at the request's last page (x = 1) its row sums
// and maxima; then hands the half to the value warpgroups (s.p_full).
template <int X>
__device__ __forceinline__ void halves_hand_over(const HalfSoftmax& sm, HalvesStorage& s, const ConsumerCtx& c,
                                                 int it, bool last_page, int nreq) {
  const int k = 2 * it + X;
  if (k > 0) wait_barrier(&s.p_free, (k - 1) & 1);  // both value warpgroups are done with half k - 1
  store_p_half(s.p_half, sm.s, c.row_a, c.lane);
  if ((c.lane & 3) == 0) {
    s.alpha[c.row_a] = sm.alpha_a;
    s.alpha[c.row_a + 8] = sm.alpha_b;
  }
  if (X == 1 && last_page) {
    const float l_a = quad_sum(sm.st.l[0]), l_b = quad_sum(sm.st.l[1]);
    const int par = nreq & 1;
    wait_barrier(&s.fin_free[par], ((nreq >> 1) & 1) ^ 1);  // request nreq - 2's values were read
    if ((c.lane & 3) == 0) {
      s.fin[par][0][c.row_a] = l_a;
      s.fin[par][0][c.row_a + 8] = l_b;
      s.fin[par][1][c.row_a] = sm.st.m[0];
      s.fin[par][1][c.row_a + 8] = sm.st.m[1];
    }
  }
  cutlass::arch::fence_view_async_shared();
  EmptyBarrier::arrive(&s.p_full[it % kTrioStages][X]);
}

// Warpgroup 0. Per request: Q, S_a of its first page; per page pg: issue S_b(pg), softmax_a(pg) while it runs,
// issue S_a(pg + 1) (none past the request's last page: the next request's Q replaces this one's),
// softmax_b(pg) while it runs.
// kInterleave: each half's softmax is spread between the k-steps of the next S issue (the issuing warp stalls
// at an HGMMA while the tensor pipe's queue is full, and nothing after it issues meanwhile).
template <bool kInterleave>
__device__ __forceinline__ void halves_score(const DecodeParams& p, HalvesStorage& s, const PartInfo& part,
                                             const ConsumerCtx& c) {
  uint32_t qa[4 * kTrioQRegSteps];  // Q's first 448 columns, A fragments (load_q_regs)
  float sa[16], sb[16];             // S (then P) of half a / half b of a page
  int it = 0, nreq = 0;
  for (int req = part.first_req; req <= part.last_req; ++req) {
    const int len = p.seqlens[req];
    int lo, hi;
    if (!part_pages(part, req, len, lo, hi)) continue;
    // The previous request's S are all done: Q may be replaced.
    load_q_chunks<kTrioQRegChunks, kTrioQTailChunks, 128>(p, s.q_tail, req, c.m_block, c.head_kv, c.t);
    load_q_regs(p, c, req, qa);
    cute::cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    own_warpgroup_sync(kBarScorer);
    fence_regs(qa);
    const int mask_from = key_limits(p, c, len).min;
    RowState st = empty_row_state();
    const int it0 = it - lo;  // page pg is the part's page it0 + pg
    // Nothing of the scorer's is in flight across the loop's back edge (each S is waited for with wait<0> in
    // the iteration that issued it): with S_b(pg + 1) issued before the wait for S_a(pg + 1) instead, ptxas
    // could not tell which group a warpgroup_wait<1> after the loop's join retires, and serialized every wgmma
    // of the kernel (C7514).
    halves_issue<0>(sa, qa, s, it, NoHook{});
    cute::warpgroup_wait<0>();
    fence_regs(sa);
    for (int pg = lo; pg < hi; ++pg) {
      const bool next = pg + 1 < hi;
      halves_mask<0>(sa, p, c, len, mask_from, pg);
      HalfSoftmax sm_a{sa, st, p.scale_log2};
      if (kInterleave) {
        halves_issue<1>(sb, qa, s, it0 + pg, SoftmaxHook{sm_a});  // softmax_a(pg) between S_b(pg)'s k-steps
      } else {
        halves_issue<1>(sb, qa, s, it0 + pg, NoHook{});
        sm_a.all();  // S_b(pg) runs
      }
      halves_hand_over<0>(sm_a, s, c, it0 + pg, false, nreq);
      cute::warpgroup_wait<0>();
      fence_regs(sb);
      halves_mask<1>(sb, p, c, len, mask_from, pg);
      HalfSoftmax sm_b{sb, st, p.scale_log2};
      if (!next) {
        sm_b.all();
      } else if (kInterleave) {
        halves_issue<0>(sa, qa, s, it0 + pg + 1, SoftmaxHook{sm_b});
      } else {
        halves_issue<0>(sa, qa, s, it0 + pg + 1, NoHook{});
        sm_b.all();  // S_a(pg + 1) runs
      }
      halves_hand_over<1>(sm_b, s, c, it0 + pg, !next, nreq);
      cute::warpgroup_wait<0>();
      fence_regs(sa);
    }
    it += hi - lo;
    ++nreq;
  }
}

// Warpgroups 1 and 2 (c.w = output half h). Per half page x: wait for the scorer's P_x (s.p_full), rescale,
// O_h += P_x V_x,h, then (lead) release the P half tile. Warpgroup 2's lead loads the RoPE half three ahead when
// it gets a half (S of that half is done with its slot); warpgroup 1's lead reloads the stage after half b as in
// trio (group L once its own P V is done, group R once warpgroup 2 is: s.p_done).
template <bool kIssuer>
__device__ __forceinline__ void halves_values(const CUtensorMap* tmap, const CUtensorMap* tmap_g,
                                              const CUtensorMap* tmap_r, const DecodeParams& p, HalvesStorage& s,
                                              const PartInfo& part, const ConsumerCtx& c) {
  constexpr int h = kIssuer ? 0 : 1;
  constexpr NamedBarrierId own = kIssuer ? kBarValue0 : kBarValue1;
  const bool lead = c.t == 0;
  PageCursor& next_stage = s.next_stage;  // walked by warpgroup 1's lead
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
      cursor_seek(s.next_rope, p, part, part.first_req);
      s.next_rope_half = 0;
      for (int k = 0; k < kHalvesRopeSlots && cursor_valid(s.next_rope, part); ++k) {
        halves_next_rope(tmap_r, p, s, part, k, c.head_kv);
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
      const int valid_rows = len - pg * kPageSize;  // keys of this page in the request (may exceed 64)
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        wait_barrier(&s.p_full[stage][x], parity);
        if (!kIssuer && lead && cursor_valid(s.next_rope, part)) {  // S of half 2 it + x is done with its slot
          halves_next_rope(tmap_r, p, s, part, 2 * it + x + kHalvesRopeSlots, c.head_kv);
        }
        if (valid_rows < (x + 1) * kHalfKeys) {  // V rows of this half past the request's end (S_x is done)
          zero_v_rows(kv, h, max(valid_rows, x * kHalfKeys), (x + 1) * kHalfKeys, c.t);
          cutlass::arch::fence_view_async_shared();
          own_warpgroup_sync(own);
        }
        rescale_rows(o, s.alpha[c.row_a], s.alpha[c.row_a + 8]);
        pv_quarter(o, s.p_half, kv, h, x);
        own_warpgroup_sync(own);  // every warp's P V of this half is done
        if (lead) {
          EmptyBarrier::arrive(&s.p_free);
          if (x == 1) {
            if (!kIssuer) {
              EmptyBarrier::arrive(&s.p_done[stage]);
            } else if (cursor_valid(next_stage, part)) {
              cursor_ids_ready();
              trio_load_latents(tmap_g, s, stage, 0, next_stage.id, c.head_kv);
              trio_prefetch_rope(tmap, next_stage.id, c.head_kv);
              wait_barrier(&s.p_done[stage], parity);
              trio_load_latents(tmap_g, s, stage, 1, next_stage.id, c.head_kv);
              cursor_next(next_stage, p, part);
            }
          }
        }
        __syncwarp();
      }
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
