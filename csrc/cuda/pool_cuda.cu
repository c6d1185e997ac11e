// CUDA masked mean / max / mean_max, forward and backward. Torch-free: raw pointers and strides.
//
// Forward: a block of 32 x 8 threads reduces a chunk of one sequence's rows over 32 * VEC channels;
// each thread owns VEC contiguous channels (one 16-byte load) and every 8th group of
// kRowsInFlight rows, loading those rows before accumulating them so that several loads are in
// flight. Padding is skipped without a load. The 8 row groups are folded in a fixed order through
// shared memory. Chunks of long sequences write partials that pool_combine folds in chunk order.
// States mode (a.states): out is Acc and its mean half sum(w x), undivided (fused_pool/partials.py).
// Backward: every element of dx is written once: w * g / sum(w) and / or g at the saved argmax
// (the index of the maximal row within its sequence: l padded, t - cu_seqlens[b] varlen).
#include <cuda_runtime.h>

#include "../common.h"
#include "device.cuh"
#include "launch.h"

namespace fused_pool {
namespace cuda {
namespace {

template <typename T, typename Acc, int VEC, int MODE>
__device__ __forceinline__ void write_pool_result(const PoolForward& a, int64_t seq, int64_t c0, bool active,
                                                  const ReduceState<Acc, VEC>& st) {
  const int64_t hidden = a.geometry.hidden;
  // Every buffer is contiguous and 16-byte aligned, and VEC divides H: VEC-aligned offsets.
  int64_t out_offset = seq * hidden * (MODE == (kMean | kMax) ? 2 : 1) + c0;
  if (MODE & kMean) {
    if (active && a.states) {  // sum(w x), undivided, in Acc
      store_elements<Acc, VEC>(static_cast<Acc*>(a.out), out_offset, st.total);
    } else if (active) {
      Acc mean[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) mean[i] = st.weight != Acc(0) ? st.total[i] / st.weight : Acc(0);
      store_channels<T, VEC>(static_cast<T*>(a.out), out_offset, mean);
    }
    if (c0 == 0) static_cast<Acc*>(a.den)[seq] = st.weight;
    out_offset += (MODE & kMax) ? hidden : 0;
  }
  if ((MODE & kMax) && active) {
    Acc maximum[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) maximum[i] = st.best_row[i] >= 0 ? st.best[i] : Acc(0);
    store_elements<int32_t, VEC>(a.argmax, seq * hidden + c0, st.best_row);
    if (a.states) {
      store_elements<Acc, VEC>(static_cast<Acc*>(a.out), out_offset, maximum);
    } else {
      store_channels<T, VEC>(static_cast<T*>(a.out), out_offset, maximum);
    }
  }
}

template <typename T, int VEC, int MODE>
__global__ void __launch_bounds__(kWarp* kRowGroups, kMinBlocksPerSm<T>) pool_forward_kernel(PoolForward a) {
  using Acc = typename AccOf<T>::type;
  const Geometry& g = a.geometry;
  const int64_t tile_c0 = grid_y() * kWarp * VEC;
  if (tile_c0 >= g.hidden) return;  // past the last channel tile (folded grid): the whole block
  const ChunkRange range = block_chunk(blockIdx.x, g, a.cu_seqlens, a.plan);
  const int64_t c0 = tile_c0 + threadIdx.x * VEC;
  const bool active = c0 < g.hidden;
  const T* x = static_cast<const T*>(a.x) + range.seq * g.stride_b;

  ReduceState<Acc, VEC> st;
  st.init();
  // Rows counted from the chunk's first row in 32 bits (a chunk has < 2^31 rows: plan_split).
  const int32_t count = static_cast<int32_t>(range.last - range.first);
  const int32_t index_base = static_cast<int32_t>(range.first - range.origin);  // index within the sequence
  x += range.first * g.stride_row;
  constexpr int32_t step = kRowGroups * kRowsInFlight;
  for (int32_t i0 = threadIdx.y * kRowsInFlight; i0 < count; i0 += step) {
    Acc w[kRowsInFlight];
    Acc v[kRowsInFlight][VEC];
#pragma unroll
    for (int k = 0; k < kRowsInFlight; ++k) {  // issue every load first
      const int32_t i = i0 + k;
      w[k] = i < count ? a.mask.weight<Acc>(range.seq, range.first + i) : Acc(0);
      if (w[k] != Acc(0) && active) load_channels<T, VEC>(x + i * g.stride_row, c0, g.stride_h, v[k]);
    }
#pragma unroll
    for (int k = 0; k < kRowsInFlight; ++k) {  // then accumulate in row order
      if (w[k] == Acc(0)) continue;  // padding: never read
      st.weight += w[k];
      if (!active) continue;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (MODE & kMean) st.total[i] += w[k] * v[k][i];
        if ((MODE & kMax) && takes_max(v[k][i], st.best[i], st.best_row[i])) {
          st.best[i] = v[k][i];
          st.best_row[i] = index_base + i0 + k;  // the row's index within its sequence (argmax)
        }
      }
    }
  }

  // Fold the row groups in order 0..7 (sums) and by (NaN, value, smallest row) (max).
  __shared__ ReduceState<Acc, VEC> shared[kRowGroups][kWarp];
  shared[threadIdx.y][threadIdx.x] = st;
  __syncthreads();
  if (threadIdx.y != 0) return;
  for (int y = 1; y < kRowGroups; ++y) {
    const ReduceState<Acc, VEC>& other = shared[y][threadIdx.x];
    st.weight += other.weight;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      st.total[i] += other.total[i];
      merge_max(st.best[i], st.best_row[i], other.best[i], other.best_row[i]);
    }
  }
  if (!a.plan.split) {
    write_pool_result<T, Acc, VEC, MODE>(a, range.seq, c0, active, st);
    return;
  }
  const int64_t part = static_cast<int64_t>(blockIdx.x) * g.hidden + c0;
  if (c0 == 0 && (MODE & kMean)) static_cast<Acc*>(a.part_den)[blockIdx.x] = st.weight;
  if (!active) return;
  if (MODE & kMean) store_elements<Acc, VEC>(static_cast<Acc*>(a.part_sum), part, st.total);
  if (MODE & kMax) {
    store_elements<Acc, VEC>(static_cast<Acc*>(a.part_max), part, st.best);
    store_elements<int32_t, VEC>(a.part_row, part, st.best_row);
  }
}

// Folds one sequence's chunk partials in chunk (= row) order; one thread per channel.
template <typename T, int MODE>
__global__ void pool_combine_kernel(PoolForward a) {
  using Acc = typename AccOf<T>::type;
  const int64_t seq = blockIdx.x;
  const int64_t c = grid_y() * blockDim.x + threadIdx.x;
  const bool active = c < a.geometry.hidden;
  if (c - threadIdx.x >= a.geometry.hidden) return;  // past the last channel block (folded grid)
  int64_t first, end;
  sequence_chunks(seq, a.plan, a.geometry.varlen, first, end);
  ReduceState<Acc, 1> st;
  st.init();
  for (int64_t chunk = first; chunk < end; ++chunk) {
    if (MODE & kMean) st.weight += static_cast<const Acc*>(a.part_den)[chunk];
    if (!active) continue;
    const int64_t part = chunk * a.geometry.hidden + c;
    if (MODE & kMean) st.total[0] += static_cast<const Acc*>(a.part_sum)[part];
    if (MODE & kMax) merge_max(st.best[0], st.best_row[0], static_cast<const Acc*>(a.part_max)[part], a.part_row[part]);
  }
  write_pool_result<T, Acc, 1, MODE>(a, seq, c, active, st);
}

template <typename T, int VEC, int MODE>
__global__ void __launch_bounds__(kWarp* kRowGroups, kMinBlocksPerSm<T>) pool_backward_kernel(PoolBackward a) {
  using Acc = typename AccOf<T>::type;
  const Geometry& g = a.geometry;
  const int64_t hidden = g.hidden;
  const int64_t c0 = (grid_y() * kWarp + threadIdx.x) * VEC;
  if (c0 >= hidden) return;
  const Acc* grad = static_cast<const Acc*>(a.grad);
  const int64_t grad_stride = hidden * (MODE == (kMean | kMax) ? 2 : 1);
  const int64_t rows_per_block = static_cast<int64_t>(kRowGroups) * kRowsInFlight;
#pragma unroll
  for (int k = 0; k < kRowsInFlight; ++k) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.y * kRowsInFlight + k;
    if (row >= g.num_rows) return;
    const RowPlace place = locate_row(g, a.cu_seqlens, row);
    const Acc w = place.inside ? a.mask.weight<Acc>(place.seq, place.position) : Acc(0);
    Acc dx[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) dx[i] = Acc(0);
    if (w != Acc(0)) {
      // grad and argmax rows: VEC-aligned offsets of 16-byte aligned buffers (vector loads).
      const int64_t g_row = place.seq * grad_stride + c0;
      if (MODE & kMean) {
        const Acc den = static_cast<const Acc*>(a.den)[place.seq];
        const Acc scale = den != Acc(0) ? w / den : Acc(0);
        Acc g_mean[VEC];
        load_elements<Acc, VEC>(grad, g_row, g_mean);
#pragma unroll
        for (int i = 0; i < VEC; ++i) dx[i] = scale * g_mean[i];
      }
      if (MODE & kMax) {
        Acc g_max[VEC];
        int32_t winner[VEC];
        load_elements<Acc, VEC>(grad, g_row + ((MODE & kMean) ? hidden : 0), g_max);
        load_elements<int32_t, VEC>(a.argmax, place.seq * hidden + c0, winner);
#pragma unroll
        for (int i = 0; i < VEC; ++i) dx[i] += winner[i] == place.index ? g_max[i] : Acc(0);
      }
    }
    store_channels<T, VEC>(static_cast<T*>(a.dx), row * hidden + c0, dx);
  }
}

// One block: a block-wide inclusive scan of chunks per sequence, 1024 sequences at a time, in int64
// and saturated at num_chunks (malformed, overlapping cu_seqlens can sum to more than int32 holds).
__global__ void chunk_offsets_kernel(IndexView cu_seqlens, int64_t num_seqs, int64_t num_rows, int64_t chunk_rows,
                                     int64_t num_chunks, int64_t* offsets) {
  __shared__ int64_t warp_totals[32];
  __shared__ int64_t carry;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (threadIdx.x == 0) {
    carry = 0;
    offsets[0] = 0;
  }
  __syncthreads();
  for (int64_t base = 0; base < num_seqs; base += blockDim.x) {
    const int64_t seq = base + threadIdx.x;
    int64_t count = 0;  // <= num_chunks: the sums below stay far from int64's limit
    if (seq < num_seqs) {
      int64_t start, end;
      segment_bounds(cu_seqlens, seq, num_rows, start, end);
      count = min((end - start + chunk_rows - 1) / chunk_rows, num_chunks);
    }
    int64_t scan = count;  // inclusive scan within the warp
#pragma unroll
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const int64_t up = __shfl_up_sync(0xffffffffu, scan, offset);
      if (lane >= offset) scan += up;
    }
    if (lane == kWarp - 1) warp_totals[warp] = scan;
    __syncthreads();
    if (warp == 0) {
      int64_t total = lane < static_cast<int>(blockDim.x / kWarp) ? warp_totals[lane] : 0;
#pragma unroll
      for (int offset = 1; offset < kWarp; offset *= 2) {
        const int64_t up = __shfl_up_sync(0xffffffffu, total, offset);
        if (lane >= offset) total += up;
      }
      warp_totals[lane] = total;  // inclusive scan of warp totals
    }
    __syncthreads();
    const int64_t inclusive = min(carry + (warp > 0 ? warp_totals[warp - 1] : 0) + scan, num_chunks);
    if (seq < num_seqs) offsets[seq + 1] = inclusive;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry = inclusive;  // saturated: never grows past num_chunks
    __syncthreads();
  }
}

template <typename T, int VEC>
bool launch_pool_forward(const PoolForward& a, cudaStream_t stream) {
  const dim3 block(kWarp, kRowGroups);
  const LaunchGrid grid = launch_grid(a.plan.num_chunks, ceil_div(a.geometry.hidden, kWarp * VEC));
  const LaunchGrid combine = launch_grid(a.plan.split ? a.geometry.num_seqs : 0, ceil_div(a.geometry.hidden, 256));
  if (!grid.ok || !combine.ok) return false;
  if (grid.empty) return true;
  switch (a.mode) {
#define FUSED_POOL_MODE_CASE(MODE)                                                                      \
  case MODE:                                                                                            \
    pool_forward_kernel<T, VEC, MODE><<<grid.grid, block, 0, stream>>>(a);                              \
    if (!combine.empty) pool_combine_kernel<T, MODE><<<combine.grid, 256, 0, stream>>>(a);              \
    break;
    FUSED_POOL_MODE_CASE(kMean)
    FUSED_POOL_MODE_CASE(kMax)
    FUSED_POOL_MODE_CASE(kMean | kMax)
#undef FUSED_POOL_MODE_CASE
  }
  return true;
}

template <typename T, int VEC>
bool launch_pool_backward(const PoolBackward& a, cudaStream_t stream) {
  const dim3 block(kWarp, kRowGroups);
  const LaunchGrid grid =
      launch_grid(ceil_div(a.geometry.num_rows, kRowGroups * kRowsInFlight), ceil_div(a.geometry.hidden, kWarp * VEC));
  if (!grid.ok) return false;
  if (grid.empty) return true;
  switch (a.mode) {
    case kMean: pool_backward_kernel<T, VEC, kMean><<<grid.grid, block, 0, stream>>>(a); break;
    case kMax: pool_backward_kernel<T, VEC, kMax><<<grid.grid, block, 0, stream>>>(a); break;
    case kMean | kMax: pool_backward_kernel<T, VEC, kMean | kMax><<<grid.grid, block, 0, stream>>>(a); break;
  }
  return true;
}

template <typename T, int VEC>
struct ForwardLaunch {
  static bool run(const PoolForward& a, cudaStream_t stream) { return launch_pool_forward<T, VEC>(a, stream); }
};
template <typename T, int VEC>
struct BackwardLaunch {
  static bool run(const PoolBackward& a, cudaStream_t stream) { return launch_pool_backward<T, VEC>(a, stream); }
};

}  // namespace

void chunk_offsets(IndexView cu_seqlens, int64_t num_seqs, int64_t num_rows, int64_t chunk_rows, int64_t num_chunks,
                   int64_t* offsets, cudaStream_t stream) {
  chunk_offsets_kernel<<<1, 1024, 0, stream>>>(cu_seqlens, num_seqs, num_rows, chunk_rows, num_chunks, offsets);
}

bool pool_forward(const PoolForward& args, cudaStream_t stream) { return dispatch<ForwardLaunch>(args, stream); }

bool pool_backward(const PoolBackward& args, cudaStream_t stream) { return dispatch<BackwardLaunch>(args, stream); }

}  // namespace cuda
}  // namespace fused_pool
