// Launchers of the CUDA probe_attention kernels (csrc/cuda/probe_attention_cuda.cu), callable without
// torch: raw pointers, sizes, strides, a stream. Acc is float64 for float64 x, float32 otherwise; every
// Acc buffer is contiguous and 16-byte aligned. They return false, launching nothing, when the work
// needs more thread blocks than a CUDA grid holds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common.h"
#include "launch.h"

namespace fused_pool {
namespace cuda {

// Probes one thread (forward, dprobes) or one warp (dots) handles: fewer for float64 (registers).
constexpr FP_HOST_DEVICE int probes_per_thread(DType dtype) { return dtype == kFloat64 ? 2 : 4; }

// Blocks of the forward and dprobes grids per row chunk: probe groups x channel tiles of 32 * vec.
FP_HOST_DEVICE int64_t probe_tiles(DType dtype, int64_t num_probes, int64_t hidden, int64_t vec) {
  return ceil_div(num_probes, probes_per_thread(dtype)) * ceil_div(hidden, 32 * vec);
}

// Per row of x, with probes (P, H) Acc: the forward's scores s[row, p] = scale * x_row . probes[p]
// (-inf where the mask drops the row), or the backward's coefficients coef[row] = [scale ds_p, p_p]
// (2P values; p = exp(s - m) / l, ds = p (x_row . g_p - g_p . out_p); 0 for rows not kept and for
// empty probes). A row is b * L + l padded, t varlen.
struct ProbeDots {
  const void* x;
  DType dtype;
  Geometry geometry;
  MaskView mask;
  IndexView cu_seqlens;
  const void* probes;  // (P, H) Acc
  int64_t num_probes;
  double scale;
  const void* grad;    // backward: (B, P, H) Acc, else nullptr
  const void* g_out;   // backward: (B, P) Acc, g_p . out_p
  const void* stats;   // backward: (B, P, 2) Acc
  void* result;        // forward: scores (num_rows, P); backward: coef (num_rows, 2P); Acc
  int vec;             // channels per load: 1, or 16 bytes' worth of x's dtype (H % vec == 0, aligned)
};
[[nodiscard]] bool probe_dots(const ProbeDots& args, cudaStream_t stream);

// Online softmax of every (sequence chunk, probe group, channel tile) from the scores; chunks of split
// sequences merged in chunk order.
struct ProbeForward {
  const void* x;
  DType dtype;
  Geometry geometry;
  MaskView mask;
  IndexView cu_seqlens;
  const void* scores;  // (num_rows, P) Acc
  int64_t num_probes;
  void* out;           // (B, P, H) Acc
  void* stats;         // (B, P, 2) Acc: softmax max m and sum l
  SplitPlan plan;
  void* part_m;        // (num_chunks, P) Acc, when split
  void* part_l;        // (num_chunks, P) Acc
  void* part_acc;      // (num_chunks, P, H) Acc
  int vec;
};
[[nodiscard]] bool probe_forward(const ProbeForward& args, cudaStream_t stream);

// dx[row] = sum_p coef[row, p] probes[p] + coef[row, P + p] g[seq, p]; 0 for rows not kept.
struct ProbeInputGrad {
  const void* coef;    // (num_rows, 2P) Acc
  const void* probes;  // (P, H) Acc
  const void* grad;    // (B, P, H) Acc
  DType dtype;         // of dx
  Geometry geometry;   // x's (rows located with it)
  MaskView mask;
  IndexView cu_seqlens;
  int64_t num_probes;
  void* dx;            // contiguous (B, L, H) / (T, H), 16-byte aligned
  int vec;             // 1, or 16 bytes' worth of dx's dtype (H % vec == 0)
};
[[nodiscard]] bool probe_input_grad(const ProbeInputGrad& args, cudaStream_t stream);

// partials[chunk, p, c] = sum over the chunk's rows of coef[row, p] x[row, c] (coef 0: x not read);
// the caller sums the chunks in order (deterministic).
struct ProbeGrad {
  const void* x;
  DType dtype;
  Geometry geometry;
  const void* coef;    // (num_rows, 2P) Acc
  int64_t num_probes;
  int64_t rows_per_chunk;
  void* partials;      // (ceil(num_rows / rows_per_chunk), P, H) Acc
  int vec;
};
[[nodiscard]] bool probe_probes_grad(const ProbeGrad& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_pool
