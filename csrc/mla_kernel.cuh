// The split-KV paged MLA decode kernel (sm_90a).
//
// Grid (m_blocks, h_kv, num_parts); 384 threads. Warpgroup 2 is the producer: its first warp streams the
// part's pages through the page table with TMA (nine 64x64 boxes per page in two chunk groups, 128B
// swizzle) into a two-stage ring. Warpgroups 0 and 1 are consumers (w = 0, 1); consumer w owns output
// columns 256w..256w+255 (O += P V with wgmma m64n256k16, V = first 512 columns of the K page already in
// smem, read transposed). Online softmax in fp32. Consumer schedule: solo (solo.cuh). (The split-S,
// seesaw and duo schedules lost to it on the measured rows and were deleted; NOTES.md keeps their numbers.)
#pragma once
#include <cuda.h>

#include <cstdint>

#include "config.h"
#include "consumer.cuh"
#include "primitives.cuh"
#include "solo.cuh"
#include "tile_scheduler.h"
#include "traits.h"

namespace mla {

__global__ void __launch_bounds__(kThreads, 1) mla_decode_kernel(const __grid_constant__ CUtensorMap tmap,
                                                                 const __grid_constant__ DecodeParams p) {
  extern __shared__ uint8_t smem_raw[];
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
