// EXPERIMENT: trio0 (session 15's tree)
#include "trio_variant_launch.cuh"
namespace mla {
void launch_trio_variants_a(int v, const CUtensorMap& t, const CUtensorMap& g, const DecodeParams& p, dim3 grid,
                            cudaStream_t st) {
  if (v == kTrio0) launch_trio_instance<0, 0, false>(t, g, p, grid, st);
}
}  // namespace mla
