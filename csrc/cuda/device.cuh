// Device helpers shared by the CUDA kernels: conversions, 16-byte loads / stores, the folded launch
// grid, chunk mapping, the mean / max reduction state, the dtype dispatch, warp sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "../common.h"
#include "launch.h"

namespace fused_pool {
namespace cuda {

constexpr int kWarp = 32;       // threads across channels (one warp wide)
constexpr int kRowGroups = 8;   // warps across rows: 256 threads per block
constexpr int kRowsInFlight = 4;  // rows each thread loads before it accumulates them

// Blocks per SM that __launch_bounds__ asks ptxas to fit. 0 leaves the register count to ptxas,
// which may settle on an occupancy threshold by spilling a few bytes: it did for some float64
// instantiations (8-16 bytes). float64 asks for 4 blocks (at most 64 registers), which every
// float64 kernel fits without a spill (checked with -Xptxas -v for sm_80 and sm_90).
template <typename T>
constexpr int kMinBlocksPerSm = 0;
template <>
constexpr int kMinBlocksPerSm<double> = 4;

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

// N elements of U at base[offset, offset + N), for a 16-byte aligned base and an offset that is a
// multiple of N (N * sizeof(U) a multiple of 16 bytes, or 8), moved as 16-byte words (one 8-byte
// word when N * sizeof(U) is 8). The address is spelled as an index into an array of words so that
// the compiler sees its alignment: with a plain T* (or a struct of T[N]) it splits 16-byte stores
// into four 4-byte STG.E.
template <typename Word, typename U>
__device__ __forceinline__ Word* words_at(U* base, int64_t offset) {
  return static_cast<Word*>(__builtin_assume_aligned(base, 16)) +
         static_cast<uint64_t>(offset) * sizeof(U) / sizeof(Word);
}
template <typename Word, typename U>
__device__ __forceinline__ const Word* words_at(const U* base, int64_t offset) {
  return static_cast<const Word*>(__builtin_assume_aligned(base, 16)) +
         static_cast<uint64_t>(offset) * sizeof(U) / sizeof(Word);
}

template <typename U, int N>
__device__ __forceinline__ void load_aligned(const U* base, int64_t offset, U (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(U));
  static_assert(kBytes % 16 == 0 || kBytes == 8, "16-byte words, or one 8-byte word");
  if constexpr (kBytes % 16 == 0) {
    const uint4* src = words_at<uint4>(base, offset);
#pragma unroll
    for (int j = 0; j < kBytes / 16; ++j) {
      const uint4 word = src[j];
      memcpy(reinterpret_cast<char*>(out) + 16 * j, &word, 16);
    }
  } else {
    const uint2 word = *words_at<uint2>(base, offset);
    memcpy(out, &word, 8);
  }
}

template <typename U, int N>
__device__ __forceinline__ void store_aligned(U* base, int64_t offset, const U (&values)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(U));
  static_assert(kBytes % 16 == 0 || kBytes == 8, "16-byte words, or one 8-byte word");
  if constexpr (kBytes % 16 == 0) {
    uint4* dst = words_at<uint4>(base, offset);
#pragma unroll
    for (int j = 0; j < kBytes / 16; ++j) {
      uint4 word;
      memcpy(&word, reinterpret_cast<const char*>(values) + 16 * j, 16);
      dst[j] = word;
    }
  } else {
    uint2 word;
    memcpy(&word, values, 8);
    *words_at<uint2>(base, offset) = word;
  }
}

// N elements of U at base[offset, offset + N): a scalar access when N == 1, else load_aligned /
// store_aligned (same alignment contract).
template <typename U, int N>
__device__ __forceinline__ void load_elements(const U* base, int64_t offset, U (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = base[offset];
  } else {
    load_aligned<U, N>(base, offset, out);
  }
}
template <typename U, int N>
__device__ __forceinline__ void store_elements(U* base, int64_t offset, const U (&values)[N]) {
  if constexpr (N == 1) {
    base[offset] = values[0];
  } else {
    store_aligned<U, N>(base, offset, values);
  }
}

// VEC elements of a row starting at channel c: one 16-byte load when VEC > 1 (contiguous channels,
// aligned: the host picks VEC so), else a strided scalar load.
template <typename T, int VEC, typename Acc>
__device__ __forceinline__ void load_channels(const T* row, int64_t c, int64_t stride_h, Acc (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_acc(row[c * stride_h]);
  } else {
    T pack[VEC];
    load_aligned<T, VEC>(row, c, pack);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_acc(pack[i]);
  }
}

// Stores VEC values converted to T at base[offset, offset + VEC): one 16-byte store when VEC > 1
// (base 16-byte aligned, offset a multiple of VEC).
template <typename T, int VEC, typename Acc>
__device__ __forceinline__ void store_channels(T* base, int64_t offset, const Acc (&values)[VEC]) {
  T pack[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack[i] = from_acc<T>(values[i]);
  store_elements<T, VEC>(base, offset, pack);
}

// A logical (x, y) grid of blocks as CUDA launches it: x as is (at most 2^31 - 1), y folded into
// gridDim.y * gridDim.z (each at most 65535; blocks past y exit at once). A kernel reads its logical
// y with grid_y(). ok = false (launch nothing) when x or y is too large; empty when either is 0.
struct LaunchGrid {
  dim3 grid;
  bool ok;
  bool empty;
};

inline LaunchGrid launch_grid(int64_t x, int64_t y) {
  constexpr int64_t kMaxX = (int64_t{1} << 31) - 1, kMaxYZ = 65535;
  if (x <= 0 || y <= 0) return {dim3(1), true, true};
  if (x > kMaxX || y > kMaxYZ * kMaxYZ) return {dim3(1), false, true};
  const int64_t z = ceil_div(y, kMaxYZ);
  return {dim3(static_cast<unsigned>(x), static_cast<unsigned>(ceil_div(y, z)), static_cast<unsigned>(z)), true,
          false};
}

__device__ __forceinline__ int64_t grid_y() {
  return static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
}

// The (sequence, [first, last) rows) that block `block` reduces under `plan`, and `origin`, the
// sequence's first row (0 padded, its clamped cu_seqlens start varlen: rows minus origin are what
// argmax stores); varlen blocks past the last chunk get an empty range.
struct ChunkRange {
  int64_t seq;
  int64_t first;
  int64_t last;
  int64_t origin;
};

// Chunk offset i of a varlen split, clamped to [0, num_chunks] (the blocks and partials allocated).
__device__ __forceinline__ int64_t chunk_offset(const SplitPlan& plan, int64_t i) {
  const int64_t offset = plan.chunk_offsets[i];
  return offset < 0 ? 0 : (offset > plan.num_chunks ? plan.num_chunks : offset);
}

__device__ __forceinline__ ChunkRange block_chunk(int64_t block, const Geometry& g, IndexView cu_seqlens,
                                                  const SplitPlan& plan) {
  ChunkRange range{block, 0, g.seq_len, 0};
  int64_t chunk = 0;
  if (plan.split && !g.varlen) {
    range.seq = block / plan.splits;
    chunk = block % plan.splits;
  } else if (plan.split) {
    if (block >= chunk_offset(plan, g.num_seqs)) return {0, 0, 0, 0};
    int64_t lo = 0, hi = g.num_seqs - 1;  // largest sequence whose first chunk is <= block
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (chunk_offset(plan, mid) <= block) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    range.seq = lo;
    chunk = block - chunk_offset(plan, lo);
  }
  if (g.varlen) {
    segment_bounds(cu_seqlens, range.seq, g.num_rows, range.first, range.last);
    range.origin = range.first;
  }
  if (plan.split) {
    const int64_t end = range.last;
    range.first += chunk * plan.chunk_rows;
    range.last = min(range.first + plan.chunk_rows, end);
    if (range.first > range.last) range.first = range.last;
  }
  return range;
}

// [first, end) partial chunks of sequence `seq`, clamped to [0, num_chunks] (those allocated).
__device__ __forceinline__ void sequence_chunks(int64_t seq, const SplitPlan& plan, bool varlen, int64_t& first,
                                                int64_t& end) {
  if (varlen) {
    first = chunk_offset(plan, seq);
    end = chunk_offset(plan, seq + 1);
  } else {
    first = min(seq * plan.splits, plan.num_chunks);
    end = min(first + plan.splits, plan.num_chunks);
  }
  if (end < first) end = first;
}

// One thread's running mean / max state over VEC channels: sum(w x), the max and its row (-1: none
// yet), and sum(w) (pool and span forwards).
template <typename Acc, int VEC>
struct ReduceState {
  Acc total[VEC];
  Acc best[VEC];
  int32_t best_row[VEC];
  Acc weight;

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      total[i] = Acc(0);
      best[i] = Acc(0);
      best_row[i] = -1;
    }
    weight = Acc(0);
  }
};

// Calls Launch<T, VEC>::run(a, stream) for a.dtype, with VEC = 16 bytes' worth of T when a.vec > 1,
// else 1.
template <template <typename, int> class Launch, typename Args>
bool dispatch(const Args& a, cudaStream_t stream) {
  switch (a.dtype) {
    case kFloat16: return a.vec > 1 ? Launch<__half, 8>::run(a, stream) : Launch<__half, 1>::run(a, stream);
    case kBFloat16:
      return a.vec > 1 ? Launch<__nv_bfloat16, 8>::run(a, stream) : Launch<__nv_bfloat16, 1>::run(a, stream);
    case kFloat32: return a.vec > 1 ? Launch<float, 4>::run(a, stream) : Launch<float, 1>::run(a, stream);
    case kFloat64: return a.vec > 1 ? Launch<double, 2>::run(a, stream) : Launch<double, 1>::run(a, stream);
  }
  return true;
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
