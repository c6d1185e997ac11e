// Torch glue of the CUDA attention kernels (csrc/cuda/attention_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../host.h"
#include "glue.h"
#include "launch.h"

namespace fused_pool {
namespace {

// Forward from (num_rows, nh) Acc scores: float32 out (B, H) and stats (B, nh, 2).
std::tuple<at::Tensor, at::Tensor> attention_from_scores(const at::Tensor& x, const Batch& batch,
                                                         const at::Tensor& scores, int64_t num_heads,
                                                         std::optional<int64_t> max_seqlen) {
  const Geometry& g = batch.geometry;
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  at::Tensor out = at::empty({g.num_seqs, g.hidden}, x.options().dtype(acc));
  at::Tensor stats = at::empty({g.num_seqs, num_heads, 2}, x.options().dtype(acc));
  if (g.num_seqs == 0 || g.hidden == 0) return {out, stats.zero_()};
  cuda::AttentionForward args{};
  args.x = x.const_data_ptr();
  args.dtype = cuda_dtype(x.scalar_type());
  args.geometry = g;
  args.mask = batch.mask;
  args.cu_seqlens = batch.cu_seqlens;
  args.scores = scores.const_data_ptr();
  args.num_heads = num_heads;
  args.head_dim = g.hidden / num_heads;
  args.out = out.mutable_data_ptr();
  args.stats = stats.mutable_data_ptr();
  args.vec = vector_width(g, args.x, x.element_size(), args.head_dim);
  const int64_t tiles = num_heads * cuda::ceil_div(args.head_dim, 32 * args.vec);
  at::Tensor offsets, part_m, part_l, part_acc;
  args.plan = plan_on_device(batch, max_seqlen, tiles, offsets, x.options());
  if (args.plan.split) {
    part_m = at::empty({args.plan.num_chunks, num_heads}, x.options().dtype(acc));
    part_l = at::empty({args.plan.num_chunks, num_heads}, x.options().dtype(acc));
    part_acc = at::empty({args.plan.num_chunks, g.hidden}, x.options().dtype(acc));
    args.part_m = part_m.mutable_data_ptr();
    args.part_l = part_l.mutable_data_ptr();
    args.part_acc = part_acc.mutable_data_ptr();
  }
  check_launched(cuda::attention_forward(args, c10::cuda::getCurrentCUDAStream()), "fused_pool::ext_attention_fwd",
                 x.sizes());
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& x, const at::Tensor& scores,
                                                      const std::optional<at::Tensor>& mask,
                                                      const std::optional<at::Tensor>& cu_seqlens,
                                                      std::optional<int64_t> max_seqlen) {
  check_attention_forward(at::kCUDA, "fused_pool::ext_attention_fwd", x, scores, std::nullopt, mask, cu_seqlens,
                          max_seqlen);
  const c10::cuda::CUDAGuard guard(x.device());
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const at::Tensor scores_acc = scores.to(accumulation_type(x.scalar_type())).contiguous();
  return attention_from_scores(x, batch, scores_acc, scores.size(-1), max_seqlen);
}

std::tuple<at::Tensor, at::Tensor> query_attention_fwd_cuda(const at::Tensor& x, const at::Tensor& query,
                                                            const std::optional<at::Tensor>& mask,
                                                            const std::optional<at::Tensor>& cu_seqlens,
                                                            std::optional<int64_t> max_seqlen, double scale) {
  check_attention_forward(at::kCUDA, "fused_pool::ext_query_attention_fwd", x, std::nullopt, query, mask, cu_seqlens,
                          max_seqlen);
  const c10::cuda::CUDAGuard guard(x.device());
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const int64_t num_heads = query.size(0);
  at::Tensor scores = at::empty({g.num_rows, num_heads}, x.options().dtype(acc));  // O(B L nh)
  if (g.num_rows > 0 && g.hidden > 0 && g.num_seqs > 0) {
    const at::Tensor query_acc = contiguous_aligned(query.to(acc));  // 16-byte vector loads
    cuda::QueryScores args{};
    args.x = x.const_data_ptr();
    args.dtype = cuda_dtype(x.scalar_type());
    args.geometry = g;
    args.mask = batch.mask;
    args.cu_seqlens = batch.cu_seqlens;
    args.query = query_acc.const_data_ptr();
    args.scale = scale;
    args.num_heads = num_heads;
    args.head_dim = g.hidden / num_heads;
    args.scores = scores.mutable_data_ptr();
    args.vec = vector_width(g, args.x, x.element_size(), args.head_dim);
    check_launched(cuda::query_scores(args, c10::cuda::getCurrentCUDAStream()), "fused_pool::ext_query_attention_fwd",
                   x.sizes());
  }
  return attention_from_scores(x, batch, scores, num_heads, max_seqlen);
}

// dx and ds ((num_rows, nh) Acc); query mode when `query_acc` is defined.
std::tuple<at::Tensor, at::Tensor> attention_grads(const at::Tensor& grad_out, const at::Tensor& x, const Batch& batch,
                                                   const at::Tensor& scores_acc, const at::Tensor& query_acc,
                                                   const at::Tensor& out, const at::Tensor& stats, double scale) {
  const Geometry& g = batch.geometry;
  const int64_t num_heads = stats.size(1);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor ds = at::empty({g.num_rows, num_heads}, out.options());
  // grad, out and query are read with 16-byte vector loads: contiguous and aligned.
  const at::Tensor grad = contiguous_aligned(grad_out.to(out.scalar_type()));
  const at::Tensor out_c = contiguous_aligned(out);
  const at::Tensor stats_c = stats.contiguous();
  cuda::AttentionBackward args{};
  args.grad = grad.const_data_ptr();
  args.x = x.const_data_ptr();
  args.dtype = cuda_dtype(x.scalar_type());
  args.geometry = g;
  args.mask = batch.mask;
  args.cu_seqlens = batch.cu_seqlens;
  args.scores = scores_acc.defined() ? scores_acc.const_data_ptr() : nullptr;
  args.query = query_acc.defined() ? query_acc.const_data_ptr() : nullptr;
  args.scale = scale;
  args.out = out_c.const_data_ptr();
  args.stats = stats_c.const_data_ptr();
  args.num_heads = num_heads;
  args.head_dim = g.hidden / num_heads;
  args.dx = dx.mutable_data_ptr();
  args.ds = ds.mutable_data_ptr();
  // Vector loads of x and stores of dx (contiguous) both need the width to fit.
  args.vec = std::min(vector_width(g, args.x, x.element_size(), args.head_dim),
                      vector_width(contiguous_geometry(g), args.dx, x.element_size(), args.head_dim));
  check_launched(cuda::attention_backward(args, c10::cuda::getCurrentCUDAStream()), "fused_pool::ext_attention_bwd",
                 x.sizes());
  return {dx, ds};
}

std::tuple<at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                                                      const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& out,
                                                      const at::Tensor& stats) {
  check_attention_backward(at::kCUDA, "fused_pool::ext_attention_bwd", grad_out, x, scores, std::nullopt, mask,
                           cu_seqlens, out, stats);
  const c10::cuda::CUDAGuard guard(x.device());
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  if (g.num_rows == 0 || g.hidden == 0 || g.num_seqs == 0) {
    return {at::zeros(x.sizes(), x.options()), at::zeros_like(scores)};
  }
  const at::Tensor scores_acc = scores.to(out.scalar_type()).contiguous();
  auto [dx, ds] = attention_grads(grad_out, x, batch, scores_acc, at::Tensor(), out, stats, 1.0);
  return {dx, ds.view(scores.sizes()).to(scores.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> query_attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& query,
                                                            const std::optional<at::Tensor>& mask,
                                                            const std::optional<at::Tensor>& cu_seqlens,
                                                            const at::Tensor& out, const at::Tensor& stats,
                                                            double scale) {
  check_attention_backward(at::kCUDA, "fused_pool::ext_query_attention_bwd", grad_out, x, std::nullopt, query, mask,
                           cu_seqlens, out, stats);
  const c10::cuda::CUDAGuard guard(x.device());
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  if (g.num_rows == 0 || g.hidden == 0 || g.num_seqs == 0) {
    return {at::zeros(x.sizes(), x.options()), at::zeros_like(query)};
  }
  const at::Tensor query_acc = contiguous_aligned(query.to(out.scalar_type()));
  auto [dx, ds] = attention_grads(grad_out, x, batch, at::Tensor(), query_acc, out, stats, scale);
  // dquery: per-chunk partials of scale * ds * x, summed over chunks in order (deterministic).
  cuda::QueryGradient args{};
  args.x = x.const_data_ptr();
  args.dtype = cuda_dtype(x.scalar_type());
  args.geometry = g;
  args.cu_seqlens = batch.cu_seqlens;
  args.ds = ds.const_data_ptr();
  args.scale = scale;
  args.num_heads = stats.size(1);
  args.head_dim = g.hidden / args.num_heads;
  args.vec = vector_width(g, args.x, x.element_size(), args.head_dim);
  const int64_t tiles = cuda::ceil_div(g.hidden, 32 * args.vec);
  const int64_t blocks = 2 * multiprocessors() * 8;
  args.rows_per_chunk = std::max<int64_t>(256, cuda::ceil_div(g.num_rows * tiles, blocks));
  const int64_t num_chunks = cuda::ceil_div(g.num_rows, args.rows_per_chunk);
  at::Tensor partials = at::empty({num_chunks, g.hidden}, out.options());
  args.partials = partials.mutable_data_ptr();
  check_launched(cuda::query_gradient(args, c10::cuda::getCurrentCUDAStream()), "fused_pool::ext_query_attention_bwd",
                 x.sizes());
  return {dx, partials.sum(0).view(query.sizes()).to(query.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool, CUDA, m) {
  m.impl("ext_attention_fwd", &attention_fwd_cuda);
  m.impl("ext_attention_bwd", &attention_bwd_cuda);
  m.impl("ext_query_attention_fwd", &query_attention_fwd_cuda);
  m.impl("ext_query_attention_bwd", &query_attention_bwd_cuda);
}

}  // namespace fused_pool
