// Host side of the decode: the TMA descriptor of the paged cache, and the main + combine launches.
#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <mutex>
#include <string>

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

// A bf16 tensor map of k_cache with 128B swizzle: `rank` dimensions (dims[0] contiguous), byte strides of
// dimensions 1..rank-1, box sizes; element strides 1. `what` names the map in the error.
CUtensorMap encode_kv_map(const DecodeArgs& a, cuuint32_t rank, const cuuint64_t* dims, const cuuint64_t* strides,
                          const cuuint32_t* box, const char* what) {
  CUtensorMap map;
  const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  const CUresult res =
      encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, const_cast<void*>(a.k_cache), dims, strides, box,
                     elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) {
    throw std::runtime_error(std::string("mlaserve._C: cuTensorMapEncodeTiled failed for ") + what + " (error " +
                             std::to_string(static_cast<int>(res)) + ")");
  }
  return map;
}

// k_cache [num_pages, 64, h_kv, 576] bf16 as a 4-D tensor (576, 64 tokens, h_kv, pages), boxes of
// 64 columns x 64 tokens, 128B swizzle: the physical page id is the 4th coordinate.
CUtensorMap make_kv_tensor_map(const DecodeArgs& a) {
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(kHeadDimQK), static_cast<cuuint64_t>(kPageSize),
                              static_cast<cuuint64_t>(a.h_kv), static_cast<cuuint64_t>(a.num_pages)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(a.k_stride_token) * 2,
                                 static_cast<cuuint64_t>(a.k_stride_head) * 2,
                                 static_cast<cuuint64_t>(a.k_stride_page) * 2};
  const cuuint32_t box[4] = {kChunkCols, kPageSize, 1, 1};
  return encode_kv_map(a, 4, dims, strides, box, "k_cache");
}

// The same k_cache as a 5-D tensor (64 columns, 64 tokens, 9 chunks, h_kv, pages) with boxes of (64, 64, 4, 1,
// 1): one box lands a trio latent group, four 64-column chunks, as four swizzled 8 KB chunks side by side
// (the smem box is laid out dimension 0 fastest, so chunk i sits 8 KB after chunk i - 1).
CUtensorMap make_kv_group_tensor_map(const DecodeArgs& a) {
  const cuuint64_t dims[5] = {static_cast<cuuint64_t>(kChunkCols), static_cast<cuuint64_t>(kPageSize),
                              static_cast<cuuint64_t>(kNumChunksQK), static_cast<cuuint64_t>(a.h_kv),
                              static_cast<cuuint64_t>(a.num_pages)};
  const cuuint64_t strides[4] = {static_cast<cuuint64_t>(a.k_stride_token) * 2, kChunkCols * 2,
                                 static_cast<cuuint64_t>(a.k_stride_head) * 2,
                                 static_cast<cuuint64_t>(a.k_stride_page) * 2};
  const cuuint32_t box[5] = {kChunkCols, kPageSize, kTrioGroupChunks, 1, 1};
  return encode_kv_map(a, 5, dims, strides, box, "the k_cache group map");
}

// The dynamic shared-memory opt-in, once per (device, kernel).
template <typename Kernel>
void ensure_smem_attribute(Kernel kernel, int smem_bytes, int which) {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  static std::mutex mu;
  static bool done[64][2] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (dev < 0 || dev >= 64 || !done[dev][which]) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
               "cudaFuncSetAttribute(main kernel, max dynamic smem)");
    if (dev >= 0 && dev < 64) done[dev][which] = true;
  }
}

void launch_main(const DecodeArgs& a, const CUtensorMap& tmap, const DecodeParams& p, dim3 grid, int schedule,
                 cudaStream_t stream) {
  if (schedule == kSchedTrio) {
    const CUtensorMap tmap_g = make_kv_group_tensor_map(a);
    ensure_smem_attribute(mla_decode_trio_kernel, kTrioSmemBytes, 1);
    mla_decode_trio_kernel<<<grid, kThreads, kTrioSmemBytes, stream>>>(tmap, tmap_g, p);
    check_cuda(cudaGetLastError(), "mla_decode_trio_kernel launch");
  } else {
    ensure_smem_attribute(mla_decode_kernel, kSmemBytes, 0);
    mla_decode_kernel<<<grid, kThreads, kSmemBytes, stream>>>(tmap, p);
    check_cuda(cudaGetLastError(), "mla_decode_kernel launch");
  }
}

}  // namespace

// Auto: solo while a KV head's query rows fit one 64-row tile (the memory-bound shapes: trio 1-3% slower
// there), trio above (two or more tiles, compute-bound: 2.7% fewer cycles than solo under ncu at 1/128/8k and
// 1-2.5% faster side by side; csrc/NOTES.md, session 7).
int resolve_schedule(int schedule, int rows) {
  if (schedule != kSchedAuto) return schedule;
  return rows > kBlockM ? kSchedTrio : kSchedSolo;
}

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
  p.scale = a.scale;
  p.scale_log2 = a.scale * static_cast<float>(M_LOG2E);

  bool main_launched = false;
  if (a.b > 0 && a.num_parts > 0 && a.num_pages > 0) {
    const CUtensorMap tmap = make_kv_tensor_map(a);
    const dim3 grid((rows + kBlockM - 1) / kBlockM, a.h_kv, a.num_parts);
    launch_main(a, tmap, p, grid, resolve_schedule(a.schedule, rows), stream);
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
