// Combine kernel: LSE-weighted merge of a split request's fp32 partial outputs into the bf16 output
// and the fp32 LSE. Also writes out = 0, lse = +inf for empty requests (no split at all).
// One warp per (request, KV head, query row), or per 128-column quarter of it in small launches
// (kCombineWideItems); four warps per block; requests with exactly one split were written by the main kernel
// and are skipped.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "api.h"
#include "config.h"
#include "primitives.cuh"
#include "traits.h"

namespace mla {
namespace {

constexpr int kCombineWarps = 4;
constexpr int kCombineBatch = 4;  // wide launches: splits whose partials are loaded together
// A launch with at most this many (request, KV head, query row) items splits each row over several warps (few
// requests with many splits: spread over more SMs), a larger one keeps one warp per row (the extra, mostly
// idle blocks cost more than they spread). Measured on the serving grid, csrc/NOTES.md session 7.
constexpr int kCombineWideItems = 512;
constexpr int kCombineWideParts = 4;  // warps per row in those launches
constexpr int kWarpCols = 32 * 4;     // columns one warp covers with a float4 per lane

// kParts warps per row, each over 512 / kParts columns: a lane holds kVecs = 4 / kParts float4.
template <int kParts>
__global__ void __launch_bounds__(kCombineWarps * 32) mla_combine_kernel(const __grid_constant__ CombineParams p) {
  constexpr int kPartCols = kHeadDimV / kParts, kVecs = kPartCols / kWarpCols;
  // Batching pays where few warps each walk many splits; in large launches (mostly 2 splits a request) its
  // registers (109 against 54) cost more than it hides: there the splits are walked one at a time.
  constexpr int kBatch = kParts == 1 ? 1 : kCombineBatch;
  // Launched with programmatic dependent launch: wait until the main kernel's writes are visible.
  cutlass::arch::wait_on_dependent_grids();
  const int req = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int item = blockIdx.x * kCombineWarps + warp;  // over (h_kv, rows, column part)
  if (item >= p.h_kv * p.rows * kParts) return;
  const int first = p.num_splits[req];
  const int ns = p.num_splits[req + 1] - first;
  if (ns == 1) return;
  const int row_id = item / kParts, part = item % kParts;
  const int head_kv = row_id / p.rows, rg = row_id % p.rows;
  const int sq = rg / p.group, head = head_kv * p.group + rg % p.group;
  const int col = part * kPartCols + 4 * lane;  // this lane's columns: col + kWarpCols k + 0..3, k < kVecs
  uint16_t* dst = p.out + static_cast<int64_t>(req) * p.o_stride_b + static_cast<int64_t>(sq) * p.o_stride_s +
                  static_cast<int64_t>(head) * p.o_stride_h + col;
  float* lse_dst = p.lse + (static_cast<int64_t>(req) * p.h_q + head) * p.s_q + sq;

  float mx = -INFINITY;
  for (int s = lane; s < ns; s += 32) {
    mx = fmaxf(mx, p.lse_accum[(static_cast<int64_t>(first + s) * p.h_kv + head_kv) * p.rows + rg]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));

  float4 acc[kVecs];
#pragma unroll
  for (int k = 0; k < kVecs; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  float lse_out = INFINITY;
  if (mx != -INFINITY) {
    float sum = 0.f;
    for (int s = lane; s < ns; s += 32) {
      sum += expf(p.lse_accum[(static_cast<int64_t>(first + s) * p.h_kv + head_kv) * p.rows + rg] - mx);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv_sum = 1.f / sum;
    // kBatch splits at a time, all their loads issued before the first is used.
    for (int s0 = 0; s0 < ns; s0 += kBatch) {
      float wgt[kBatch];
      float4 v[kBatch][kVecs];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        wgt[j] = 0.f;
#pragma unroll
        for (int k = 0; k < kVecs; ++k) v[j][k] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (s0 + j < ns) {
          const int64_t row = (static_cast<int64_t>(first + s0 + j) * p.h_kv + head_kv) * p.rows + rg;
          wgt[j] = expf(p.lse_accum[row] - mx) * inv_sum;
          const float4* src = reinterpret_cast<const float4*>(p.o_accum + row * kHeadDimV + col);
#pragma unroll
          for (int k = 0; k < kVecs; ++k) v[j][k] = src[32 * k];
        }
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
#pragma unroll
        for (int k = 0; k < kVecs; ++k) {
          acc[k].x += wgt[j] * v[j][k].x;
          acc[k].y += wgt[j] * v[j][k].y;
          acc[k].z += wgt[j] * v[j][k].z;
          acc[k].w += wgt[j] * v[j][k].w;
        }
      }
    }
    lse_out = mx + logf(sum);
  }
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(acc[k].x, acc[k].y);
    const __nv_bfloat162 b = __floats2bfloat162_rn(acc[k].z, acc[k].w);
    uint2 packed;
    packed.x = *reinterpret_cast<const uint32_t*>(&a);
    packed.y = *reinterpret_cast<const uint32_t*>(&b);
    *reinterpret_cast<uint2*>(dst + kWarpCols * k) = packed;
  }
  if (part == 0 && lane == 0) *lse_dst = lse_out;
}

}  // namespace

// pdl: launch as a programmatic dependent of the preceding kernel in the stream (the main kernel's CTAs
// trigger as they exit, so the combine's launch overlaps the last ones; griddepcontrol.wait keeps it
// correct).
void launch_mla_combine(const CombineParams& params, bool pdl, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  const int64_t items = static_cast<int64_t>(params.b) * params.h_kv * params.rows;
  const bool wide = items <= kCombineWideItems;
  const int parts = wide ? kCombineWideParts : 1;
  cfg.gridDim = dim3((params.h_kv * params.rows * parts + kCombineWarps - 1) / kCombineWarps, params.b);
  cfg.blockDim = dim3(kCombineWarps * 32);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&cfg, wide ? mla_combine_kernel<kCombineWideParts> : mla_combine_kernel<1>, params),
             "mla_combine_kernel launch");
  check_cuda(cudaGetLastError(), "mla_combine_kernel launch");
}

}  // namespace mla
