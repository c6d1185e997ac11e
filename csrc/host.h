// Host-side preparation shared by the CPU and CUDA kernels: the geometry of x and views of the mask
// and cu_seqlens as the caller gave them. (Torch headers: never included by a .cu file.)
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common.h"

namespace fused_pool {

// float64 accumulation for float64 inputs, float32 otherwise.
inline at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The outputs of a pool forward (fused_pool/specs.py): out (B, H or 2H) in x's dtype, or in the
// accumulation type with the kStates bit; den (B,) for mean modes, argmax (B, H) int32 for max
// modes, else empty. `mode` is the reduction alone (kStates stripped).
struct PoolOutputs {
  int mode;
  bool states;
  at::Tensor out, den, argmax;
};

inline PoolOutputs pool_outputs(const at::Tensor& x, int64_t num_seqs, int64_t hidden, int64_t mode) {
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const bool states = (mode & kStates) != 0;
  const int reduction = static_cast<int>(mode & (kMean | kMax));
  return {reduction, states,
          at::empty({num_seqs, hidden * (reduction == (kMean | kMax) ? 2 : 1)},
                    x.options().dtype(states ? acc : x.scalar_type())),
          at::empty({(reduction & kMean) ? num_seqs : 0}, x.options().dtype(acc)),
          at::empty((reduction & kMax) ? at::IntArrayRef{num_seqs, hidden} : at::IntArrayRef{0},
                    x.options().dtype(at::kInt))};
}

// Everything a kernel needs to find each sequence's rows and their weights. The storage tensors
// keep converted copies alive (only for mask dtypes the kernels do not read directly).
struct Batch {
  Geometry geometry{};
  MaskView mask;
  IndexView cu_seqlens;
  at::Tensor mask_storage;
  at::Tensor cu_storage;
};

// The mask's view for the kernels: (B, L) padded, the per-token weights (T,) varlen (by
// batch.geometry.varlen); a copy in batch.mask_storage only for dtypes the kernels do not read.
inline void set_mask(Batch& batch, const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return;
  int kind;
  batch.mask_storage = *mask;
  switch (mask->scalar_type()) {
    case at::kBool: batch.mask_storage = mask->view(at::kByte); kind = kMaskUInt8; break;
    case at::kByte: kind = kMaskUInt8; break;
    case at::kInt: kind = kMaskInt32; break;
    case at::kLong: kind = kMaskInt64; break;
    case at::kFloat: kind = kMaskFloat32; break;
    case at::kDouble: kind = kMaskFloat64; break;
    default:  // float16, bfloat16, int8, int16, ...: converted once, (B, L) or (T,) small
      kind = mask->is_floating_point() ? kMaskFloat32 : kMaskUInt8;
      batch.mask_storage = mask->is_floating_point() ? mask->to(at::kFloat) : mask->ne(0).to(at::kByte);
  }
  // Varlen: row t's weight at mask[t * stride], whatever the sequence.
  const bool per_token = batch.geometry.varlen;
  batch.mask = {batch.mask_storage.const_data_ptr(), kind, per_token ? 0 : batch.mask_storage.stride(0),
                batch.mask_storage.stride(per_token ? 0 : 1)};
}

// x given by its sizes and strides: (B, L, H) padded, (T, H) varlen (its sequences: cu_seqlens).
inline Geometry make_geometry(at::IntArrayRef sizes, at::IntArrayRef strides,
                              const std::optional<at::Tensor>& cu_seqlens) {
  if (cu_seqlens.has_value()) return {cu_seqlens->size(0) - 1, 0, sizes[0], sizes[1], 0, strides[0], strides[1], true};
  return {sizes[0], sizes[1], sizes[0] * sizes[1], sizes[2], strides[0], strides[1], strides[2], false};
}

// x given by its sizes and strides: (B, L, H) padded, (T, H) varlen. mask: (B, L) padded, (T,)
// per-token weights varlen (shapes checked by checks.h).
inline Batch make_batch(at::IntArrayRef sizes, at::IntArrayRef strides, const std::optional<at::Tensor>& mask,
                        const std::optional<at::Tensor>& cu_seqlens) {
  Batch batch;
  batch.geometry = make_geometry(sizes, strides, cu_seqlens);
  if (cu_seqlens.has_value()) {
    batch.cu_storage = cu_seqlens->contiguous();
    batch.cu_seqlens = {batch.cu_storage.const_data_ptr(), batch.cu_storage.scalar_type() == at::kLong};
  }
  set_mask(batch, mask);
  return batch;
}

inline Batch make_batch(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                        const std::optional<at::Tensor>& cu_seqlens) {
  return make_batch(x.sizes(), x.strides(), mask, cu_seqlens);
}

// span_pool's inputs: x (T, H) as S varlen "sequences" (the spans) over its T tokens, the per-token
// mask (T,), and the spans (S, 2) contiguous (read with span_bounds).
struct SpanBatch {
  Batch tokens;
  IndexView spans;
  at::Tensor spans_storage;
};

inline SpanBatch make_span_batch(at::IntArrayRef sizes, at::IntArrayRef strides, const at::Tensor& spans,
                                 const std::optional<at::Tensor>& mask) {
  SpanBatch batch;
  batch.tokens.geometry = {spans.size(0), 0, sizes[0], sizes[1], 0, strides[0], strides[1], true};
  set_mask(batch.tokens, mask);
  batch.spans_storage = spans.contiguous();
  batch.spans = {batch.spans_storage.const_data_ptr(), batch.spans_storage.scalar_type() == at::kLong};
  return batch;
}

}  // namespace fused_pool
