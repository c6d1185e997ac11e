// Launchers of the CUDA kernels, callable without torch: raw pointers, sizes, strides, a stream.
// Shared by the .cu files (which define them) and the torch glue in csrc/cuda/*.cpp.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"

namespace fused_pool {
namespace cuda {

enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

FP_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Accumulators, partials and statistics are float64 for float64 x, float32 otherwise ("Acc").

// How the forward spreads the sequence axis over thread blocks (see plan_split).
struct SplitPlan {
  bool split = false;       // false: one block per (sequence, channel tile), writing the result
  int64_t chunk_rows = 0;   // rows per chunk when split
  int64_t splits = 1;       // padded: chunks per sequence
  int64_t num_chunks = 0;   // blocks along the sequence axis (varlen: an upper bound)
  const int64_t* chunk_offsets = nullptr;  // varlen: (B + 1,) prefix sums of chunks per sequence, <= num_chunks
};

// Sequences longer than a balanced share of the work are split into chunks (the same rule as
// the Triton kernels). num_rows: B * L or T; longest: L, or varlen the max_seqlen hint (else T).
inline SplitPlan plan_split(int64_t num_seqs, int64_t num_rows, int64_t longest, int64_t channel_tiles,
                            int64_t num_sms, bool varlen) {
  constexpr int64_t kMinChunkRows = 128, kBlocksPerSm = 8, kRowStep = 32;
  // The kernels count a block's rows in int32: chunks stay below 2^30 rows, and varlen input with
  // 2^31 rows or more is always split (a max_seqlen hint may understate the longest sequence).
  constexpr int64_t kMaxChunkRows = int64_t{1} << 30, kMaxBlockRows = (int64_t{1} << 31) - 1;
  SplitPlan plan;
  plan.num_chunks = num_seqs;
  const int64_t blocks = 2 * num_sms * kBlocksPerSm;
  const int64_t share = ceil_div(num_rows * channel_tiles, blocks);
  const int64_t chunk_rows = std::min(kMaxChunkRows, std::max(kMinChunkRows, ceil_div(share, kRowStep) * kRowStep));
  if (longest <= chunk_rows && !(varlen && num_rows > kMaxBlockRows)) return plan;
  plan.split = true;
  plan.chunk_rows = chunk_rows;
  if (!varlen) {
    plan.splits = ceil_div(longest, chunk_rows);
    plan.num_chunks = num_seqs * plan.splits;
  } else {
    // sum over b of ceil(len_b / chunk) <= T / chunk + B for non-overlapping segments; chunks past
    // this bound (only with malformed, overlapping cu_seqlens) are dropped, never run out of bounds.
    plan.num_chunks = ceil_div(num_rows, chunk_rows) + num_seqs;
  }
  return plan;
}

// offsets[0] = 0, offsets[b + 1] = min(num_chunks, sum over sequences <= b of ceil(len / chunk_rows)):
// scanned in int64 and saturated, so that malformed, overlapping cu_seqlens never give offsets
// outside the num_chunks allocated.
void chunk_offsets(IndexView cu_seqlens, int64_t num_seqs, int64_t num_rows, int64_t chunk_rows, int64_t num_chunks,
                   int64_t* offsets, cudaStream_t stream);

// The launchers below return false, launching nothing, when the work needs more thread blocks than
// a CUDA grid holds (2^31 - 1 along the row / sequence axis; the channel / head axis is folded into
// gridDim.y * gridDim.z, up to 65535^2); the glue raises an error then.

struct PoolForward {
  const void* x;
  DType dtype;
  Geometry geometry;
  MaskView mask;
  IndexView cu_seqlens;
  int mode;          // kMean | kMax
  bool states;       // out holds the partial states: Acc, the mean half sum(w x) undivided
  void* out;         // (B, H or 2H), x's dtype (states: Acc), contiguous
  void* den;         // (B,) Acc: sum of weights (mean modes)
  int32_t* argmax;   // (B, H): index within its sequence of each maximum, -1 when empty (max modes)
  SplitPlan plan;
  void* part_sum;    // (num_chunks, H) Acc, when split
  void* part_den;    // (num_chunks,) Acc
  void* part_max;    // (num_chunks, H) Acc
  int32_t* part_row; // (num_chunks, H): index within the sequence
  int vec;           // channels per load: 1, or 16 bytes' worth (then H % vec == 0, aligned rows)
};
[[nodiscard]] bool pool_forward(const PoolForward& args, cudaStream_t stream);

struct PoolBackward {
  const void* grad;     // (B, H or 2H) Acc, contiguous, 16-byte aligned
  DType dtype;          // of dx
  Geometry geometry;    // of dx: contiguous (B, L, H) or (T, H)
  MaskView mask;
  IndexView cu_seqlens;
  int mode;
  const void* den;      // (B,) Acc
  const int32_t* argmax;  // (B, H) contiguous, 16-byte aligned
  void* dx;
  int vec;
};
[[nodiscard]] bool pool_backward(const PoolBackward& args, cudaStream_t stream);

// span_pool: geometry is x (T, H) as S varlen "sequences" (num_seqs S, num_rows T), the mask per
// token (T,), spans (S, 2) contiguous, read with span_bounds (clamped to [0, T]).
struct SpanForward {
  const void* x;
  DType dtype;
  Geometry geometry;
  MaskView mask;
  IndexView spans;
  int mode;          // kMean | kMax
  void* out;         // (S, H or 2H), x's dtype, contiguous, 16-byte aligned
  void* den;         // (S,) Acc: sum of weights (mean modes)
  int32_t* argmax;   // (S, H): index within the clamped span of each maximum, -1 when empty (max modes)
  int vec;           // channels per load: 1, or 16 bytes' worth (then H % vec == 0, aligned rows)
};
[[nodiscard]] bool span_forward(const SpanForward& args, cudaStream_t stream);

struct SpanBackward {
  const void* grad;       // (S, H or 2H) Acc, contiguous, 16-byte aligned
  DType dtype;            // of dx
  Geometry geometry;      // of dx: contiguous (T, H)
  MaskView mask;
  IndexView spans;
  int mode;
  const void* den;        // (S,) Acc
  const int32_t* argmax;  // (S, H) contiguous, 16-byte aligned
  void* dx;
  int vec;
};
[[nodiscard]] bool span_backward(const SpanBackward& args, cudaStream_t stream);

// attention_pool forward from per-row scores; query mode computes them first with query_scores.
struct AttentionForward {
  const void* x;
  DType dtype;
  Geometry geometry;
  MaskView mask;
  IndexView cu_seqlens;
  const void* scores;  // (num_rows, nh) Acc, contiguous; a row is b * L + l padded, t varlen
  int64_t num_heads;
  int64_t head_dim;
  void* out;           // (B, H) Acc
  void* stats;         // (B, nh, 2) Acc: softmax max m and sum l
  SplitPlan plan;
  void* part_m;        // (num_chunks, nh) Acc, when split
  void* part_l;        // (num_chunks, nh) Acc
  void* part_acc;      // (num_chunks, H) Acc
  int vec;             // 1, or 16 bytes' worth dividing head_dim
};
[[nodiscard]] bool attention_forward(const AttentionForward& args, cudaStream_t stream);

// scores[row, k] = scale * (x_row, head k) . query[k] for every row (varlen: 0 <= t < T, whatever the
// sequences), -inf where the mask is 0: every score the forward reads is written.
struct QueryScores {
  const void* x;
  DType dtype;
  Geometry geometry;
  MaskView mask;
  IndexView cu_seqlens;
  const void* query;   // (nh, D) Acc, contiguous
  double scale;
  int64_t num_heads;
  int64_t head_dim;
  void* scores;        // (num_rows, nh) Acc
  int vec;
};
[[nodiscard]] bool query_scores(const QueryScores& args, cudaStream_t stream);

// Per row and head: p = exp(s - m) / l, ds = p * g . (x - out); dx = p * g (+ ds * scale * q).
struct AttentionBackward {
  const void* grad;    // (B, H) Acc, contiguous, 16-byte aligned
  const void* x;
  DType dtype;
  Geometry geometry;
  MaskView mask;
  IndexView cu_seqlens;
  const void* scores;  // (num_rows, nh) Acc, or nullptr in query mode (recomputed from query)
  const void* query;   // (nh, D) Acc in query mode, else nullptr; contiguous, 16-byte aligned
  double scale;
  const void* out;     // (B, H) Acc, contiguous, 16-byte aligned
  const void* stats;   // (B, nh, 2) Acc
  int64_t num_heads;
  int64_t head_dim;
  void* dx;            // contiguous like x
  void* ds;            // (num_rows, nh) Acc: dscores (0 for rows not kept)
  int vec;
};
[[nodiscard]] bool attention_backward(const AttentionBackward& args, cudaStream_t stream);

// partials[chunk, c] = scale * sum over rows r of the chunk of ds[r, head(c)] * x[r, c]: the
// per-chunk terms of dquery, summed in chunk order by the caller (deterministic).
struct QueryGradient {
  const void* x;
  DType dtype;
  Geometry geometry;
  IndexView cu_seqlens;
  const void* ds;      // (num_rows, nh) Acc
  double scale;
  int64_t num_heads;
  int64_t head_dim;
  int64_t rows_per_chunk;
  void* partials;      // (ceil(num_rows / rows_per_chunk), H) Acc
  int vec;
};
[[nodiscard]] bool query_gradient(const QueryGradient& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_pool
