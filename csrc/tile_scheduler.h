// The split-KV plan: how the (request, page) stream is cut into num_parts contiguous parts.
//
// Cost model: request i with n_i = ceil(len_i / 64) > 0 pages costs n_i + kFixedSplitCost cost
// points ([C_i, C_i + F) are its fixed work, [C_i + F, C_{i+1}) its pages); an empty request costs
// nothing. The total T is cut at B_p = floor(p T / P) (B_p = min(p, T) when T < P, so no part is
// empty inside a request). Part p takes the pages whose points fall in [B_p, B_{p+1}); every
// request is split among the consecutive parts holding its pages.
//
// tile_scheduler_metadata: [num_parts, 8] int32, one row per part:
//   [0] first request, [1] its first page, [2] last request, [3] its end page (exclusive),
//   [4] split index of the first request inside it (later requests start at split 0), [5..7] 0.
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
