// Argument checks of every ext op, shared by the CPU and the CUDA kernels. The public functions are
// checked in Python (fused_pool/_checks.py); these make a direct torch.ops.fused_pool.ext_* call with a
// wrong device, dtype, shape or mode raise a RuntimeError that names the argument, instead of
// reading out of bounds or returning garbage. They read no tensor values (no device sync).
// (Torch headers: never included by a .cu file.)
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common.h"
#include "host.h"

namespace fused_pool {

// x's sizes in the kernels' terms.
struct Dims {
  bool varlen;
  int64_t num_seqs;  // B
  int64_t seq_len;   // L padded, 0 varlen
  int64_t num_rows;  // B * L padded, T varlen
  int64_t hidden;    // H
};

// One op's checks: its name (for the messages) and the device every tensor must be on.
class ArgChecks {
 public:
  // `anchor` (x, or grad_out for ext_pool_bwd) must be on the device type of the kernel called.
  ArgChecks(const char* op, at::DeviceType kernel_device, const char* anchor_name, const at::Tensor& anchor)
      : op_(op), anchor_(anchor_name), device_(anchor.device()) {
    TORCH_CHECK(anchor.device().type() == kernel_device, op_, " (", at::DeviceTypeName(kernel_device),
                " kernel): ", anchor_name, " must be a ", at::DeviceTypeName(kernel_device), " tensor, got one on ",
                anchor.device(), "; every tensor argument must be on ", anchor_name, "'s device");
  }

  const char* op() const { return op_; }

  void device(const char* name, const at::Tensor& t) const {
    TORCH_CHECK(t.device() == device_, op_, ": ", name, " is on ", t.device(), " but must be on ", device_, " (",
                anchor_, "'s device)");
  }

  void floating(const char* name, at::ScalarType dtype) const {
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble, op_,
                ": ", name, " must be float16, bfloat16, float32 or float64, got ", dtype);
  }

  void dtype(const char* name, const at::Tensor& t, at::ScalarType expected) const {
    TORCH_CHECK(t.scalar_type() == expected, op_, ": ", name, " must be ", expected, ", got ", t.scalar_type());
  }

  void shape(const char* name, const at::Tensor& t, at::IntArrayRef expected, const char* what) const {
    TORCH_CHECK(t.sizes() == expected, op_, ": ", name, " must be ", what, " = ", expected, ", got shape ", t.sizes());
  }

  // cu_seqlens (B + 1,) int32 / int64.
  void cu_seqlens(const at::Tensor& cu) const {
    device("cu_seqlens", cu);
    TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, op_,
                ": cu_seqlens must be int32 or int64, got ", cu.scalar_type());
    TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, op_, ": cu_seqlens must be 1-D of shape (B + 1,), got shape ",
                cu.sizes());
  }

  // x's sizes and dtype: (B, L, H) padded, (T, H) varlen (after cu_seqlens is checked).
  Dims x(const char* name, at::IntArrayRef sizes, at::ScalarType dtype,
         const std::optional<at::Tensor>& cu_seqlens_arg) const {
    floating(name, dtype);
    for (const int64_t size : sizes) TORCH_CHECK(size >= 0, op_, ": ", name, " has a negative size: ", sizes);
    if (cu_seqlens_arg.has_value()) {
      cu_seqlens(*cu_seqlens_arg);
      TORCH_CHECK(sizes.size() == 2, op_, ": ", name, " must be (T, H) when cu_seqlens is given, got shape ", sizes);
      return {true, cu_seqlens_arg->size(0) - 1, 0, sizes[0], sizes[1]};
    }
    TORCH_CHECK(sizes.size() == 3, op_, ": ", name, " must be (B, L, H) when cu_seqlens is None, got shape ", sizes);
    return {false, sizes[0], sizes[1], sizes[0] * sizes[1], sizes[2]};
  }

  // mask: (B, L) padded, per-token (T,) varlen.
  void mask(const std::optional<at::Tensor>& mask, const Dims& d) const {
    if (!mask.has_value()) return;
    device("mask", *mask);
    TORCH_CHECK(!mask->is_complex(), op_, ": mask must be bool, integer or floating, got ", mask->scalar_type());
    if (!d.varlen) {
      shape("mask", *mask, {d.num_seqs, d.seq_len}, "(B, L)");
      return;
    }
    shape("mask", *mask, {d.num_rows}, "(T,)");
  }

  void max_seqlen(std::optional<int64_t> max_seqlen) const {
    TORCH_CHECK(!max_seqlen.has_value() || *max_seqlen >= 0, op_, ": max_seqlen must be >= 0, got ", *max_seqlen);
  }

  // 1 (mean), 2 (max) or 3 (mean_max); a forward may add 4 (states).
  void mode(int64_t mode, bool forward) const {
    const int64_t reduction = forward ? (mode & ~int64_t(kStates)) : mode;
    TORCH_CHECK(reduction == kMean || reduction == kMax || reduction == (kMean | kMax), op_,
                ": mode must be 1 (mean), 2 (max) or 3 (mean_max)", forward ? ", plus 4 (states)," : "", " got ",
                mode);
  }

  // Heads of attention: nh >= 1 dividing H.
  void heads(const char* name, int64_t num_heads, const Dims& d) const {
    TORCH_CHECK(num_heads >= 1 && d.hidden % num_heads == 0, op_, ": ", name, " has nh = ", num_heads,
                " heads, which must be >= 1 and divide H = ", d.hidden);
  }

 private:
  const char* op_;
  const char* anchor_;
  at::Device device_;
};

// ext_pool_fwd(x, mask, cu_seqlens, max_seqlen, mode). Varlen takes per-token weights (T,).
inline void check_pool_forward(at::DeviceType kernel, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& cu_seqlens, std::optional<int64_t> max_seqlen,
                               int64_t mode) {
  const ArgChecks c("fused_pool::ext_pool_fwd", kernel, "x", x);
  c.mode(mode, true);
  const Dims d = c.x("x", x.sizes(), x.scalar_type(), cu_seqlens);
  c.mask(mask, d);
  c.max_seqlen(max_seqlen);
  // argmax holds a row's index within its sequence in int32.
  TORCH_CHECK(!(mode & kMax) || d.varlen || d.seq_len <= INT32_MAX, c.op(),
              ": masked_max needs L <= 2^31 - 1 (int32 argmax), got L = ", d.seq_len);
}

// ext_pool_bwd(grad_out, mask, cu_seqlens, den, argmax, x_shape, x_dtype, mode).
inline void check_pool_backward(at::DeviceType kernel, const at::Tensor& grad_out,
                                const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
                                const at::Tensor& den, const at::Tensor& argmax, at::IntArrayRef x_shape,
                                at::ScalarType x_dtype, int64_t mode) {
  const ArgChecks c("fused_pool::ext_pool_bwd", kernel, "grad_out", grad_out);
  c.mode(mode, false);
  const Dims d = c.x("x_shape / x_dtype", x_shape, x_dtype, cu_seqlens);
  c.mask(mask, d);
  c.floating("grad_out", grad_out.scalar_type());
  c.shape("grad_out", grad_out, {d.num_seqs, d.hidden * (mode == (kMean | kMax) ? 2 : 1)},
          mode == (kMean | kMax) ? "(B, 2H)" : "(B, H)");
  if (mode & kMean) {
    c.device("den", den);
    c.dtype("den", den, accumulation_type(x_dtype));
    c.shape("den", den, {d.num_seqs}, "(B,)");
  }
  if (mode & kMax) {
    c.device("argmax", argmax);
    c.dtype("argmax", argmax, at::kInt);
    c.shape("argmax", argmax, {d.num_seqs, d.hidden}, "(B, H)");
  }
}

// span_pool's x (T, H) and spans (S, 2) int32 / int64: x's dims as S varlen "sequences" over T tokens
// (the mask is then per-token (T,)).
inline Dims check_span_inputs(const ArgChecks& c, const char* x_name, at::IntArrayRef x_sizes, at::ScalarType x_dtype,
                              const at::Tensor& spans) {
  c.floating(x_name, x_dtype);
  TORCH_CHECK(x_sizes.size() == 2, c.op(), ": ", x_name, " must be (T, H), got shape ", x_sizes);
  for (const int64_t size : x_sizes) TORCH_CHECK(size >= 0, c.op(), ": ", x_name, " has a negative size: ", x_sizes);
  c.device("spans", spans);
  TORCH_CHECK(spans.scalar_type() == at::kInt || spans.scalar_type() == at::kLong, c.op(),
              ": spans must be int32 or int64, got ", spans.scalar_type());
  TORCH_CHECK(spans.dim() == 2 && spans.size(1) == 2, c.op(), ": spans must be (S, 2), got shape ", spans.sizes());
  return {true, spans.size(0), 0, x_sizes[0], x_sizes[1]};
}

// ext_span_fwd(x, spans, mask, mode).
inline void check_span_forward(at::DeviceType kernel, const at::Tensor& x, const at::Tensor& spans,
                               const std::optional<at::Tensor>& mask, int64_t mode) {
  const ArgChecks c("fused_pool::ext_span_fwd", kernel, "x", x);
  c.mode(mode, false);
  const Dims d = check_span_inputs(c, "x", x.sizes(), x.scalar_type(), spans);
  c.mask(mask, d);
  // argmax holds a token's index within its span (< T) in int32.
  TORCH_CHECK(!(mode & kMax) || d.num_rows <= INT32_MAX, c.op(),
              ": max modes need T <= 2^31 - 1 (int32 argmax), got T = ", d.num_rows);
}

// ext_span_bwd(grad_out, spans, mask, den, argmax, x_shape, x_dtype, mode).
inline void check_span_backward(at::DeviceType kernel, const at::Tensor& grad_out, const at::Tensor& spans,
                                const std::optional<at::Tensor>& mask, const at::Tensor& den, const at::Tensor& argmax,
                                at::IntArrayRef x_shape, at::ScalarType x_dtype, int64_t mode) {
  const ArgChecks c("fused_pool::ext_span_bwd", kernel, "grad_out", grad_out);
  c.mode(mode, false);
  const Dims d = check_span_inputs(c, "x_shape / x_dtype", x_shape, x_dtype, spans);
  c.mask(mask, d);
  c.floating("grad_out", grad_out.scalar_type());
  c.shape("grad_out", grad_out, {d.num_seqs, d.hidden * (mode == (kMean | kMax) ? 2 : 1)},
          mode == (kMean | kMax) ? "(S, 2H)" : "(S, H)");
  if (mode & kMean) {
    c.device("den", den);
    c.dtype("den", den, accumulation_type(x_dtype));
    c.shape("den", den, {d.num_seqs}, "(S,)");
  }
  if (mode & kMax) {
    c.device("argmax", argmax);
    c.dtype("argmax", argmax, at::kInt);
    c.shape("argmax", argmax, {d.num_seqs, d.hidden}, "(S, H)");
  }
}

// The inputs shared by the attention forwards and backwards: x, the mask, and scores (B, L, nh) /
// (T, nh) or query (nh, H / nh). Returns x's dims and nh.
struct AttentionDims {
  Dims d;
  int64_t num_heads;
};

inline AttentionDims check_attention_inputs(const ArgChecks& c, const at::Tensor& x,
                                            const std::optional<at::Tensor>& scores,
                                            const std::optional<at::Tensor>& query,
                                            const std::optional<at::Tensor>& mask,
                                            const std::optional<at::Tensor>& cu_seqlens) {
  const Dims d = c.x("x", x.sizes(), x.scalar_type(), cu_seqlens);
  c.mask(mask, d);
  if (query.has_value()) {
    c.device("query", *query);
    c.floating("query", query->scalar_type());
    TORCH_CHECK(query->dim() == 2, c.op(), ": query must be (nh, H / nh), got shape ", query->sizes());
    c.heads("query", query->size(0), d);
    c.shape("query", *query, {query->size(0), d.hidden / query->size(0)}, "(nh, H / nh)");
    return {d, query->size(0)};
  }
  c.device("scores", *scores);
  c.floating("scores", scores->scalar_type());
  const std::vector<int64_t> tokens =
      d.varlen ? std::vector<int64_t>{d.num_rows} : std::vector<int64_t>{d.num_seqs, d.seq_len};
  const int64_t rank = static_cast<int64_t>(tokens.size()) + 1;
  TORCH_CHECK(scores->dim() == rank && scores->sizes().slice(0, rank - 1) == at::IntArrayRef(tokens), c.op(),
              ": scores must be ", d.varlen ? "(T, nh) with T = " : "(B, L, nh) with (B, L) = ",
              at::IntArrayRef(tokens), ", got shape ", scores->sizes());
  c.heads("scores", scores->size(-1), d);
  return {d, scores->size(-1)};
}

// ext_attention_fwd (scores) and ext_query_attention_fwd (query). Varlen takes a per-token mask
// (T,), as pool does.
inline void check_attention_forward(at::DeviceType kernel, const char* op, const at::Tensor& x,
                                    const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& query,
                                    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
                                    std::optional<int64_t> max_seqlen) {
  const ArgChecks c(op, kernel, "x", x);
  check_attention_inputs(c, x, scores, query, mask, cu_seqlens);
  c.max_seqlen(max_seqlen);
}

// ext_attention_bwd / ext_query_attention_bwd: the forward's arguments plus grad_out (B, H), out
// (B, H) and stats (B, nh, 2) in the accumulation dtype.
inline void check_attention_backward(at::DeviceType kernel, const char* op, const at::Tensor& grad_out,
                                     const at::Tensor& x, const std::optional<at::Tensor>& scores,
                                     const std::optional<at::Tensor>& query, const std::optional<at::Tensor>& mask,
                                     const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& out,
                                     const at::Tensor& stats) {
  const ArgChecks c(op, kernel, "x", x);
  const auto [d, num_heads] = check_attention_inputs(c, x, scores, query, mask, cu_seqlens);
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  c.device("grad_out", grad_out);
  c.floating("grad_out", grad_out.scalar_type());
  c.shape("grad_out", grad_out, {d.num_seqs, d.hidden}, "(B, H)");
  c.device("out", out);
  c.dtype("out", out, acc);
  c.shape("out", out, {d.num_seqs, d.hidden}, "(B, H)");
  c.device("stats", stats);
  c.dtype("stats", stats, acc);
  c.shape("stats", stats, {d.num_seqs, num_heads, 2}, "(B, nh, 2)");
}

// --- probe_attention ------------------------------------------------------------------------------

// x, the mask ((B, L) padded; varlen none) and probes (P, H), 1 <= P <= kMaxProbes. Returns x's dims.
inline Dims check_probe_inputs(const ArgChecks& c, const at::Tensor& x, const at::Tensor& probes,
                               const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens) {
  const Dims d = c.x("x", x.sizes(), x.scalar_type(), cu_seqlens);
  TORCH_CHECK(!(d.varlen && mask.has_value()), c.op(), ": mask must be None when cu_seqlens is given (varlen)");
  c.mask(mask, d);
  c.device("probes", probes);
  c.floating("probes", probes.scalar_type());
  TORCH_CHECK(probes.dim() == 2 && probes.size(1) == d.hidden, c.op(), ": probes must be (P, H) with H = ", d.hidden,
              ", got shape ", probes.sizes());
  TORCH_CHECK(probes.size(0) >= 1 && probes.size(0) <= kMaxProbes, c.op(), ": probes must hold 1 to ", kMaxProbes,
              " probes (P, H), got P = ", probes.size(0));
  return d;
}

// ext_probe_attention_fwd(x, probes, mask, cu_seqlens, max_seqlen, scale).
inline void check_probe_attention_forward(at::DeviceType kernel, const at::Tensor& x, const at::Tensor& probes,
                                          const std::optional<at::Tensor>& mask,
                                          const std::optional<at::Tensor>& cu_seqlens,
                                          std::optional<int64_t> max_seqlen) {
  const ArgChecks c("fused_pool::ext_probe_attention_fwd", kernel, "x", x);
  check_probe_inputs(c, x, probes, mask, cu_seqlens);
  c.max_seqlen(max_seqlen);
}

// ext_probe_attention_bwd: the forward's arguments plus grad_out (B, P, H), out (B, P, H) and stats
// (B, P, 2) in the accumulation dtype.
inline void check_probe_attention_backward(at::DeviceType kernel, const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& probes, const std::optional<at::Tensor>& mask,
                                           const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& out,
                                           const at::Tensor& stats) {
  const ArgChecks c("fused_pool::ext_probe_attention_bwd", kernel, "x", x);
  const Dims d = check_probe_inputs(c, x, probes, mask, cu_seqlens);
  const int64_t num_probes = probes.size(0);
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  c.device("grad_out", grad_out);
  c.floating("grad_out", grad_out.scalar_type());
  c.shape("grad_out", grad_out, {d.num_seqs, num_probes, d.hidden}, "(B, P, H)");
  c.device("out", out);
  c.dtype("out", out, acc);
  c.shape("out", out, {d.num_seqs, num_probes, d.hidden}, "(B, P, H)");
  c.device("stats", stats);
  c.dtype("stats", stats, acc);
  c.shape("stats", stats, {d.num_seqs, num_probes, 2}, "(B, P, 2)");
}

// --- linear_pool ----------------------------------------------------------------------------------

// linear's x (B, L, H) / (T, H), mask, weight (N, H) and bias (N,) or None in x's dtype, mode MAX /
// SUM / MEAN and the activation index. Returns x's dims.
inline Dims check_linear_inputs(const ArgChecks& c, const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                                const std::optional<at::Tensor>& cu_seqlens, int64_t mode, int64_t activation) {
  TORCH_CHECK(mode == kMax || mode == kSum || mode == kMean, c.op(), ": mode must be 2 (max), 8 (sum) or 1 (mean), got ",
              mode);
  TORCH_CHECK(activation >= 0 && activation < kNumActivations, c.op(), ": activation must be an index into ",
              "fused_pool.contract.ACTIVATIONS (0 to ", kNumActivations - 1, "), got ", activation);
  const Dims d = c.x("x", x.sizes(), x.scalar_type(), cu_seqlens);
  c.mask(mask, d);
  c.device("weight", weight);
  c.dtype("weight", weight, x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d.hidden, c.op(), ": weight must be (N, H) with H = ", d.hidden,
              ", got shape ", weight.sizes());
  if (bias.has_value()) {
    c.device("bias", *bias);
    c.dtype("bias", *bias, x.scalar_type());
    c.shape("bias", *bias, {weight.size(0)}, "(N,)");
  }
  // argmax and the plan hold a token's index within its sequence in int32.
  TORCH_CHECK(d.num_rows <= INT32_MAX, c.op(), ": linear_pool needs fewer than 2^31 tokens, got ", d.num_rows);
  return d;
}

// ext_linear_fwd(x, weight, bias, mask, cu_seqlens, max_seqlen, mode, activation).
inline void check_linear_forward(at::DeviceType kernel, const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& cu_seqlens, std::optional<int64_t> max_seqlen,
                                 int64_t mode, int64_t activation) {
  const ArgChecks c("fused_pool::ext_linear_fwd", kernel, "x", x);
  check_linear_inputs(c, x, weight, bias, mask, cu_seqlens, mode, activation);
  c.max_seqlen(max_seqlen);
}

// ext_linear_bwd(grad_out, x, weight, bias, mask, cu_seqlens, den, argmax, mode, activation).
inline void check_linear_backward(at::DeviceType kernel, const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
                                  const at::Tensor& den, const at::Tensor& argmax, int64_t mode, int64_t activation) {
  const ArgChecks c("fused_pool::ext_linear_bwd", kernel, "x", x);
  const Dims d = check_linear_inputs(c, x, weight, bias, mask, cu_seqlens, mode, activation);
  c.device("grad_out", grad_out);
  c.floating("grad_out", grad_out.scalar_type());
  c.shape("grad_out", grad_out, {d.num_seqs, weight.size(0)}, "(B, N)");
  if (mode == kMean) {
    c.device("den", den);
    c.dtype("den", den, accumulation_type(x.scalar_type()));
    c.shape("den", den, {d.num_seqs}, "(B,)");
  }
  if (mode == kMax) {
    c.device("argmax", argmax);
    c.dtype("argmax", argmax, at::kInt);
    c.shape("argmax", argmax, {d.num_seqs, weight.size(0)}, "(B, N)");
  }
}

}  // namespace fused_pool
