// CPU linear_pool: pool(act(x W^T + b)) over each sequence's kept tokens, forward and backward,
// never building the (tokens, N) projection (plan: csrc/linear_host.h).
//
// Forward, per block of kept tokens: gather the block's rows, z = b + x_block W^T through ATen's
// BLAS (addmm) into a bounded (block, N) workspace in the accumulation dtype (bfloat16 / float16
// inputs are converted to float32 first: the GEMM then runs and accumulates in float32), the
// activation in place with ATen's vectorized ops, then the reduction of each row into its
// sequence's (B, N) state, parallel over N (rows in order: deterministic).
// Backward MAX: B N H work from the saved argmax: dz = g act'(z) with z recomputed at the winning
// token, dweight[n] and dbias[n] summed over b in order (parallel over n), dx[t] summed over the
// (b, n) that chose t in increasing (b, n) order (parallel over channel chunks).
// Backward SUM / MEAN, per block: z recomputed by a GEMM, dz = g w (/ den) act'(z) in place,
// dx_block = dz W written to the block's rows, dweight += dz^T x_block, dbias += sum of dz, blocks
// in order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../linear_host.h"
#include "cpu_common.h"

namespace fused_pool {
namespace {

// z = act(z) in place, with ATen's vectorized kernels.
void activate_(at::Tensor& z, int64_t activation) {
  switch (activation) {
    case kActRelu: z.relu_(); break;
    case kActLog1pRelu: z.relu_().log1p_(); break;
    case kActLog1pLog1pRelu: z.relu_().log1p_().log1p_(); break;
    case kActGelu: at::gelu_(z); break;
    case kActTanh: z.tanh_(); break;
    case kActSilu: at::silu_(z); break;
    default: break;
  }
}

// best / argmax of one sequence's columns updated with one row (NaN wins, earlier rows win ties):
// branch-free, so that the loop vectorizes.
template <typename Acc>
FP_CPU_CLONES void max_row(Acc* __restrict best, int32_t* __restrict argmax, const Acc* __restrict z, int32_t index,
                           int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const Acc v = z[i], b = best[i];
    const bool take = argmax[i] < 0 || v > b || (v != v && b == b);
    best[i] = take ? v : b;
    argmax[i] = take ? index : argmax[i];
  }
}

// Rows [0, rows) of the block's activated workspace z (rows, N) reduced into the states, each into
// its sequence's row; parallel over column chunks.
template <typename Acc>
void reduce_block(const at::Tensor& z, const int32_t* seq, const int32_t* index, const Acc* weight, int64_t rows,
                  int64_t mode, LinearStates& s) {
  const int64_t features = z.size(1);
  const Acc* z_ptr = z.const_data_ptr<Acc>();
  Acc* value = s.value.mutable_data_ptr<Acc>();
  int32_t* argmax = mode == kMax ? s.argmax.mutable_data_ptr<int32_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(256, kParallelWork / std::max<int64_t>(rows, 1));
  at::parallel_for(0, features, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = seq[r] * features + n0;
      if (mode == kMax) {
        max_row(value + row, argmax + row, z_ptr + r * features + n0, index[r], n1 - n0);
      } else {
        add_weighted_row(value + row, z_ptr + r * features + n0, weight[r], n1 - n0);
      }
    }
  });
  if (mode == kMean) {
    Acc* den = s.den.mutable_data_ptr<Acc>();
    for (int64_t r = 0; r < rows; ++r) den[seq[r]] += weight[r];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias,
                                                               const std::optional<at::Tensor>& mask,
                                                               const std::optional<at::Tensor>& cu_seqlens,
                                                               std::optional<int64_t> max_seqlen, int64_t mode,
                                                               int64_t activation) {
  check_linear_forward(at::kCPU, x, weight, bias, mask, cu_seqlens, max_seqlen, mode, activation);
  const int64_t features = weight.size(0);
  const LinearPlan p = make_linear_plan(x, mask, cu_seqlens, true, true);
  LinearStates s = linear_states(x, p.geometry.num_seqs, features, mode);
  if (p.entries == 0 || features == 0) return finish_linear_forward(s, mode, x.scalar_type());
  const at::Tensor w = weight.to(p.acc).t();  // (H, N); no copy for float32 / float64
  const at::Tensor b = bias.has_value() ? bias->to(p.acc) : at::Tensor();
  const int64_t block = std::min(linear_block_rows(features, at::elementSize(p.acc)), p.entries);
  at::Tensor workspace = at::empty({block, features}, x.options().dtype(p.acc));
  AT_DISPATCH_FLOATING_TYPES(p.acc, "linear_fwd_cpu", [&] {
    for (int64_t start = 0; start < p.entries; start += block) {
      const int64_t rows = std::min(block, p.entries - start);
      const at::Tensor x_block = gather_rows(x, p.rows.narrow(0, start, rows)).to(p.acc);
      at::Tensor z = workspace.narrow(0, 0, rows);
      if (b.defined()) {
        at::addmm_out(z, b, x_block, w);
      } else {
        at::mm_out(z, x_block, w);
      }
      activate_(z, activation);
      reduce_block<scalar_t>(z, p.seq.const_data_ptr<int32_t>() + start, p.index.const_data_ptr<int32_t>() + start,
                             p.weight.const_data_ptr<scalar_t>() + start, rows, mode, s);
    }
  });
  return finish_linear_forward(s, mode, x.scalar_type());
}

// --- backward -------------------------------------------------------------------------------------

template <typename T, typename Acc>
FP_CPU_CLONES Acc dot(const T* __restrict x, const T* __restrict w, int64_t n) {
  Acc total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += static_cast<Acc>(x[i]) * static_cast<Acc>(w[i]);
  return total;
}

// MAX: dz[b, n] = g act'(z) at the argmax token (0 where there is none or it is not the
// sequence's kept token), dweight, dbias and dx, added to `grads`.
template <typename T, typename Acc>
void max_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const LinearPlan& p, const at::Tensor& argmax,
                  int64_t activation, LinearGrads& grads) {
  const Geometry& g = p.geometry;
  const int64_t num_seqs = g.num_seqs, features = weight.size(0), hidden = g.hidden;
  const at::Tensor w_c = weight.contiguous(), argmax_c = argmax.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const T* x_ptr = x.const_data_ptr<T>();
  const T* w_ptr = w_c.const_data_ptr<T>();
  const T* b_ptr = bias_c.defined() ? bias_c.const_data_ptr<T>() : nullptr;
  const Acc* g_ptr = grad.const_data_ptr<Acc>();
  const int32_t* arg = argmax_c.const_data_ptr<int32_t>();
  const int32_t* owner = p.row_owner.const_data_ptr<int32_t>();
  const int64_t* first = p.first_row.const_data_ptr<int64_t>();
  const int64_t* length = p.length.const_data_ptr<int64_t>();
  std::vector<Acc> dz(num_seqs * features);
  std::vector<int64_t> token(num_seqs * features);
  Acc* dweight = grads.dweight.mutable_data_ptr<Acc>();
  Acc* dbias = grads.dbias.mutable_data_ptr<Acc>();
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(num_seqs * hidden, 1));
  at::parallel_for(0, features, grain, [&](int64_t n0, int64_t n1) {
    std::vector<T> row_buffer;
    for (int64_t n = n0; n < n1; ++n) {
      const T* w_row = w_ptr + n * hidden;
      Acc* dw_row = dweight + n * hidden;
      Acc db = 0;
      for (int64_t b = 0; b < num_seqs; ++b) {
        const int64_t i = b * features + n, a = arg[i];
        const int64_t t = first[b] + a;
        if (a < 0 || a >= length[b] || owner[t] != b) {
          dz[i] = 0;
          token[i] = -1;
          continue;
        }
        const T* x_row = contiguous_slice(x_ptr + row_offset(g, t), g.stride_h, hidden, row_buffer);
        Acc z = dot<T, Acc>(x_row, w_row, hidden);
        if (b_ptr != nullptr) z += static_cast<Acc>(b_ptr[n]);
        const Acc d = g_ptr[i] * activation_grad<Acc>(static_cast<int>(activation), z);
        add_weighted_row(dw_row, x_row, d, hidden);
        db += d;
        dz[i] = d;
        token[i] = t;
      }
      dbias[n] = db;
    }
  });
  // dx: each task owns a chunk of channels of every row and walks (b, n) in order.
  constexpr int64_t kChunk = 64;
  Acc* dx = grads.dx.mutable_data_ptr<Acc>();
  const int64_t chunks = (hidden + kChunk - 1) / kChunk;
  const int64_t work = num_seqs * features * hidden;
  at::parallel_for(0, chunks, work < kParallelWork ? chunks : 1, [&](int64_t c0, int64_t c1) {
    const int64_t h0 = c0 * kChunk, h1 = std::min(c1 * kChunk, hidden);
    for (int64_t i = 0; i < num_seqs * features; ++i) {
      if (token[i] < 0) continue;
      add_weighted_row(dx + token[i] * hidden + h0, w_ptr + (i % features) * hidden + h0, dz[i], h1 - h0);
    }
  });
}

// z[r, n] = g[seq_r, n] scale_r act'(z[r, n]) in place, for one activation (a constant, so that the
// loop vectorizes where act' is arithmetic).
template <int ACT, typename Acc>
FP_CPU_CLONES void grad_rows(Acc* __restrict z, const Acc* __restrict g, Acc scale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = g[i] * scale * activation_grad<Acc>(ACT, z[i]);
}

template <typename Acc>
void grad_block(at::Tensor& z, const Acc* grad, const int32_t* seq, const Acc* scale, int64_t rows,
                int64_t activation) {
  const int64_t features = z.size(1);
  Acc* z_ptr = z.mutable_data_ptr<Acc>();
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(features, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      Acc* row = z_ptr + r * features;
      const Acc* g = grad + std::max<int32_t>(seq[r], 0) * features;
      switch (activation) {
        case kActRelu: grad_rows<kActRelu>(row, g, scale[r], features); break;
        case kActLog1pRelu: grad_rows<kActLog1pRelu>(row, g, scale[r], features); break;
        case kActLog1pLog1pRelu: grad_rows<kActLog1pLog1pRelu>(row, g, scale[r], features); break;
        case kActGelu: grad_rows<kActGelu>(row, g, scale[r], features); break;
        case kActTanh: grad_rows<kActTanh>(row, g, scale[r], features); break;
        case kActSilu: grad_rows<kActSilu>(row, g, scale[r], features); break;
        default: grad_rows<kActNone>(row, g, scale[r], features); break;
      }
    }
  });
}

// SUM / MEAN: the projection recomputed block by block (see the file's comment).
void sum_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const LinearPlan& p, const at::Tensor& den, int64_t mode,
                  int64_t activation, LinearGrads& grads) {
  if (p.entries == 0) return;
  const int64_t features = weight.size(0);
  const at::Tensor w = weight.to(p.acc);
  const at::Tensor b = bias.has_value() ? bias->to(p.acc) : at::Tensor();
  const at::Tensor scale = linear_backward_scale(p, den, mode);
  const int64_t block =
      std::min(linear_block_rows(features, at::elementSize(p.acc), kLinearBackwardWorkspaceBytes), p.entries);
  at::Tensor workspace = at::empty({block, features}, x.options().dtype(p.acc));
  at::Tensor dx_rows = grads.dx.view({p.geometry.num_rows, p.geometry.hidden});
  AT_DISPATCH_FLOATING_TYPES(p.acc, "linear_bwd_cpu", [&] {
    for (int64_t start = 0; start < p.entries; start += block) {
      const int64_t rows = std::min(block, p.entries - start);
      const at::Tensor row_ids = p.rows.narrow(0, start, rows);
      const at::Tensor x_block = gather_rows(x, row_ids).to(p.acc);
      at::Tensor z = workspace.narrow(0, 0, rows);
      if (b.defined()) {
        at::addmm_out(z, b, x_block, w.t());
      } else {
        at::mm_out(z, x_block, w.t());
      }
      grad_block<scalar_t>(z, grad.const_data_ptr<scalar_t>(), p.seq.const_data_ptr<int32_t>() + start,
                           scale.const_data_ptr<scalar_t>() + start, rows, activation);
      dx_rows.index_copy_(0, row_ids, at::mm(z, w));  // each kept row in exactly one block
      grads.dweight.addmm_(z.t(), x_block);
      grads.dbias.add_(z.sum(0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& den,
    const at::Tensor& argmax, int64_t mode, int64_t activation) {
  check_linear_backward(at::kCPU, grad_out, x, weight, bias, mask, cu_seqlens, den, argmax, mode, activation);
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const at::Tensor grad = grad_out.to(acc).contiguous();
  LinearGrads grads = linear_grads(x, weight);
  // H = 0 still has tokens: z = bias, and the bias gets act'(bias) from every kept token.
  const int64_t rows = x.dim() == 3 ? x.size(0) * x.size(1) : x.size(0);
  if (rows > 0 && weight.size(0) > 0) {
    const LinearPlan p = make_linear_plan(x, mask, cu_seqlens, mode != kMax, true);
    if (mode == kMax) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_bwd_cpu", [&] {
        max_backward<scalar_t, at::opmath_type<scalar_t>>(grad, x, weight, bias, p, argmax, activation, grads);
      });
    } else {
      sum_backward(grad, x, weight, bias, p, den, mode, activation, grads);
    }
  }
  return finish_linear_backward(grads, x, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_pool, CPU, m) {
  m.impl("ext_linear_fwd", &linear_fwd_cpu);
  m.impl("ext_linear_bwd", &linear_bwd_cpu);
}

}  // namespace fused_pool
