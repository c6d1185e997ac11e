// Launchers of the CUDA linear_pool epilogue kernels (csrc/cuda/linear_cuda.cu), callable without
// torch: raw pointers, sizes, strides, a stream. The GEMMs run through ATen (cuBLAS) in the glue,
// csrc/cuda/linear_cuda.cpp. Acc is float64 for float64 x, float32 otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common.h"
#include "launch.h"

namespace fused_pool {
namespace cuda {

// Forward, one block of entries: a = act(z + bias) reduced into each entry's sequence state, rows
// in order (entries with seq < 0 skipped).
struct LinearForwardEpilogue {
  const void* z;          // (rows, N) Acc, contiguous: x_block W^T
  DType dtype;            // x's (and bias's)
  const void* bias;       // (N,) or nullptr
  const int32_t* seq;     // (rows,) sequence of each entry, -1: not kept
  const int32_t* index;   // (rows,) index within its sequence
  const void* weight;     // (rows,) Acc mask weight
  int64_t rows;
  int64_t features;       // N
  int mode;               // kMax, kSum, kMean
  int activation;
  void* value;            // (B, N) Acc: max, or sum of w a
  int32_t* argmax;        // (B, N) (kMax), -1: empty
  void* den;              // (B,) Acc (kMean)
};
[[nodiscard]] bool linear_forward_epilogue(const LinearForwardEpilogue& args, cudaStream_t stream);

// SUM / MEAN backward, one block: z = grad[seq] * scale * act'(z + bias) in place (0 where seq < 0).
struct LinearGradEpilogue {
  void* z;                // (rows, N) Acc, contiguous
  DType dtype;
  const void* bias;       // (N,) or nullptr
  const int32_t* seq;     // (rows,)
  const void* scale;      // (rows,) Acc: w, or w / den
  const void* grad;       // (B, N) Acc, contiguous
  int64_t rows;
  int64_t features;
  int activation;
};
[[nodiscard]] bool linear_grad_epilogue(const LinearGradEpilogue& args, cudaStream_t stream);

// MAX backward, per feature n (one thread block each, sequences in order): z at the argmax token
// recomputed by a block-wide dot (fixed order), dz = grad act'(z), dweight[n] += dz x_t, dbias[n].
// token[b, n] = the row of x, -1 where the sequence has no (valid, owned, kept) winner.
struct LinearMaxGrad {
  const void* x;          // padded (B, L, H) or varlen (T, H), any strides
  DType dtype;
  Geometry geometry;      // x's
  const void* weight;     // (N, H) contiguous
  const void* bias;       // (N,) or nullptr
  const void* grad;       // (B, N) Acc, contiguous
  const int32_t* argmax;  // (B, N) contiguous
  const int32_t* owner;   // (num_rows,): the sequence of each kept row, -1 otherwise
  const int64_t* first_row;  // (B,)
  const int64_t* length;     // (B,)
  int64_t features;
  int activation;
  void* dz;               // (B, N) Acc
  int64_t* token;         // (B, N)
  void* dweight;          // (N, H) Acc, contiguous, zeros
  void* dbias;            // (N,) Acc
};
[[nodiscard]] bool linear_max_grad(const LinearMaxGrad& args, cudaStream_t stream);

// MAX backward dx: row t = sum over the (b, n) pairs whose token is t, in increasing (b, n) order
// (`order` sorts the pairs by token, stably), of dz W[n]; 0 for rows no pair chose. Every element
// of dx is written once (no atomics).
struct LinearMaxDx {
  const int64_t* order;    // (B N,) pair ids b N + n sorted by token
  const int64_t* offsets;  // (num_rows + 1,) row t's pairs: order[offsets[t], offsets[t + 1])
  const void* dz;          // (B, N) Acc
  const void* weight;      // (N, H) contiguous, x's dtype
  DType dtype;
  int64_t num_rows, features, hidden;
  void* dx;                // (num_rows, H) Acc, contiguous
};
[[nodiscard]] bool linear_max_dx(const LinearMaxDx& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_pool
