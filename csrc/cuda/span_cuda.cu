// CUDA span_pool (mean / max / mean_max over token spans of x (T, H)), forward and backward.
// Torch-free: raw pointers and strides.
//
// Forward: a block of 32 x 8 threads reduces one span's clamped tokens [start', end') over 32 * VEC
// channels, as pool does: each thread owns VEC contiguous channels (one 16-byte load) and every 8th
// group of kRowsInFlight tokens, loading them before accumulating them; tokens not kept are never
// read. The 8 groups are folded in a fixed order through shared memory.
// Backward: a block owns a tile of 32 tokens over 32 * VEC channels and loops over every span in
// increasing order, adding w_t g_s / den_s (mean) and g_s where argmax == t - start'_s (max) for
// the tokens of the tile the span holds: deterministic, no atomics, each dx element written once.
#include <cuda_runtime.h>

#include "../common.h"
#include "device.cuh"
#include "launch.h"

namespace fused_pool {
namespace cuda {
namespace {

// Blocks per SM that __launch_bounds__ asks ptxas to fit (at most 128 registers a thread). Left to
// itself (0), ptxas settled on occupancy tiers of 32 / 48 / 64 registers by spilling 8-16 bytes in
// some instantiations of these kernels; with this budget none spills (-Xptxas -v, sm_80 and sm_90).
constexpr int kSpanMinBlocksPerSm = 2;

template <typename T, int VEC, int MODE>
__global__ void __launch_bounds__(kWarp* kRowGroups, kSpanMinBlocksPerSm) span_forward_kernel(SpanForward a) {
  using Acc = typename AccOf<T>::type;
  const Geometry& g = a.geometry;
  const int64_t tile_c0 = grid_y() * kWarp * VEC;
  if (tile_c0 >= g.hidden) return;  // past the last channel tile (folded grid): the whole block
  const int64_t span = blockIdx.x;
  int64_t start, end;
  span_bounds(a.spans, span, g.num_rows, start, end);
  const int64_t c0 = tile_c0 + threadIdx.x * VEC;
  const bool active = c0 < g.hidden;
  const T* x = static_cast<const T*>(a.x);

  ReduceState<Acc, VEC> st;
  st.init();
  // Tokens counted in 32 bits within pieces of < 2^30 tokens (one piece but for huge spans).
  constexpr int64_t kPieceRows = int64_t{1} << 30;
  constexpr int32_t step = kRowGroups * kRowsInFlight;
  for (int64_t piece = start; piece < end; piece += kPieceRows) {
    const int32_t count = static_cast<int32_t>(min(end - piece, kPieceRows));
    const int32_t index_base = static_cast<int32_t>(piece - start);  // < T < 2^31 in max modes (checked)
    const T* x_piece = x + piece * g.stride_row;
    for (int32_t i0 = threadIdx.y * kRowsInFlight; i0 < count; i0 += step) {
      Acc w[kRowsInFlight];
      Acc v[kRowsInFlight][VEC];
#pragma unroll
      for (int k = 0; k < kRowsInFlight; ++k) {  // issue every load first
        const int32_t i = i0 + k;
        w[k] = i < count ? a.mask.weight<Acc>(0, piece + i) : Acc(0);
        if (w[k] != Acc(0) && active) load_channels<T, VEC>(x_piece + i * g.stride_row, c0, g.stride_h, v[k]);
      }
#pragma unroll
      for (int k = 0; k < kRowsInFlight; ++k) {  // then accumulate in token order
        if (w[k] == Acc(0)) continue;  // not kept: never read
        st.weight += w[k];
        if (!active) continue;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          if (MODE & kMean) st.total[i] += w[k] * v[k][i];
          if ((MODE & kMax) && takes_max(v[k][i], st.best[i], st.best_row[i])) {
            st.best[i] = v[k][i];
            st.best_row[i] = index_base + i0 + k;  // the token's index within the span (argmax)
          }
        }
      }
    }
  }

  // Fold the token groups in order 0..7 (sums) and by (NaN, value, smallest index) (max).
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
  // out, den and argmax are contiguous and 16-byte aligned, and VEC divides H: VEC-aligned offsets.
  int64_t out_offset = span * g.hidden * (MODE == (kMean | kMax) ? 2 : 1) + c0;
  if (MODE & kMean) {
    if (c0 == 0) static_cast<Acc*>(a.den)[span] = st.weight;
    if (active) {
      Acc mean[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) mean[i] = st.weight != Acc(0) ? st.total[i] / st.weight : Acc(0);
      store_channels<T, VEC>(static_cast<T*>(a.out), out_offset, mean);
    }
    out_offset += (MODE & kMax) ? g.hidden : 0;
  }
  if ((MODE & kMax) && active) {
    Acc maximum[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) maximum[i] = st.best_row[i] >= 0 ? st.best[i] : Acc(0);
    store_elements<int32_t, VEC>(a.argmax, span * g.hidden + c0, st.best_row);
    store_channels<T, VEC>(static_cast<T*>(a.out), out_offset, maximum);
  }
}

template <typename T, int VEC, int MODE>
__global__ void __launch_bounds__(kWarp* kRowGroups, kSpanMinBlocksPerSm) span_backward_kernel(SpanBackward a) {
  using Acc = typename AccOf<T>::type;
  const Geometry& g = a.geometry;
  const int64_t hidden = g.hidden;
  const int64_t c0 = (grid_y() * kWarp + threadIdx.x) * VEC;
  if (c0 >= hidden) return;
  const Acc* grad = static_cast<const Acc*>(a.grad);
  const int64_t grad_stride = hidden * (MODE == (kMean | kMax) ? 2 : 1);
  // This thread's tokens: first + k for k < kRowsInFlight (a warp shares them: uniform branches).
  const int64_t first =
      static_cast<int64_t>(blockIdx.x) * kRowGroups * kRowsInFlight + threadIdx.y * kRowsInFlight;
  Acc w[kRowsInFlight];
  Acc dx[kRowsInFlight][VEC];
#pragma unroll
  for (int k = 0; k < kRowsInFlight; ++k) {
    w[k] = first + k < g.num_rows ? a.mask.weight<Acc>(0, first + k) : Acc(0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) dx[k][i] = Acc(0);
  }
  for (int64_t span = 0; span < g.num_seqs; ++span) {
    int64_t start, end;
    span_bounds(a.spans, span, g.num_rows, start, end);
    if (end <= first || start >= first + kRowsInFlight) continue;  // none of this thread's tokens
    // This thread's tokens k in [lo, hi) are in the span; token k's index in it is offset + k.
    const int lo = static_cast<int>(max(start - first, int64_t{0}));
    const int hi = static_cast<int>(min(end - first, int64_t{kRowsInFlight}));
    const int64_t offset = first - start;
    // grad and argmax rows: VEC-aligned offsets of 16-byte aligned buffers (vector loads).
    const int64_t g_row = span * grad_stride + c0;
    if (MODE & kMean) {
      const Acc den = static_cast<const Acc*>(a.den)[span];
      Acc g_mean[VEC];
      load_elements<Acc, VEC>(grad, g_row, g_mean);
#pragma unroll
      for (int k = 0; k < kRowsInFlight; ++k) {
        if (k < lo || k >= hi || w[k] == Acc(0) || den == Acc(0)) continue;
        const Acc scale = w[k] / den;
#pragma unroll
        for (int i = 0; i < VEC; ++i) dx[k][i] += scale * g_mean[i];
      }
    }
    // argmax is int32: a token whose index in the span is past 2^31 - 1 - kRowsInFlight is no maximum.
    if ((MODE & kMax) && offset <= INT32_MAX - kRowsInFlight) {
      const int32_t offset32 = static_cast<int32_t>(offset);  // > -kRowsInFlight: the span holds a token
      Acc g_max[VEC];
      int32_t winner[VEC];
      load_elements<Acc, VEC>(grad, g_row + ((MODE & kMean) ? hidden : 0), g_max);
      load_elements<int32_t, VEC>(a.argmax, span * hidden + c0, winner);
#pragma unroll
      for (int k = 0; k < kRowsInFlight; ++k) {
        if (k < lo || k >= hi || w[k] == Acc(0)) continue;
#pragma unroll
        for (int i = 0; i < VEC; ++i) dx[k][i] += winner[i] == offset32 + k ? g_max[i] : Acc(0);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kRowsInFlight; ++k) {
    if (first + k < g.num_rows) store_channels<T, VEC>(static_cast<T*>(a.dx), (first + k) * hidden + c0, dx[k]);
  }
}

template <typename T, int VEC>
bool launch_span_forward(const SpanForward& a, cudaStream_t stream) {
  const dim3 block(kWarp, kRowGroups);
  const LaunchGrid grid = launch_grid(a.geometry.num_seqs, ceil_div(a.geometry.hidden, kWarp * VEC));
  if (!grid.ok) return false;
  if (grid.empty) return true;
  switch (a.mode) {
    case kMean: span_forward_kernel<T, VEC, kMean><<<grid.grid, block, 0, stream>>>(a); break;
    case kMax: span_forward_kernel<T, VEC, kMax><<<grid.grid, block, 0, stream>>>(a); break;
    case kMean | kMax: span_forward_kernel<T, VEC, kMean | kMax><<<grid.grid, block, 0, stream>>>(a); break;
  }
  return true;
}

template <typename T, int VEC>
bool launch_span_backward(const SpanBackward& a, cudaStream_t stream) {
  const dim3 block(kWarp, kRowGroups);
  const LaunchGrid grid =
      launch_grid(ceil_div(a.geometry.num_rows, kRowGroups * kRowsInFlight), ceil_div(a.geometry.hidden, kWarp * VEC));
  if (!grid.ok) return false;
  if (grid.empty) return true;
  switch (a.mode) {
    case kMean: span_backward_kernel<T, VEC, kMean><<<grid.grid, block, 0, stream>>>(a); break;
    case kMax: span_backward_kernel<T, VEC, kMax><<<grid.grid, block, 0, stream>>>(a); break;
    case kMean | kMax: span_backward_kernel<T, VEC, kMean | kMax><<<grid.grid, block, 0, stream>>>(a); break;
  }
  return true;
}

template <typename T, int VEC>
struct ForwardLaunch {
  static bool run(const SpanForward& a, cudaStream_t stream) { return launch_span_forward<T, VEC>(a, stream); }
};
template <typename T, int VEC>
struct BackwardLaunch {
  static bool run(const SpanBackward& a, cudaStream_t stream) { return launch_span_backward<T, VEC>(a, stream); }
};

}  // namespace

bool span_forward(const SpanForward& args, cudaStream_t stream) { return dispatch<ForwardLaunch>(args, stream); }

bool span_backward(const SpanBackward& args, cudaStream_t stream) { return dispatch<BackwardLaunch>(args, stream); }

}  // namespace cuda
}  // namespace fused_pool
