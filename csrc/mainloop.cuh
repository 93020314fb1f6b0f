// Main-loop stages of the decode kernel: the TMA producer, the Q tile load, and the per-page
// tensor-core steps (S = Q K^T, O += P V) of a consumer warpgroup.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "config.h"
#include "primitives.cuh"
#include "tile_scheduler.h"
#include "traits.h"

namespace mla {

// Pages this part assigns to request `req`: [lo, hi). Returns false when there are none.
__device__ __forceinline__ bool part_pages(const PartInfo& part, int req, int len, int& lo, int& hi) {
  const int n = len > 0 ? (len + kPageSize - 1) / kPageSize : 0;
  lo = req == part.first_req ? part.first_page : 0;
  hi = req == part.last_req ? min(part.end_page, n) : n;
  return lo < hi;
}

// Chunk c of group g (config.h): A = 0, 1, 2, 3, 8; B = 4, 5, 6, 7.
__device__ __forceinline__ constexpr int group_chunk(int g, int i) {
  return g == kGroupA ? (i < 4 ? i : kNumChunksQK - 1) : 4 + i;
}
__device__ __forceinline__ constexpr int group_chunks(int g) { return g == kGroupA ? kChunksA : kChunksB; }
__device__ __forceinline__ constexpr int group_bytes(int g) { return group_chunks(g) * kChunkBytes; }

// One thread: TMA of chunk c (64 columns x 64 tokens) of physical page `page`, head head_kv, into `dst` (one
// swizzled chunk), completing on `bar`: box (64 cols, 64 tokens, 1 head, 1 page) at (64c, 0, head_kv, page).
__device__ __forceinline__ void load_page_chunk(const CUtensorMap* tmap, uint64_t* bar, uint8_t* dst, int c, int page,
                                                int head_kv) {
  constexpr auto kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
  cute::SM90_TMA_LOAD_4D::copy(tmap, bar, kHint, dst, c * kChunkCols, 0, head_kv, page);
}

// Producer warp: streams this part's pages, in order, into the stage ring, each page as its two chunk
// groups (group A once warpgroup 0 released it, then group B once warpgroup 1 did). One lane issues.
__device__ __forceinline__ void produce_pages(const CUtensorMap* tmap, const DecodeParams& p, const PartInfo& part,
                                              SharedStorage& s, int head_kv) {
  const int lane = threadIdx.x & 31;
  int it = 0;
  for (int req = part.first_req; req <= part.last_req; ++req) {
    int lo, hi;
    if (!part_pages(part, req, p.seqlens[req], lo, hi)) continue;
    const int* bt = p.block_table + static_cast<int64_t>(req) * p.bt_stride_b;
    for (int base = lo; base < hi; base += 32) {
      const int mine = base + lane < hi ? __ldg(bt + base + lane) : 0;
      const int cnt = min(32, hi - base);
      for (int j = 0; j < cnt; ++j, ++it) {
        const int page = __shfl_sync(0xffffffffu, mine, j);
        if (lane == 0) {
          const int stage = it % kNumStages;
          const uint32_t parity = ((it / kNumStages) & 1) ^ 1;
#pragma unroll
          for (int g = 0; g < kNumGroups; ++g) {
            wait_barrier(&s.empty_bar[stage][g], parity);
            FullBarrier::arrive_and_expect_tx(&s.full_bar[stage][g], group_bytes(g));
#pragma unroll
            for (int i = 0; i < group_chunks(g); ++i) {
              const int c = group_chunk(g, i);
              load_page_chunk(tmap, &s.full_bar[stage][g], s.kv[stage] + c * kChunkBytes, c, page, head_kv);
            }
          }
        }
        __syncwarp();
      }
    }
  }
}

// kThreadsQ threads (t = 0..kThreadsQ-1) copy chunks [kFirst, kFirst + kChunks) of the 64 query rows of
// (req, m_block, head_kv) into `dst` (kChunks swizzled chunks), with cp.async (no staging registers); rows
// past the last query row are zero-filled. The caller waits (cp_async_wait), fences to the async proxy
// and syncs. Solo: the whole tile (chunks 0..8, both consumers); trio: chunks 7 and 8 (its scorer).
template <int kFirst, int kChunks, int kThreadsQ>
__device__ __forceinline__ void load_q_chunks(const DecodeParams& p, uint8_t* dst, int req, int m_block, int head_kv,
                                              int t) {
  constexpr int kUnitsPerRow = kChunks * kChunkCols / 8;  // units of 16 bytes
  constexpr int kUnits = kBlockM * kUnitsPerRow;
  constexpr int kPerThread = kUnits / kThreadsQ;
  static_assert(kUnits % kThreadsQ == 0, "Q chunks must split evenly");
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int idx = t + k * kThreadsQ;
    const int r = idx / kUnitsPerRow, u = idx % kUnitsPerRow;
    const int rg = m_block * kBlockM + r;
    const bool valid = rg < p.rows;
    const int sq = valid ? rg / p.group : 0, g = valid ? rg % p.group : 0;
    const uint16_t* src = p.q + static_cast<int64_t>(req) * p.q_stride_b + static_cast<int64_t>(sq) * p.q_stride_s +
                          static_cast<int64_t>(head_kv * p.group + g) * p.q_stride_h + kFirst * kChunkCols + u * 8;
    // destination = &sQ(r, 8u) of smem_tensor(dst, SmemLayoutQK{}), written out by hand: the same
    // address (checked for every (r, u)), but CuTe's swizzled-pointer arithmetic costs ~200 more SASS
    // instructions per kernel here (and a 4-byte spill in the since-deleted split-S kernel when used in
    // store_p too).
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(src),
        *reinterpret_cast<cute::uint128_t*>(dst + (u / 8) * kChunkBytes + r * 128 + (((u % 8) ^ (r & 7)) << 4)), valid);
  }
}

// Descriptor steps of the K loop (start-address offsets are unswizzled: the hardware applies the
// swizzle): k-th 16-column slice of a K-major tile, k-th 16-key slice of V^T.
__device__ __forceinline__ uint32_t qk_step(int k) {
  return desc_step(cute::get_nonswizzle_portion(SmemLayoutQK{})(0, 16 * k));
}
__device__ __forceinline__ uint32_t vt_step(int k) {
  return desc_step(cute::get_nonswizzle_portion(SmemLayoutVt{})(0, 16 * k));
}

// S(64 x 64) += Q(64 x 576)[:, chunks of group g] . K^T[chunks of group g, :] (first = overwrite S):
// waits for the group's TMA bytes, issues its wgmmas and commits them as one group.
__device__ __forceinline__ void qk_group_issue(float (&sacc)[32], SharedStorage& s, int stage, int g,
                                               uint32_t parity, bool first) {
  using namespace cute;
  const GMMA::DescriptorIterator dq{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.q, SmemLayoutQK{}), Shape<Int<kBlockM>, _16>{}, make_coord(0, 0)))};
  const GMMA::DescriptorIterator dk{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(s.kv[stage], SmemLayoutQK{}), Shape<Int<kBlockN>, _16>{}, make_coord(0, 0)))};
  wait_barrier(&s.full_bar[stage][g], parity);
  warpgroup_arrive();
#pragma unroll
  for (int i = 0; i < group_chunks(g); ++i) {
#pragma unroll
    for (int kk = 0; kk < kChunkCols / 16; ++kk) {
      const int k = group_chunk(g, i) * (kChunkCols / 16) + kk;
      gmma<MmaQK64>(sacc, dq[qk_step(k)], dk[qk_step(k)],
                    first && i == 0 && kk == 0 ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One);
    }
  }
  warpgroup_commit_batch();
}

// S = Q K^T for the whole page: group A, then group B (the caller waits with warpgroup_wait and then
// fence_regs(sacc)).
__device__ __forceinline__ void qk_full_issue(float (&sacc)[32], SharedStorage& s, int stage, uint32_t parity) {
  qk_group_issue(sacc, s, stage, kGroupA, parity, true);
  qk_group_issue(sacc, s, stage, kGroupB, parity, false);
}

// O(64 x 256) += P(64 x 64) . V[:, 256w .. 256w+255] for output half w, P read from `p_tile` (one swizzled
// 64 x 64 chunk), V from the page `kv`. Issues one wgmma group and waits for it.
__device__ __forceinline__ void pv_half(float (&o)[128], const uint8_t* p_tile, const uint8_t* kv, int w) {
  using namespace cute;
  const GMMA::DescriptorIterator dp{GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(smem_tensor(p_tile, SmemLayoutP{}), Shape<Int<kBlockM>, _16>{}, make_coord(0, 0)))};
  // V^T is MN-major: its descriptor's leading offset is the 8 KB chunk step, the stride offset 1 KB
  const GMMA::DescriptorIterator dv{GMMA::make_gmma_desc<GMMA::Major::MN>(
      local_tile(smem_tensor(kv, SmemLayoutVt{}), Shape<Int<kHeadDimV / 2>, _16>{}, make_coord(w, 0)))};
  fence_regs(o);
  warpgroup_arrive();
#pragma unroll
  for (int k = 0; k < kBlockN / 16; ++k) {
    gmma<MmaPV>(o, dp[qk_step(k)], dv[vt_step(k)]);
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  fence_regs(o);
}

// Writes this thread's probabilities (bf16) into the P tile `p_tile` (one swizzled 64 x 64 chunk): rows
// a/b, columns col0 + 8j + 2(lane%4) + e. Addresses = &sP(row, col) of smem_tensor(p_tile, SmemLayoutP{}),
// by hand for the reason in load_q_chunks.
template <int N>
__device__ __forceinline__ void store_p(uint8_t* p_tile, const float (&pr)[N], int col0, int row_a, int lane) {
  const int row_b = row_a + 8;
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    const int unit = col0 / 8 + j;
    __nv_bfloat162 va = __floats2bfloat162_rn(pr[4 * j + 0], pr[4 * j + 1]);
    __nv_bfloat162 vb = __floats2bfloat162_rn(pr[4 * j + 2], pr[4 * j + 3]);
    *reinterpret_cast<__nv_bfloat162*>(p_tile + row_a * 128 + ((unit ^ (row_a & 7)) << 4) + 4 * (lane & 3)) = va;
    *reinterpret_cast<__nv_bfloat162*>(p_tile + row_b * 128 + ((unit ^ (row_b & 7)) << 4) + 4 * (lane & 3)) = vb;
  }
}

// Zeroes rows [first_row, 64) of V columns 256w .. 256w+255 of the page `kv`, so
// that whatever lies in the unused slots of a request's last page (NaN included) meets P = 0 as
// an exact 0. t = thread index in the warpgroup. (Zero is zero under any swizzle: the loop walks the
// 16-byte units of those rows in memory order.)
__device__ __forceinline__ void zero_v_tail(uint8_t* kv, int w, int first_row, int t) {
  const int units = (kBlockN - first_row) * 32;  // 4 chunks x 8 units of 16 B per row
  uint8_t* base = kv;
  for (int u = t; u < units; u += 128) {
    const int r = first_row + u / 32, c = 4 * w + (u / 8) % 4, x = u % 8;
    *reinterpret_cast<uint4*>(base + c * kChunkBytes + r * 128 + x * 16) = make_uint4(0, 0, 0, 0);
  }
}

}  // namespace mla
