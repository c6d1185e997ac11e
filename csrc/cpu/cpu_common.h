// Work planning and small helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <vector>

#include "../common.h"
#include "../host.h"

// Hot loops are compiled for AVX-512, AVX2 + FMA and baseline x86-64; the loader picks the best
// one the machine supports. Other architectures get the default build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FP_CPU_CLONES
#endif

namespace fused_pool {

// Rows [first, last) of sequence `seq`, whose first row is `origin` (0 padded, its clamped
// cu_seqlens start varlen: row - origin is the row's index in the sequence, what argmax stores);
// whole_sequence when the chunk is the entire sequence.
struct RowChunk {
  int64_t seq;
  int64_t first;
  int64_t last;
  int64_t origin;
  bool whole_sequence;
};

// Below this many elements of work, waking the thread pool costs more than it saves.
constexpr int64_t kParallelWork = 1 << 15;

// Runs fn(task, scratch) for every task in [0, count), each thread taking the next task as it
// finishes its last (sequences differ in length, so a fixed split would leave threads idle); one
// thread when `work` (elements touched) is small. A task's result does not depend on the thread
// that runs it. `scratch` is per-thread state.
template <typename Scratch, typename F>
void parallel_tasks(int64_t count, int64_t work, const F& fn) {
  const int64_t threads = work < kParallelWork ? 1 : std::min<int64_t>(count, at::get_num_threads());
  std::atomic<int64_t> next{0};
  auto run = [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < count;) fn(task, scratch);
  };
  if (threads <= 1) {
    run(0, 1);
  } else {
    at::parallel_for(0, threads, 1, run);
  }
}

// Rows per at::parallel_for grain so that small inputs run on one thread.
inline int64_t row_grain(int64_t hidden) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(hidden, 1));
}

// Splits sequences longer than chunk_rows into chunks of chunk_rows rows. The caller picks chunk_rows
// from the shapes only, never from the thread count, so results are the same on every machine
// configuration: partials are combined in row order. Non-overlapping sequences have at most
// num_rows / chunk_rows + num_seqs chunks; past that budget (malformed, overlapping cu_seqlens only)
// sequences stay whole, so that the plan never grows like B * T / chunk_rows.
inline std::vector<RowChunk> plan_row_chunks(const Batch& batch, int64_t chunk_rows) {
  const Geometry& g = batch.geometry;
  const int64_t budget = g.num_rows / chunk_rows + g.num_seqs;
  std::vector<RowChunk> chunks;
  chunks.reserve(g.num_seqs);
  for (int64_t seq = 0; seq < g.num_seqs; ++seq) {
    int64_t start = 0, end = g.seq_len;
    if (g.varlen) segment_bounds(batch.cu_seqlens, seq, g.num_rows, start, end);
    const int64_t pieces = (end - start + chunk_rows - 1) / chunk_rows;
    if (pieces <= 1 || static_cast<int64_t>(chunks.size()) + pieces + (g.num_seqs - seq - 1) > budget) {
      chunks.push_back({seq, start, end, start, true});
      continue;
    }
    for (int64_t first = start; first < end; first += chunk_rows)
      chunks.push_back({seq, first, std::min(first + chunk_rows, end), start, false});
  }
  return chunks;
}

// The pool and attention kernels' plan: only sequences much longer than the average are split.
inline std::vector<RowChunk> plan_row_chunks(const Batch& batch) {
  return plan_row_chunks(batch, std::max<int64_t>(2048, (batch.geometry.num_rows + 63) / 64));
}

// The first chunk of every split sequence (their partials are combined afterwards).
inline std::vector<int64_t> split_sequence_starts(const std::vector<RowChunk>& chunks) {
  std::vector<int64_t> starts;
  for (size_t i = 0; i < chunks.size(); ++i)
    if (!chunks[i].whole_sequence && (i == 0 || chunks[i - 1].seq != chunks[i].seq)) starts.push_back(i);
  return starts;
}

// Channels per task: all of them when there are enough row chunks to keep every thread busy,
// else blocks of 256 (this choice does not change any result).
struct ChannelSplit {
  int64_t size;
  int64_t count;
};

inline ChannelSplit split_channels(int64_t hidden, int64_t row_tasks) {
  if (hidden == 0) return {1, 0};
  const int64_t size = std::min<int64_t>(hidden, row_tasks >= 4 * at::get_num_threads() ? hidden : 256);
  return {size, (hidden + size - 1) / size};
}

// acc += w * x over n contiguous channels.
template <typename T, typename Acc>
FP_CPU_CLONES void add_weighted_row(Acc* __restrict acc, const T* __restrict x, Acc w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<Acc>(x[i]);
}

// Rows summed into a block accumulator before it is added to the running total: float32 error then
// grows like (kSumBlockRows + rows / kSumBlockRows) ulps instead of rows ulps.
constexpr int64_t kSumBlockRows = 64;

// total += block; block = 0.
template <typename Acc>
FP_CPU_CLONES void flush_block(Acc* __restrict total, Acc* __restrict block, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    total[i] += block[i];
    block[i] = Acc(0);
  }
}

// n elements at stride `stride`: the pointer itself when contiguous, else a gathered copy.
template <typename T>
inline const T* contiguous_slice(const T* ptr, int64_t stride, int64_t n, std::vector<T>& buffer) {
  if (stride == 1) return ptr;
  buffer.resize(n);
  for (int64_t i = 0; i < n; ++i) buffer[i] = ptr[i * stride];
  return buffer.data();
}

}  // namespace fused_pool
