// The sm_90a primitives of the decode kernels, all from CUTLASS / CuTe (nvidia-cutlass 4.2 headers):
//   mbarrier         cutlass::arch::ClusterBarrier / ClusterTransactionBarrier (cutlass/arch/barrier.h)
//   named barriers   cutlass::arch::NamedBarrier (user ids, offset by CUTLASS's 8 reserved ones)
//   proxy fence      cutlass::arch::fence_view_async_shared (fence.proxy.async.shared::cta)
//   TMA              cute::SM90_TMA_LOAD_4D, cute::prefetch_tma_descriptor (cute/arch/copy_sm90_*.hpp)
//   cp.async         cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL, cute::cp_async_wait (cute/arch/copy_sm80.hpp)
//   wgmma            cute::SM90::GMMA::MMA_64xNx16_F32BF16BF16_SS atoms, cute::warpgroup_arrive /
//                    warpgroup_commit_batch / warpgroup_wait / warpgroup_fence_operand
//   descriptors      cute::make_gmma_desc over the CuTe shared-memory layouts below, advanced with
//                    cute::DescriptorIterator (adds to the start-address field)
//   setmaxnreg       cutlass::arch::warpgroup_reg_alloc / warpgroup_reg_dealloc
//   PDL              cutlass::arch::launch_dependent_grids / wait_on_dependent_grids
// Nothing here is hand-written PTX; the only glue is gmma(), which spreads a float array over an
// atom's per-register fma arguments.
#pragma once

// CUTLASS emits griddepcontrol only when asked to (else launch_dependent_grids / wait_on_dependent_grids
// compile to nothing, and the PDL-launched combine kernel would read partials before they are written).
#ifndef CUTLASS_ENABLE_GDC_FOR_SM90
#define CUTLASS_ENABLE_GDC_FOR_SM90 1
#endif

#include <cuda.h>

#include <cstdint>
#include <utility>

#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/grid_dependency_control.h>
#include <cutlass/arch/reg_reconfig.h>

#include "config.h"

// Each wrapper above silently compiles to nothing (or a trap) when its feature macro is off: fail the
// build instead.
#if defined(__CUDA_ARCH__)
#if !defined(CUTLASS_GDC_ENABLED)
#error "mlaserve: CUTLASS griddepcontrol is disabled (needs sm_90a and CUTLASS_ENABLE_GDC_FOR_SM90)"
#endif
#if !CUDA_CTA_RECONFIG_ACTIVATED || !CUDA_BARRIER_ENABLED
#error "mlaserve: CUTLASS setmaxnreg / mbarrier support is disabled (build for sm_90a)"
#endif
#if !defined(CUTE_ARCH_MMA_SM90A_ENABLED) || !defined(CUTE_ARCH_TMA_SM90_ENABLED) || \
    !defined(CUTE_ARCH_CP_ASYNC_SM80_ENABLED)
#error "mlaserve: CuTe wgmma / TMA / cp.async support is disabled (build for sm_90a)"
#endif
#endif

namespace mla {

namespace GMMA = cute::SM90::GMMA;
using bf16 = cute::bfloat16_t;
using cute::_16;
using cute::Int;
using cute::Shape;

// ---- shared-memory tiles as CuTe layouts (element offsets, 128B swizzle) ------------------------
// Q tile / K page: (64 rows, 576 columns) bf16, K-major: 8-row x 64-column swizzle atoms, rows first
// (8 atoms = one 8 KB chunk of 64 columns), then the 9 chunks side by side. This is the layout the TMA
// boxes (64 columns x 64 tokens, CU_TENSOR_MAP_SWIZZLE_128B) write.
using SmemLayoutQK =
    decltype(cute::tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<kBlockM>, Int<kHeadDimQK>>{}));
// P: (64 rows, 64 keys) bf16, K-major, one chunk.
using SmemLayoutP =
    decltype(cute::tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
// V^T: the first 512 columns of a K page seen as the B operand of P.V, (512 columns, 64 keys),
// MN-major: 64-column x 8-key atoms, keys first (8 atoms = one chunk), then the chunks.
using SmemLayoutVt = decltype(cute::tile_to_shape(GMMA::Layout_MN_SW128_Atom<bf16>{},
                                                  Shape<Int<kHeadDimV>, Int<kBlockN>>{},
                                                  cute::Step<cute::_2, cute::_1>{}));

constexpr int kChunkElems = kBlockM * kChunkCols;  // 4096 elements = 8 KB
static_assert(cute::cosize(SmemLayoutQK{}) == kNumChunksQK * kChunkElems, "Q/K tile is 9 chunks");
static_assert(cute::cosize(SmemLayoutP{}) == kChunkElems, "P is one chunk");
// Unswizzled strides (what descriptors and TMA boxes see): 64-column chunks 8 KB apart, 8-row groups
// 1 KB apart, and V^T is the same bytes (key = row).
constexpr auto kQKPlain = cute::get_nonswizzle_portion(SmemLayoutQK{});
constexpr auto kVtPlain = cute::get_nonswizzle_portion(SmemLayoutVt{});
static_assert(kQKPlain(Int<0>{}, Int<kChunkCols>{}) == kChunkElems, "Q/K: 64-column chunks 8 KB apart");
static_assert(kQKPlain(Int<8>{}, Int<0>{}) == 8 * kChunkCols, "Q/K: 8-row groups 1 KB apart");
static_assert(kVtPlain(Int<kChunkCols>{}, Int<0>{}) == kChunkElems, "V^T: 64-column chunks 8 KB apart");
static_assert(kVtPlain(Int<0>{}, Int<8>{}) == 8 * kChunkCols, "V^T: 8-key groups 1 KB apart");

// A tile as a CuTe tensor. The swizzle of these layouts lives in the smem pointer (smem_ptr_flag): take
// addresses through the tensor (&t(r, c)); evaluating the layout as an integer gives the UNswizzled
// offset (which is what descriptor steps want, see desc_step).
template <class Layout>
__host__ __device__ __forceinline__ auto smem_tensor(const void* p, Layout layout) {
  return cute::make_tensor(cute::make_smem_ptr(reinterpret_cast<bf16*>(const_cast<void*>(p))), layout);
}

// Start-address increment (16-byte units) that moves a descriptor by `elems` elements (an unswizzled
// offset: a row-0 / key-0 position inside a 1 KB-aligned atom row, which the swizzle leaves in place).
__host__ __device__ __forceinline__ constexpr uint32_t desc_step(int elems) {
  return static_cast<uint32_t>(elems) * sizeof(bf16) / 16;
}

// ---- wgmma --------------------------------------------------------------------------------------
// D (+)= A . B with a CuTe SS atom (Op::fma takes one float& per accumulator register).
template <class Op, int N, std::size_t... I>
__device__ __forceinline__ void gmma_unpack(float (&d)[N], uint64_t da, uint64_t db, GMMA::ScaleOut scale,
                                            std::index_sequence<I...>) {
  Op::fma(da, db, d[I]..., scale);
}
template <class Op, int N>
__device__ __forceinline__ void gmma(float (&d)[N], uint64_t da, uint64_t db,
                                     GMMA::ScaleOut scale = GMMA::ScaleOut::One) {
  static_assert(sizeof(typename Op::CRegisters) == N * sizeof(float), "accumulator size must match the atom");
  gmma_unpack<Op>(d, da, db, scale, std::make_index_sequence<N>{});
}

// D (+)= A . B with a CuTe RS atom: A = four bf16x2 registers (one m64k16 step), B from shared memory.
template <class Op, int N, std::size_t... I>
__device__ __forceinline__ void gmma_rs_unpack(float (&d)[N], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint64_t db, GMMA::ScaleOut scale, std::index_sequence<I...>) {
  Op::fma(a0, a1, a2, a3, db, d[I]..., scale);
}
template <class Op, int N>
__device__ __forceinline__ void gmma_rs(float (&d)[N], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint64_t db, GMMA::ScaleOut scale = GMMA::ScaleOut::One) {
  static_assert(sizeof(typename Op::CRegisters) == N * sizeof(float), "accumulator size must match the atom");
  gmma_rs_unpack<Op>(d, a0, a1, a2, a3, db, scale, std::make_index_sequence<N>{});
}

using MmaQK64 = GMMA::MMA_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;     // S = Q K^T
using MmaQK64RS = GMMA::MMA_64x64x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::K>;   // the same, Q in registers
using MmaPV = GMMA::MMA_64x256x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>;     // O half += P.V

// Keeps the compiler from moving accumulator (or A-fragment) reads/writes across wgmma issue / wait.
template <class T, int N>
__device__ __forceinline__ void fence_regs(T (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(r[i]);
}

// ---- barriers -----------------------------------------------------------------------------------
using FullBarrier = cutlass::arch::ClusterTransactionBarrier;  // producer arrive + TMA bytes
using EmptyBarrier = cutlass::arch::ClusterBarrier;            // consumer arrivals

// Spins on mbarrier.try_wait (no suspend-time hint). ClusterBarrier::wait passes a 10M-tick hint,
// which ptxas turns into a test + NANOSLEEP.SYNCS back-off loop; this keeps the measured spin loop.
__device__ __forceinline__ void wait_barrier(const uint64_t* bar, uint32_t phase) {
  while (!cutlass::arch::ClusterBarrier::try_wait(bar, phase)) {
  }
}

// Named barriers among the consumer warpgroups (CUTLASS user ids; hardware ids 8 + id).
enum NamedBarrierId : uint32_t {
  kBarQ = 0,      // both consumer WGs: Q tile free / written
  kBarMax = 1,    // both consumer WGs: a request's final row sums and maxima exchanged
  kBarP = 2,      // both consumer WGs: P tile (and rescale factors) written
  kBarPFree = 3,  // consumer 1 done reading P (consumer 0 may overwrite it)
  // trio: one warpgroup's own 128 threads
  kBarScorer = 4,  // scorer: Q's tail chunks (s.q_tail) are written
  kBarValue0 = 5,  // value warpgroup 1 (output half 0): every warp's P V of the page is done
  kBarValue1 = 6,  // value warpgroup 2 (output half 1)
};
constexpr int kConsumerThreads = kNumConsumerWG * 128;
__device__ __forceinline__ void consumer_sync(NamedBarrierId id) {
  cutlass::arch::NamedBarrier::sync(kConsumerThreads, id);
}
__device__ __forceinline__ void consumer_arrive(NamedBarrierId id) {
  cutlass::arch::NamedBarrier::arrive(kConsumerThreads, id);
}
__device__ __forceinline__ void own_warpgroup_sync(NamedBarrierId id) { cutlass::arch::NamedBarrier::sync(128, id); }

}  // namespace mla
