// EXPERIMENT (not for the tree): per-page clock64() events of a few trio CTAs (m_block 0, KV head 0, parts
// 0..kTraceCtas-1), read back by _C.trace_copy. Compiled only into the traced kernel instances.
#pragma once
#include <cstdint>

namespace mla {

constexpr int kTraceCtas = 4, kTracePages = 256, kTraceEvents = 20;
static __device__ long long g_trace[kTraceCtas][kTracePages][kTraceEvents];

template <bool kTrace>
__device__ __forceinline__ void trace_event(int it, int e) {
  if constexpr (kTrace) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z < kTraceCtas && it < kTracePages) {
      g_trace[blockIdx.z][it][e] = clock64();
    }
  }
}

}  // namespace mla
