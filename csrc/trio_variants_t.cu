// EXPERIMENT: the traced instances and their trace read-back (g_trace is this translation unit's own).
#include "trio_variant_launch.cuh"
namespace mla {
void launch_trio_variants_t(int v, const CUtensorMap& t, const CUtensorMap& g, const DecodeParams& p, dim3 grid,
                            cudaStream_t st) {
  if (v == kTrio1h5T) launch_trio_instance<3, kOptBox5, true>(t, g, p, grid, st);
  if (v == kTrio2h5T) launch_trio_instance<4, kOptBox5, true>(t, g, p, grid, st);
}
int trace_bytes() { return static_cast<int>(sizeof(g_trace)); }
void trace_copy(void* dst, bool clear) {
  check_cuda(cudaMemcpyFromSymbol(dst, g_trace, sizeof(g_trace), 0, cudaMemcpyDeviceToDevice), "trace copy");
  if (clear) {
    void* sym = nullptr;
    check_cuda(cudaGetSymbolAddress(&sym, g_trace), "trace symbol");
    check_cuda(cudaMemset(sym, 0, sizeof(g_trace)), "trace clear");
  }
}
}  // namespace mla
