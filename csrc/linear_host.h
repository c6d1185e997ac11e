// linear_pool's host-side plan, shared by the CPU and CUDA kernels (csrc/cpu/linear_cpu.cpp,
// csrc/cuda/linear_cuda.cpp): which rows of x are kept, by which sequence, in which blocks the
// projection z = x W^T + b is computed, and the (B, N) states it is reduced into. Built with ATen
// ops, so the same code runs on either device and never reads cu_seqlens back to the host on CUDA.
// (Torch headers: never included by a .cu file.)
//
// Entries: the kept rows in token order (CPU: exactly those; CUDA: every row, the kept ones first
// and the rest marked seq = -1, so that no host sync is needed to count them). A varlen row belongs
// to at most one sequence, the first whose clamped end is past it (the torch backend's rule): with
// malformed cu_seqlens a row is still used at most once and never out of bounds. Blocks of
// `block_rows` entries may span sequence boundaries; they run in order, so the read-modify-write of
// the states by each block's epilogue is deterministic.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <optional>

#include "common.h"
#include "host.h"

namespace fused_pool {

// The (block_rows, N) workspace of one block's projection stays under this many bytes: 16 MiB in
// the forward; 48 MiB in the SUM / MEAN backward, whose dweight += dz^T x_block is a rank-R update
// of the whole (N, H) accumulator, memory-bound for small R (forward + backward stays under the
// issue's 224 MiB at B=16 L=256 H=768 N=30522 float32: 106 MiB of gradients, 48 of workspace).
constexpr int64_t kLinearWorkspaceBytes = int64_t{16} << 20;
constexpr int64_t kLinearBackwardWorkspaceBytes = int64_t{48} << 20;
constexpr int64_t kLinearMaxBlockRows = 4096;

// Rows per block: the workspace bound, at most 4096, a multiple of 16 when above 16.
// FUSED_POOL_LINEAR_BLOCK_ROWS overrides it (tests force blocks shorter than a sequence).
inline int64_t linear_block_rows(int64_t features, int64_t acc_size, int64_t bytes = kLinearWorkspaceBytes) {
  if (const char* forced = std::getenv("FUSED_POOL_LINEAR_BLOCK_ROWS")) {
    const int64_t rows = std::atoll(forced);
    if (rows > 0) return rows;
  }
  int64_t rows = bytes / std::max<int64_t>(features * acc_size, 1);
  rows = std::clamp<int64_t>(rows, 1, kLinearMaxBlockRows);
  return rows > 16 ? rows / 16 * 16 : rows;
}

struct LinearPlan {
  Geometry geometry{};  // x's: rows b * L + l padded (B * L of them), t varlen (T)
  at::ScalarType acc;
  // Per row of x (num_rows,): its sequence if kept, else -1 (int32).
  at::Tensor row_owner;
  // Per sequence (B,): the row of its index 0 and its clamped length (int64).
  at::Tensor first_row, length;
  // Entries (E,): row of x (int64), sequence (int32, -1: not kept), index within the sequence
  // (int32), mask weight (acc).
  at::Tensor rows, seq, index, weight;
  int64_t entries = 0;
};

// x padded (B, L, H) or varlen (T, H) (checked by checks.h). `with_entries`: also the entries (the
// forward and the SUM / MEAN backward); `exact`: cut them to the kept rows (reads their count back
// to the host: the CPU kernels only).
inline LinearPlan make_linear_plan(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                   const std::optional<at::Tensor>& cu_seqlens, bool with_entries, bool exact) {
  LinearPlan p;
  p.geometry = make_geometry(x.sizes(), x.strides(), cu_seqlens);
  const Geometry& g = p.geometry;
  p.acc = accumulation_type(x.scalar_type());
  const at::TensorOptions longs = x.options().dtype(at::kLong);
  at::Tensor row = at::arange(g.num_rows, longs);
  at::Tensor owner, index, inside;
  if (g.varlen) {
    const at::Tensor cu = cu_seqlens->to(at::kLong);
    const at::Tensor starts = cu.narrow(0, 0, g.num_seqs).clamp(0, g.num_rows);
    const at::Tensor ends = at::maximum(cu.narrow(0, 1, g.num_seqs), starts).clamp_max(g.num_rows);
    // The first sequence whose end is past the row (skips empty ones); num_seqs: none.
    owner = at::searchsorted(ends, row, /*out_int32=*/false, /*right=*/true);
    const at::Tensor padded_starts = at::cat({starts, starts.new_zeros({1})});
    const at::Tensor padded_ends = at::cat({ends, ends.new_zeros({1})});
    const at::Tensor start = padded_starts.index_select(0, owner);
    inside = owner.lt(g.num_seqs).logical_and_(row.ge(start)).logical_and_(row.lt(padded_ends.index_select(0, owner)));
    index = row - start;
    p.first_row = starts;
    p.length = ends - starts;
  } else {
    const int64_t len = std::max<int64_t>(g.seq_len, 1);
    owner = row.div(len, "floor");
    index = row.remainder(len);
    inside = at::ones({g.num_rows}, x.options().dtype(at::kBool));
    p.first_row = at::arange(g.num_seqs, longs) * g.seq_len;
    p.length = at::full({g.num_seqs}, g.seq_len, longs);
  }
  at::Tensor keep = inside;
  at::Tensor weight;
  if (mask.has_value()) {
    const at::Tensor flat_mask = mask->reshape({-1});
    keep = keep.logical_and(flat_mask.ne(0));
    weight = mask->is_floating_point() ? at::where(keep, flat_mask.to(p.acc), 0) : keep.to(p.acc);
  } else {
    weight = keep.to(p.acc);
  }
  p.row_owner = at::where(keep, owner, -1).to(at::kInt);
  if (!with_entries) return p;
  const at::Tensor selected =
      exact ? keep.nonzero().squeeze(1) : at::argsort(keep.logical_not().to(at::kByte), /*stable=*/true, 0, false);
  p.rows = selected;
  p.seq = p.row_owner.index_select(0, selected);
  p.index = index.index_select(0, selected).to(at::kInt);
  p.weight = weight.index_select(0, selected);
  p.entries = selected.size(0);
  return p;
}

// Rows `rows` (int64) of x as an (R, H) contiguous tensor in x's dtype, from any strides, without
// copying x.
inline at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& rows) {
  if (x.dim() == 2) return x.index_select(0, rows);
  const int64_t len = x.size(1);
  if (x.size(0) <= 1 || x.stride(0) == len * x.stride(1))
    return x.as_strided({x.size(0) * len, x.size(2)}, {x.stride(1), x.stride(2)}).index_select(0, rows);
  return at::index(x, {rows.div(std::max<int64_t>(len, 1), "floor"), rows.remainder(std::max<int64_t>(len, 1))})
      .contiguous();
}

// The forward's (B, N) running states: max and its argmax (MAX, argmax -1 = empty), or the sum of
// w a (SUM / MEAN) and den (MEAN), in the accumulation dtype.
struct LinearStates {
  at::Tensor value;   // (B, N) acc: max, or sum of w a
  at::Tensor argmax;  // (B, N) int32 (MAX), else empty(0)
  at::Tensor den;     // (B,) acc (MEAN), else empty(0)
};

inline LinearStates linear_states(const at::Tensor& x, int64_t num_seqs, int64_t features, int64_t mode) {
  const at::TensorOptions acc = x.options().dtype(accumulation_type(x.scalar_type()));
  LinearStates s;
  s.value = mode == kMax ? at::empty({num_seqs, features}, acc) : at::zeros({num_seqs, features}, acc);
  s.argmax = mode == kMax ? at::full({num_seqs, features}, -1, x.options().dtype(at::kInt))
                          : at::empty({0}, x.options().dtype(at::kInt));
  s.den = mode == kMean ? at::zeros({num_seqs}, acc) : at::empty({0}, acc);
  return s;
}

// (out in x's dtype, den, argmax): MAX 0 where empty, MEAN sum / den (0 where den == 0).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_linear_forward(const LinearStates& s, int64_t mode,
                                                                            at::ScalarType dtype) {
  at::Tensor out;
  if (mode == kMax) {
    out = at::where(s.argmax.ge(0), s.value, 0);
  } else if (mode == kMean) {
    const at::Tensor den = s.den.unsqueeze(1);
    const at::Tensor nonzero = den.ne(0);
    out = at::where(nonzero, s.value / at::where(nonzero, den, 1), 0);
  } else {
    out = s.value;
  }
  return {out.to(dtype).contiguous(), s.den, s.argmax};
}

// The backward's accumulators, zeros in the accumulation dtype: dx (x's shape, contiguous), dweight
// (N, H), dbias (N,); finish_linear_backward converts them to the outputs' dtypes.
struct LinearGrads {
  at::Tensor dx, dweight, dbias;
};

inline LinearGrads linear_grads(const at::Tensor& x, const at::Tensor& weight) {
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  return {at::zeros(x.sizes(), x.options().dtype(acc)), at::zeros(weight.sizes(), weight.options().dtype(acc)),
          at::zeros({weight.size(0)}, weight.options().dtype(acc))};
}

// (dx in x's dtype, dweight and dbias in weight's): no copy for float32 / float64.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_linear_backward(const LinearGrads& grads,
                                                                             const at::Tensor& x,
                                                                             const at::Tensor& weight) {
  return {grads.dx.to(x.scalar_type()), grads.dweight.to(weight.scalar_type()), grads.dbias.to(weight.scalar_type())};
}

// Per-entry scale of the SUM / MEAN backward: w (SUM), w / den[seq] (MEAN, 0 where den == 0), 0
// for the entries not kept (seq = -1).
inline at::Tensor linear_backward_scale(const LinearPlan& p, const at::Tensor& den, int64_t mode) {
  const at::Tensor valid = p.seq.ge(0);
  at::Tensor scale = at::where(valid, p.weight, 0);
  if (mode == kMean) {
    const at::Tensor inverse = at::where(den.ne(0), 1 / at::where(den.ne(0), den.to(p.acc), 1), 0);
    scale = scale * inverse.index_select(0, p.seq.clamp_min(0).to(at::kLong));
  }
  return scale.contiguous();
}

}  // namespace fused_pool
