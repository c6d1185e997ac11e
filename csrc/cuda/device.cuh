// Device helpers shared by the CUDA kernels: conversions, vector loads, chunk mapping, warp sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common.h"
#include "launch.h"

namespace fused_pool {
namespace cuda {

constexpr int kWarp = 32;       // threads across channels (one warp wide)
constexpr int kRowGroups = 8;   // warps across rows: 256 threads per block
constexpr int kRowsInFlight = 4;  // rows each thread loads before it accumulates them

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC elements of a row starting at channel c: one 16-byte load when VEC > 1 (contiguous channels,
// aligned: the host picks VEC so), else a strided scalar load.
template <typename T, int VEC, typename Acc>
__device__ __forceinline__ void load_channels(const T* row, int64_t c, int64_t stride_h, Acc (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_acc(row[c * stride_h]);
  } else {
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(row + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_acc(pack.v[i]);
  }
}

// Stores VEC values at dst (contiguous; aligned when VEC > 1).
template <typename T, int VEC, typename Acc>
__device__ __forceinline__ void store_channels(T* dst, const Acc (&values)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_acc<T>(values[i]);
  *reinterpret_cast<Pack<T, VEC>*>(dst) = pack;
}

// The (sequence, [first, last) rows) that block `block` reduces under `plan`; varlen blocks past the
// last chunk get an empty range.
struct ChunkRange {
  int64_t seq;
  int64_t first;
  int64_t last;
};

__device__ __forceinline__ ChunkRange block_chunk(int64_t block, const Geometry& g, IndexView cu_seqlens,
                                                  const SplitPlan& plan) {
  ChunkRange range{block, 0, g.seq_len};
  int64_t chunk = 0;
  if (plan.split && !g.varlen) {
    range.seq = block / plan.splits;
    chunk = block % plan.splits;
  } else if (plan.split) {
    const int32_t* offsets = plan.chunk_offsets;
    if (block >= offsets[g.num_seqs]) return {0, 0, 0};
    int64_t lo = 0, hi = g.num_seqs - 1;  // largest sequence whose first chunk is <= block
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (offsets[mid] <= block) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    range.seq = lo;
    chunk = block - offsets[lo];
  }
  if (g.varlen) segment_bounds(cu_seqlens, range.seq, g.num_rows, range.first, range.last);
  if (plan.split) {
    const int64_t end = range.last;
    range.first += chunk * plan.chunk_rows;
    range.last = min(range.first + plan.chunk_rows, end);
    if (range.first > range.last) range.first = range.last;
  }
  return range;
}

// [first, end) partial chunks of sequence `seq`, clamped to the num_chunks allocated.
__device__ __forceinline__ void sequence_chunks(int64_t seq, const SplitPlan& plan, bool varlen, int64_t& first,
                                                int64_t& end) {
  if (varlen) {
    first = plan.chunk_offsets[seq];
    end = plan.chunk_offsets[seq + 1];
  } else {
    first = seq * plan.splits;
    end = first + plan.splits;
  }
  first = min(first, plan.num_chunks);
  end = min(end, plan.num_chunks);
}

// Sum over the warp in a fixed butterfly order: every lane gets the same, deterministic value.
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace cuda
}  // namespace fused_pool
