// Host entry points of the kernels (called by bindings.cpp with raw pointers; no torch here).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

namespace mla {

// Errors become C++ exceptions (RuntimeError in Python); nothing here exits the process.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("mlaserve._C: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// Split plans. kPlanAuto: the split-aware packing when it is no worse than the even cut plus one split
// per part (it then avoids splits), else the even cut; kPlanEven: FlashMLA-style even cut of the cost
// line; kPlanPack: always the packing. split_cost: pages charged to a continuation piece.
enum PlanMode : int { kPlanAuto = 0, kPlanEven = 1, kPlanPack = 2 };
void launch_mla_metadata(const int* seqlens, int b, int num_parts, int split_cost, int mode, int* metadata,
                         int* num_splits, cudaStream_t stream);

// Consumer schedules of the main kernel (mla_kernel.cuh): kSchedAuto picks the measured best per shape.
enum Schedule : int { kSchedAuto = 0, kSchedSolo = 1, kSchedTrio = 2 };
// The schedule (kSchedSolo or kSchedTrio) a launch with `schedule` runs for `rows` = s_q * h_q / h_kv query
// rows per KV head.
int resolve_schedule(int schedule, int rows);

struct DecodeArgs {
  const void* q;  // [b, s_q, h_q, 576] bf16
  int64_t q_stride_b, q_stride_s, q_stride_h;
  const void* k_cache;  // [num_pages, 64, h_kv, 576] bf16
  int64_t k_stride_page, k_stride_token, k_stride_head;
  int64_t num_pages;
  const int* block_table;  // [b, max_pages]
  int64_t bt_stride_b;
  const int* seqlens;        // [b]
  const int* tile_metadata;  // [num_parts, 8]
  const int* num_splits;     // [b + 1]
  int num_parts;
  void* out;  // [b, s_q, h_q, 512] bf16
  int64_t o_stride_b, o_stride_s, o_stride_h;
  float* lse;      // [b, h_q, s_q]
  float* o_accum;  // [(b + num_parts), h_kv, rows, 512]
  float* lse_accum;  // [(b + num_parts), h_kv, rows]
  int b, s_q, h_q, h_kv;
  float scale;
  bool causal;
  bool pdl;  // launch the combine kernel as a programmatic dependent of the main kernel
  int schedule;  // Schedule
};

void launch_mla_decode(const DecodeArgs& args, cudaStream_t stream);

int num_sms(int device);

}  // namespace mla
