// CUDA linear_pool epilogues (the GEMMs run through cuBLAS in csrc/cuda/linear_cuda.cpp).
// Torch-free: raw pointers and strides. Deterministic, no atomics:
// - forward: a thread owns a feature column of one block's projection and walks the block's rows in
//   order, keeping the running state of the current sequence in registers and writing it back when
//   the sequence changes (a block may span several sequences);
// - SUM / MEAN backward: elementwise dz = g w (/ den) act'(z);
// - MAX backward: one thread block per feature recomputes z at each sequence's winning token (a
//   block-wide dot in a fixed order) and adds dz x to its dweight row; dx is then a gather-sum over
//   the (b, n) pairs sorted by token, one thread block per row.
#include <cuda_runtime.h>

#include "../common.h"
#include "device.cuh"
#include "linear_launch.h"

namespace fused_pool {
namespace cuda {
namespace {

constexpr int kColumnThreads = 256;
constexpr int kDotThreads = 128;  // threads of the MAX backward's per-feature block (4 warps)

template <typename T>
__device__ __forceinline__ typename AccOf<T>::type bias_at(const void* bias, int64_t n) {
  using Acc = typename AccOf<T>::type;
  return bias == nullptr ? Acc(0) : to_acc(static_cast<const T*>(bias)[n]);
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kColumnThreads) linear_forward_kernel(LinearForwardEpilogue a) {
  using Acc = typename AccOf<T>::type;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  const int64_t features = a.features;
  const Acc* z = static_cast<const Acc*>(a.z);
  const Acc* weight = static_cast<const Acc*>(a.weight);
  Acc* value = static_cast<Acc*>(a.value);
  if (MODE == kMean && n == 0) {  // one thread sums the weights, rows in order
    Acc* den = static_cast<Acc*>(a.den);
    for (int64_t r = 0; r < a.rows; ++r)
      if (a.seq[r] >= 0) den[a.seq[r]] += weight[r];
  }
  if (n >= features) return;
  const Acc b = bias_at<T>(a.bias, n);
  int32_t current = -1;
  Acc best = Acc(0);
  int32_t best_index = -1;
  for (int64_t r = 0; r < a.rows; ++r) {
    const int32_t s = a.seq[r];
    if (s < 0) continue;
    if (s != current) {  // write the previous sequence's state back, load this one's
      if (current >= 0) {
        value[current * features + n] = best;
        if (MODE == kMax) a.argmax[current * features + n] = best_index;
      }
      current = s;
      best = value[s * features + n];
      if (MODE == kMax) best_index = a.argmax[s * features + n];
    }
    const Acc v = activate<Acc>(a.activation, z[r * features + n] + b);
    if (MODE == kMax) {
      if (takes_max(v, best, best_index)) {
        best = v;
        best_index = a.index[r];
      }
    } else {
      best += weight[r] * v;
    }
  }
  if (current >= 0) {
    value[current * features + n] = best;
    if (MODE == kMax) a.argmax[current * features + n] = best_index;
  }
}

template <typename T>
__global__ void __launch_bounds__(kColumnThreads) linear_grad_kernel(LinearGradEpilogue a) {
  using Acc = typename AccOf<T>::type;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  const int64_t r = blockIdx.y;
  if (n >= a.features) return;
  Acc* z = static_cast<Acc*>(a.z) + r * a.features + n;
  const int32_t s = a.seq[r];
  if (s < 0) {
    *z = Acc(0);
    return;
  }
  const Acc g = static_cast<const Acc*>(a.grad)[s * a.features + n] * static_cast<const Acc*>(a.scale)[r];
  *z = g * activation_grad<Acc>(a.activation, *z + bias_at<T>(a.bias, n));
}

// Sum over the block's kDotThreads threads in a fixed order; every thread gets it.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* shared) {
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers are done with `shared`
  if (threadIdx.x % kWarp == 0) shared[threadIdx.x / kWarp] = v;
  __syncthreads();
  Acc total = Acc(0);
#pragma unroll
  for (int w = 0; w < kDotThreads / kWarp; ++w) total += shared[w];
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kDotThreads) linear_max_grad_kernel(LinearMaxGrad a) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[kDotThreads / kWarp];
  const Geometry& g = a.geometry;
  const int64_t n = blockIdx.x;
  const T* x = static_cast<const T*>(a.x);
  const T* w_row = static_cast<const T*>(a.weight) + n * g.hidden;
  Acc* dw_row = static_cast<Acc*>(a.dweight) + n * g.hidden;
  const Acc* grad = static_cast<const Acc*>(a.grad);
  const Acc b = bias_at<T>(a.bias, n);
  Acc db = Acc(0);
  for (int64_t seq = 0; seq < g.num_seqs; ++seq) {
    const int64_t i = seq * a.features + n;
    const int64_t index = a.argmax[i];
    const int64_t t = a.first_row[seq] + index;
    // Uniform across the block: every thread takes the same branch.
    if (index < 0 || index >= a.length[seq] || a.owner[t] != seq) {
      if (threadIdx.x == 0) {
        static_cast<Acc*>(a.dz)[i] = Acc(0);
        a.token[i] = -1;
      }
      continue;
    }
    const T* x_row = x + row_offset(g, t);
    Acc partial = Acc(0);
    for (int64_t h = threadIdx.x; h < g.hidden; h += kDotThreads)
      partial += to_acc(x_row[h * g.stride_h]) * to_acc(w_row[h]);
    const Acc z = block_sum(partial, shared) + b;
    const Acc dz = grad[i] * activation_grad<Acc>(a.activation, z);
    for (int64_t h = threadIdx.x; h < g.hidden; h += kDotThreads) dw_row[h] += dz * to_acc(x_row[h * g.stride_h]);
    db += dz;
    if (threadIdx.x == 0) {
      static_cast<Acc*>(a.dz)[i] = dz;
      a.token[i] = t;
    }
  }
  if (threadIdx.x == 0) static_cast<Acc*>(a.dbias)[n] = db;
}

template <typename T>
__global__ void __launch_bounds__(kColumnThreads) linear_max_dx_kernel(LinearMaxDx a) {
  using Acc = typename AccOf<T>::type;
  const int64_t row = blockIdx.x;
  const int64_t h = static_cast<int64_t>(blockIdx.y) * kColumnThreads + threadIdx.x;
  if (h >= a.hidden) return;
  const Acc* dz = static_cast<const Acc*>(a.dz);
  const T* weight = static_cast<const T*>(a.weight);
  Acc total = Acc(0);
  for (int64_t e = a.offsets[row]; e < a.offsets[row + 1]; ++e) {
    const int64_t pair = a.order[e];
    total += dz[pair] * to_acc(weight[(pair % a.features) * a.hidden + h]);
  }
  static_cast<Acc*>(a.dx)[row * a.hidden + h] = total;
}

constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
bool launch_forward(const LinearForwardEpilogue& a, cudaStream_t stream) {
  const int64_t blocks = ceil_div(a.features, kColumnThreads);
  if (blocks > kMaxGridX) return false;
  if (blocks == 0 || a.rows == 0) return true;
  switch (a.mode) {
    case kMax: linear_forward_kernel<T, kMax><<<blocks, kColumnThreads, 0, stream>>>(a); break;
    case kSum: linear_forward_kernel<T, kSum><<<blocks, kColumnThreads, 0, stream>>>(a); break;
    case kMean: linear_forward_kernel<T, kMean><<<blocks, kColumnThreads, 0, stream>>>(a); break;
  }
  return true;
}

template <typename T>
bool launch_grad(const LinearGradEpilogue& a, cudaStream_t stream) {
  const int64_t blocks = ceil_div(a.features, kColumnThreads);
  if (blocks > kMaxGridX || a.rows > kMaxGridY) return false;
  if (blocks == 0 || a.rows == 0) return true;
  linear_grad_kernel<T><<<dim3(blocks, a.rows), kColumnThreads, 0, stream>>>(a);
  return true;
}

template <typename T>
bool launch_max_grad(const LinearMaxGrad& a, cudaStream_t stream) {
  if (a.features > kMaxGridX) return false;
  if (a.features == 0) return true;
  linear_max_grad_kernel<T><<<a.features, kDotThreads, 0, stream>>>(a);
  return true;
}

template <typename T>
bool launch_max_dx(const LinearMaxDx& a, cudaStream_t stream) {
  const int64_t tiles = ceil_div(a.hidden, kColumnThreads);
  if (a.num_rows > kMaxGridX || tiles > kMaxGridY) return false;
  if (a.num_rows == 0 || tiles == 0) return true;
  linear_max_dx_kernel<T><<<dim3(a.num_rows, tiles), kColumnThreads, 0, stream>>>(a);
  return true;
}

// Calls Launch<T>(a, stream) for a.dtype.
#define FP_LINEAR_DISPATCH(launch, a, stream)                     \
  switch ((a).dtype) {                                            \
    case kFloat16: return launch<__half>(a, stream);              \
    case kBFloat16: return launch<__nv_bfloat16>(a, stream);      \
    case kFloat32: return launch<float>(a, stream);               \
    case kFloat64: return launch<double>(a, stream);              \
  }                                                               \
  return true

}  // namespace

bool linear_forward_epilogue(const LinearForwardEpilogue& args, cudaStream_t stream) {
  FP_LINEAR_DISPATCH(launch_forward, args, stream);
}

bool linear_grad_epilogue(const LinearGradEpilogue& args, cudaStream_t stream) {
  FP_LINEAR_DISPATCH(launch_grad, args, stream);
}

bool linear_max_grad(const LinearMaxGrad& args, cudaStream_t stream) { FP_LINEAR_DISPATCH(launch_max_grad, args, stream); }

bool linear_max_dx(const LinearMaxDx& args, cudaStream_t stream) { FP_LINEAR_DISPATCH(launch_max_dx, args, stream); }

}  // namespace cuda
}  // namespace fused_pool
