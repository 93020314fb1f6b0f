// Compile-time configuration of the sm_90a paged MLA decode kernels.
#pragma once

namespace mla {

constexpr int kPageSize = 64;       // tokens per page of the latent cache
constexpr int kHeadDimQK = 576;     // 512 latent + 64 RoPE
constexpr int kHeadDimV = 512;      // V = the first 512 columns of the latent
constexpr int kBlockM = 64;         // query rows (heads x s_q of one KV head) per CTA tile
constexpr int kBlockN = kPageSize;  // keys per main-loop step: one page
constexpr int kChunkCols = 64;      // columns per 128-byte swizzled smem chunk (and per TMA box)
constexpr int kNumChunksQK = kHeadDimQK / kChunkCols;  // 9
constexpr int kNumChunksV = kHeadDimV / kChunkCols;    // 8
constexpr int kNumStages = 2;       // pages in flight per CTA (shared memory bound: Q + 2 pages + P)
// Each stage is filled and released as two chunk groups, each on its own full / empty barrier, so that
// the half a warpgroup is done with reloads while the other half is still read:
//   group A = chunks 0..3 (V columns 0..255) + chunk 8 (RoPE), released by consumer warpgroup 0;
//   group B = chunks 4..7 (V columns 256..511), released by consumer warpgroup 1.
constexpr int kGroupA = 0, kGroupB = 1, kNumGroups = 2;
constexpr int kChunksA = 5, kChunksB = 4;

// Threads: warpgroups 0 and 1 = consumers (threads 0..255), warpgroup 2 = producer (one warp issues
// the TMA loads). The register file is split over the SM's 4 sub-partitions, so the entry cap is 168
// per thread at 384 threads; setmaxnreg moves the producer to 24 and the consumers to 240.
constexpr int kNumConsumerWG = 2;
constexpr int kThreads = 128 * (kNumConsumerWG + 1);  // 384
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;

// The trio schedule (trio.cuh): warpgroup 0 (the scorer) keeps Q's first 448 columns in registers as
// wgmma A fragments (112 per thread) and computes S and the softmax; warpgroups 1 and 2 (the value
// warpgroups) each own one 256-column output half; warpgroup 1 also issues the latent TMA loads, warpgroup 2
// those of the RoPE chunks. No producer warpgroup: 184 + 2 x 160 registers = the entry 3 x 168. Three stages of latents (chunks 0..7, in two
// groups on their own full barriers: L = V columns 0..255, R = 256..511), one slot of RoPE chunks and one
// P tile, which is what leaves room in shared memory for Q's last two chunks.
constexpr int kTrioStages = 3;
constexpr int kTrioGroupChunks = 4;  // chunks per latent group (one TMA box of the group map)
constexpr int kTrioQRegChunks = 7;   // Q chunks 0..6 in the scorer's registers
constexpr int kTrioQTailChunks = 2;  // Q chunks 7, 8 in shared memory
constexpr int kTrioScorerRegs = 184;
constexpr int kTrioIssuerRegs = 160;
constexpr int kTrioValueRegs = 160;

// Scheduler cost model: a (request, split) costs its pages plus this many pages of fixed work
// (Q load, epilogue, partial write + combine).
constexpr int kFixedSplitCost = 5;
constexpr int kMetadataFields = 8;     // columns of tile_scheduler_metadata (FlashMLA's API)
constexpr int kMaxBatchMetadata = 4096;  // the metadata kernel keeps per-request arrays in smem

}  // namespace mla
