// Torch glue of CUDA linear_pool: the plan of csrc/linear_host.h with the GEMMs through ATen
// (cuBLAS) and the epilogues of csrc/cuda/linear_cuda.cu. No host sync: the plan's entries are every
// row, the kept ones first (the rest marked seq = -1, skipped by the epilogues, their gathered rows
// zeroed before any GEMM that sums over rows).
// Precision: float32 / float64 inputs run their own GEMMs. bfloat16 / float16 forward GEMMs run in
// the input dtype with a float32 result (aten::mm.dtype: float32 accumulation, no rounding of z);
// the SUM / MEAN backward converts W and each row block to float32 (float32 GEMMs).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../linear_host.h"
#include "glue.h"
#include "linear_launch.h"

namespace fused_pool {
namespace {

constexpr const char* kForward = "fused_pool::ext_linear_fwd";
constexpr const char* kBackward = "fused_pool::ext_linear_bwd";

// z = x_block W^T (no bias: the epilogues add it) as (rows, N) in Acc.
at::Tensor project(const at::Tensor& x_block, const at::Tensor& weight, at::ScalarType acc, at::Tensor& workspace) {
  at::Tensor z = workspace.narrow(0, 0, x_block.size(0));
  if (x_block.scalar_type() == acc) return at::mm_out(z, x_block, weight.t());
  return at::mm(x_block, weight.t(), acc);
}

// Rows of x for `entries`, 0 where the entry is not kept (seq < 0), in `dtype`.
at::Tensor kept_rows(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& seq, at::ScalarType dtype) {
  return at::where(seq.ge(0).unsqueeze(1), gather_rows(x, rows), 0).to(dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                const std::optional<at::Tensor>& mask,
                                                                const std::optional<at::Tensor>& cu_seqlens,
                                                                std::optional<int64_t> max_seqlen, int64_t mode,
                                                                int64_t activation) {
  check_linear_forward(at::kCUDA, x, weight, bias, mask, cu_seqlens, max_seqlen, mode, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t features = weight.size(0);
  const LinearPlan p = make_linear_plan(x, mask, cu_seqlens, true, false);
  LinearStates s = linear_states(x, p.geometry.num_seqs, features, mode);
  if (p.entries == 0 || features == 0) return finish_linear_forward(s, mode, x.scalar_type());
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t block = std::min(linear_block_rows(features, at::elementSize(p.acc)), p.entries);
  at::Tensor workspace = at::empty({block, features}, x.options().dtype(p.acc));
  cuda::LinearForwardEpilogue args{};
  args.dtype = cuda_dtype(x.scalar_type());
  args.bias = bias_c.defined() ? bias_c.const_data_ptr() : nullptr;
  args.features = features;
  args.mode = static_cast<int>(mode);
  args.activation = static_cast<int>(activation);
  args.value = s.value.mutable_data_ptr();
  args.argmax = mode == kMax ? s.argmax.mutable_data_ptr<int32_t>() : nullptr;
  args.den = mode == kMean ? s.den.mutable_data_ptr() : nullptr;
  for (int64_t start = 0; start < p.entries; start += block) {
    const int64_t rows = std::min(block, p.entries - start);
    const at::Tensor z = project(gather_rows(x, p.rows.narrow(0, start, rows)), weight, p.acc, workspace);
    args.z = z.const_data_ptr();
    args.rows = rows;
    args.seq = p.seq.const_data_ptr<int32_t>() + start;
    args.index = p.index.const_data_ptr<int32_t>() + start;
    args.weight = static_cast<const char*>(p.weight.const_data_ptr()) + start * p.weight.element_size();
    check_launched(cuda::linear_forward_epilogue(args, c10::cuda::getCurrentCUDAStream()), kForward, x.sizes());
  }
  return finish_linear_forward(s, mode, x.scalar_type());
}

void max_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias_c,
                  const LinearPlan& p, const at::Tensor& argmax, int64_t activation, LinearGrads& grads) {
  const int64_t features = weight.size(0), num_rows = p.geometry.num_rows;
  const at::Tensor w_c = weight.contiguous(), argmax_c = argmax.contiguous();
  at::Tensor dz = at::empty({p.geometry.num_seqs, features}, grad.options());
  at::Tensor token = at::empty({p.geometry.num_seqs, features}, grad.options().dtype(at::kLong));
  cuda::LinearMaxGrad g{};
  g.x = x.const_data_ptr();
  g.dtype = cuda_dtype(x.scalar_type());
  g.geometry = p.geometry;
  g.weight = w_c.const_data_ptr();
  g.bias = bias_c.defined() ? bias_c.const_data_ptr() : nullptr;
  g.grad = grad.const_data_ptr();
  g.argmax = argmax_c.const_data_ptr<int32_t>();
  g.owner = p.row_owner.const_data_ptr<int32_t>();
  g.first_row = p.first_row.const_data_ptr<int64_t>();
  g.length = p.length.const_data_ptr<int64_t>();
  g.features = features;
  g.activation = static_cast<int>(activation);
  g.dz = dz.mutable_data_ptr();
  g.token = token.mutable_data_ptr<int64_t>();
  g.dweight = grads.dweight.mutable_data_ptr();
  g.dbias = grads.dbias.mutable_data_ptr();
  check_launched(cuda::linear_max_grad(g, c10::cuda::getCurrentCUDAStream()), kBackward, x.sizes());
  // The (b, n) pairs sorted by token (stable: increasing (b, n) within a token; none last).
  const at::Tensor keys = at::where(token.ge(0), token, num_rows).reshape({-1});
  const auto [sorted, order] = at::sort(keys, /*stable=*/true, 0, false);
  const at::Tensor offsets = at::searchsorted(sorted, at::arange(num_rows + 1, keys.options()));
  cuda::LinearMaxDx d{};
  d.order = order.const_data_ptr<int64_t>();
  d.offsets = offsets.const_data_ptr<int64_t>();
  d.dz = dz.const_data_ptr();
  d.weight = w_c.const_data_ptr();
  d.dtype = g.dtype;
  d.num_rows = num_rows;
  d.features = features;
  d.hidden = p.geometry.hidden;
  d.dx = grads.dx.mutable_data_ptr();
  check_launched(cuda::linear_max_dx(d, c10::cuda::getCurrentCUDAStream()), kBackward, x.sizes());
}

void sum_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias_c,
                  const LinearPlan& p, const at::Tensor& den, int64_t mode, int64_t activation, LinearGrads& grads) {
  const int64_t features = weight.size(0);
  const at::Tensor w = weight.to(p.acc);
  const at::Tensor scale = linear_backward_scale(p, den, mode);
  const int64_t block =
      std::min(linear_block_rows(features, at::elementSize(p.acc), kLinearBackwardWorkspaceBytes), p.entries);
  at::Tensor workspace = at::empty({block, features}, x.options().dtype(p.acc));
  at::Tensor dx_rows = grads.dx.view({p.geometry.num_rows, p.geometry.hidden});
  cuda::LinearGradEpilogue args{};
  args.dtype = cuda_dtype(x.scalar_type());
  args.bias = bias_c.defined() ? bias_c.const_data_ptr() : nullptr;
  args.grad = grad.const_data_ptr();
  args.features = features;
  args.activation = static_cast<int>(activation);
  for (int64_t start = 0; start < p.entries; start += block) {
    const int64_t rows = std::min(block, p.entries - start);
    const at::Tensor row_ids = p.rows.narrow(0, start, rows);
    const at::Tensor x_block = kept_rows(x, row_ids, p.seq.narrow(0, start, rows), p.acc);
    at::Tensor z = workspace.narrow(0, 0, rows);
    at::mm_out(z, x_block, w.t());
    args.z = z.mutable_data_ptr();
    args.rows = rows;
    args.seq = p.seq.const_data_ptr<int32_t>() + start;
    args.scale = static_cast<const char*>(scale.const_data_ptr()) + start * scale.element_size();
    check_launched(cuda::linear_grad_epilogue(args, c10::cuda::getCurrentCUDAStream()), kBackward, x.sizes());
    dx_rows.index_copy_(0, row_ids, at::mm(z, w));  // each row in exactly one block (0 if not kept)
    grads.dweight.addmm_(z.t(), x_block);
    grads.dbias.add_(z.sum(0));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& den,
    const at::Tensor& argmax, int64_t mode, int64_t activation) {
  check_linear_backward(at::kCUDA, grad_out, x, weight, bias, mask, cu_seqlens, den, argmax, mode, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const at::Tensor grad = grad_out.to(acc).contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  LinearGrads grads = linear_grads(x, weight);
  // H = 0 still has tokens: z = bias, and the bias gets act'(bias) from every kept token.
  const int64_t rows = x.dim() == 3 ? x.size(0) * x.size(1) : x.size(0);
  if (rows > 0 && weight.size(0) > 0) {
    const LinearPlan p = make_linear_plan(x, mask, cu_seqlens, mode != kMax, false);
    if (mode == kMax) {
      max_backward(grad, x, weight, bias_c, p, argmax, activation, grads);
    } else {
      sum_backward(grad, x, weight, bias_c, p, den, mode, activation, grads);
    }
  }
  return finish_linear_backward(grads, x, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool, CUDA, m) {
  m.impl("ext_linear_fwd", &linear_fwd_cuda);
  m.impl("ext_linear_bwd", &linear_bwd_cuda);
}

}  // namespace fused_pool
