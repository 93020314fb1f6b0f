// EXPERIMENT (session 16, not for the tree): trio variants, each instance in a translation unit of its own
// (trio_variants_*.cu) so that they compile in parallel. Schedule numbers = MLASERVE_MLA_CONSUMER values
// (worker/kernels/sm90.py _CONSUMERS).
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include "api.h"
#include "traits.h"

namespace mla {

// schedule -> (kV, kOpt, kTrace); kSchedTrio itself (the tree: <3, box5>) is launched by launch.cu
enum TrioVariant : int {
  kTrio0 = 3,     // <0, 0>: session 15's tree (two RoPE slots, chunk boxes)
  kTrio2h5 = 4,   // <4, box5>: two slots + half 0 late
  kTrio1h5T = 5,  // <3, box5, traced>: the default, traced
  kTrio2h5T = 6,  // <4, box5, traced>
  kTrioLast = 6,
};
bool trio_variant_uses_group_map(int schedule);
void launch_trio_variant(int schedule, const CUtensorMap& tmap, const CUtensorMap& tmap_g, const DecodeParams& p,
                         dim3 grid, cudaStream_t stream);
// one per translation unit
void launch_trio_variants_a(int schedule, const CUtensorMap&, const CUtensorMap&, const DecodeParams&, dim3, cudaStream_t);
void launch_trio_variants_b(int schedule, const CUtensorMap&, const CUtensorMap&, const DecodeParams&, dim3, cudaStream_t);
void launch_trio_variants_t(int schedule, const CUtensorMap&, const CUtensorMap&, const DecodeParams&, dim3, cudaStream_t);

}  // namespace mla
