// The split-KV plan: how the (request, page) stream is cut into num_parts contiguous parts (about one
// CTA per SM each; a part runs as m_blocks x h_kv CTAs). Computed on the GPU by one block
// (tile_scheduler.cu), no host sync, CUDA-graph capturable, reused by every layer of a step.
//
// Two plans, chosen on the GPU (PlanMode in api.h):
//  * packing: requests in order, a part closed when the next piece does not fit under a makespan M; a
//    piece costs its pages + 2, a continuation piece also split_cost (its fp32 partial written and
//    read back). Each of 1024 threads tries one M; the smallest feasible one is replayed. It avoids
//    splits where it can (e.g. b = 128 fixed lengths on 132 SMs: no request is split at all).
//  * even cut (FlashMLA's): request i costs n_i + 5 cost points, the total T is cut at
//    B_p = floor(p T / P) (min(p, T) when T < P); part p takes the pages whose points fall in
//    [B_p, B_{p+1}). About one split per part, but every part carries the same load.
//  Auto mode keeps the packing when its makespan M <= T/P + split_cost, else the even cut.
//
// tile_scheduler_metadata: [num_parts, 8] int32, one row per part:
//   [0] first request, [1] its first page, [2] last request, [3] its end page (exclusive),
//   [4] split index of the first request inside it (later requests start at split 0), [5..7] 0.
//   An empty part is {0, 0, -1, 0, 0}.
// num_splits: [b + 1] int32, num_splits[i] = sum of splits of requests < i (a request with one
//   split is written directly by the main kernel; one with several goes through the combine).
#pragma once
#include <cstdint>

#include "config.h"

namespace mla {

struct PartInfo {
  int first_req, first_page, last_req, end_page, first_split;
};

__device__ __forceinline__ PartInfo load_part(const int* metadata, int part) {
  const int4 a = *reinterpret_cast<const int4*>(metadata + part * kMetadataFields);
  const int b = metadata[part * kMetadataFields + 4];
  return PartInfo{a.x, a.y, a.z, a.w, b};
}

}  // namespace mla
