// Torch glue of the CUDA probe_attention kernels (csrc/cuda/probe_attention_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../host.h"
#include "glue.h"
#include "launch.h"
#include "probe_launch.h"

namespace fused_pool {
namespace {

// The dots' arguments shared by the forward (scores) and the backward (which adds grad, g_out and
// stats for the coefficients): x, probes_acc (P, H) Acc contiguous and aligned, `result` written.
cuda::ProbeDots probe_dots_args(const at::Tensor& x, const Batch& batch, const at::Tensor& probes_acc, double scale,
                                at::Tensor& result) {
  cuda::ProbeDots dots{};
  dots.x = x.const_data_ptr();
  dots.dtype = cuda_dtype(x.scalar_type());
  dots.geometry = batch.geometry;
  dots.mask = batch.mask;
  dots.cu_seqlens = batch.cu_seqlens;
  dots.probes = probes_acc.const_data_ptr();
  dots.num_probes = probes_acc.size(0);
  dots.scale = scale;
  dots.result = result.mutable_data_ptr();
  dots.vec = vector_width(batch.geometry, dots.x, x.element_size(), batch.geometry.hidden);
  return dots;
}

std::tuple<at::Tensor, at::Tensor> probe_attention_fwd_cuda(const at::Tensor& x, const at::Tensor& probes,
                                                            const std::optional<at::Tensor>& mask,
                                                            const std::optional<at::Tensor>& cu_seqlens,
                                                            std::optional<int64_t> max_seqlen, double scale) {
  check_probe_attention_forward(at::kCUDA, x, probes, mask, cu_seqlens, max_seqlen);
  const c10::cuda::CUDAGuard guard(x.device());
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const int64_t P = probes.size(0);
  at::Tensor out = at::empty({g.num_seqs, P, g.hidden}, x.options().dtype(acc));
  at::Tensor stats = at::empty({g.num_seqs, P, 2}, x.options().dtype(acc));
  if (g.num_seqs == 0) return {out, stats};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor probes_acc = contiguous_aligned(probes.to(acc));  // 16-byte vector loads
  at::Tensor scores = at::empty({g.num_rows, P}, x.options().dtype(acc));  // O(B L P)
  const cuda::ProbeDots dots = probe_dots_args(x, batch, probes_acc, scale, scores);
  check_launched(cuda::probe_dots(dots, stream), "fused_pool::ext_probe_attention_fwd", x.sizes());

  cuda::ProbeForward args{};
  args.x = x.const_data_ptr();
  args.dtype = dots.dtype;
  args.geometry = g;
  args.mask = batch.mask;
  args.cu_seqlens = batch.cu_seqlens;
  args.scores = scores.const_data_ptr();
  args.num_probes = P;
  args.out = out.mutable_data_ptr();
  args.stats = stats.mutable_data_ptr();
  args.vec = dots.vec;
  // At least one channel tile: the stats are written when H = 0.
  const int64_t tiles = cuda::probe_tiles(args.dtype, P, std::max<int64_t>(g.hidden, 1), args.vec);
  at::Tensor offsets, part_m, part_l, part_acc;
  args.plan = plan_on_device(batch, max_seqlen, tiles, offsets, x.options());
  if (args.plan.split) {
    part_m = at::empty({args.plan.num_chunks, P}, x.options().dtype(acc));
    part_l = at::empty({args.plan.num_chunks, P}, x.options().dtype(acc));
    part_acc = at::empty({args.plan.num_chunks, P, g.hidden}, x.options().dtype(acc));
    args.part_m = part_m.mutable_data_ptr();
    args.part_l = part_l.mutable_data_ptr();
    args.part_acc = part_acc.mutable_data_ptr();
  }
  check_launched(cuda::probe_forward(args, stream), "fused_pool::ext_probe_attention_fwd", x.sizes());
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> probe_attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& probes,
                                                            const std::optional<at::Tensor>& mask,
                                                            const std::optional<at::Tensor>& cu_seqlens,
                                                            const at::Tensor& out, const at::Tensor& stats,
                                                            double scale) {
  check_probe_attention_backward(at::kCUDA, grad_out, x, probes, mask, cu_seqlens, out, stats);
  const c10::cuda::CUDAGuard guard(x.device());
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  if (g.num_rows == 0 || g.num_seqs == 0) return {at::zeros(x.sizes(), x.options()), at::zeros_like(probes)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t P = probes.size(0);
  // probes, grad (read with 16-byte vector loads): contiguous and aligned.
  const at::Tensor probes_acc = contiguous_aligned(probes.to(out.scalar_type()));
  const at::Tensor grad = contiguous_aligned(grad_out.to(out.scalar_type()));
  const at::Tensor g_out = (grad * out).sum(-1).contiguous();  // (B, P): g_p . out_p
  const at::Tensor stats_c = stats.contiguous();
  at::Tensor coef = at::empty({g.num_rows, 2 * P}, out.options());  // O(B L P)
  cuda::ProbeDots dots = probe_dots_args(x, batch, probes_acc, scale, coef);
  dots.grad = grad.const_data_ptr();
  dots.g_out = g_out.const_data_ptr();
  dots.stats = stats_c.const_data_ptr();
  check_launched(cuda::probe_dots(dots, stream), "fused_pool::ext_probe_attention_bwd", x.sizes());

  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  cuda::ProbeInputGrad input{};
  input.coef = coef.const_data_ptr();
  input.probes = probes_acc.const_data_ptr();
  input.grad = grad.const_data_ptr();
  input.dtype = dots.dtype;
  input.geometry = g;
  input.mask = batch.mask;
  input.cu_seqlens = batch.cu_seqlens;
  input.num_probes = P;
  input.dx = dx.mutable_data_ptr();
  input.vec = vector_width(contiguous_geometry(g), input.dx, x.element_size(), g.hidden);
  check_launched(cuda::probe_input_grad(input, stream), "fused_pool::ext_probe_attention_bwd", x.sizes());

  // dprobes: per-chunk partials summed over chunks in order (deterministic), at most 64 of them.
  cuda::ProbeGrad args{};
  args.x = x.const_data_ptr();
  args.dtype = dots.dtype;
  args.geometry = g;
  args.coef = coef.const_data_ptr();
  args.num_probes = P;
  args.vec = dots.vec;
  const int64_t tiles = cuda::probe_tiles(args.dtype, P, g.hidden, args.vec);
  const int64_t blocks = 2 * multiprocessors() * 8;
  args.rows_per_chunk = std::max<int64_t>({256, cuda::ceil_div(g.num_rows * std::max<int64_t>(tiles, 1), blocks),
                                           cuda::ceil_div(g.num_rows, 64)});
  at::Tensor partials = at::empty({cuda::ceil_div(g.num_rows, args.rows_per_chunk), P, g.hidden}, out.options());
  args.partials = partials.mutable_data_ptr();
  check_launched(cuda::probe_probes_grad(args, stream), "fused_pool::ext_probe_attention_bwd", x.sizes());
  return {dx, partials.sum(0).to(probes.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool, CUDA, m) {
  m.impl("ext_probe_attention_fwd", &probe_attention_fwd_cuda);
  m.impl("ext_probe_attention_bwd", &probe_attention_bwd_cuda);
}

}  // namespace fused_pool
