// Torch glue of the CUDA span_pool kernels (csrc/cuda/span_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../host.h"
#include "glue.h"
#include "launch.h"

namespace fused_pool {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> span_fwd_cuda(const at::Tensor& x, const at::Tensor& spans,
                                                              const std::optional<at::Tensor>& mask, int64_t mode) {
  check_span_forward(at::kCUDA, x, spans, mask, mode);
  const c10::cuda::CUDAGuard guard(x.device());
  const SpanBatch batch = make_span_batch(x.sizes(), x.strides(), spans, mask);
  const Geometry& g = batch.tokens.geometry;
  PoolOutputs outputs = pool_outputs(x, g.num_seqs, g.hidden, mode);
  at::Tensor &out = outputs.out, &den = outputs.den, &argmax = outputs.argmax;
  if (g.num_seqs == 0 || g.hidden == 0) return {out, den.zero_(), argmax.fill_(-1)};

  cuda::SpanForward args{};
  args.x = x.const_data_ptr();
  args.dtype = cuda_dtype(x.scalar_type());
  args.geometry = g;
  args.mask = batch.tokens.mask;
  args.spans = batch.spans;
  args.mode = outputs.mode;
  args.out = out.mutable_data_ptr();
  args.den = den.mutable_data_ptr();
  args.argmax = argmax.mutable_data_ptr<int32_t>();
  args.vec = vector_width(g, args.x, x.element_size(), g.hidden);
  check_launched(cuda::span_forward(args, c10::cuda::getCurrentCUDAStream()), "fused_pool::ext_span_fwd", x.sizes());
  return {out, den, argmax};
}

at::Tensor span_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& spans, const std::optional<at::Tensor>& mask,
                         const at::Tensor& den, const at::Tensor& argmax, at::IntArrayRef x_shape,
                         at::ScalarType x_dtype, int64_t mode) {
  check_span_backward(at::kCUDA, grad_out, spans, mask, den, argmax, x_shape, x_dtype, mode);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor dx = at::empty(x_shape, grad_out.options().dtype(x_dtype));
  if (dx.numel() == 0) return dx;
  if (spans.size(0) == 0) return dx.zero_();
  const SpanBatch batch = make_span_batch(dx.sizes(), dx.strides(), spans, mask);
  const Geometry& g = batch.tokens.geometry;
  // Read with 16-byte vector loads: contiguous and aligned.
  const at::Tensor grad = contiguous_aligned(grad_out.to(accumulation_type(x_dtype)));
  const at::Tensor den_c = (mode & kMean) ? den.contiguous() : den;
  const at::Tensor argmax_c = (mode & kMax) ? contiguous_aligned(argmax) : argmax;
  cuda::SpanBackward args{};
  args.grad = grad.const_data_ptr();
  args.dtype = cuda_dtype(x_dtype);
  args.geometry = g;
  args.mask = batch.tokens.mask;
  args.spans = batch.spans;
  args.mode = static_cast<int>(mode);
  args.den = (mode & kMean) ? den_c.const_data_ptr() : nullptr;
  args.argmax = (mode & kMax) ? argmax_c.const_data_ptr<int32_t>() : nullptr;
  args.dx = dx.mutable_data_ptr();
  args.vec = vector_width(g, args.dx, dx.element_size(), g.hidden);
  check_launched(cuda::span_backward(args, c10::cuda::getCurrentCUDAStream()), "fused_pool::ext_span_bwd", x_shape);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool, CUDA, m) {
  m.impl("ext_span_fwd", &span_fwd_cuda);
  m.impl("ext_span_bwd", &span_bwd_cuda);
}

}  // namespace fused_pool
