// CPU attention_pool and query_attention_pool, forward and backward.
//
// Forward: a task runs an online softmax over a range of rows of one sequence for one head: running
// max m, running sum l and an accumulator of p * x over the head's channels, rescaled when m grows;
// scores are read (attention_pool) or computed from the row already loaded (query mode). Long
// sequences are split into chunks (planned from the shapes alone) merged in row order. Output:
// float32 out and (m, l) per (sequence, head).
// A NaN or +inf kept score makes l NaN, hence out and every gradient of the head NaN, as
// torch.softmax does; l == 0 (every kept score -inf) is an empty head: 0, zero gradients.
// Backward, per row and head: p = exp(s - m) / l; ds = p * g . (x - out); dx = p * g (+ ds * scale * q);
// dquery is summed from per-block partials in block order. Every row of dx is written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../host.h"
#include "cpu_common.h"

namespace fused_pool {
namespace {

// The reductions below are vectorized (`omp simd reduction`): their summation order follows the
// vector width of the machine, fixed for a given machine, so results stay deterministic.
template <typename T, typename Acc>
FP_CPU_CLONES Acc dot_row(const T* __restrict x, const Acc* __restrict q, int64_t n) {
  Acc total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += static_cast<Acc>(x[i]) * q[i];
  return total;
}

// sum of g * (x - out): subtracting first keeps ds exact where it is 0 (a row that takes all weight).
template <typename T, typename Acc>
FP_CPU_CLONES Acc dot_minus_out(const Acc* __restrict g, const T* __restrict x, const Acc* __restrict out, int64_t n) {
  Acc total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += g[i] * (static_cast<Acc>(x[i]) - out[i]);
  return total;
}

template <typename Acc>
FP_CPU_CLONES void scale_row(Acc* __restrict acc, Acc alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] *= alpha;
}

// dx = p * g, returning sum of g * (x - out) from the same pass (attention_pool: ds needs no dx).
template <typename T, typename Acc>
FP_CPU_CLONES Acc scaled_grad_and_dot(T* __restrict dx, const Acc* __restrict g, Acc p, const T* __restrict x,
                                      const Acc* __restrict out, int64_t n) {
  Acc total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    total += g[i] * (static_cast<Acc>(x[i]) - out[i]);
    dx[i] = static_cast<T>(p * g[i]);
  }
  return total;
}

// dx = p * g + c * q.
template <typename T, typename Acc>
FP_CPU_CLONES void attention_grad_row(T* __restrict dx, const Acc* __restrict g, Acc p, const Acc* __restrict q, Acc c,
                                      int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = static_cast<T>(p * g[i] + c * q[i]);
}

// Where the score of (sequence, row, head) comes from.
template <typename Acc>
struct Scores {
  const Acc* scores = nullptr;  // (B, L, nh) / (T, nh) contiguous, attention_pool
  const Acc* query = nullptr;   // (nh, D) contiguous, query mode (null when D = 0: no pointer test)
  bool from_query = false;
  Acc scale = 1;
  int64_t num_heads = 1;
  int64_t head_dim = 0;
};

template <typename T, typename Acc>
Acc score_of(const Scores<Acc>& sc, const T* x_head, int64_t score_row, int64_t head) {
  if (sc.from_query) return sc.scale * dot_row(x_head, sc.query + head * sc.head_dim, sc.head_dim);
  return sc.scores[score_row * sc.num_heads + head];
}

template <typename Acc>
struct SoftmaxPartial {
  Acc m = -INFINITY;
  Acc l = 0;
  std::vector<Acc> acc;
};

template <typename T, typename Acc>
void softmax_rows(const T* x, const Batch& batch, const Scores<Acc>& sc, const RowChunk& chunk, int64_t head,
                  SoftmaxPartial<Acc>& part, std::vector<T>& gathered) {
  const Geometry& g = batch.geometry;
  const int64_t d = sc.head_dim;
  part.acc.assign(d, Acc(0));
  std::vector<Acc> block(d, Acc(0));  // p * x and p of the latest rows, relative to the same max m
  Acc block_l = 0;
  int64_t in_block = 0;
  const T* x_seq = x + chunk.seq * g.stride_b + head * d * g.stride_h;
  for (int64_t row = chunk.first; row < chunk.last; ++row) {
    if (batch.mask.weight<Acc>(chunk.seq, row) == Acc(0)) continue;  // padding: never read
    const int64_t token = chunk.seq * g.seq_len + row;  // flat row: b * L + l padded, t varlen
    const T* values = contiguous_slice(x_seq + row * g.stride_row, g.stride_h, d, gathered);
    const Acc s = score_of(sc, values, token, head);
    if (!(s <= part.m)) {  // a new max (or NaN, which propagates)
      const Acc alpha = exp_diff(part.m, s);
      part.l *= alpha;
      block_l *= alpha;
      scale_row(part.acc.data(), alpha, d);
      scale_row(block.data(), alpha, d);
      part.m = s;
    }
    // 0 for s = -inf, yet added: a NaN x of the row still reaches out, as in sum(p * x); a NaN or
    // +inf score makes p and l NaN (exp(NaN), exp(inf - inf)), as torch.softmax does.
    const Acc p = exp_diff(s, part.m);
    block_l += p;
    add_weighted_row(block.data(), values, p, d);
    if (++in_block == kSumBlockRows) {
      flush_block(part.acc.data(), block.data(), d);
      part.l += block_l;
      block_l = 0;
      in_block = 0;
    }
  }
  flush_block(part.acc.data(), block.data(), d);
  part.l += block_l;
}

template <typename Acc>
void merge_softmax(SoftmaxPartial<Acc>& into, const SoftmaxPartial<Acc>& part) {
  Acc alpha, beta;
  into.m = merged_max(into.m, part.m, alpha, beta);
  into.l = into.l * alpha + part.l * beta;
  for (size_t i = 0; i < into.acc.size(); ++i) into.acc[i] = into.acc[i] * alpha + part.acc[i] * beta;
}

template <typename Acc>
void write_softmax(Acc* out, Acc* stats, const SoftmaxPartial<Acc>& part, int64_t seq, int64_t head, int64_t hidden,
                   int64_t num_heads) {
  const int64_t d = static_cast<int64_t>(part.acc.size());
  Acc* out_head = out + seq * hidden + head * d;
  // l == 0: every kept score -inf (an empty head); a NaN l (NaN or +inf score) gives NaN.
  for (int64_t i = 0; i < d; ++i) out_head[i] = part.l != Acc(0) ? part.acc[i] / part.l : Acc(0);
  stats[(seq * num_heads + head) * 2] = part.m;
  stats[(seq * num_heads + head) * 2 + 1] = part.l;
}

template <typename T, typename Acc>
void attention_forward_kernel(const at::Tensor& x, const Batch& batch, const Scores<Acc>& sc, at::Tensor& out,
                              at::Tensor& stats) {
  const Geometry& g = batch.geometry;
  const std::vector<RowChunk> chunks = plan_row_chunks(batch);
  const T* x_ptr = x.const_data_ptr<T>();
  Acc* out_ptr = out.mutable_data_ptr<Acc>();
  Acc* stats_ptr = stats.mutable_data_ptr<Acc>();
  const int64_t heads = sc.num_heads;
  std::vector<SoftmaxPartial<Acc>> parts(chunks.size() * heads);
  const int64_t work = g.num_rows * g.hidden;
  parallel_tasks<std::vector<T>>(static_cast<int64_t>(parts.size()), work, [&](int64_t task, std::vector<T>& gathered) {
    const RowChunk& chunk = chunks[task / heads];
    softmax_rows(x_ptr, batch, sc, chunk, task % heads, parts[task], gathered);
    if (chunk.whole_sequence) write_softmax(out_ptr, stats_ptr, parts[task], chunk.seq, task % heads, g.hidden, heads);
  });
  // Merge the chunks of split sequences in row order.
  const std::vector<int64_t> starts = split_sequence_starts(chunks);
  parallel_tasks<int>(static_cast<int64_t>(starts.size()) * heads, work, [&](int64_t task, int&) {
    const int64_t first = starts[task / heads], head = task % heads, seq = chunks[first].seq;
    SoftmaxPartial<Acc> total;
    total.acc.assign(sc.head_dim, Acc(0));
    for (size_t c = first; c < chunks.size() && chunks[c].seq == seq; ++c) merge_softmax(total, parts[c * heads + head]);
    write_softmax(out_ptr, stats_ptr, total, seq, head, g.hidden, heads);
  });
}

template <typename Acc>
Scores<Acc> make_scores(const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& query, double scale,
                        int64_t hidden, int64_t num_heads) {
  Scores<Acc> sc;
  sc.scores = scores.has_value() ? scores->const_data_ptr<Acc>() : nullptr;
  sc.query = query.has_value() ? query->const_data_ptr<Acc>() : nullptr;
  sc.from_query = query.has_value();
  sc.scale = static_cast<Acc>(scale);
  sc.num_heads = num_heads;
  sc.head_dim = num_heads > 0 ? hidden / num_heads : 0;
  return sc;
}

// scores (B, L, nh) / (T, nh) or query (nh, D), as contiguous tensors in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu_impl(const at::Tensor& x, const std::optional<at::Tensor>& scores,
                                                          const std::optional<at::Tensor>& query,
                                                          const std::optional<at::Tensor>& mask,
                                                          const std::optional<at::Tensor>& cu_seqlens, double scale) {
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const int64_t num_heads = query.has_value() ? query->size(0) : scores->size(-1);
  at::Tensor out = at::empty({g.num_seqs, g.hidden}, x.options().dtype(acc));
  at::Tensor stats = at::empty({g.num_seqs, num_heads, 2}, x.options().dtype(acc));
  const std::optional<at::Tensor> scores_acc =
      scores.has_value() ? std::optional<at::Tensor>(scores->to(acc).contiguous()) : std::nullopt;
  const std::optional<at::Tensor> query_acc =
      query.has_value() ? std::optional<at::Tensor>(query->to(acc).contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_fwd_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Scores<Acc> sc = make_scores<Acc>(scores_acc, query_acc, scale, g.hidden, num_heads);
    attention_forward_kernel<scalar_t, Acc>(x, batch, sc, out, stats);
  });
  return {out, stats};
}

constexpr int64_t kBackwardBlockRows = 256;  // rows per dquery partial (fixed: deterministic sum)

template <typename T, typename Acc>
void attention_backward_kernel(const at::Tensor& grad, const at::Tensor& x, const Batch& batch, const at::Tensor& out,
                               const at::Tensor& stats, const Scores<Acc>& sc, at::Tensor& dx, Acc* dscores,
                               Acc* dquery_parts) {
  const Geometry& g = batch.geometry;
  const int64_t heads = sc.num_heads, d = sc.head_dim, hidden = g.hidden;
  const T* x_ptr = x.const_data_ptr<T>();
  const Acc* g_ptr = grad.const_data_ptr<Acc>();
  const Acc* out_ptr = out.const_data_ptr<Acc>();
  const Acc* stats_ptr = stats.const_data_ptr<Acc>();
  T* dx_ptr = dx.mutable_data_ptr<T>();
  const int64_t num_blocks = (g.num_rows + kBackwardBlockRows - 1) / kBackwardBlockRows;
  // Blocks differ in work (padding rows only write zeros): each thread takes the next block.
  parallel_tasks<std::vector<T>>(num_blocks, g.num_rows * hidden, [&](int64_t block, std::vector<T>& gathered) {
    Acc* dq = dquery_parts != nullptr ? dquery_parts + block * hidden : nullptr;
    if (dq != nullptr) std::fill(dq, dq + hidden, Acc(0));
    const int64_t last = std::min(g.num_rows, (block + 1) * kBackwardBlockRows);
    for (int64_t row = block * kBackwardBlockRows; row < last; ++row) {
      const RowPlace place = locate_row(g, batch.cu_seqlens, row);
      const int64_t seq = place.seq;
      const bool kept = place.inside && batch.mask.weight<Acc>(seq, place.position) != Acc(0);
      T* dx_row = dx_ptr + row * hidden;
      if (!kept) {
        std::fill(dx_row, dx_row + hidden, T(0));
        if (dscores != nullptr) std::fill(dscores + row * heads, dscores + (row + 1) * heads, Acc(0));
        continue;
      }
      const T* x_row = x_ptr + seq * g.stride_b + place.position * g.stride_row;
      for (int64_t head = 0; head < heads; ++head) {
        const Acc* stat = stats_ptr + (seq * heads + head) * 2;
        if (stat[1] == Acc(0)) {  // an empty head: zero gradients, whatever x or scale hold
          std::fill(dx_row + head * d, dx_row + (head + 1) * d, T(0));
          if (dscores != nullptr) dscores[row * heads + head] = Acc(0);
          continue;
        }
        const T* values = contiguous_slice(x_row + head * d * g.stride_h, g.stride_h, d, gathered);
        const Acc p = softmax_weight(score_of(sc, values, row, head), stat[0], stat[1]);
        const Acc* g_head = g_ptr + seq * hidden + head * d;
        const Acc* out_head = out_ptr + seq * hidden + head * d;
        if (dq != nullptr) {  // query mode: dx needs ds, so ds comes first
          const Acc ds = p * dot_minus_out(g_head, values, out_head, d);
          attention_grad_row(dx_row + head * d, g_head, p, sc.query + head * d, ds * sc.scale, d);
          add_weighted_row(dq + head * d, values, ds * sc.scale, d);
        } else {
          dscores[row * heads + head] = p * scaled_grad_and_dot(dx_row + head * d, g_head, p, values, out_head, d);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_bwd_cpu_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const std::optional<at::Tensor>& scores,
                                                          const std::optional<at::Tensor>& query,
                                                          const std::optional<at::Tensor>& mask,
                                                          const std::optional<at::Tensor>& cu_seqlens,
                                                          const at::Tensor& out, const at::Tensor& stats, double scale) {
  const at::Tensor& other = query.has_value() ? *query : *scores;
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const int64_t num_heads = stats.size(1);
  if (g.num_rows == 0 || g.hidden == 0 || g.num_seqs == 0) return {dx.zero_(), at::zeros_like(other)};
  const at::Tensor grad = grad_out.to(acc).contiguous();
  const at::Tensor out_c = out.contiguous(), stats_c = stats.contiguous();  // indexed as contiguous
  at::Tensor dscores = at::empty({query.has_value() ? 0 : g.num_rows * num_heads}, x.options().dtype(acc));
  const int64_t num_blocks = (g.num_rows + kBackwardBlockRows - 1) / kBackwardBlockRows;
  at::Tensor dquery_parts = at::empty({query.has_value() ? num_blocks : 0, g.hidden}, x.options().dtype(acc));
  const std::optional<at::Tensor> scores_acc =
      scores.has_value() ? std::optional<at::Tensor>(scores->to(acc).contiguous()) : std::nullopt;
  const std::optional<at::Tensor> query_acc =
      query.has_value() ? std::optional<at::Tensor>(query->to(acc).contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_bwd_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const Scores<Acc> sc = make_scores<Acc>(scores_acc, query_acc, scale, g.hidden, num_heads);
    attention_backward_kernel<scalar_t, Acc>(grad, x, batch, out_c, stats_c, sc, dx,
                                             query.has_value() ? nullptr : dscores.mutable_data_ptr<Acc>(),
                                             query.has_value() ? dquery_parts.mutable_data_ptr<Acc>() : nullptr);
  });
  if (query.has_value()) {
    // Block partials summed in block order: deterministic.
    return {dx, dquery_parts.sum(0).view(query->sizes()).to(query->scalar_type())};
  }
  return {dx, dscores.view(scores->sizes()).to(scores->scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& x, const at::Tensor& scores,
                                                     const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& cu_seqlens,
                                                     std::optional<int64_t> max_seqlen) {
  check_attention_forward(at::kCPU, "fused_pool::ext_attention_fwd", x, scores, std::nullopt, mask, cu_seqlens,
                          max_seqlen);  // max_seqlen: unused, the plan reads the lengths
  return attention_fwd_cpu_impl(x, scores, std::nullopt, mask, cu_seqlens, 1.0);
}

std::tuple<at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& out,
                                                     const at::Tensor& stats) {
  check_attention_backward(at::kCPU, "fused_pool::ext_attention_bwd", grad_out, x, scores, std::nullopt, mask,
                           cu_seqlens, out, stats);
  return attention_bwd_cpu_impl(grad_out, x, scores, std::nullopt, mask, cu_seqlens, out, stats, 1.0);
}

std::tuple<at::Tensor, at::Tensor> query_attention_fwd_cpu(const at::Tensor& x, const at::Tensor& query,
                                                           const std::optional<at::Tensor>& mask,
                                                           const std::optional<at::Tensor>& cu_seqlens,
                                                           std::optional<int64_t> max_seqlen, double scale) {
  check_attention_forward(at::kCPU, "fused_pool::ext_query_attention_fwd", x, std::nullopt, query, mask, cu_seqlens,
                          max_seqlen);
  return attention_fwd_cpu_impl(x, std::nullopt, query, mask, cu_seqlens, scale);
}

std::tuple<at::Tensor, at::Tensor> query_attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                           const at::Tensor& query, const std::optional<at::Tensor>& mask,
                                                           const std::optional<at::Tensor>& cu_seqlens,
                                                           const at::Tensor& out, const at::Tensor& stats, double scale) {
  check_attention_backward(at::kCPU, "fused_pool::ext_query_attention_bwd", grad_out, x, std::nullopt, query, mask,
                           cu_seqlens, out, stats);
  return attention_bwd_cpu_impl(grad_out, x, std::nullopt, query, mask, cu_seqlens, out, stats, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool, CPU, m) {
  m.impl("ext_attention_fwd", &attention_fwd_cpu);
  m.impl("ext_attention_bwd", &attention_bwd_cpu);
  m.impl("ext_query_attention_fwd", &query_attention_fwd_cpu);
  m.impl("ext_query_attention_bwd", &query_attention_bwd_cpu);
}

}  // namespace fused_pool
