// CUDA attention_pool and query_attention_pool, forward and backward. Torch-free.
//
// Forward: like the pool forward (32 x 8 threads, VEC channels per thread, rows in groups of
// kRowsInFlight), each thread running an online softmax over its rows for one head's channels:
// running max m, running sum l, accumulator of p * x, rescaled when m grows. Row groups and, for
// long sequences, chunks are merged in a fixed order exactly as split softmax does. Query mode
// first computes the scores (one warp per row and head, for every row).
// Backward: one warp per (row, head): p = exp(s - m) / l, ds = p * g . (x - out), then
// dx = p * g (+ ds * scale * q). dquery: per-chunk partials of scale * ds * x (query_gradient).
#include <cuda_runtime.h>

#include "../common.h"
#include "device.cuh"
#include "launch.h"

namespace fused_pool {
namespace cuda {
namespace {

template <typename Acc, int VEC>
struct SoftmaxAcc {
  Acc m;
  Acc l;
  Acc acc[VEC];

  __device__ __forceinline__ void init() {
    m = -INFINITY;
    l = Acc(0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = Acc(0);
  }

  // Adds one row with score s and values v (v = 0 for rows not kept). p = 0 for s = -inf, yet added:
  // a NaN x of the row still reaches out, as in sum(p * x); a NaN or +inf score makes p and l NaN
  // (exp(NaN), exp(inf - inf)), as torch.softmax does.
  __device__ __forceinline__ void add(Acc s, const Acc (&v)[VEC]) {
    if (!(s <= m)) {  // a new max (or NaN, which propagates)
      const Acc alpha = exp_diff(m, s);
      l *= alpha;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] *= alpha;
      m = s;
    }
    const Acc p = exp_diff(s, m);
    l += p;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += p * v[i];
  }

  // Merges another state (rows of another group or chunk).
  __device__ __forceinline__ void merge(Acc other_m, Acc other_l, const Acc* other_acc) {
    Acc alpha, beta;
    m = merged_max(m, other_m, alpha, beta);
    l = l * alpha + other_l * beta;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc[i] * alpha + other_acc[i] * beta;
  }
};

template <typename Acc, int VEC>
__device__ __forceinline__ void write_attention(const AttentionForward& a, int64_t seq, int64_t head, int64_t c,
                                                bool active, bool writes_stats, const SoftmaxAcc<Acc, VEC>& st) {
  if (active) {
    Acc out[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = st.l != Acc(0) ? st.acc[i] / st.l : Acc(0);  // l == 0: empty
    store_elements<Acc, VEC>(static_cast<Acc*>(a.out), seq * a.geometry.hidden + c, out);  // VEC | H: aligned
  }
  if (writes_stats) {
    Acc* stats = static_cast<Acc*>(a.stats) + (seq * a.num_heads + head) * 2;
    stats[0] = st.m;
    stats[1] = st.l;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp* kRowGroups, kMinBlocksPerSm<T>) attention_forward_kernel(AttentionForward a) {
  using Acc = typename AccOf<T>::type;
  const Geometry& g = a.geometry;
  const int64_t tiles_per_head = ceil_div(a.head_dim, kWarp * VEC);
  const int64_t tile = grid_y();
  if (tile >= a.num_heads * tiles_per_head) return;  // past the last tile (folded grid): the whole block
  const int64_t head = tile / tiles_per_head;
  const int64_t d0 = (tile % tiles_per_head) * kWarp * VEC + threadIdx.x * VEC;  // within the head
  const bool active = d0 < a.head_dim;
  const int64_t c = head * a.head_dim + d0;
  const ChunkRange range = block_chunk(blockIdx.x, g, a.cu_seqlens, a.plan);
  // Rows counted from the chunk's first row in 32 bits (a chunk has < 2^31 rows: plan_split).
  const int32_t count = static_cast<int32_t>(range.last - range.first);
  const T* x = static_cast<const T*>(a.x) + range.seq * g.stride_b + range.first * g.stride_row +
               (active ? c * g.stride_h : 0);  // this thread's channels
  const Acc* scores = static_cast<const Acc*>(a.scores) + (range.seq * g.seq_len + range.first) * a.num_heads + head;

  SoftmaxAcc<Acc, VEC> st;
  st.init();
  constexpr int32_t step = kRowGroups * kRowsInFlight;
  for (int32_t i0 = threadIdx.y * kRowsInFlight; i0 < count; i0 += step) {
    Acc s[kRowsInFlight];
    Acc v[kRowsInFlight][VEC];
#pragma unroll
    for (int k = 0; k < kRowsInFlight; ++k) {  // issue every load first
      const int32_t i = i0 + k;
      s[k] = -INFINITY;
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[k][j] = Acc(0);  // rows not kept add 0 * 0
      if (i < count && a.mask.weight<Acc>(range.seq, range.first + i) != Acc(0)) {
        s[k] = scores[static_cast<int64_t>(i) * a.num_heads];
        if (active) load_channels<T, VEC>(x + i * g.stride_row, 0, g.stride_h, v[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kRowsInFlight; ++k) st.add(s[k], v[k]);  // rows in order
  }

  __shared__ SoftmaxAcc<Acc, VEC> shared[kRowGroups][kWarp];
  shared[threadIdx.y][threadIdx.x] = st;
  __syncthreads();
  if (threadIdx.y != 0) return;
  for (int y = 1; y < kRowGroups; ++y) {
    const SoftmaxAcc<Acc, VEC>& other = shared[y][threadIdx.x];
    st.merge(other.m, other.l, other.acc);
  }
  const bool writes_stats = tile % tiles_per_head == 0 && threadIdx.x == 0;
  if (!a.plan.split) {
    write_attention<Acc, VEC>(a, range.seq, head, c, active, writes_stats, st);
    return;
  }
  if (writes_stats) {
    static_cast<Acc*>(a.part_m)[blockIdx.x * a.num_heads + head] = st.m;
    static_cast<Acc*>(a.part_l)[blockIdx.x * a.num_heads + head] = st.l;
  }
  if (active) {
    store_elements<Acc, VEC>(static_cast<Acc*>(a.part_acc), static_cast<int64_t>(blockIdx.x) * g.hidden + c, st.acc);
  }
}

// Merges one sequence's chunk partials in chunk order; one thread per channel.
template <typename Acc>
__global__ void attention_combine_kernel(AttentionForward a) {
  const int64_t seq = blockIdx.x;
  const int64_t c = grid_y() * blockDim.x + threadIdx.x;
  if (c - threadIdx.x >= a.geometry.hidden) return;  // past the last channel block (folded grid)
  const bool active = c < a.geometry.hidden;
  const int64_t head = active ? c / a.head_dim : 0;
  int64_t first, end;
  sequence_chunks(seq, a.plan, a.geometry.varlen, first, end);
  SoftmaxAcc<Acc, 1> st;
  st.init();
  for (int64_t chunk = first; chunk < end && active; ++chunk) {
    const Acc part = static_cast<const Acc*>(a.part_acc)[chunk * a.geometry.hidden + c];
    st.merge(static_cast<const Acc*>(a.part_m)[chunk * a.num_heads + head],
             static_cast<const Acc*>(a.part_l)[chunk * a.num_heads + head], &part);
  }
  write_attention<Acc, 1>(a, seq, head, c, active, active && c % a.head_dim == 0, st);
}

// One warp per (row, head): the row's score from the query. Every row gets one, whatever the
// sequences (a score depends on its row alone; varlen rows in gaps or overlaps of malformed
// cu_seqlens may still be read by the forward, which walks each sequence's clamped bounds); rows
// the mask drops get -inf without a load.
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp* kRowGroups, kMinBlocksPerSm<T>) query_scores_kernel(QueryScores a) {
  using Acc = typename AccOf<T>::type;
  const Geometry& g = a.geometry;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowGroups + threadIdx.y;
  const int64_t head = grid_y();
  if (row >= g.num_rows || head >= a.num_heads) return;
  const int64_t seq = g.varlen ? 0 : row / g.seq_len;  // padded (b, l); varlen t (the mask is (T,))
  const int64_t position = g.varlen ? row : row % g.seq_len;
  Acc* score = static_cast<Acc*>(a.scores) + row * a.num_heads + head;
  if (a.mask.weight<Acc>(seq, position) == Acc(0)) {
    if (threadIdx.x == 0) *score = -INFINITY;
    return;
  }
  const T* x_row = static_cast<const T*>(a.x) + seq * g.stride_b + position * g.stride_row;
  const int64_t c0 = head * a.head_dim;
  Acc dot = Acc(0);
  for (int64_t d = threadIdx.x * VEC; d < a.head_dim; d += kWarp * VEC) {
    Acc v[VEC], q[VEC];
    load_channels<T, VEC>(x_row, c0 + d, g.stride_h, v);
    load_elements<Acc, VEC>(static_cast<const Acc*>(a.query), c0 + d, q);  // (nh, D) contiguous, aligned
#pragma unroll
    for (int i = 0; i < VEC; ++i) dot += v[i] * q[i];
  }
  dot = warp_sum(dot);
  if (threadIdx.x == 0) *score = static_cast<Acc>(a.scale) * dot;
}

template <typename T, int VEC, bool QUERY>
__global__ void __launch_bounds__(kWarp* kRowGroups, kMinBlocksPerSm<T>)
    attention_backward_kernel(AttentionBackward a) {
  using Acc = typename AccOf<T>::type;
  const Geometry& g = a.geometry;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowGroups + threadIdx.y;
  const int64_t head = grid_y();
  if (row >= g.num_rows || head >= a.num_heads) return;
  const int64_t D = a.head_dim, c0 = head * D;
  T* dx = static_cast<T*>(a.dx);  // contiguous: row's head starts at row * H + c0 (VEC | D: aligned)
  const int64_t dx_row = row * g.hidden + c0;
  Acc* ds_out = static_cast<Acc*>(a.ds) + row * a.num_heads + head;
  const RowPlace place = locate_row(g, a.cu_seqlens, row);
  const int64_t seq = place.seq;
  const bool kept = place.inside && a.mask.weight<Acc>(seq, place.position) != Acc(0);
  const Acc* stats = static_cast<const Acc*>(a.stats) + (seq * a.num_heads + head) * 2;
  if (!kept || stats[1] == Acc(0)) {  // padding or an empty head: zero gradients (l NaN: NaN ones)
    const Acc zeros[VEC] = {};
    for (int64_t d = threadIdx.x * VEC; d < D; d += kWarp * VEC) store_channels<T, VEC>(dx, dx_row + d, zeros);
    if (threadIdx.x == 0) *ds_out = Acc(0);
    return;
  }
  const T* x_row = static_cast<const T*>(a.x) + seq * g.stride_b + place.position * g.stride_row;
  // grad, out (B, H) and query (nh, D): contiguous, 16-byte aligned, read VEC at a time.
  const Acc* grad = static_cast<const Acc*>(a.grad);
  const Acc* out = static_cast<const Acc*>(a.out);
  const Acc* query = static_cast<const Acc*>(a.query);
  const int64_t seq_c0 = seq * g.hidden + c0;
  // Pass 1: g . (x - out) (and x . q in query mode), subtracting first so that ds is exact where
  // it is 0 (a row that takes all the weight).
  Acc g_dot = Acc(0), q_dot = Acc(0);
  for (int64_t d = threadIdx.x * VEC; d < D; d += kWarp * VEC) {
    Acc v[VEC], g_v[VEC], out_v[VEC];
    load_channels<T, VEC>(x_row, c0 + d, g.stride_h, v);
    load_elements<Acc, VEC>(grad, seq_c0 + d, g_v);
    load_elements<Acc, VEC>(out, seq_c0 + d, out_v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) g_dot += g_v[i] * (v[i] - out_v[i]);
    if (QUERY) {
      Acc q_v[VEC];
      load_elements<Acc, VEC>(query, c0 + d, q_v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) q_dot += v[i] * q_v[i];
    }
  }
  g_dot = warp_sum(g_dot);
  const Acc s = QUERY ? static_cast<Acc>(a.scale) * warp_sum(q_dot)
                      : static_cast<const Acc*>(a.scores)[row * a.num_heads + head];
  const Acc p = softmax_weight(s, stats[0], stats[1]);
  const Acc ds = p * g_dot;
  // Pass 2: dx.
  const Acc q_scale = static_cast<Acc>(a.scale) * ds;
  for (int64_t d = threadIdx.x * VEC; d < D; d += kWarp * VEC) {
    Acc g_v[VEC], values[VEC];
    load_elements<Acc, VEC>(grad, seq_c0 + d, g_v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) values[i] = p * g_v[i];
    if (QUERY) {
      Acc q_v[VEC];
      load_elements<Acc, VEC>(query, c0 + d, q_v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) values[i] += q_scale * q_v[i];
    }
    store_channels<T, VEC>(dx, dx_row + d, values);
  }
  if (threadIdx.x == 0) *ds_out = ds;
}

// partials[chunk, c] = scale * sum over the chunk's rows of ds[row, head(c)] * x[row, c].
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp* kRowGroups, kMinBlocksPerSm<T>) query_gradient_kernel(QueryGradient a) {
  using Acc = typename AccOf<T>::type;
  const Geometry& g = a.geometry;
  const int64_t tile_c0 = grid_y() * kWarp * VEC;
  if (tile_c0 >= g.hidden) return;  // past the last channel tile (folded grid): the whole block
  const int64_t c = tile_c0 + threadIdx.x * VEC;
  const bool active = c < g.hidden;
  const int64_t head = active ? c / a.head_dim : 0;  // VEC divides head_dim: one head per thread
  const Acc* ds = static_cast<const Acc*>(a.ds);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * a.rows_per_chunk;
  const int64_t last = min(first + a.rows_per_chunk, g.num_rows);
  Acc total[VEC] = {};
  for (int64_t row = first + threadIdx.y; row < last && active; row += kRowGroups) {
    const Acc weight = ds[row * a.num_heads + head];
    if (weight == Acc(0)) continue;  // padding, empty heads and rows with no weight
    const RowPlace place = locate_row(g, a.cu_seqlens, row);
    Acc v[VEC];
    load_channels<T, VEC>(static_cast<const T*>(a.x) + place.seq * g.stride_b + place.position * g.stride_row, c,
                          g.stride_h, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) total[i] += weight * v[i];
  }
  __shared__ Acc shared[kRowGroups][kWarp * VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) shared[threadIdx.y][threadIdx.x * VEC + i] = total[i];
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
  for (int y = 1; y < kRowGroups; ++y) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) total[i] += shared[y][threadIdx.x * VEC + i];
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    if (total[i] != Acc(0)) total[i] *= static_cast<Acc>(a.scale);  // no row had a say: 0, even for scale nan / inf
  }
  store_elements<Acc, VEC>(static_cast<Acc*>(a.partials), static_cast<int64_t>(blockIdx.x) * g.hidden + c, total);
}

template <typename T, int VEC>
struct Launch {
  using Acc = typename AccOf<T>::type;
  static bool forward(const AttentionForward& a, cudaStream_t stream) {
    const LaunchGrid grid = launch_grid(a.plan.num_chunks, a.num_heads * ceil_div(a.head_dim, kWarp * VEC));
    const LaunchGrid combine = launch_grid(a.plan.split ? a.geometry.num_seqs : 0, ceil_div(a.geometry.hidden, 256));
    if (!grid.ok || !combine.ok) return false;
    if (grid.empty) return true;
    attention_forward_kernel<T, VEC><<<grid.grid, dim3(kWarp, kRowGroups), 0, stream>>>(a);
    if (!combine.empty) attention_combine_kernel<Acc><<<combine.grid, 256, 0, stream>>>(a);
    return true;
  }
  static bool scores(const QueryScores& a, cudaStream_t stream) {
    const LaunchGrid grid = launch_grid(ceil_div(a.geometry.num_rows, kRowGroups), a.num_heads);
    if (!grid.ok) return false;
    if (!grid.empty) query_scores_kernel<T, VEC><<<grid.grid, dim3(kWarp, kRowGroups), 0, stream>>>(a);
    return true;
  }
  static bool backward(const AttentionBackward& a, cudaStream_t stream) {
    const LaunchGrid grid = launch_grid(ceil_div(a.geometry.num_rows, kRowGroups), a.num_heads);
    if (!grid.ok) return false;
    if (grid.empty) return true;
    if (a.query != nullptr) {
      attention_backward_kernel<T, VEC, true><<<grid.grid, dim3(kWarp, kRowGroups), 0, stream>>>(a);
    } else {
      attention_backward_kernel<T, VEC, false><<<grid.grid, dim3(kWarp, kRowGroups), 0, stream>>>(a);
    }
    return true;
  }
  static bool query_gradient(const QueryGradient& a, cudaStream_t stream) {
    const LaunchGrid grid =
        launch_grid(ceil_div(a.geometry.num_rows, a.rows_per_chunk), ceil_div(a.geometry.hidden, kWarp * VEC));
    if (!grid.ok) return false;
    if (!grid.empty) query_gradient_kernel<T, VEC><<<grid.grid, dim3(kWarp, kRowGroups), 0, stream>>>(a);
    return true;
  }
};

// Calls Launch<T, VEC>::method with VEC = 16 bytes' worth of T when vec > 1, else 1.
#define FUSED_POOL_DISPATCH(ARGS, METHOD, STREAM)                                                          \
  switch ((ARGS).dtype) {                                                                                 \
    case kFloat16:                                                                                        \
      return (ARGS).vec > 1 ? Launch<__half, 8>::METHOD(ARGS, STREAM) : Launch<__half, 1>::METHOD(ARGS, STREAM); \
    case kBFloat16:                                                                                       \
      return (ARGS).vec > 1 ? Launch<__nv_bfloat16, 8>::METHOD(ARGS, STREAM)                              \
                            : Launch<__nv_bfloat16, 1>::METHOD(ARGS, STREAM);                             \
    case kFloat32:                                                                                        \
      return (ARGS).vec > 1 ? Launch<float, 4>::METHOD(ARGS, STREAM) : Launch<float, 1>::METHOD(ARGS, STREAM); \
    case kFloat64:                                                                                        \
      return (ARGS).vec > 1 ? Launch<double, 2>::METHOD(ARGS, STREAM) : Launch<double, 1>::METHOD(ARGS, STREAM); \
  }                                                                                                       \
  return true;

}  // namespace

bool attention_forward(const AttentionForward& args, cudaStream_t stream) { FUSED_POOL_DISPATCH(args, forward, stream) }

bool query_scores(const QueryScores& args, cudaStream_t stream) { FUSED_POOL_DISPATCH(args, scores, stream) }

bool attention_backward(const AttentionBackward& args, cudaStream_t stream) {
  FUSED_POOL_DISPATCH(args, backward, stream)
}

bool query_gradient(const QueryGradient& args, cudaStream_t stream) {
  FUSED_POOL_DISPATCH(args, query_gradient, stream)
}

}  // namespace cuda
}  // namespace fused_pool
