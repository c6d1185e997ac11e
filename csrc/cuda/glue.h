// Torch-side helpers for the CUDA glue (.cpp): dtype codes, vector width, device properties, plan.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../host.h"
#include "launch.h"

namespace fused_pool {

inline cuda::DType cuda_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return cuda::kFloat16;
    case at::kBFloat16: return cuda::kBFloat16;
    case at::kFloat: return cuda::kFloat32;
    case at::kDouble: return cuda::kFloat64;
    default: TORCH_CHECK(false, "fused_pool: unsupported dtype ", dtype);
  }
}

// 16 bytes' worth of channels per load when every row (and head) starts 16-byte aligned and the
// channels are contiguous; 1 otherwise.
inline int vector_width(const Geometry& g, const void* data, int64_t element_size, int64_t head_dim) {
  const int64_t vec = 16 / element_size;
  const bool aligned = g.stride_h == 1 && g.hidden % vec == 0 && head_dim % vec == 0 && g.stride_row % vec == 0 &&
                       g.stride_b % vec == 0 && reinterpret_cast<uintptr_t>(data) % 16 == 0;
  return aligned ? static_cast<int>(vec) : 1;
}

// The geometry of a contiguous tensor shaped like g's x (such as dx): (B, L, H) or (T, H) row-major.
inline Geometry contiguous_geometry(const Geometry& g) {
  return {g.num_seqs, g.seq_len, g.num_rows, g.hidden, g.seq_len * g.hidden, g.hidden, 1, g.varlen};
}

// t contiguous with its data 16-byte aligned (a copy only for a view that starts misaligned): the
// kernels read such small (B, H)-sized buffers with 16-byte vector loads.
inline at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// Raises the error of a launcher that found the work too large for a CUDA grid.
inline void check_launched(bool launched, const char* op, at::IntArrayRef x_shape) {
  TORCH_CHECK(launched, op, ": x of shape ", x_shape,
              " needs more thread blocks than a CUDA grid holds (2^31 - 1 along the row / sequence axis)");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Streaming multiprocessors of the current device (queried once per device).
inline int64_t multiprocessors() {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};
  const int device = c10::cuda::current_device();
  if (device < kMaxDevices && counts[device] > 0) return counts[device];
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < kMaxDevices) counts[device] = count;
  return count;
}

// Rows bounding one sequence: L padded; varlen the max_seqlen hint if given, else T.
inline int64_t longest_sequence(const Geometry& g, std::optional<int64_t> max_seqlen) {
  if (!g.varlen) return g.seq_len;
  return max_seqlen.has_value() ? std::min(*max_seqlen, g.num_rows) : g.num_rows;
}

// Plans the split and, for varlen, computes the chunk offsets on the device (no host sync).
inline cuda::SplitPlan plan_on_device(const Batch& batch, std::optional<int64_t> max_seqlen, int64_t channel_tiles,
                                      at::Tensor& offsets_storage, const at::TensorOptions& options) {
  const Geometry& g = batch.geometry;
  cuda::SplitPlan plan =
      cuda::plan_split(g.num_seqs, g.num_rows, longest_sequence(g, max_seqlen), channel_tiles, multiprocessors(), g.varlen);
  if (plan.split && g.varlen) {
    offsets_storage = at::empty({g.num_seqs + 1}, options.dtype(at::kLong));
    cuda::chunk_offsets(batch.cu_seqlens, g.num_seqs, g.num_rows, plan.chunk_rows, plan.num_chunks,
                        offsets_storage.mutable_data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    plan.chunk_offsets = offsets_storage.const_data_ptr<int64_t>();
  }
  return plan;
}

}  // namespace fused_pool
