// Host side of the decode: the TMA descriptor of the paged cache, and the main + combine launches.
#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <mutex>

#include "api.h"
#include "config.h"
#include "mla_kernel.cuh"
#include "traits.h"

namespace mla {

void launch_mla_combine(const CombineParams& params, bool pdl, cudaStream_t stream);

namespace {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point: the extension links no libcuda,
// so it imports on machines without a driver.
EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = nullptr;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (fn == nullptr) {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (status != cudaDriverEntryPointSuccess || ptr == nullptr) {
      throw std::runtime_error("mlaserve._C: cuTensorMapEncodeTiled is not available from the CUDA driver");
    }
    fn = reinterpret_cast<EncodeTiledFn>(ptr);
  }
  return fn;
}

// k_cache [num_pages, 64, h_kv, 576] bf16 as a 4-D tensor (576, 64 tokens, h_kv, pages), boxes of
// 64 columns x 64 tokens, 128B swizzle: the physical page id is the 4th coordinate.
CUtensorMap make_kv_tensor_map(const DecodeArgs& a) {
  CUtensorMap map;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(kHeadDimQK), static_cast<cuuint64_t>(kPageSize),
                              static_cast<cuuint64_t>(a.h_kv), static_cast<cuuint64_t>(a.num_pages)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(a.k_stride_token) * 2,
                                 static_cast<cuuint64_t>(a.k_stride_head) * 2,
                                 static_cast<cuuint64_t>(a.k_stride_page) * 2};
  const cuuint32_t box[4] = {kChunkCols, kPageSize, 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult res =
      encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<void*>(a.k_cache), dims, strides, box,
                     elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) {
    throw std::runtime_error("mlaserve._C: cuTensorMapEncodeTiled failed for k_cache (error " +
                             std::to_string(static_cast<int>(res)) + ")");
  }
  return map;
}

template <int kSchedule, int kCluster>
void ensure_smem_attribute() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  static std::mutex mu;
  static bool done[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (dev < 0 || dev >= 64 || !done[dev]) {
    check_cuda(cudaFuncSetAttribute(mla_decode_kernel<kSchedule, kCluster>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
               "cudaFuncSetAttribute(mla_decode_kernel, max dynamic smem)");
    if (dev >= 0 && dev < 64) done[dev] = true;
  }
}

template <int kSchedule, int kCluster>
cudaLaunchConfig_t launch_config(dim3 grid, cudaStream_t stream, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kSmemBytes;
  cfg.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = kCluster;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether every CTA of `grid` is resident at once in clusters of kCluster (1 CTA per SM: a GPC with an odd
// number of free SMs leaves one idle, and a grid that does not fit would run a second wave).
template <int kCluster>
bool clusters_fit(dim3 grid) {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  static std::mutex mu;
  static int max_clusters[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (dev < 0 || dev >= 64) return false;
  if (max_clusters[dev] == 0) {
    ensure_smem_attribute<kDuo, kCluster>();
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = launch_config<kDuo, kCluster>(grid, nullptr, &attr);
    int n = 0;
    check_cuda(cudaOccupancyMaxActiveClusters(&n, mla_decode_kernel<kDuo, kCluster>, &cfg),
               "cudaOccupancyMaxActiveClusters");
    max_clusters[dev] = n > 0 ? n : -1;
  }
  return static_cast<long>(max_clusters[dev]) * kCluster >= static_cast<long>(grid.x) * grid.y * grid.z;
}

template <int kSchedule, int kCluster>
void launch_main(const CUtensorMap& tmap, const DecodeParams& p, dim3 grid, cudaStream_t stream) {
  ensure_smem_attribute<kSchedule, kCluster>();
  if constexpr (kCluster == 1) {
    mla_decode_kernel<kSchedule, 1><<<grid, kThreads, kSmemBytes, stream>>>(tmap, p);
    check_cuda(cudaGetLastError(), "mla_decode_kernel launch");
  } else {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = launch_config<kSchedule, kCluster>(grid, stream, &attr);
    check_cuda(cudaLaunchKernelEx(&cfg, mla_decode_kernel<kSchedule, kCluster>, tmap, p),
               "mla_decode_kernel launch (cluster)");
  }
}

// The consumer schedule of a call: solo unless kConsumerDuo asks for the pair schedule. (Measured side by
// side on the H200, 2026-12-02: duo is within +-5% of solo on the compute-bound rows, 0.99x on their
// geomean, and slower on the serving shapes; csrc/NOTES.md. It stays selectable as the base of the next
// compute-bound schedule.)
int pick_schedule(int consumer, int /*rows*/) { return consumer == kConsumerDuo ? kDuo : kSolo; }

}  // namespace

int num_sms(int device) {
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return n;
}

void launch_mla_decode(const DecodeArgs& a, cudaStream_t stream) {
  const int group = a.h_q / a.h_kv;
  const int rows = a.s_q * group;
  DecodeParams p;
  p.q = static_cast<const uint16_t*>(a.q);
  p.q_stride_b = a.q_stride_b;
  p.q_stride_s = a.q_stride_s;
  p.q_stride_h = a.q_stride_h;
  p.out = static_cast<uint16_t*>(a.out);
  p.o_stride_b = a.o_stride_b;
  p.o_stride_s = a.o_stride_s;
  p.o_stride_h = a.o_stride_h;
  p.lse = a.lse;
  p.block_table = a.block_table;
  p.bt_stride_b = a.bt_stride_b;
  p.seqlens = a.seqlens;
  p.tile_metadata = a.tile_metadata;
  p.num_splits = a.num_splits;
  p.o_accum = a.o_accum;
  p.lse_accum = a.lse_accum;
  p.b = a.b;
  p.s_q = a.s_q;
  p.h_q = a.h_q;
  p.h_kv = a.h_kv;
  p.group = group;
  p.rows = rows;
  p.num_parts = a.num_parts;
  p.causal = a.causal ? 1 : 0;
  p.duo_s_after_a = a.duo_s_after_a ? 1 : 0;
  p.scale = a.scale;
  p.scale_log2 = a.scale * static_cast<float>(M_LOG2E);

  bool main_launched = false;
  if (a.b > 0 && a.num_parts > 0 && a.num_pages > 0) {
    const CUtensorMap tmap = make_kv_tensor_map(a);
    const dim3 grid((rows + kBlockM - 1) / kBlockM, a.h_kv, a.num_parts);
    const int schedule = pick_schedule(a.consumer, rows);
    p.prefetch = a.prefetch >= 0 ? a.prefetch : (schedule == kDuo ? kDuoPrefetchPages : kSoloPrefetchPages);
    // duo in CTA pairs sharing the page loads where the m-blocks pair up and the pairs fit at once
    const bool pair = schedule == kDuo && a.cluster != kClusterNone && grid.x % 2 == 0 && clusters_fit<2>(grid);
    if (pair) {
      launch_main<kDuo, 2>(tmap, p, grid, stream);
    } else if (schedule == kDuo) {
      launch_main<kDuo, 1>(tmap, p, grid, stream);
    } else {
      launch_main<kSolo, 1>(tmap, p, grid, stream);
    }
    main_launched = true;
  }

  CombineParams c;
  c.o_accum = a.o_accum;
  c.lse_accum = a.lse_accum;
  c.num_splits = a.num_splits;
  c.out = p.out;
  c.o_stride_b = a.o_stride_b;
  c.o_stride_s = a.o_stride_s;
  c.o_stride_h = a.o_stride_h;
  c.lse = a.lse;
  c.b = a.b;
  c.s_q = a.s_q;
  c.h_q = a.h_q;
  c.h_kv = a.h_kv;
  c.group = group;
  c.rows = rows;
  if (a.b > 0) launch_mla_combine(c, a.pdl && main_launched, stream);
}

}  // namespace mla
