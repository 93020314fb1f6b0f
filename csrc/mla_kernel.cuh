// The split-KV paged MLA decode kernel (sm_90a).
//
// Grid (m_blocks, h_kv, num_parts); 384 threads. Warpgroup 2 is the producer: its first warp streams the
// part's pages through the page table with TMA (nine 64x64 boxes per page in two chunk groups, 128B
// swizzle) into a two-stage ring. Warpgroups 0 and 1 are consumers (w = 0, 1); consumer w owns output
// columns 256w..256w+255 (O += P V with wgmma m64n256k16, V = first 512 columns of the K page already in
// smem, read transposed). Online softmax in fp32. Consumer schedule: solo (solo.cuh). The trio kernel
// below runs the trio schedule (trio.cuh) on the same grid; auto picks it above 64 query rows per KV head
// (launch.cu). (The split-S, seesaw and duo schedules lost to solo on the measured rows and were deleted;
// NOTES.md keeps their numbers.)
#pragma once
#include <cuda.h>

#include <cstdint>

#include "config.h"
#include "consumer.cuh"
#include "primitives.cuh"
#include "solo.cuh"
#include "trio.cuh"
#include "tile_scheduler.h"
#include "traits.h"

namespace mla {

// The dynamic shared memory base rounded up to 1024 bytes (the 128B swizzle atoms' alignment), by pointer
// arithmetic on the __shared__ array itself so that the compiler keeps seeing shared-memory addresses
// (a round trip through an integer makes every access through it a generic 64-bit one).
__device__ __forceinline__ uint8_t* align_smem_1024(uint8_t* base) {
  return base + ((1024 - (reinterpret_cast<uintptr_t>(base) & 1023)) & 1023);
}

__global__ void __launch_bounds__(kThreads, 1) mla_decode_kernel(const __grid_constant__ CUtensorMap tmap,
                                                                 const __grid_constant__ DecodeParams p) {
  extern __shared__ uint8_t smem_raw[];
  // (The integer round trip here, unlike align_smem_1024, is what the measured solo SASS was built with:
  // with shared-space addresses ptxas spills 48 bytes in this kernel.)
  SharedStorage& s = *reinterpret_cast<SharedStorage*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                                       ~static_cast<uintptr_t>(1023));
  const int m_block = blockIdx.x, head_kv = blockIdx.y, part_idx = blockIdx.z;

  if (threadIdx.x == 0) {
    for (int i = 0; i < kNumStages; ++i) {
      for (int g = 0; g < kNumGroups; ++g) {
        FullBarrier::init(&s.full_bar[i][g], 1);
        EmptyBarrier::init(&s.empty_bar[i][g], 128);  // the releasing warpgroup's threads
      }
    }
    cutlass::arch::fence_barrier_init();
    cute::prefetch_tma_descriptor(&tmap);
  }
  __syncthreads();
  // No explicit launch_dependent_grids: each CTA triggers the PDL-launched combine when it exits, which
  // measured best (NOTES.md, session 10: triggering at entry let combine CTAs pile up behind the tail).
  const PartInfo part = load_part(p.tile_metadata, part_idx);

  if (threadIdx.x >= kConsumerThreads) {  // warpgroup 2: the producer (its first warp issues)
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x < kConsumerThreads + 32) produce_pages(&tmap, p, part, s, head_kv);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  consume_solo_s(p, s, part, consumer_ctx(threadIdx.x / 128, m_block, head_kv));
}

// The trio schedule (trio.cuh), auto above 64 query rows per KV head: same grid and threads; warpgroup 0
// scores, warpgroups 1 and 2 add P V and issue the loads.
// tmap: the cache's 64-column chunks (RoPE chunks); tmap_g: its 4-chunk latent groups (launch.cu).
__global__ void __launch_bounds__(kThreads, 1) mla_decode_trio_kernel(const __grid_constant__ CUtensorMap tmap,
                                                                      const __grid_constant__ CUtensorMap tmap_g,
                                                                      const __grid_constant__ DecodeParams p) {
  extern __shared__ uint8_t smem_raw[];
  TrioStorage& s = *reinterpret_cast<TrioStorage*>(align_smem_1024(smem_raw));
  const int m_block = blockIdx.x, head_kv = blockIdx.y, part_idx = blockIdx.z;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kTrioStages; ++i) {
      for (int g = 0; g < 2; ++g) FullBarrier::init(&s.full_bar[i][g], 1);
      EmptyBarrier::init(&s.p_full[i], 128);  // the scorer's threads
      EmptyBarrier::init(&s.p_late[i], 128);  // the same
      EmptyBarrier::init(&s.p_done[i], 1);    // value warpgroup 2's lead thread
    }
    FullBarrier::init(&s.rope_full, 1);
    EmptyBarrier::init(&s.p_free, 2);  // the value warpgroups' leads
    for (int i = 0; i < 2; ++i) EmptyBarrier::init(&s.fin_free[i], 256);  // both value warpgroups
    cutlass::arch::fence_barrier_init();
    cute::prefetch_tma_descriptor(&tmap);
    cute::prefetch_tma_descriptor(&tmap_g);
  }
  __syncthreads();  // (PDL trigger at exit, as above)
  const PartInfo part = load_part(p.tile_metadata, part_idx);
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    cutlass::arch::warpgroup_reg_alloc<kTrioScorerRegs>();
    trio_score(p, s, part, consumer_ctx(0, m_block, head_kv));
  } else if (wg == 1) {
    cutlass::arch::warpgroup_reg_dealloc<kTrioIssuerRegs>();
    trio_values<true>(&tmap, &tmap_g, p, s, part, consumer_ctx(0, m_block, head_kv));
  } else {
    cutlass::arch::warpgroup_reg_dealloc<kTrioValueRegs>();
    trio_values<false>(&tmap, &tmap_g, p, s, part, consumer_ctx(1, m_block, head_kv));
  }
}

}  // namespace mla
