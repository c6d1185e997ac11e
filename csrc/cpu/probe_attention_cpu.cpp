// CPU probe_attention_pool, forward and backward, on BLAS GEMMs (at::mm on views of the buffers: MKL /
// OpenBLAS, whichever ATen was built with).
//
// Sequences are cut into row chunks (planned from the shapes alone); a task walks its chunk in blocks
// of kept rows, each block an Acc matrix X (rows x H): the rows of x themselves when they are
// consecutive float32 / float64 rows with contiguous channels, else a gathered, converted copy (a
// mask with holes, float16 / bfloat16, strided channels). Padding is never read.
// Forward, per block: S = X probes^T (rows x P), then per probe an online softmax step (running max
// m, sum l, the accumulator rescaled when m grows), then acc += softmax(S)^T X (P x H). Chunks of a
// split sequence are merged in row order. out = acc / l (0 where l == 0), stats (m, l).
// A NaN or +inf kept score makes l NaN, hence out and every gradient of the probe NaN, as
// torch.softmax does; l == 0 (every kept score -inf, or no kept token) is an empty probe: 0.
// Backward, per block: [S / scale, dP] = X [probes; g]^T, p = exp(S - m) / l, ds = p (dP - g . out);
// dx = [scale ds, p] [probes; g]; dprobes += (scale ds)^T X into the partial of the task's group of
// chunks (groups fixed by the shapes), the partials summed in group order: deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../host.h"
#include "cpu_common.h"

namespace fused_pool {
namespace {

// A row-major (rows, cols) matrix at `data` with strides (row_stride, col_stride), not owned.
template <typename Acc>
at::Tensor view(const Acc* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  return at::from_blob(const_cast<Acc*>(data), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value));
}

// c (m, n) row-major with leading dimension ldc = a b, or += a b (`accumulate`): ATen's BLAS.
template <typename Acc>
void matmul(const at::Tensor& a, const at::Tensor& b, Acc* c, int64_t ldc, bool accumulate) {
  at::Tensor out = view(c, a.size(0), b.size(1), ldc, 1);
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

constexpr int64_t kMinChunkRows = 128;                 // rows per task of a split sequence, at least
constexpr int64_t kPartialBudget = int64_t{1} << 24;  // Acc elements of (P, H) partials, at most

// Rows per GEMM block: about 512 KiB of float32 rows, so that a block stays in cache between the
// two GEMMs that read it. From the shapes alone (results do not depend on the machine).
inline int64_t block_rows(int64_t hidden) {
  return std::clamp<int64_t>((int64_t{1} << 17) / std::max<int64_t>(hidden, 1), 16, 256);
}

// (P, H) partials allowed: at most 64, within kPartialBudget (from the shapes alone). The forward cuts
// the rows into about this many chunks beyond one per sequence, the backward into this many groups.
int64_t partial_pieces(int64_t num_probes, int64_t hidden) {
  return std::clamp<int64_t>(kPartialBudget / std::max<int64_t>(num_probes * hidden, 1), 1, 64);
}

// Row chunks: sequences longer than chunk_rows are split (their partials merged in order).
std::vector<RowChunk> plan_probe_chunks(const Batch& batch, int64_t num_probes) {
  const Geometry& g = batch.geometry;
  const int64_t pieces = partial_pieces(num_probes, g.hidden);
  return plan_row_chunks(batch, std::max(kMinChunkRows, (g.num_rows + pieces - 1) / pieces));
}

template <typename Acc>
struct Scratch {
  std::vector<Acc> gathered;  // (rows, H) converted rows
  std::vector<Acc> scores;    // (P or 2P, rows): scores / dots, then weights
  std::vector<Acc> coef;      // (2P, rows): backward coefficients [scale ds; p]
  std::vector<Acc> dx;        // (rows, H) before conversion / scatter
  std::vector<int64_t> rows;  // the block's kept rows
};

// A block of kept rows as an Acc matrix: data[i * ld + c] is channel c of row rows[i].
template <typename Acc>
struct RowBlock {
  const Acc* data;
  int64_t ld;
  int64_t count;
  bool consecutive;  // rows[i] = rows[0] + i
};

// The next block of up to `limit` kept rows of [row, last) (row advances past them).
template <typename T, typename Acc>
RowBlock<Acc> next_block(const T* x_seq, const Batch& batch, int64_t seq, int64_t& row, int64_t last, int64_t limit,
                         Scratch<Acc>& scratch) {
  const Geometry& g = batch.geometry;
  scratch.rows.clear();
  for (; row < last && static_cast<int64_t>(scratch.rows.size()) < limit; ++row)
    if (batch.mask.weight<Acc>(seq, row) != Acc(0)) scratch.rows.push_back(row);
  const int64_t count = static_cast<int64_t>(scratch.rows.size());
  const bool consecutive = count > 0 && scratch.rows.back() - scratch.rows.front() == count - 1;
  if constexpr (std::is_same_v<T, Acc>) {
    // BLAS reads rows at a leading dimension >= H: x's own rows when their stride allows.
    if (consecutive && g.stride_h == 1 && (count == 1 || g.stride_row >= g.hidden))
      return {x_seq + scratch.rows.front() * g.stride_row, std::max<int64_t>(g.stride_row, g.hidden), count, true};
  }
  scratch.gathered.resize(count * g.hidden);
  for (int64_t i = 0; i < count; ++i) {
    const T* src = x_seq + scratch.rows[i] * g.stride_row;
    Acc* dst = scratch.gathered.data() + i * g.hidden;
    for (int64_t c = 0; c < g.hidden; ++c) dst[c] = static_cast<Acc>(src[c * g.stride_h]);
  }
  return {scratch.gathered.data(), g.hidden, count, consecutive};
}

// The block's rows as a (count, H) matrix.
template <typename Acc>
at::Tensor rows_of(const RowBlock<Acc>& block, int64_t hidden) {
  return view(block.data, block.count, hidden, block.ld, 1);
}

// dots (n, count) row-major = W (n, H) . X^T: dots[j * count + i] = w_j . x_i.
template <typename Acc>
void block_dots(const RowBlock<Acc>& block, const Acc* w, int64_t n, int64_t hidden, Acc* dots) {
  if (hidden == 0) {
    std::fill(dots, dots + n * block.count, Acc(0));
    return;
  }
  matmul(view(w, n, hidden, hidden, 1), rows_of(block, hidden).t(), dots, block.count, false);
}

// The softmax state of one task over P probes: m, l and acc (P, H) (acc may point into out).
template <typename Acc>
struct ProbeState {
  Acc* m;
  Acc* l;
  Acc* acc;
};

// Online softmax of one chunk into `state` (initialized by the caller).
template <typename T, typename Acc>
void softmax_chunk(const T* x, const Batch& batch, const RowChunk& chunk, const Acc* probes, int64_t num_probes,
                   Acc scale, ProbeState<Acc> state, Scratch<Acc>& scratch) {
  const Geometry& g = batch.geometry;
  const int64_t hidden = g.hidden, limit = block_rows(hidden);
  const T* x_seq = x + chunk.seq * g.stride_b;
  scratch.scores.resize(num_probes * limit);
  for (int64_t row = chunk.first; row < chunk.last;) {
    const RowBlock<Acc> block = next_block(x_seq, batch, chunk.seq, row, chunk.last, limit, scratch);
    const int64_t n = block.count;
    if (n == 0) break;
    Acc* s = scratch.scores.data();
    block_dots(block, probes, num_probes, hidden, s);
    for (int64_t j = 0; j < num_probes; ++j) {
      Acc* s_j = s + j * n;
      Acc best = -INFINITY;
      for (int64_t i = 0; i < n; ++i) {
        s_j[i] *= scale;
        best = max_keeping_nan(best, s_j[i]);
      }
      Acc& m = state.m[j];
      if (!(best <= m)) {  // a new max (or NaN, which propagates)
        const Acc alpha = exp_diff(m, best);
        state.l[j] *= alpha;
        Acc* acc_j = state.acc + j * hidden;
        for (int64_t c = 0; c < hidden; ++c) acc_j[c] *= alpha;
        m = best;
      }
      // p = 0 for s = -inf, yet multiplied in: a NaN x of a kept row still reaches out, as in sum(p x).
      Acc total = 0;
      for (int64_t i = 0; i < n; ++i) {
        s_j[i] = exp_diff(s_j[i], m);
        total += s_j[i];
      }
      state.l[j] += total;
    }
    if (hidden > 0) matmul(view<Acc>(s, num_probes, n, n, 1), rows_of(block, hidden), state.acc, hidden, true);
  }
}

// out = acc / l (0 where l == 0: an empty probe; NaN where l is NaN), in place when acc is out.
template <typename Acc>
void write_probes(const ProbeState<Acc>& state, Acc* out, Acc* stats, int64_t num_probes, int64_t hidden) {
  for (int64_t j = 0; j < num_probes; ++j) {
    const Acc l = state.l[j];
    for (int64_t c = 0; c < hidden; ++c) out[j * hidden + c] = l != Acc(0) ? state.acc[j * hidden + c] / l : Acc(0);
    stats[2 * j] = state.m[j];
    stats[2 * j + 1] = l;
  }
}

template <typename Acc>
struct ChunkPartial {
  std::vector<Acc> m, l, acc;
  ProbeState<Acc> state() { return {m.data(), l.data(), acc.data()}; }
};

template <typename T, typename Acc>
void probe_forward_kernel(const at::Tensor& x, const Batch& batch, const Acc* probes, int64_t num_probes, Acc scale,
                          at::Tensor& out, at::Tensor& stats) {
  const Geometry& g = batch.geometry;
  const int64_t P = num_probes, hidden = g.hidden;
  const std::vector<RowChunk> chunks = plan_probe_chunks(batch, P);
  const T* x_ptr = x.const_data_ptr<T>();
  Acc* out_ptr = out.mutable_data_ptr<Acc>();
  Acc* stats_ptr = stats.mutable_data_ptr<Acc>();
  std::vector<ChunkPartial<Acc>> parts(chunks.size());
  const int64_t work = g.num_rows * hidden * P;
  parallel_tasks<Scratch<Acc>>(static_cast<int64_t>(chunks.size()), work, [&](int64_t task, Scratch<Acc>& scratch) {
    const RowChunk& chunk = chunks[task];
    ChunkPartial<Acc>& part = parts[task];
    part.m.assign(P, -INFINITY);
    part.l.assign(P, Acc(0));
    ProbeState<Acc> state = part.state();
    Acc* out_seq = out_ptr + chunk.seq * P * hidden;
    if (chunk.whole_sequence) {
      state.acc = out_seq;  // accumulated in place
      std::fill(out_seq, out_seq + P * hidden, Acc(0));
    } else {
      part.acc.assign(P * hidden, Acc(0));
      state.acc = part.acc.data();
    }
    softmax_chunk(x_ptr, batch, chunk, probes, P, scale, state, scratch);
    if (chunk.whole_sequence) write_probes(state, out_seq, stats_ptr + chunk.seq * P * 2, P, hidden);
  });
  // Merge the chunks of split sequences in row order.
  const std::vector<int64_t> starts = split_sequence_starts(chunks);
  parallel_tasks<int>(static_cast<int64_t>(starts.size()), work, [&](int64_t task, int&) {
    const size_t first = starts[task];
    const int64_t seq = chunks[first].seq;
    ChunkPartial<Acc>& total = parts[first];
    for (size_t c = first + 1; c < chunks.size() && chunks[c].seq == seq; ++c) {
      for (int64_t j = 0; j < P; ++j) {
        Acc alpha, beta;
        total.m[j] = merged_max(total.m[j], parts[c].m[j], alpha, beta);
        total.l[j] = total.l[j] * alpha + parts[c].l[j] * beta;
        for (int64_t k = j * hidden; k < (j + 1) * hidden; ++k)
          total.acc[k] = total.acc[k] * alpha + parts[c].acc[k] * beta;
      }
    }
    write_probes(total.state(), out_ptr + seq * P * hidden, stats_ptr + seq * P * 2, P, hidden);
  });
}

std::tuple<at::Tensor, at::Tensor> probe_attention_fwd_cpu(const at::Tensor& x, const at::Tensor& probes,
                                                           const std::optional<at::Tensor>& mask,
                                                           const std::optional<at::Tensor>& cu_seqlens,
                                                           std::optional<int64_t> max_seqlen, double scale) {
  check_probe_attention_forward(at::kCPU, x, probes, mask, cu_seqlens, max_seqlen);  // max_seqlen: unused
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const int64_t num_probes = probes.size(0);
  at::Tensor out = at::empty({g.num_seqs, num_probes, g.hidden}, x.options().dtype(acc));
  at::Tensor stats = at::empty({g.num_seqs, num_probes, 2}, x.options().dtype(acc));
  const at::Tensor probes_acc = probes.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "probe_attention_fwd_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    probe_forward_kernel<scalar_t, Acc>(x, batch, probes_acc.const_data_ptr<Acc>(), num_probes,
                                        static_cast<Acc>(scale), out, stats);
  });
  return {out, stats};
}

// Contiguous runs of chunks with about equal rows, at most `pieces` of them (from the shapes alone):
// each group sums its dprobes terms into one partial, in chunk order.
std::vector<int64_t> group_starts(const std::vector<RowChunk>& chunks, int64_t pieces) {
  int64_t total = 0;
  for (const RowChunk& c : chunks) total += c.last - c.first;
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(pieces, static_cast<int64_t>(chunks.size())));
  std::vector<int64_t> starts{0};
  int64_t seen = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const int64_t next = static_cast<int64_t>(starts.size());
    if (i > 0 && next < groups && seen * groups >= total * next) starts.push_back(i);
    seen += chunks[i].last - chunks[i].first;
  }
  starts.push_back(static_cast<int64_t>(chunks.size()));
  return starts;
}

// Inputs of the backward shared by every task.
template <typename Acc>
struct BackwardInputs {
  const Acc* weights;  // (B, 2P, H): per sequence [probes; grad_out]
  const Acc* g_out;    // (B, P): g_p . out_p
  const Acc* stats;    // (B, P, 2)
  int64_t num_probes;
  Acc scale;
};

// One chunk's dx rows and its dprobes terms (added to dprobes, (P, H)).
template <typename T, typename Acc>
void backward_chunk(const T* x, T* dx, const Batch& batch, const RowChunk& chunk, const BackwardInputs<Acc>& in,
                    Acc* dprobes, Scratch<Acc>& scratch) {
  const Geometry& g = batch.geometry;
  const int64_t P = in.num_probes, hidden = g.hidden, limit = block_rows(hidden);
  const T* x_seq = x + chunk.seq * g.stride_b;
  const Acc* w = in.weights + chunk.seq * 2 * P * hidden;
  const Acc* stats = in.stats + chunk.seq * P * 2;
  const Acc* g_out = in.g_out + chunk.seq * P;
  // dx rows: b * L + l padded, t varlen (dx is contiguous).
  T* dx_seq = dx + (g.varlen ? 0 : chunk.seq * g.seq_len * hidden);
  scratch.scores.resize(2 * P * limit);
  scratch.coef.resize(2 * P * limit);
  for (int64_t row = chunk.first; row < chunk.last;) {
    const int64_t from = row;
    const RowBlock<Acc> block = next_block(x_seq, batch, chunk.seq, row, chunk.last, limit, scratch);
    const int64_t n = block.count;
    // Rows the mask drops get zero gradients (every row of [from, row) not in the block).
    for (int64_t r = from, k = 0; r < row; ++r) {
      if (k < n && scratch.rows[k] == r) {
        ++k;
      } else {
        std::fill(dx_seq + r * hidden, dx_seq + (r + 1) * hidden, T(0));
      }
    }
    if (n == 0) continue;
    Acc* dots = scratch.scores.data();  // (2P, n): x . probes, then x . g
    Acc* coef = scratch.coef.data();    // (2P, n): scale ds, then p (matching W's rows)
    block_dots(block, w, 2 * P, hidden, dots);
    for (int64_t j = 0; j < P; ++j) {
      const Acc m = stats[2 * j], l = stats[2 * j + 1];
      Acc* c_ds = coef + j * n;
      Acc* c_p = coef + (P + j) * n;
      if (l == Acc(0)) {  // an empty probe: zero gradients, whatever x or scale hold
        std::fill(c_ds, c_ds + n, Acc(0));
        std::fill(c_p, c_p + n, Acc(0));
        continue;
      }
      for (int64_t i = 0; i < n; ++i) {
        const Acc p = softmax_weight(in.scale * dots[j * n + i], m, l);
        c_p[i] = p;
        c_ds[i] = in.scale * (p * (dots[(P + j) * n + i] - g_out[j]));
      }
    }
    if (hidden == 0) continue;
    // dx (n, H) = coef^T (n, 2P) . W (2P, H): straight into dx when the rows are consecutive.
    const bool direct = std::is_same_v<T, Acc> && block.consecutive;
    Acc* dst = direct ? reinterpret_cast<Acc*>(dx_seq + scratch.rows.front() * hidden) : nullptr;
    if (!direct) {
      scratch.dx.resize(n * hidden);
      dst = scratch.dx.data();
    }
    matmul(view<Acc>(coef, n, 2 * P, 1, n), view(w, 2 * P, hidden, hidden, 1), dst, hidden, false);
    if (!direct) {
      for (int64_t i = 0; i < n; ++i) {
        T* out_row = dx_seq + scratch.rows[i] * hidden;
        const Acc* src = dst + i * hidden;
        for (int64_t c = 0; c < hidden; ++c) out_row[c] = static_cast<T>(src[c]);
      }
    }
    // dprobes (P, H) += (scale ds) (P, n) . X (n, H).
    matmul(view<Acc>(coef, P, n, n, 1), rows_of(block, hidden), dprobes, hidden, true);
  }
}

// Whether varlen segments (clamped) cover [0, T) exactly once, in order: then every dx row is
// written by exactly one task. Otherwise (gaps, overlaps of malformed cu_seqlens) dx starts at zero
// and the tasks run one after another.
bool segments_tile_rows(const Batch& batch) {
  const Geometry& g = batch.geometry;
  if (!g.varlen) return true;
  int64_t expected = 0;
  for (int64_t seq = 0; seq < g.num_seqs; ++seq) {
    int64_t start, end;
    segment_bounds(batch.cu_seqlens, seq, g.num_rows, start, end);
    if (start != expected) return false;
    expected = end;
  }
  return expected == g.num_rows;
}

template <typename T, typename Acc>
void probe_backward_kernel(const at::Tensor& x, at::Tensor& dx, const Batch& batch, const BackwardInputs<Acc>& in,
                           at::Tensor& parts, const std::vector<RowChunk>& chunks, const std::vector<int64_t>& starts,
                           bool serial) {
  const Geometry& g = batch.geometry;
  const int64_t P = in.num_probes, hidden = g.hidden;
  const T* x_ptr = x.const_data_ptr<T>();
  T* dx_ptr = dx.mutable_data_ptr<T>();
  Acc* parts_ptr = parts.mutable_data_ptr<Acc>();
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  const int64_t work = serial ? 0 : g.num_rows * hidden * P;
  parallel_tasks<Scratch<Acc>>(groups, work, [&](int64_t group, Scratch<Acc>& scratch) {
    Acc* dprobes = parts_ptr + group * P * hidden;
    std::fill(dprobes, dprobes + P * hidden, Acc(0));
    for (int64_t c = starts[group]; c < starts[group + 1]; ++c)
      backward_chunk(x_ptr, dx_ptr, batch, chunks[c], in, dprobes, scratch);
  });
}

std::tuple<at::Tensor, at::Tensor> probe_attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                           const at::Tensor& probes,
                                                           const std::optional<at::Tensor>& mask,
                                                           const std::optional<at::Tensor>& cu_seqlens,
                                                           const at::Tensor& out, const at::Tensor& stats,
                                                           double scale) {
  check_probe_attention_backward(at::kCPU, grad_out, x, probes, mask, cu_seqlens, out, stats);
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const int64_t P = probes.size(0);
  const bool tiled = segments_tile_rows(batch);
  at::Tensor dx = tiled ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                        : at::zeros(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (g.num_seqs == 0 || g.num_rows == 0) return {dx.zero_(), at::zeros_like(probes)};
  const at::Tensor probes_acc = probes.to(acc).contiguous();
  const at::Tensor grad = grad_out.to(acc).contiguous();
  // Per sequence [probes; g] (B, 2P, H) for one GEMM, and g_p . out_p (B, P).
  const at::Tensor weights = at::cat({probes_acc.expand({g.num_seqs, P, g.hidden}), grad}, 1).contiguous();
  const at::Tensor g_out = (grad * out).sum(-1).contiguous();
  const at::Tensor stats_c = stats.contiguous();
  const std::vector<RowChunk> chunks = plan_probe_chunks(batch, P);
  const std::vector<int64_t> starts = group_starts(chunks, partial_pieces(P, g.hidden));
  at::Tensor parts = at::empty({static_cast<int64_t>(starts.size()) - 1, P, g.hidden}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "probe_attention_bwd_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const BackwardInputs<Acc> in{weights.const_data_ptr<Acc>(), g_out.const_data_ptr<Acc>(),
                                 stats_c.const_data_ptr<Acc>(), P, static_cast<Acc>(scale)};
    probe_backward_kernel<scalar_t, Acc>(x, dx, batch, in, parts, chunks, starts, !tiled);
  });
  // Group partials summed in group order: deterministic.
  return {dx, parts.sum(0).to(probes.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool, CPU, m) {
  m.impl("ext_probe_attention_fwd", &probe_attention_fwd_cpu);
  m.impl("ext_probe_attention_bwd", &probe_attention_bwd_cpu);
}

}  // namespace fused_pool
