// CPU span_pool (mean / max / mean_max over token spans of x (T, H)), forward and backward.
//
// Forward: the pool reduction (reduce_rows.h) with each span as a sequence of its clamped tokens
// [start', end'): tasks over (span, channel block), in parallel; spans much longer than the average
// (by the shapes alone, never the thread count) are split and their partials combined in token order.
// argmax holds the maximum's index within its clamped span (t - start').
// Backward: deterministic without atomics: tasks over token blocks, each adding, for the spans that
// intersect it in increasing span order, w_t g_s / den_s (mean) and g_s where argmax == t - start'_s
// (max), then writing each dx row of its block once (0 for tokens in no span or not kept).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../host.h"
#include "cpu_common.h"
#include "reduce_rows.h"

namespace fused_pool {
namespace {

// Whole spans, or chunks of the spans longer than chunk_rows = max(2048, total / 64) where total is
// the sum of the clamped span lengths: at most 64 spans are split, so few partials are kept.
// `total` returns that sum (the rows the forward reads).
std::vector<RowChunk> plan_span_chunks(const SpanBatch& spans, int64_t& total) {
  const Geometry& g = spans.tokens.geometry;
  total = 0;
  for (int64_t s = 0; s < g.num_seqs; ++s) {
    int64_t start, end;
    span_bounds(spans.spans, s, g.num_rows, start, end);
    total += end - start;
  }
  const int64_t chunk_rows = std::max<int64_t>(2048, (total + 63) / 64);
  std::vector<RowChunk> chunks;
  chunks.reserve(g.num_seqs);
  for (int64_t s = 0; s < g.num_seqs; ++s) {
    int64_t start, end;
    span_bounds(spans.spans, s, g.num_rows, start, end);
    if (end - start <= chunk_rows) {
      chunks.push_back({s, start, end, start, true});
      continue;
    }
    for (int64_t first = start; first < end; first += chunk_rows)
      chunks.push_back({s, first, std::min(first + chunk_rows, end), start, false});
  }
  return chunks;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> span_fwd_cpu(const at::Tensor& x, const at::Tensor& spans,
                                                             const std::optional<at::Tensor>& mask, int64_t mode) {
  check_span_forward(at::kCPU, x, spans, mask, mode);
  const SpanBatch batch = make_span_batch(x.sizes(), x.strides(), spans, mask);
  const Geometry& g = batch.tokens.geometry;
  PoolOutputs o = pool_outputs(x, g.num_seqs, g.hidden, mode);
  if (g.num_seqs == 0 || g.hidden == 0) return {o.out, o.den.zero_(), o.argmax.fill_(-1)};
  int64_t total = 0;
  const std::vector<RowChunk> chunks = plan_span_chunks(batch, total);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "span_fwd_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    reduce_chunks<scalar_t, Acc, scalar_t>(x, batch.tokens, chunks, total * g.hidden, o.mode, false, o.out, o.den,
                                           o.argmax);
  });
  return {o.out, o.den, o.argmax};
}

// The spans intersecting each block of `rows` tokens, in increasing span order (CSR: block b's are
// spans[offsets[b], offsets[b + 1])). Empty spans are in no block.
struct BlockSpans {
  int64_t rows;
  int64_t count;
  std::vector<int64_t> offsets;
  std::vector<int64_t> spans;
};

BlockSpans spans_by_block(const SpanBatch& batch, int64_t rows) {
  const Geometry& g = batch.tokens.geometry;
  BlockSpans blocks{rows, (g.num_rows + rows - 1) / rows, {}, {}};
  blocks.offsets.assign(blocks.count + 1, 0);
  for (int64_t s = 0; s < g.num_seqs; ++s) {
    int64_t start, end;
    span_bounds(batch.spans, s, g.num_rows, start, end);
    if (start == end) continue;
    for (int64_t b = start / rows; b <= (end - 1) / rows; ++b) ++blocks.offsets[b + 1];
  }
  for (int64_t b = 0; b < blocks.count; ++b) blocks.offsets[b + 1] += blocks.offsets[b];
  blocks.spans.resize(blocks.offsets[blocks.count]);
  std::vector<int64_t> cursor(blocks.offsets.begin(), blocks.offsets.end() - 1);
  for (int64_t s = 0; s < g.num_seqs; ++s) {
    int64_t start, end;
    span_bounds(batch.spans, s, g.num_rows, start, end);
    if (start == end) continue;
    for (int64_t b = start / rows; b <= (end - 1) / rows; ++b) blocks.spans[cursor[b]++] = s;
  }
  return blocks;
}

// dx = acc converted to T over n elements.
template <typename T, typename Acc>
FP_CPU_CLONES void store_rows(T* __restrict dx, const Acc* __restrict acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = static_cast<T>(acc[i]);
}

template <typename T, typename Acc>
void span_backward_kernel(const at::Tensor& grad, const SpanBatch& batch, const at::Tensor& den,
                          const at::Tensor& argmax, int mode, at::Tensor& dx) {
  const Geometry& g = batch.tokens.geometry;
  const MaskView& mask = batch.tokens.mask;
  const int64_t hidden = g.hidden;
  const int64_t grad_stride = hidden * (mode == (kMean | kMax) ? 2 : 1);
  const Acc* g_ptr = grad.const_data_ptr<Acc>();
  const Acc* den_ptr = (mode & kMean) ? den.const_data_ptr<Acc>() : nullptr;
  const int32_t* argmax_ptr = (mode & kMax) ? argmax.const_data_ptr<int32_t>() : nullptr;
  T* dx_ptr = dx.mutable_data_ptr<T>();
  const BlockSpans blocks = spans_by_block(batch, row_grain(hidden));
  parallel_tasks<std::vector<Acc>>(blocks.count, g.num_rows * hidden, [&](int64_t block, std::vector<Acc>& acc) {
    const int64_t b0 = block * blocks.rows;
    const int64_t b1 = std::min(b0 + blocks.rows, g.num_rows);
    acc.assign((b1 - b0) * hidden, Acc(0));
    for (int64_t e = blocks.offsets[block]; e < blocks.offsets[block + 1]; ++e) {
      const int64_t s = blocks.spans[e];
      int64_t start, end;
      span_bounds(batch.spans, s, g.num_rows, start, end);
      const int64_t lo = std::max(start, b0), hi = std::min(end, b1);
      const Acc* g_row = g_ptr + s * grad_stride;
      if ((mode & kMean) && den_ptr[s] != Acc(0)) {
        for (int64_t t = lo; t < hi; ++t) {
          const Acc w = mask.weight<Acc>(0, t);
          if (w != Acc(0)) add_weighted_row(acc.data() + (t - b0) * hidden, g_row, w / den_ptr[s], hidden);
        }
      }
      if (mode & kMax) {
        const Acc* g_max = g_row + ((mode & kMean) ? hidden : 0);
        const int32_t* winner = argmax_ptr + s * hidden;
        for (int64_t h = 0; h < hidden; ++h) {
          const int64_t t = start + winner[h];  // the maximum's token; in this block and kept, or skipped
          if (winner[h] < 0 || t < lo || t >= hi || mask.weight<Acc>(0, t) == Acc(0)) continue;
          acc[(t - b0) * hidden + h] += g_max[h];
        }
      }
    }
    store_rows(dx_ptr + b0 * hidden, acc.data(), (b1 - b0) * hidden);
  });
}

at::Tensor span_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& spans, const std::optional<at::Tensor>& mask,
                        const at::Tensor& den, const at::Tensor& argmax, at::IntArrayRef x_shape,
                        at::ScalarType x_dtype, int64_t mode) {
  check_span_backward(at::kCPU, grad_out, spans, mask, den, argmax, x_shape, x_dtype, mode);
  at::Tensor dx = at::empty(x_shape, grad_out.options().dtype(x_dtype));
  if (dx.numel() == 0) return dx;
  if (spans.size(0) == 0) return dx.zero_();
  const SpanBatch batch = make_span_batch(dx.sizes(), dx.strides(), spans, mask);
  const at::Tensor grad = grad_out.to(accumulation_type(x_dtype)).contiguous();
  const at::Tensor den_c = den.contiguous(), argmax_c = argmax.contiguous();  // indexed as contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "span_bwd_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    span_backward_kernel<scalar_t, Acc>(grad, batch, den_c, argmax_c, static_cast<int>(mode), dx);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool, CPU, m) {
  m.impl("ext_span_fwd", &span_fwd_cpu);
  m.impl("ext_span_bwd", &span_bwd_cpu);
}

}  // namespace fused_pool
