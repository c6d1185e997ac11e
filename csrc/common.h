// Semantics shared by the CPU kernels (g++) and the CUDA kernels (nvcc). Torch-free on purpose, so
// that the .cu files that include it compile with nvcc alone.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FP_HOST_DEVICE inline
#endif

namespace fused_pool {

// Where the rows of each sequence are. Padded: sequence b owns rows (positions) [0, L) at
// x + b * stride_b + l * stride_row. Varlen: rows are tokens [cu[b], cu[b+1]) (clamped) at
// x + t * stride_row (stride_b = 0).
struct Geometry {
  int64_t num_seqs;
  int64_t seq_len;   // L (padded), 0 (varlen)
  int64_t num_rows;  // B * L (padded), T (varlen)
  int64_t hidden;
  int64_t stride_b;
  int64_t stride_row;
  int64_t stride_h;
  bool varlen;
};

// Pool modes: bit 1 = mean, bit 2 = max (mean_max = both). Forward only, bit 4 = states: `out` holds
// the partial states in the accumulation type, the mean half sum(w x) undivided (fused_pool/partials.py).
constexpr int kMean = 1;
constexpr int kMax = 2;
constexpr int kStates = 4;

// cu_seqlens as the caller gave it: int32 or int64, contiguous.
struct IndexView {
  const void* data = nullptr;
  bool is_int64 = false;
  FP_HOST_DEVICE int64_t operator[](int64_t i) const {
    return is_int64 ? static_cast<const int64_t*>(data)[i] : static_cast<const int32_t*>(data)[i];
  }
};

// The mask as the caller gave it, any strides, read without a converted copy: (B, L) padded, or the
// per-token weights (T,) varlen (stride_seq = 0, row = t). A floating mask gives its value (the
// weight of masked_mean), any other mask 1 where nonzero; every op keeps w != 0.
enum MaskKind : int { kNoMask = 0, kMaskUInt8 = 1, kMaskInt32 = 2, kMaskInt64 = 3, kMaskFloat32 = 4, kMaskFloat64 = 5 };

struct MaskView {
  const void* data = nullptr;
  int kind = kNoMask;
  int64_t stride_seq = 0;
  int64_t stride_row = 0;

  template <typename Acc>
  FP_HOST_DEVICE Acc weight(int64_t seq, int64_t row) const {
    const int64_t i = seq * stride_seq + row * stride_row;
    switch (kind) {
      case kMaskUInt8: return static_cast<const uint8_t*>(data)[i] != 0 ? Acc(1) : Acc(0);
      case kMaskInt32: return static_cast<const int32_t*>(data)[i] != 0 ? Acc(1) : Acc(0);
      case kMaskInt64: return static_cast<const int64_t*>(data)[i] != 0 ? Acc(1) : Acc(0);
      case kMaskFloat32: return static_cast<Acc>(static_cast<const float*>(data)[i]);
      case kMaskFloat64: return static_cast<Acc>(static_cast<const double*>(data)[i]);
      default: return Acc(1);
    }
  }
};

// [start, end) rows clamped to [0, num_rows], end >= start, so that malformed values never reach
// memory out of bounds.
FP_HOST_DEVICE void clamp_rows(int64_t num_rows, int64_t& start, int64_t& end) {
  start = start < 0 ? 0 : (start > num_rows ? num_rows : start);
  end = end < start ? start : (end > num_rows ? num_rows : end);
}

// [start, end) rows of varlen sequence `seq`: cu_seqlens[seq], cu_seqlens[seq + 1] clamped.
FP_HOST_DEVICE void segment_bounds(IndexView cu_seqlens, int64_t seq, int64_t num_rows, int64_t& start, int64_t& end) {
  start = cu_seqlens[seq];
  end = cu_seqlens[seq + 1];
  clamp_rows(num_rows, start, end);
}

// [start', end') tokens of span `span` (spans: (S, 2) contiguous, half-open [start, end) offsets):
// start' = min(max(start, 0), T), end' = min(max(end, start'), T), so that malformed spans are empty
// or cut at the edges and never reach memory out of bounds.
FP_HOST_DEVICE void span_bounds(IndexView spans, int64_t span, int64_t num_rows, int64_t& start, int64_t& end) {
  start = spans[2 * span];
  end = spans[2 * span + 1];
  clamp_rows(num_rows, start, end);
}

// The sequence of varlen row `row`: the largest seq in [0, num_seqs) with cu_seqlens[seq] <= row
// (0 if none). Whether the row is inside that sequence is for the caller to check with its bounds.
FP_HOST_DEVICE int64_t row_sequence(IndexView cu_seqlens, int64_t num_seqs, int64_t row) {
  int64_t lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    int64_t mid = (lo + hi + 1) / 2;
    if (cu_seqlens[mid] <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Where row `row` of the flattened (B * L or T) rows belongs.
struct RowPlace {
  int64_t seq;       // its sequence
  int64_t position;  // the row in the forward's terms, which x and the mask are indexed by: l padded, t varlen
  int64_t index;     // its index within the sequence, what argmax stores: l padded, t - cu_seqlens[seq] varlen
  bool inside;       // false for varlen gaps and overlaps of malformed cu_seqlens (the mask is for the caller)
};

FP_HOST_DEVICE RowPlace locate_row(const Geometry& g, IndexView cu_seqlens, int64_t row) {
  if (g.varlen) {
    const int64_t seq = row_sequence(cu_seqlens, g.num_seqs, row);
    int64_t start, end;
    segment_bounds(cu_seqlens, seq, g.num_rows, start, end);
    return {seq, row, row - start, row >= start && row < end};
  }
  return {row / g.seq_len, row % g.seq_len, row % g.seq_len, true};
}

// Where flattened row `row` (b * L + l padded, t varlen) starts, in elements from x's start.
FP_HOST_DEVICE int64_t row_offset(const Geometry& g, int64_t row) {
  return g.varlen ? row * g.stride_row : (row / g.seq_len) * g.stride_b + (row % g.seq_len) * g.stride_row;
}

template <typename Acc>
FP_HOST_DEVICE bool is_nan(Acc v) {
  return v != v;
}

// Running max over rows in increasing order: a row takes the max if it is greater, or if it is the
// first NaN (NaN propagates as in torch.max); ties keep the earlier row. best_row < 0 means empty.
// Rows here are indices within the sequence (RowPlace::index): int32 holds them for any sequence
// shorter than 2^31 rows, however many rows T the batch has.
template <typename Acc>
FP_HOST_DEVICE bool takes_max(Acc value, Acc best, int32_t best_row) {
  return best_row < 0 || (is_nan(value) && !is_nan(best)) || (!is_nan(best) && value > best);
}

// Merges two (max, row) candidates whose rows may interleave: NaN first, then the larger value,
// then the smaller row. row < 0 means empty.
template <typename Acc>
FP_HOST_DEVICE void merge_max(Acc& best, int32_t& best_row, Acc value, int32_t row) {
  if (row < 0) return;
  bool take;
  if (best_row < 0) {
    take = true;
  } else if (is_nan(value) != is_nan(best)) {
    take = is_nan(value);
  } else if (is_nan(value) || value == best) {
    take = row < best_row;
  } else {
    take = value > best;
  }
  if (take) {
    best = value;
    best_row = row;
  }
}

// exp(a - b) where -inf - -inf counts as exp(-inf) = 0 (an empty state).
template <typename Acc>
FP_HOST_DEVICE Acc exp_diff(Acc a, Acc b) {
  return a == -INFINITY ? Acc(0) : std::exp(a - b);
}

// The new max after seeing `incoming_max`, and the factors that rescale the running state and the
// incoming one to it: (m, alpha, beta). With both -inf everything is 0 (no NaN).
template <typename Acc>
FP_HOST_DEVICE Acc merged_max(Acc current, Acc incoming, Acc& alpha, Acc& beta) {
  Acc m = current > incoming ? current : incoming;
  if (is_nan(incoming)) m = incoming;
  alpha = exp_diff(current, m);
  beta = exp_diff(incoming, m);
  return m;
}

// Softmax weight of a row from the saved statistics: exp(s - m) / l, or 0 for an empty head
// (l == 0); NaN where l is NaN (a NaN or +inf kept score).
template <typename Acc>
FP_HOST_DEVICE Acc softmax_weight(Acc s, Acc m, Acc l) {
  return l != Acc(0) ? std::exp(s - m) / l : Acc(0);
}

// --- probe_attention ------------------------------------------------------------------------------

// Learned probes per call: 1 <= P <= kMaxProbes (fused_pool/_checks.py MAX_PROBES).
constexpr int64_t kMaxProbes = 256;

// Running max of scores that keeps the first NaN (a NaN score makes its probe NaN, as torch.softmax).
template <typename Acc>
FP_HOST_DEVICE Acc max_keeping_nan(Acc best, Acc s) {
  return (is_nan(s) || (!is_nan(best) && s > best)) ? s : best;
}

// --- linear_pool (csrc/linear_host.h): the SUM mode and the activations ---------------------------

// linear_pool's modes: kMax, kMean (sum of w a / sum of w) or kSum (sum of w a), as fused_pool.contract.
constexpr int kSum = 8;

// Indices into fused_pool.contract.ACTIVATIONS.
enum Activation : int {
  kActNone = 0,
  kActRelu = 1,
  kActLog1pRelu = 2,
  kActLog1pLog1pRelu = 3,
  kActGelu = 4,
  kActTanh = 5,
  kActSilu = 6,
};
constexpr int kNumActivations = 7;

// act(z); gelu is the erf form (torch.nn.functional.gelu), log1p_relu is log(1 + max(z, 0)). NaN
// stays NaN (relu(NaN) = NaN, as torch.relu).
template <typename Acc>
FP_HOST_DEVICE Acc activate(int activation, Acc z) {
  const Acc relu = (z > Acc(0) || is_nan(z)) ? z : Acc(0);
  switch (activation) {
    case kActRelu: return relu;
    case kActLog1pRelu: return std::log1p(relu);
    case kActLog1pLog1pRelu: return std::log1p(std::log1p(relu));
    case kActGelu: return Acc(0.5) * z * (Acc(1) + std::erf(z * Acc(0.70710678118654752440)));
    case kActTanh: return std::tanh(z);
    case kActSilu: return z / (Acc(1) + std::exp(-z));
    default: return z;
  }
}

// d act / dz at z, as autograd computes it: relu'(0) = 0 and relu'(NaN) = 1 (torch's threshold_backward
// passes the gradient where z <= 0 is false); elsewhere NaN in, NaN out.
template <typename Acc>
FP_HOST_DEVICE Acc activation_grad(int activation, Acc z) {
  switch (activation) {
    case kActRelu: return (z > Acc(0) || is_nan(z)) ? Acc(1) : Acc(0);
    case kActLog1pRelu: return z > Acc(0) ? Acc(1) / (Acc(1) + z) : (is_nan(z) ? z : Acc(0));
    case kActLog1pLog1pRelu:
      return z > Acc(0) ? Acc(1) / ((Acc(1) + std::log1p(z)) * (Acc(1) + z)) : (is_nan(z) ? z : Acc(0));
    case kActGelu: {
      const Acc cdf = Acc(0.5) * (Acc(1) + std::erf(z * Acc(0.70710678118654752440)));
      const Acc pdf = std::exp(Acc(-0.5) * z * z) * Acc(0.39894228040143267794);
      return cdf + z * pdf;
    }
    case kActTanh: {
      const Acc t = std::tanh(z);
      return Acc(1) - t * t;
    }
    case kActSilu: {
      const Acc s = Acc(1) / (Acc(1) + std::exp(-z));
      return s * (Acc(1) + z * (Acc(1) - s));
    }
    default: return Acc(1);
  }
}

}  // namespace fused_pool
