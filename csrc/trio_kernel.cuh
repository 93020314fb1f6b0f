// The trio kernel (trio.cuh) as a template over the EXPERIMENT variants (kV, kOpt, kTrace); its own header so that
// variant instances compile in their own translation units (trio_variants_*.cu) beside launch.cu.
#pragma once
#include <cuda.h>

#include "config.h"
#include "consumer.cuh"
#include "primitives.cuh"
#include "trio.cuh"
#include "traits.h"

namespace mla {

// The dynamic shared memory base rounded up to 1024 bytes (the 128B swizzle atoms' alignment), by pointer
// arithmetic on the __shared__ array itself so that the compiler keeps seeing shared-memory addresses
// (a round trip through an integer makes every access through it a generic 64-bit one).
__device__ __forceinline__ uint8_t* align_smem_1024(uint8_t* base) {
  return base + ((1024 - (reinterpret_cast<uintptr_t>(base) & 1023)) & 1023);
}

// The trio schedule (trio.cuh), auto above 64 query rows per KV head: same grid and threads; warpgroup 0
// scores, warpgroups 1 and 2 add P V and issue the loads.
template <int kV, int kOpt, bool kTrace>
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
      EmptyBarrier::init(&s.p_late[i], 128);  // (kV = 3) the same
      EmptyBarrier::init(&s.p_done[i], 1);    // value warpgroup 2's lead thread
    }
    for (int i = 0; i < kTrioRopeSlots; ++i) FullBarrier::init(&s.rope_full[i], 1);
    for (int i = 0; i < 2; ++i) EmptyBarrier::init(&s.fin_free[i], 256);  // both value warpgroups
    EmptyBarrier::init(&s.p_free, 2);  // (kV > 0) the value warpgroups' leads
    cutlass::arch::fence_barrier_init();
    cute::prefetch_tma_descriptor(&tmap);
    if constexpr ((kOpt & kOptBox5) != 0) cute::prefetch_tma_descriptor(&tmap_g);
  }
  __syncthreads();  // (PDL trigger at exit, as above)
  const PartInfo part = load_part(p.tile_metadata, part_idx);
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    cutlass::arch::warpgroup_reg_alloc<kTrioScorerRegs>();
    trio_score<kV, kTrace>(&tmap, p, s, part, consumer_ctx(0, m_block, head_kv));
  } else if (wg == 1) {
    cutlass::arch::warpgroup_reg_dealloc<kTrioIssuerRegs>();
    trio_values<true, kV, kOpt, kTrace>(&tmap, &tmap_g, p, s, part, consumer_ctx(0, m_block, head_kv));
  } else {
    cutlass::arch::warpgroup_reg_dealloc<kTrioValueRegs>();
    trio_values<false, kV, kOpt, kTrace>(&tmap, &tmap_g, p, s, part, consumer_ctx(1, m_block, head_kv));
  }
}

}  // namespace mla
