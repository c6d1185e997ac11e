// The CPU forward reduction shared by pool and span: a task reduces a range of rows of one
// sequence (or span) over a range of channels into float32 / float64 accumulators (inner loops over
// contiguous channels, vectorized for AVX-512 / AVX2 / SSE and picked at load time); chunks of
// split sequences keep partials that are combined in row order.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../common.h"
#include "../host.h"
#include "cpu_common.h"

namespace fused_pool {

// Running max for one more row (rows come in increasing order; best already holds a kept row).
template <typename T, typename Acc>
FP_CPU_CLONES void max_row(Acc* __restrict best, int32_t* __restrict best_row, const T* __restrict x,
                           int32_t row, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    Acc v = static_cast<Acc>(x[i]);
    Acc b = best[i];
    bool take = (v > b) | ((v != v) & (b == b));  // greater, or the first NaN
    best[i] = take ? v : b;
    best_row[i] = take ? row : best_row[i];
  }
}

// mean_max in one pass over the row: block += w * x and the running max of max_row.
template <typename T, typename Acc>
FP_CPU_CLONES void mean_max_row(Acc* __restrict block, Acc w, Acc* __restrict best, int32_t* __restrict best_row,
                                const T* __restrict x, int32_t row, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const Acc v = static_cast<Acc>(x[i]);
    block[i] += w * v;
    const Acc b = best[i];
    const bool take = (v > b) | ((v != v) & (b == b));
    best[i] = take ? v : b;
    best_row[i] = take ? row : best_row[i];
  }
}

// What one task accumulates over its rows and channels.
template <typename Acc>
struct Partial {
  std::vector<Acc> total;
  Acc weight = 0;
  std::vector<Acc> best;
  std::vector<int32_t> best_row;  // -1: no kept row yet
  Partial(int64_t n, int mode)
      : total(mode & kMean ? n : 0, Acc(0)), best(mode & kMax ? n : 0, Acc(0)), best_row(mode & kMax ? n : 0, -1) {}
};

template <typename T, typename Acc>
void reduce_rows(const T* x, const Batch& batch, const RowChunk& chunk, int64_t c0, int64_t n, int mode,
                 Partial<Acc>& part, std::vector<T>& gathered) {
  const Geometry& g = batch.geometry;
  const T* x_seq = x + chunk.seq * g.stride_b + c0 * g.stride_h;
  std::vector<Acc> block(mode & kMean ? n : 0, Acc(0));
  Acc block_weight = 0;
  int64_t kept = 0;
  for (int64_t row = chunk.first; row < chunk.last; ++row) {
    const Acc w = batch.mask.weight<Acc>(chunk.seq, row);
    if (w == Acc(0)) continue;  // padding: never read
    const T* values = contiguous_slice(x_seq + row * g.stride_row, g.stride_h, n, gathered);
    const int32_t r = static_cast<int32_t>(row - chunk.origin);  // index within the sequence
    if ((mode & kMax) && kept == 0) {  // the first kept row starts the running max
      for (int64_t i = 0; i < n; ++i) part.best[i] = static_cast<Acc>(values[i]);
      std::fill(part.best_row.begin(), part.best_row.end(), r);
      if (mode & kMean) add_weighted_row(block.data(), values, w, n);
    } else if (mode == (kMean | kMax)) {  // both from one pass over the row
      mean_max_row(block.data(), w, part.best.data(), part.best_row.data(), values, r, n);
    } else if (mode & kMean) {
      add_weighted_row(block.data(), values, w, n);
    } else {
      max_row(part.best.data(), part.best_row.data(), values, r, n);
    }
    if (mode & kMean) {
      block_weight += w;
      if ((kept + 1) % kSumBlockRows == 0) {
        flush_block(part.total.data(), block.data(), n);
        part.weight += block_weight;
        block_weight = 0;
      }
    }
    ++kept;
  }
  if (mode & kMean) {
    flush_block(part.total.data(), block.data(), n);
    part.weight += block_weight;
  }
}

// Out is T, or Acc in states mode, where the mean half is sum(w x), not yet divided.
template <typename Out, typename Acc>
void write_result(Out* out, Acc* den, int32_t* argmax, const Partial<Acc>& part, int64_t seq, int64_t c0, int64_t n,
                  int64_t hidden, int mode, bool states) {
  Out* out_row = out + seq * hidden * (mode == (kMean | kMax) ? 2 : 1);
  if (mode & kMean) {
    for (int64_t i = 0; i < n; ++i)
      out_row[c0 + i] = static_cast<Out>(states                   ? part.total[i]
                                         : part.weight != Acc(0) ? part.total[i] / part.weight
                                                                 : Acc(0));
    if (c0 == 0) den[seq] = part.weight;
    out_row += (mode & kMax) ? hidden : 0;
  }
  if (mode & kMax) {
    for (int64_t i = 0; i < n; ++i) {
      out_row[c0 + i] = static_cast<Out>(part.best_row[i] >= 0 ? part.best[i] : Acc(0));
      argmax[seq * hidden + c0 + i] = part.best_row[i];
    }
  }
}

// Reduces every chunk (each whole sequence, or the pieces of a split one, in row order) into out,
// den and argmax; work (elements read) decides whether the thread pool is woken.
template <typename T, typename Acc, typename Out>
void reduce_chunks(const at::Tensor& x, const Batch& batch, const std::vector<RowChunk>& chunks, int64_t work, int mode,
                   bool states, at::Tensor& out, at::Tensor& den, at::Tensor& argmax) {
  const Geometry& g = batch.geometry;
  const ChannelSplit channels = split_channels(g.hidden, static_cast<int64_t>(chunks.size()));
  const T* x_ptr = x.const_data_ptr<T>();
  Out* out_ptr = out.mutable_data_ptr<Out>();
  Acc* den_ptr = (mode & kMean) ? den.mutable_data_ptr<Acc>() : nullptr;
  int32_t* argmax_ptr = (mode & kMax) ? argmax.mutable_data_ptr<int32_t>() : nullptr;

  // Chunks of split sequences keep their partials here, indexed by task, until combined.
  std::vector<std::unique_ptr<Partial<Acc>>> parts(chunks.size() * channels.count);
  parallel_tasks<std::vector<T>>(static_cast<int64_t>(parts.size()), work, [&](int64_t task, std::vector<T>& gathered) {
    const RowChunk& chunk = chunks[task / channels.count];
    const int64_t c0 = (task % channels.count) * channels.size;
    const int64_t n = std::min(channels.size, g.hidden - c0);
    auto part = std::make_unique<Partial<Acc>>(n, mode);
    reduce_rows(x_ptr, batch, chunk, c0, n, mode, *part, gathered);
    if (chunk.whole_sequence) {
      write_result(out_ptr, den_ptr, argmax_ptr, *part, chunk.seq, c0, n, g.hidden, mode, states);
    } else {
      parts[task] = std::move(part);
    }
  });

  // Combine split sequences: partials in row order, so the result does not depend on scheduling.
  const std::vector<int64_t> starts = split_sequence_starts(chunks);
  parallel_tasks<int>(static_cast<int64_t>(starts.size()) * channels.count, work, [&](int64_t task, int&) {
    const int64_t first = starts[task / channels.count];
    const int64_t channel_block = task % channels.count;
    const int64_t c0 = channel_block * channels.size;
    const int64_t n = std::min(channels.size, g.hidden - c0);
    const int64_t seq = chunks[first].seq;
    Partial<Acc> total(n, mode);
    for (size_t c = first; c < chunks.size() && chunks[c].seq == seq; ++c) {
      const Partial<Acc>& part = *parts[c * channels.count + channel_block];
      if (mode & kMean) {
        for (int64_t i = 0; i < n; ++i) total.total[i] += part.total[i];
        total.weight += part.weight;
      }
      if (mode & kMax) {
        for (int64_t i = 0; i < n; ++i) merge_max(total.best[i], total.best_row[i], part.best[i], part.best_row[i]);
      }
    }
    write_result(out_ptr, den_ptr, argmax_ptr, total, seq, c0, n, g.hidden, mode, states);
  });
}

}  // namespace fused_pool
