// Combine kernel: LSE-weighted merge of a split request's fp32 partial outputs into the bf16 output
// and the fp32 LSE. Also writes out = 0, lse = +inf for empty requests (no split at all).
// One warp per (request, KV head, query row); requests with exactly one split were written by the
// main kernel and are skipped.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "api.h"
#include "config.h"
#include "primitives.cuh"
#include "traits.h"

namespace mla {
namespace {

constexpr int kCombineWarps = 8;

__global__ void __launch_bounds__(kCombineWarps * 32) mla_combine_kernel(const __grid_constant__ CombineParams p) {
  // Launched with programmatic dependent launch: wait until the main kernel's writes are visible.
  cutlass::arch::wait_on_dependent_grids();
  const int req = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_id = blockIdx.x * kCombineWarps + warp;  // over (h_kv, rows)
  if (row_id >= p.h_kv * p.rows) return;
  const int first = p.num_splits[req];
  const int ns = p.num_splits[req + 1] - first;
  if (ns == 1) return;
  const int head_kv = row_id / p.rows, rg = row_id % p.rows;
  const int sq = rg / p.group, head = head_kv * p.group + rg % p.group;
  uint16_t* dst = p.out + static_cast<int64_t>(req) * p.o_stride_b + static_cast<int64_t>(sq) * p.o_stride_s +
                  static_cast<int64_t>(head) * p.o_stride_h;
  float* lse_dst = p.lse + (static_cast<int64_t>(req) * p.h_q + head) * p.s_q + sq;

  float mx = -INFINITY;
  for (int s = lane; s < ns; s += 32) {
    mx = fmaxf(mx, p.lse_accum[(static_cast<int64_t>(first + s) * p.h_kv + head_kv) * p.rows + rg]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));

  float acc[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i] = 0.f;
  float lse_out = INFINITY;
  if (mx != -INFINITY) {
    float sum = 0.f;
    for (int s = lane; s < ns; s += 32) {
      sum += expf(p.lse_accum[(static_cast<int64_t>(first + s) * p.h_kv + head_kv) * p.rows + rg] - mx);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv_sum = 1.f / sum;
    for (int s = 0; s < ns; ++s) {
      const int64_t row = (static_cast<int64_t>(first + s) * p.h_kv + head_kv) * p.rows + rg;
      const float wgt = expf(p.lse_accum[row] - mx) * inv_sum;
      const float4* src = reinterpret_cast<const float4*>(p.o_accum + row * kHeadDimV);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float4 v = src[lane + 32 * k];
        acc[4 * k + 0] += wgt * v.x;
        acc[4 * k + 1] += wgt * v.y;
        acc[4 * k + 2] += wgt * v.z;
        acc[4 * k + 3] += wgt * v.w;
      }
    }
    lse_out = mx + logf(sum);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(acc[4 * k + 0], acc[4 * k + 1]);
    const __nv_bfloat162 b = __floats2bfloat162_rn(acc[4 * k + 2], acc[4 * k + 3]);
    uint2 packed;
    packed.x = *reinterpret_cast<const uint32_t*>(&a);
    packed.y = *reinterpret_cast<const uint32_t*>(&b);
    *reinterpret_cast<uint2*>(dst + 4 * (lane + 32 * k)) = packed;
  }
  if (lane == 0) *lse_dst = lse_out;
}

}  // namespace

// pdl: launch as a programmatic dependent of the preceding kernel in the stream (the main kernel
// triggers early, so the combine's launch overlaps its tail; griddepcontrol.wait keeps it correct).
void launch_mla_combine(const CombineParams& params, bool pdl, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((params.h_kv * params.rows + kCombineWarps - 1) / kCombineWarps, params.b);
  cfg.blockDim = dim3(kCombineWarps * 32);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&cfg, mla_combine_kernel, params), "mla_combine_kernel launch");
  check_cuda(cudaGetLastError(), "mla_combine_kernel launch");
}

}  // namespace mla
