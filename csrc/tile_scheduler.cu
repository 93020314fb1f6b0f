// GPU split-KV scheduler: tile_scheduler_metadata and num_splits from cache_seqlens (one block,
// no host sync; CUDA-graph capturable; the plan is reused by every layer of a decode step).
#include <cuda_runtime.h>

#include "api.h"
#include "config.h"
#include "tile_scheduler.h"

namespace mla {
namespace {

constexpr int kSchedThreads = 1024;

// In-place inclusive scan of data[0..n) by the whole block. scratch: >= 32 ints of smem.
__device__ void block_inclusive_scan(int* data, int n, int* scratch) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int chunk = (n + kSchedThreads - 1) / kSchedThreads;
  const int lo = min(n, tid * chunk), hi = min(n, lo + chunk);
  int sum = 0;
  for (int i = lo; i < hi; ++i) sum += data[i];
  int incl = sum;  // inclusive scan of the per-thread sums
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = scratch[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += v;
    }
    scratch[lane] = w;
  }
  __syncthreads();
  int run = incl - sum + (warp > 0 ? scratch[warp - 1] : 0);
  for (int i = lo; i < hi; ++i) {
    run += data[i];
    data[i] = run;
  }
  __syncthreads();
}

__device__ __forceinline__ int boundary(int p, int total, int parts) {
  return total >= parts ? static_cast<int>((static_cast<long long>(p) * total) / parts) : min(p, total);
}

// The part that holds cost point x (0 <= x < total): the largest p with boundary(p) <= x.
__device__ __forceinline__ int part_of(int x, int total, int parts) {
  if (total < parts) return x;
  int p = static_cast<int>((static_cast<long long>(x) * parts) / total);
  while (p + 1 < parts && boundary(p + 1, total, parts) <= x) ++p;
  while (p > 0 && boundary(p, total, parts) > x) --p;
  return p;
}

// The smallest i in [0, b) with prefix[i + 1] > x (prefix[0] = 0, nondecreasing); b if none.
__device__ __forceinline__ int first_request_above(const int* prefix, int b, int x) {
  int lo = 0, hi = b;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (prefix[mid + 1] > x) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// FlashMLA-style plan: the cost line cut evenly. prefix, splits: [b + 1] ints of smem each.
__device__ void even_cut_plan(const int* __restrict__ seqlens, int b, int num_parts, int* __restrict__ metadata,
                              int* __restrict__ num_splits, int* prefix, int* splits, int* scratch) {
  const int tid = threadIdx.x;
  for (int i = tid; i < b; i += kSchedThreads) {
    const int len = seqlens[i];
    const int n = len > 0 ? (len + kPageSize - 1) / kPageSize : 0;
    prefix[i + 1] = n > 0 ? n + kFixedSplitCost : 0;
  }
  if (tid == 0) { prefix[0] = 0; splits[0] = 0; }
  __syncthreads();
  block_inclusive_scan(prefix + 1, b, scratch);
  const int total = prefix[b];

  for (int i = tid; i < b; i += kSchedThreads) {
    int ns = 0;
    if (prefix[i + 1] > prefix[i]) {
      const int first = part_of(prefix[i] + kFixedSplitCost, total, num_parts);
      const int last = part_of(prefix[i + 1] - 1, total, num_parts);
      ns = last - first + 1;
    }
    splits[i + 1] = ns;
  }
  __syncthreads();
  block_inclusive_scan(splits + 1, b, scratch);
  for (int i = tid; i <= b; i += kSchedThreads) num_splits[i] = splits[i];

  for (int p = tid; p < num_parts; p += kSchedThreads) {
    const int x0 = boundary(p, total, num_parts), x1 = boundary(p + 1, total, num_parts);
    int row[kMetadataFields] = {0, 0, -1, 0, 0, 0, 0, 0};
    if (x0 < x1) {
      const int is = first_request_above(prefix, b, x0);
      const int ie = first_request_above(prefix, b, x1 - 1);
      row[0] = is;
      row[1] = max(0, x0 - prefix[is] - kFixedSplitCost);
      row[2] = ie;
      row[3] = max(0, x1 - prefix[ie] - kFixedSplitCost);
      row[4] = max(0, p - part_of(prefix[is] + kFixedSplitCost, total, num_parts));
    }
#pragma unroll
    for (int f = 0; f < kMetadataFields; ++f) metadata[p * kMetadataFields + f] = row[f];
  }
}

__global__ void __launch_bounds__(kSchedThreads) mla_metadata_kernel(const int* __restrict__ seqlens, int b,
                                                                      int num_parts, int* __restrict__ metadata,
                                                                      int* __restrict__ num_splits) {
  extern __shared__ int smem[];
  __shared__ int scratch[32];
  even_cut_plan(seqlens, b, num_parts, metadata, num_splits, smem, smem + b + 1, scratch);
}

// ---- split-aware plan: smallest makespan M for which a greedy contiguous packing fits ---------
//
// Costs in pages. A piece of a request costs its pages + kPieceCost; a continuation piece (split
// index > 0) also pays split_cost (its fp32 partial written and read back by the combine, plus the
// combine's own work), so a boundary is only put inside a request when balance gains more than that.
// Every thread evaluates one candidate M (greedy packing, in request order); the smallest feasible one
// is replayed by thread 0 to write the plan.
constexpr int kPieceCost = 2;
constexpr int kMinPiece = 4;
constexpr int kNoPlan = 0x7fffffff;

struct Packer {
  int m, split_cost, part, load, pos, piece;
  // Places request pages [pos, n) into parts; returns false if more than num_parts are needed.
  template <class Record>
  __device__ bool place(int req, int n, int num_parts, Record record) {
    pos = 0;
    piece = 0;
    while (pos < n) {
      const int pf = kPieceCost + (piece > 0 ? split_cost : 0);
      const int room = m - load - pf, rem = n - pos;
      int take;
      if (rem <= room) {
        take = rem;
      } else if (room >= kMinPiece || load == 0) {
        take = max(room, 1);
      } else {
        ++part;
        load = 0;
        if (part >= num_parts) return false;
        continue;
      }
      record(part, req, pos, pos + take, piece);
      load += pf + take;
      pos += take;
      ++piece;
      if (pos < n) {
        ++part;
        load = 0;
        if (part >= num_parts) return false;
      }
    }
    return true;
  }
};

__global__ void __launch_bounds__(kSchedThreads) mla_metadata_greedy_kernel(const int* __restrict__ seqlens, int b,
                                                                             int num_parts, int split_cost,
                                                                             bool always_pack,
                                                                             int* __restrict__ metadata,
                                                                             int* __restrict__ num_splits) {
  extern __shared__ int smem[];
  int* pages = smem;            // [b + 1] (reused as the cost prefix by the even-cut fallback)
  int* splits = smem + b + 1;   // [b + 1]
  __shared__ int scratch[32];
  __shared__ int best;
  __shared__ long long total_cost;
  const int tid = threadIdx.x;
  if (tid == 0) { best = kNoPlan; total_cost = 0; splits[0] = 0; }
  __syncthreads();
  long long local = 0;
  int local_max = 0;
  for (int i = tid; i < b; i += kSchedThreads) {
    const int len = seqlens[i];
    const int n = len > 0 ? (len + kPageSize - 1) / kPageSize : 0;
    pages[i] = n;
    if (n > 0) local += n + kPieceCost;
    local_max = max(local_max, n);
  }
  atomicAdd(reinterpret_cast<unsigned long long*>(&total_cost), static_cast<unsigned long long>(local));
  __syncthreads();
  const long long total = total_cost;
  const int lb = static_cast<int>((total + num_parts - 1) / num_parts);
  const int lo_m = max(lb, kPieceCost + split_cost + kMinPiece + 1);
  // Candidates lo_m + k*step; the span covers the worst waste of a greedy part boundary.
  const int span = 2 * (kPieceCost + split_cost + kMinPiece) + lb / 4 + 16;
  const int step = max(1, (span + kSchedThreads - 1) / kSchedThreads);
  {
    // The last candidate is the whole work in one part: always feasible, so a plan always exists.
    const int m = tid == kSchedThreads - 1 ? max(lo_m + tid * step, static_cast<int>(min(total, 1ll << 30)))
                                           : lo_m + tid * step;
    Packer pk{m, split_cost, 0, 0, 0, 0};
    bool ok = true;
    for (int i = 0; i < b && ok; ++i) {
      if (pages[i] > 0) ok = pk.place(i, pages[i], num_parts, [](int, int, int, int, int) {});
    }
    if (ok) atomicMin(&best, m);
  }
  __syncthreads();
  const int m = best;
  // The even cut pays about one split per part; prefer the packing only when its makespan is no worse.
  if (!always_pack && m > lb + split_cost) {
    __syncthreads();
    even_cut_plan(seqlens, b, num_parts, metadata, num_splits, pages, splits, scratch);
    return;
  }
  for (int p = tid; p < num_parts; p += kSchedThreads) {
    int* row = metadata + p * kMetadataFields;
    row[0] = 0; row[1] = 0; row[2] = -1; row[3] = 0; row[4] = 0; row[5] = 0; row[6] = 0; row[7] = 0;
  }
  __syncthreads();
  if (tid == 0) {
    Packer pk{m, split_cost, 0, 0, 0, 0};
    int open_part = -1;
    for (int i = 0; i < b; ++i) {
      splits[i + 1] = 0;
      if (pages[i] == 0) continue;
      pk.place(i, pages[i], num_parts, [&](int part, int req, int lo, int hi, int piece) {
        int* row = metadata + part * kMetadataFields;
        if (part != open_part) {
          row[0] = req;
          row[1] = lo;
          row[4] = piece;
          open_part = part;
        }
        row[2] = req;
        row[3] = hi;
      });
      splits[i + 1] = pk.piece;
    }
  }
  __syncthreads();
  block_inclusive_scan(splits + 1, b, scratch);
  for (int i = tid; i <= b; i += kSchedThreads) num_splits[i] = splits[i];
}

}  // namespace

void launch_mla_metadata(const int* seqlens, int b, int num_parts, int split_cost, int mode, int* metadata,
                         int* num_splits, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(2 * (b + 1)) * sizeof(int);
  if (mode == kPlanEven) {
    mla_metadata_kernel<<<1, kSchedThreads, smem, stream>>>(seqlens, b, num_parts, metadata, num_splits);
  } else {
    mla_metadata_greedy_kernel<<<1, kSchedThreads, smem, stream>>>(seqlens, b, num_parts, split_cost,
                                                                   mode == kPlanPack, metadata, num_splits);
  }
  check_cuda(cudaGetLastError(), "mla_metadata_kernel launch");
}

}  // namespace mla
