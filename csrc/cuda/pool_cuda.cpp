// Torch glue of the CUDA mean / max / mean_max kernels (csrc/cuda/pool_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../host.h"
#include "glue.h"
#include "launch.h"

namespace fused_pool {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                                              const std::optional<at::Tensor>& cu_seqlens,
                                                              std::optional<int64_t> max_seqlen, int64_t mode) {
  check_pool_forward(at::kCUDA, x, mask, cu_seqlens, max_seqlen, mode);
  const c10::cuda::CUDAGuard guard(x.device());
  const Batch batch = make_batch(x, mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  PoolOutputs outputs = pool_outputs(x, g.num_seqs, g.hidden, mode);
  mode = outputs.mode;
  at::Tensor &out = outputs.out, &den = outputs.den, &argmax = outputs.argmax;
  if (g.num_seqs == 0 || g.hidden == 0) return {out, den.zero_(), argmax.fill_(-1)};

  cuda::PoolForward args{};
  args.x = x.const_data_ptr();
  args.dtype = cuda_dtype(x.scalar_type());
  args.geometry = g;
  args.mask = batch.mask;
  args.cu_seqlens = batch.cu_seqlens;
  args.mode = static_cast<int>(mode);
  args.states = outputs.states;
  args.out = out.mutable_data_ptr();
  args.den = den.mutable_data_ptr();
  args.argmax = argmax.mutable_data_ptr<int32_t>();
  args.vec = vector_width(g, args.x, x.element_size(), g.hidden);
  at::Tensor offsets;
  args.plan = plan_on_device(batch, max_seqlen, cuda::ceil_div(g.hidden, 32 * args.vec), offsets, x.options());
  at::Tensor part_sum, part_den, part_max, part_row;
  if (args.plan.split) {
    const int64_t chunks = args.plan.num_chunks;
    part_sum = at::empty({(mode & kMean) ? chunks : 0, g.hidden}, x.options().dtype(acc));
    part_den = at::empty({(mode & kMean) ? chunks : 0}, x.options().dtype(acc));
    part_max = at::empty({(mode & kMax) ? chunks : 0, g.hidden}, x.options().dtype(acc));
    part_row = at::empty({(mode & kMax) ? chunks : 0, g.hidden}, x.options().dtype(at::kInt));
    args.part_sum = part_sum.mutable_data_ptr();
    args.part_den = part_den.mutable_data_ptr();
    args.part_max = part_max.mutable_data_ptr();
    args.part_row = part_row.mutable_data_ptr<int32_t>();
  }
  check_launched(cuda::pool_forward(args, c10::cuda::getCurrentCUDAStream()), "fused_pool::ext_pool_fwd", x.sizes());
  return {out, den, argmax};
}

at::Tensor pool_bwd_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& mask,
                         const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& den, const at::Tensor& argmax,
                         at::IntArrayRef x_shape, at::ScalarType x_dtype, int64_t mode) {
  check_pool_backward(at::kCUDA, grad_out, mask, cu_seqlens, den, argmax, x_shape, x_dtype, mode);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor dx = at::empty(x_shape, grad_out.options().dtype(x_dtype));
  const Batch batch = make_batch(dx.sizes(), dx.strides(), mask, cu_seqlens);
  const Geometry& g = batch.geometry;
  if (dx.numel() == 0) return dx;
  if (g.num_seqs == 0) return dx.zero_();
  // Read with 16-byte vector loads: contiguous and aligned.
  const at::Tensor grad = contiguous_aligned(grad_out.to(accumulation_type(x_dtype)));
  const at::Tensor den_c = (mode & kMean) ? den.contiguous() : den;
  const at::Tensor argmax_c = (mode & kMax) ? contiguous_aligned(argmax) : argmax;
  cuda::PoolBackward args{};
  args.grad = grad.const_data_ptr();
  args.dtype = cuda_dtype(x_dtype);
  args.geometry = g;
  args.mask = batch.mask;
  args.cu_seqlens = batch.cu_seqlens;
  args.mode = static_cast<int>(mode);
  args.den = (mode & kMean) ? den_c.const_data_ptr() : nullptr;
  args.argmax = (mode & kMax) ? argmax_c.const_data_ptr<int32_t>() : nullptr;
  args.dx = dx.mutable_data_ptr();
  args.vec = vector_width(g, args.dx, dx.element_size(), g.hidden);
  check_launched(cuda::pool_backward(args, c10::cuda::getCurrentCUDAStream()), "fused_pool::ext_pool_bwd", x_shape);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool, CUDA, m) {
  m.impl("ext_pool_fwd", &pool_fwd_cuda);
  m.impl("ext_pool_bwd", &pool_bwd_cuda);
}

}  // namespace fused_pool
