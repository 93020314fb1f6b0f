// EXPERIMENT: trio2h5
#include "trio_variant_launch.cuh"
namespace mla {
void launch_trio_variants_b(int v, const CUtensorMap& t, const CUtensorMap& g, const DecodeParams& p, dim3 grid,
                            cudaStream_t st) {
  if (v == kTrio2h5) launch_trio_instance<4, kOptBox5, false>(t, g, p, grid, st);
}
}  // namespace mla
