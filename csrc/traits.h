// Shared-memory layout and kernel parameter blocks of the MLA decode kernels.
#pragma once
#include <cstdint>
#include <cuda.h>

#include "config.h"

namespace mla {

// One 64-row x 64-column bf16 chunk, 128-byte rows, 128B swizzle (16-byte unit u of row r sits at
// unit u ^ (r % 8)); 8 KB, 1024-byte aligned. A 64 x 576 tile is 9 such chunks side by side.
constexpr int kChunkBytes = kBlockM * kChunkCols * 2;     // 8192
constexpr int kTileBytesQK = kNumChunksQK * kChunkBytes;  // 73728: Q tile, or one K page
constexpr int kStageBytes = kTileBytesQK;                 // one page = 64 tokens x 576

struct SharedStorage {
  // (64 rows, 576) bf16 as 9 swizzled chunks: query rows of the tile
  alignas(1024) uint8_t q[kTileBytesQK];
  // [stage] (64 tokens, 576) bf16 as 9 swizzled chunks: one page of latents; V = chunks 0..7
  alignas(1024) uint8_t kv[kNumStages][kStageBytes];
  // (64 rows, 64 keys) bf16, one swizzled chunk: softmax probabilities P, A operand of P.V
  alignas(1024) uint8_t p[kChunkBytes];
  // consumer 0 -> 1: [0][row] the current page's rescale factors ([1] unused since split-S was deleted)
  float row_max[kNumConsumerWG][kBlockM];
  // consumer 0 -> 1 at a request's end: [0][row] final row sum, [1][row] final row max
  float row_sum[kNumConsumerWG][kBlockM];
  // [stage][group]: TMA bytes landed / the group's readers are done (see config.h for the groups)
  alignas(8) uint64_t full_bar[kNumStages][kNumGroups];
  alignas(8) uint64_t empty_bar[kNumStages][kNumGroups];
};
constexpr int kSmemBytes = sizeof(SharedStorage) + 1024;  // + slack to align the base to 1024

// A trio TMA-issuing thread's position in its part's page sequence (trio.cuh walks it): page pg of request
// req (req > the part's last request when done), the request's end page hi, and the physical page id.
struct PageCursor {
  int req, pg, hi, id;
};

// Shared memory of the trio schedule (config.h): three pages of latents, one RoPE chunk slot, one P tile, the
// Q tile's last two chunks (the rest is in the scorer's registers).
struct TrioStorage {
  // [stage] (64 tokens, 512) bf16 as 8 swizzled chunks: a page's latents (K columns 0..511 = V); page i in
  // stage i % 3
  alignas(1024) uint8_t kv[kTrioStages][kNumChunksV * kChunkBytes];
  // (64 tokens, 64) bf16, one swizzled chunk: the RoPE columns of the page S is on (reloaded once S is done)
  alignas(1024) uint8_t rope[kChunkBytes];
  // (64 rows, 64 keys) bf16, one swizzled chunk: P of the page the value warpgroups are on
  alignas(1024) uint8_t p_tile[kChunkBytes];
  // (64 rows, 128) bf16 as 2 swizzled chunks: Q columns 448..575 (the A operand of S's last 8 k-steps)
  alignas(1024) uint8_t q_tail[kTrioQTailChunks * kChunkBytes];
  float alpha[kTrioStages][kBlockM];  // [stage][row]: the page's O rescale factors (scorer -> value WGs)
  float fin[2][2][kBlockM];           // [request parity][0: row sum, 1: row max] at a request's last page
  alignas(8) uint64_t full_bar[kTrioStages][2];  // [stage][L, R]: TMA bytes of a latent chunk group landed
  alignas(8) uint64_t rope_full;             // TMA bytes of the RoPE slot's chunk landed
  alignas(8) uint64_t p_full[kTrioStages];  // scorer: the page's P and rescale factors are written (WG 2 goes)
  alignas(8) uint64_t p_late[kTrioStages];  // scorer: S of the next page is issued (WG 1 takes this page's P)
  alignas(8) uint64_t p_free;               // value WGs' leads: both are done with the P tile
  alignas(8) uint64_t p_done[kTrioStages];  // value warpgroup 2: done with the page (it may reload)
  alignas(8) uint64_t fin_free[2];          // value WGs: fin[parity] read
  PageCursor next_stage;                    // value WG 1's lead: the next page to load into a stage
  PageCursor next_rope;                     // value WG 2's lead: the next page to load into the RoPE slot
};
constexpr int kTrioSmemBytes = sizeof(TrioStorage) + 1024;
static_assert(kTrioSmemBytes <= 227 * 1024, "trio shared memory exceeds the sm_90 per-block limit");

struct DecodeParams {
  // q: [b, s_q, h_q, 576] bf16, last dim contiguous; strides in elements
  const uint16_t* q;
  int64_t q_stride_b, q_stride_s, q_stride_h;
  // out: [b, s_q, h_q, 512] bf16, last dim contiguous; strides in elements
  uint16_t* out;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  float* lse;  // [b, h_q, s_q] fp32, contiguous
  // block_table: [b, max_pages] int32, row stride in elements
  const int* block_table;
  int64_t bt_stride_b;
  const int* seqlens;        // [b] int32
  const int* tile_metadata;  // [num_parts, 8] int32
  const int* num_splits;     // [b + 1] int32, prefix sum of splits per request
  float* o_accum;            // [total_splits, h_kv, rows, 512] fp32: partial outputs of split requests
  float* lse_accum;          // [total_splits, h_kv, rows] fp32
  int b, s_q, h_q, h_kv;
  int group;  // h_q / h_kv
  int rows;   // s_q * group: query rows per KV head
  int num_parts;
  int causal;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e)
};

struct CombineParams {
  const float* o_accum;    // [total_splits, h_kv, rows, 512]
  const float* lse_accum;  // [total_splits, h_kv, rows]
  const int* num_splits;   // [b + 1]
  uint16_t* out;           // [b, s_q, h_q, 512] bf16
  int64_t o_stride_b, o_stride_s, o_stride_h;
  float* lse;  // [b, h_q, s_q]
  int b, s_q, h_q, h_kv, group, rows;
};

}  // namespace mla
