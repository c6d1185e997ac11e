// CUDA probe_attention_pool, forward and backward. Torch-free.
//
// Forward: probe_dots_kernel computes every row's scores (one warp per row and group of probes, the
// dot over all H channels), then probe_forward_kernel runs, per (sequence chunk, probe group, channel
// tile), an online softmax for each probe of the group over the chunk's rows (32 x 8 threads, VEC
// channels per thread, row groups merged in order); long sequences are split into chunks merged in
// chunk order by probe_combine_kernel. No float atomics anywhere: deterministic.
// Backward: probe_dots_kernel computes the coefficients [scale ds_p, p_p] of every row from the saved
// stats, probe_input_grad_kernel writes dx = sum_p scale ds_p probes_p + p_p g_p (every row once),
// probe_probes_grad_kernel the per-chunk partials of dprobes = sum_t scale ds x_t.
#include <cuda_runtime.h>

#include "../common.h"
#include "device.cuh"
#include "launch.h"
#include "probe_launch.h"

namespace fused_pool {
namespace cuda {
namespace {

constexpr int kProbeRowsInFlight = 2;  // rows each forward thread loads before it accumulates them

template <typename Acc>
constexpr int kProbesPerThread = probes_per_thread(sizeof(Acc) == 8 ? kFloat64 : kFloat32);

// One warp per (row, group of PB probes): the dots x_row . probes[p] (and, backward, x_row . g[seq, p]).
template <typename T, int VEC, bool BACKWARD>
__global__ void __launch_bounds__(kWarp* kRowGroups, kMinBlocksPerSm<T>) probe_dots_kernel(ProbeDots a) {
  using Acc = typename AccOf<T>::type;
  constexpr int PB = kProbesPerThread<Acc>;
  const Geometry& g = a.geometry;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowGroups + threadIdx.y;
  const int64_t p0 = grid_y() * PB;
  const int64_t P = a.num_probes, H = g.hidden;
  if (row >= g.num_rows || p0 >= P) return;
  // The forward needs no sequence (a varlen mask is none); the backward locates the row's.
  RowPlace place{g.varlen ? 0 : row / g.seq_len, g.varlen ? row : row % g.seq_len, 0, true};
  if (BACKWARD) place = locate_row(g, a.cu_seqlens, row);
  const int64_t seq = place.seq;
  const bool kept = place.inside && a.mask.weight<Acc>(seq, place.position) != Acc(0);
  Acc* result = static_cast<Acc*>(a.result) + row * (BACKWARD ? 2 * P : P);
  const Acc* stats = static_cast<const Acc*>(a.stats) + seq * P * 2;
  bool any_probe = false;  // backward: a probe of the group that is not empty
  if (BACKWARD && kept) {
#pragma unroll
    for (int k = 0; k < PB; ++k) any_probe |= p0 + k < P && stats[(p0 + k) * 2 + 1] != Acc(0);
  }
  if (!kept || (BACKWARD && !any_probe)) {  // no load: -inf scores, zero coefficients
    if (threadIdx.x < PB && p0 + threadIdx.x < P) {
      if (BACKWARD) {
        result[p0 + threadIdx.x] = Acc(0);
        result[P + p0 + threadIdx.x] = Acc(0);
      } else {
        result[p0 + threadIdx.x] = -INFINITY;
      }
    }
    return;
  }
  const T* x_row = static_cast<const T*>(a.x) + seq * g.stride_b + place.position * g.stride_row;
  const Acc* probes = static_cast<const Acc*>(a.probes);
  const Acc* grad = static_cast<const Acc*>(a.grad) + seq * P * H;
  Acc dot[PB] = {}, g_dot[PB] = {};
  for (int64_t d = threadIdx.x * VEC; d < H; d += kWarp * VEC) {
    Acc v[VEC];
    load_channels<T, VEC>(x_row, d, g.stride_h, v);
#pragma unroll
    for (int k = 0; k < PB; ++k) {
      if (p0 + k >= P) break;
      Acc w[VEC];
      load_elements<Acc, VEC>(probes, (p0 + k) * H + d, w);  // (P, H) contiguous, aligned, VEC | H
#pragma unroll
      for (int i = 0; i < VEC; ++i) dot[k] += v[i] * w[i];
      if (BACKWARD) {
        load_elements<Acc, VEC>(grad, (p0 + k) * H + d, w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) g_dot[k] += v[i] * w[i];
      }
    }
  }
  const Acc scale = static_cast<Acc>(a.scale);
#pragma unroll
  for (int k = 0; k < PB; ++k) {
    dot[k] = warp_sum(dot[k]);
    if (BACKWARD) g_dot[k] = warp_sum(g_dot[k]);
  }
  if (threadIdx.x != 0) return;
#pragma unroll
  for (int k = 0; k < PB; ++k) {
    const int64_t p = p0 + k;
    if (p >= P) break;
    if (!BACKWARD) {
      result[p] = scale * dot[k];
      continue;
    }
    const Acc m = stats[p * 2], l = stats[p * 2 + 1];
    if (l == Acc(0)) {  // an empty probe: zero gradients, whatever x or scale hold
      result[p] = Acc(0);
      result[P + p] = Acc(0);
      continue;
    }
    const Acc weight = softmax_weight(scale * dot[k], m, l);
    result[p] = scale * (weight * (g_dot[k] - static_cast<const Acc*>(a.g_out)[seq * P + p]));
    result[P + p] = weight;
  }
}

// The block's tile grid_y() of ceil(P / PB) probe groups (major) x channel_tiles: p0, the group's
// first probe, its channel tile, and c, this thread's first channel. false past the last tile
// (folded grid): the whole block exits.
template <int PB, int VEC>
__device__ __forceinline__ bool probe_tile(int64_t num_probes, int64_t channel_tiles, int64_t& p0,
                                           int64_t& channel_tile, int64_t& c) {
  const int64_t tile = grid_y();
  if (tile >= ceil_div(num_probes, PB) * channel_tiles) return false;
  p0 = (tile / channel_tiles) * PB;
  channel_tile = tile % channel_tiles;
  c = channel_tile * kWarp * VEC + threadIdx.x * VEC;
  return true;
}

// Online softmax state of PB probes over VEC channels.
template <typename Acc, int PB, int VEC>
struct ProbeSoftmax {
  Acc m[PB];
  Acc l[PB];
  Acc acc[PB][VEC];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int k = 0; k < PB; ++k) {
      m[k] = -INFINITY;
      l[k] = Acc(0);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[k][i] = Acc(0);
    }
  }

  // One row with scores s and values v: p = 0 for s = -inf, yet added (a NaN x still reaches out);
  // a NaN or +inf score makes p and l NaN, as torch.softmax does.
  __device__ __forceinline__ void add(const Acc (&s)[PB], const Acc (&v)[VEC]) {
#pragma unroll
    for (int k = 0; k < PB; ++k) {
      if (!(s[k] <= m[k])) {  // a new max (or NaN, which propagates)
        const Acc alpha = exp_diff(m[k], s[k]);
        l[k] *= alpha;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[k][i] *= alpha;
        m[k] = s[k];
      }
      const Acc p = exp_diff(s[k], m[k]);
      l[k] += p;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[k][i] += p * v[i];
    }
  }

  __device__ __forceinline__ void merge(const ProbeSoftmax& other) {
#pragma unroll
    for (int k = 0; k < PB; ++k) {
      Acc alpha, beta;
      m[k] = merged_max(m[k], other.m[k], alpha, beta);
      l[k] = l[k] * alpha + other.l[k] * beta;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[k][i] = acc[k][i] * alpha + other.acc[k][i] * beta;
    }
  }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp* kRowGroups, kMinBlocksPerSm<T>) probe_forward_kernel(ProbeForward a) {
  using Acc = typename AccOf<T>::type;
  constexpr int PB = kProbesPerThread<Acc>;
  const Geometry& g = a.geometry;
  const int64_t P = a.num_probes, H = g.hidden;
  // At least one channel tile, so that stats are written when H = 0.
  int64_t p0, channel_tile, c;
  if (!probe_tile<PB, VEC>(P, H > 0 ? ceil_div(H, kWarp * VEC) : 1, p0, channel_tile, c)) return;
  const bool active = c < H;
  const ChunkRange range = block_chunk(blockIdx.x, g, a.cu_seqlens, a.plan);
  const int32_t count = static_cast<int32_t>(range.last - range.first);  // < 2^31 rows: plan_split
  const T* x = static_cast<const T*>(a.x) + range.seq * g.stride_b + range.first * g.stride_row +
               (active ? c * g.stride_h : 0);
  const Acc* scores = static_cast<const Acc*>(a.scores) + (range.seq * g.seq_len + range.first) * P + p0;

  ProbeSoftmax<Acc, PB, VEC> st;
  st.init();
  constexpr int32_t step = kRowGroups * kProbeRowsInFlight;
  for (int32_t i0 = threadIdx.y * kProbeRowsInFlight; i0 < count; i0 += step) {
    Acc s[kProbeRowsInFlight][PB];
    Acc v[kProbeRowsInFlight][VEC];
#pragma unroll
    for (int r = 0; r < kProbeRowsInFlight; ++r) {  // issue every load first
      const int32_t i = i0 + r;
#pragma unroll
      for (int k = 0; k < PB; ++k) s[r][k] = -INFINITY;
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[r][j] = Acc(0);
      if (i < count && a.mask.weight<Acc>(range.seq, range.first + i) != Acc(0)) {
#pragma unroll
        for (int k = 0; k < PB; ++k) {
          if (p0 + k < P) s[r][k] = scores[static_cast<int64_t>(i) * P + k];
        }
        if (active) load_channels<T, VEC>(x + i * g.stride_row, 0, g.stride_h, v[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < kProbeRowsInFlight; ++r) st.add(s[r], v[r]);  // rows in order
  }

  __shared__ ProbeSoftmax<Acc, PB, VEC> shared[kRowGroups][kWarp];
  shared[threadIdx.y][threadIdx.x] = st;
  __syncthreads();
  if (threadIdx.y != 0) return;
  for (int y = 1; y < kRowGroups; ++y) st.merge(shared[y][threadIdx.x]);
  const bool writes_stats = channel_tile == 0 && threadIdx.x == 0;
#pragma unroll
  for (int k = 0; k < PB; ++k) {
    const int64_t p = p0 + k;
    if (p >= P) break;
    if (!a.plan.split) {
      if (active) {
        Acc out[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = st.l[k] != Acc(0) ? st.acc[k][i] / st.l[k] : Acc(0);  // l == 0: empty
        store_elements<Acc, VEC>(static_cast<Acc*>(a.out), (range.seq * P + p) * H + c, out);
      }
      if (writes_stats) {
        static_cast<Acc*>(a.stats)[(range.seq * P + p) * 2] = st.m[k];
        static_cast<Acc*>(a.stats)[(range.seq * P + p) * 2 + 1] = st.l[k];
      }
      continue;
    }
    const int64_t chunk_probe = static_cast<int64_t>(blockIdx.x) * P + p;
    if (active) store_elements<Acc, VEC>(static_cast<Acc*>(a.part_acc), chunk_probe * H + c, st.acc[k]);
    if (writes_stats) {
      static_cast<Acc*>(a.part_m)[chunk_probe] = st.m[k];
      static_cast<Acc*>(a.part_l)[chunk_probe] = st.l[k];
    }
  }
}

// Merges one (sequence, probe)'s chunk partials in chunk order; threads across channels.
template <typename Acc>
__global__ void probe_combine_kernel(ProbeForward a) {
  const int64_t seq = blockIdx.x, p = grid_y(), P = a.num_probes, H = a.geometry.hidden;
  if (p >= P) return;
  int64_t first, end;
  sequence_chunks(seq, a.plan, a.geometry.varlen, first, end);
  const Acc* part_m = static_cast<const Acc*>(a.part_m);
  const Acc* part_l = static_cast<const Acc*>(a.part_l);
  const Acc* part_acc = static_cast<const Acc*>(a.part_acc);
  for (int64_t c = threadIdx.x; c < H || (c == 0 && threadIdx.x == 0); c += blockDim.x) {
    ProbeSoftmax<Acc, 1, 1> st;
    st.init();
    for (int64_t chunk = first; chunk < end; ++chunk) {
      ProbeSoftmax<Acc, 1, 1> part;
      part.m[0] = part_m[chunk * P + p];
      part.l[0] = part_l[chunk * P + p];
      part.acc[0][0] = c < H ? part_acc[(chunk * P + p) * H + c] : Acc(0);
      st.merge(part);
    }
    if (c < H) static_cast<Acc*>(a.out)[(seq * P + p) * H + c] = st.l[0] != Acc(0) ? st.acc[0][0] / st.l[0] : Acc(0);
    if (c == 0) {
      static_cast<Acc*>(a.stats)[(seq * P + p) * 2] = st.m[0];
      static_cast<Acc*>(a.stats)[(seq * P + p) * 2 + 1] = st.l[0];
    }
  }
}

// One warp per row, VEC channels per thread: every row of dx written once.
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp* kRowGroups, kMinBlocksPerSm<T>) probe_input_grad_kernel(ProbeInputGrad a) {
  using Acc = typename AccOf<T>::type;
  const Geometry& g = a.geometry;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowGroups + threadIdx.y;
  const int64_t c = grid_y() * kWarp * VEC + threadIdx.x * VEC;
  const int64_t P = a.num_probes, H = g.hidden;
  if (row >= g.num_rows || c >= H) return;
  const RowPlace place = locate_row(g, a.cu_seqlens, row);
  const bool kept = place.inside && a.mask.weight<Acc>(place.seq, place.position) != Acc(0);
  Acc values[VEC] = {};
  if (kept) {
    const Acc* coef = static_cast<const Acc*>(a.coef) + row * 2 * P;
    const Acc* probes = static_cast<const Acc*>(a.probes);
    const Acc* grad = static_cast<const Acc*>(a.grad) + place.seq * P * H;
    for (int64_t p = 0; p < P; ++p) {
      const Acc c_ds = coef[p], c_p = coef[P + p];
      if (c_ds == Acc(0) && c_p == Acc(0)) continue;  // no weight (empty probe, zero score weight)
      Acc w[VEC], gv[VEC];
      load_elements<Acc, VEC>(probes, p * H + c, w);
      load_elements<Acc, VEC>(grad, p * H + c, gv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) values[i] += c_ds * w[i] + c_p * gv[i];
    }
  }
  store_channels<T, VEC>(static_cast<T*>(a.dx), row * H + c, values);
}

// partials[chunk, p, c] for a group of PB probes and VEC channels per thread, rows across warps.
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp* kRowGroups, kMinBlocksPerSm<T>) probe_probes_grad_kernel(ProbeGrad a) {
  using Acc = typename AccOf<T>::type;
  constexpr int PB = kProbesPerThread<Acc>;
  const Geometry& g = a.geometry;
  const int64_t P = a.num_probes, H = g.hidden;
  int64_t p0, channel_tile, c;
  if (!probe_tile<PB, VEC>(P, ceil_div(H, kWarp * VEC), p0, channel_tile, c)) return;
  const bool active = c < H;
  const Acc* coef = static_cast<const Acc*>(a.coef);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * a.rows_per_chunk;
  const int64_t last = min(first + a.rows_per_chunk, g.num_rows);
  Acc total[PB][VEC] = {};
  for (int64_t row = first + threadIdx.y; row < last && active; row += kRowGroups) {
    Acc w[PB];
    bool any = false;
#pragma unroll
    for (int k = 0; k < PB; ++k) {
      w[k] = p0 + k < P ? coef[row * 2 * P + p0 + k] : Acc(0);
      any |= w[k] != Acc(0);
    }
    if (!any) continue;  // padding, empty probes, rows with no weight: x not read
    Acc v[VEC];  // row (b, l) padded, t varlen: the sequence does not matter
    load_channels<T, VEC>(static_cast<const T*>(a.x) + row_offset(g, row), c, g.stride_h, v);
#pragma unroll
    for (int k = 0; k < PB; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) total[k][i] += w[k] * v[i];
    }
  }
  __shared__ Acc shared[kRowGroups][kWarp][PB][VEC];
#pragma unroll
  for (int k = 0; k < PB; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) shared[threadIdx.y][threadIdx.x][k][i] = total[k][i];
  }
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
  for (int y = 1; y < kRowGroups; ++y) {
#pragma unroll
    for (int k = 0; k < PB; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) total[k][i] += shared[y][threadIdx.x][k][i];
    }
  }
#pragma unroll
  for (int k = 0; k < PB; ++k) {
    if (p0 + k >= P) break;
    store_elements<Acc, VEC>(static_cast<Acc*>(a.partials), (static_cast<int64_t>(blockIdx.x) * P + p0 + k) * H + c,
                             total[k]);
  }
}

template <typename T, int VEC>
struct LaunchDots {
  static bool run(const ProbeDots& a, cudaStream_t stream) {
    const LaunchGrid grid =
        launch_grid(ceil_div(a.geometry.num_rows, kRowGroups), ceil_div(a.num_probes, kProbesPerThread<typename AccOf<T>::type>));
    if (!grid.ok) return false;
    if (grid.empty) return true;
    if (a.grad != nullptr) {
      probe_dots_kernel<T, VEC, true><<<grid.grid, dim3(kWarp, kRowGroups), 0, stream>>>(a);
    } else {
      probe_dots_kernel<T, VEC, false><<<grid.grid, dim3(kWarp, kRowGroups), 0, stream>>>(a);
    }
    return true;
  }
};

template <typename T, int VEC>
struct LaunchForward {
  static bool run(const ProbeForward& a, cudaStream_t stream) {
    using Acc = typename AccOf<T>::type;
    // At least one channel tile: the stats are written when H = 0.
    const int64_t tiles = probe_tiles(a.dtype, a.num_probes, std::max<int64_t>(a.geometry.hidden, 1), VEC);
    const LaunchGrid grid = launch_grid(a.plan.num_chunks, tiles);
    const LaunchGrid combine = launch_grid(a.plan.split ? a.geometry.num_seqs : 0, a.num_probes);
    if (!grid.ok || !combine.ok) return false;
    if (grid.empty) return true;
    probe_forward_kernel<T, VEC><<<grid.grid, dim3(kWarp, kRowGroups), 0, stream>>>(a);
    if (!combine.empty) probe_combine_kernel<Acc><<<combine.grid, 256, 0, stream>>>(a);
    return true;
  }
};

template <typename T, int VEC>
struct LaunchInputGrad {
  static bool run(const ProbeInputGrad& a, cudaStream_t stream) {
    const LaunchGrid grid =
        launch_grid(ceil_div(a.geometry.num_rows, kRowGroups), ceil_div(a.geometry.hidden, kWarp * VEC));
    if (!grid.ok) return false;
    if (!grid.empty) probe_input_grad_kernel<T, VEC><<<grid.grid, dim3(kWarp, kRowGroups), 0, stream>>>(a);
    return true;
  }
};

template <typename T, int VEC>
struct LaunchProbesGrad {
  static bool run(const ProbeGrad& a, cudaStream_t stream) {
    const int64_t tiles = probe_tiles(a.dtype, a.num_probes, a.geometry.hidden, VEC);
    const LaunchGrid grid = launch_grid(ceil_div(a.geometry.num_rows, a.rows_per_chunk), tiles);
    if (!grid.ok) return false;
    if (!grid.empty) probe_probes_grad_kernel<T, VEC><<<grid.grid, dim3(kWarp, kRowGroups), 0, stream>>>(a);
    return true;
  }
};

}  // namespace

bool probe_dots(const ProbeDots& args, cudaStream_t stream) { return dispatch<LaunchDots>(args, stream); }

bool probe_forward(const ProbeForward& args, cudaStream_t stream) { return dispatch<LaunchForward>(args, stream); }

bool probe_input_grad(const ProbeInputGrad& args, cudaStream_t stream) {
  return dispatch<LaunchInputGrad>(args, stream);
}

bool probe_probes_grad(const ProbeGrad& args, cudaStream_t stream) {
  return dispatch<LaunchProbesGrad>(args, stream);
}

}  // namespace cuda
}  // namespace fused_pool
