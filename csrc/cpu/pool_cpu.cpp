// CPU masked mean / max / mean_max, forward and backward.
//
// Forward: the row reduction of reduce_rows.h (shared with span_cpu.cpp): a task reduces a range of
// rows of one sequence over a range of channels, reading each kept row once into float32
// accumulators. Sequences longer than a chunk (fixed by the shapes alone, never by the thread
// count) are split; their partials are combined in row order.
// Backward: every row of dx is written once, in parallel over rows. argmax holds each maximum's
// index within its sequence (l padded, t - cu_seqlens[b] varlen). In states mode (kStates) the forward
// writes the float32 / float64 partial states: sum(w x) for the mean, not divided by sum(w).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../host.h"
#include "cpu_common.h"
#include "reduce_rows.h"

namespace fused_pool {
namespace {

// dx = scale * g_mean + (argmax == position ? g_max : 0) over n channels (either term optional).
template <typename T, typename Acc>
FP_CPU_CLONES void pool_grad_row(T* __restrict dx, const Acc* __restrict g_mean, Acc scale,
                                 const Acc* __restrict g_max, const int32_t* __restrict argmax,
                                 int32_t position, int64_t n) {
  if (g_mean != nullptr && g_max != nullptr) {
    for (int64_t i = 0; i < n; ++i)
      dx[i] = static_cast<T>(scale * g_mean[i] + (argmax[i] == position ? g_max[i] : Acc(0)));
  } else if (g_mean != nullptr) {
    for (int64_t i = 0; i < n; ++i) dx[i] = static_cast<T>(scale * g_mean[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dx[i] = static_cast<T>(argmax[i] == position ? g_max[i] : Acc(0));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                                             const std::optional<at::Tensor>& cu_seqlens,
                                                             std::optional<int64_t> max_seqlen, int64_t mode) {
  check_pool_forward(at::kCPU, x, mask, cu_seqlens, max_seqlen, mode);  // max_seqlen: unused, the plan reads lengths
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  PoolOutputs o = pool_outputs(x, g.num_seqs, g.hidden, mode);
  const std::vector<RowChunk> chunks = plan_row_chunks(batch);
  const int64_t work = g.num_rows * g.hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_fwd_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    if (o.states) {
      reduce_chunks<scalar_t, Acc, Acc>(x, batch, chunks, work, o.mode, true, o.out, o.den, o.argmax);
    } else {
      reduce_chunks<scalar_t, Acc, scalar_t>(x, batch, chunks, work, o.mode, false, o.out, o.den, o.argmax);
    }
  });
  return {o.out, o.den, o.argmax};
}

template <typename T, typename Acc>
void pool_backward_kernel(const at::Tensor& grad, const Batch& batch, const at::Tensor& den, const at::Tensor& argmax,
                          int mode, at::Tensor& dx) {
  const Geometry& g = batch.geometry;
  const int64_t hidden = g.hidden;
  const Acc* g_ptr = grad.const_data_ptr<Acc>();
  const Acc* den_ptr = (mode & kMean) ? den.const_data_ptr<Acc>() : nullptr;
  const int32_t* argmax_ptr = (mode & kMax) ? argmax.const_data_ptr<int32_t>() : nullptr;
  T* dx_ptr = dx.mutable_data_ptr<T>();
  at::parallel_for(0, g.num_rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* dx_row = dx_ptr + row * hidden;
      const RowPlace place = locate_row(g, batch.cu_seqlens, row);
      const Acc w = place.inside ? batch.mask.weight<Acc>(place.seq, place.position) : Acc(0);
      if (w == Acc(0)) {
        std::fill(dx_row, dx_row + hidden, T(0));
        continue;
      }
      const int64_t seq = place.seq;
      const Acc* g_row = g_ptr + seq * grad.stride(0);
      const Acc scale = (mode & kMean) && den_ptr[seq] != Acc(0) ? w / den_ptr[seq] : Acc(0);
      pool_grad_row(dx_row, (mode & kMean) ? g_row : nullptr, scale,
                    (mode & kMax) ? g_row + ((mode & kMean) ? hidden : 0) : nullptr,
                    (mode & kMax) ? argmax_ptr + seq * hidden : nullptr, static_cast<int32_t>(place.index), hidden);
    }
  });
}

at::Tensor pool_bwd_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& mask,
                        const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& den, const at::Tensor& argmax,
                        at::IntArrayRef x_shape, at::ScalarType x_dtype, int64_t mode) {
  check_pool_backward(at::kCPU, grad_out, mask, cu_seqlens, den, argmax, x_shape, x_dtype, mode);
  at::Tensor dx = at::empty(x_shape, grad_out.options().dtype(x_dtype));
  const Batch batch = make_batch(dx.sizes(), dx.strides(), mask, cu_seqlens);
  if (dx.numel() == 0) return dx;
  if (batch.geometry.num_seqs == 0) return dx.zero_();
  const at::Tensor grad = grad_out.to(accumulation_type(x_dtype)).contiguous();
  const at::Tensor den_c = den.contiguous(), argmax_c = argmax.contiguous();  // indexed as contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "pool_bwd_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    pool_backward_kernel<scalar_t, Acc>(grad, batch, den_c, argmax_c, static_cast<int>(mode), dx);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool, CPU, m) {
  m.impl("ext_pool_fwd", &pool_fwd_cpu);
  m.impl("ext_pool_bwd", &pool_bwd_cpu);
}

}  // namespace fused_pool
