// EXPERIMENT: one trio instance's launch (dynamic shared memory opt-in on every call: host cost only).
#pragma once
#include "trio_kernel.cuh"
#include "trio_variants.h"

namespace mla {

template <int kV, int kOpt, bool kTrace>
void launch_trio_instance(const CUtensorMap& tmap, const CUtensorMap& tmap_g, const DecodeParams& p, dim3 grid,
                          cudaStream_t stream) {
  auto kernel = mla_decode_trio_kernel<kV, kOpt, kTrace>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTrioSmemBytes),
             "cudaFuncSetAttribute(trio variant)");
  kernel<<<grid, kThreads, kTrioSmemBytes, stream>>>(tmap, tmap_g, p);
  check_cuda(cudaGetLastError(), "mla_decode_trio_kernel (variant) launch");
}

}  // namespace mla
