// kd_loss: the CUDA kernels and their launchers (the ops are in softmax_divergence_ops.cpp,
// the schemas in _C.cpp). CUDA headers only: nvcc's per-architecture passes parse no ATen.
//
// Math: kernels/softmax_divergence.py (docstring: forward formula, online kl, gradient table);
// pydistill/reference/softmax_divergence.py is the oracle. The row algorithm lives in
// kd_row.cuh, shared by:
//
//   kd_kernel          one thread block per row (grid-stride over rows), 16-byte vector
//                      loads, fp32 math: pass 1 (online logsumexps; kl / reverse_kl online),
//                      pass 2 for jsd / tvd / skew_*, then (optionally) the gradient pass.
//                      Logits-sized transfers, forward + backward (kl, recompute): 2 + 3 = 5;
//                      with the gradient written in the forward: 3 (+2 when grad_output != 1).
//                      Floor: 3.
//   kd_cluster_kernel  sm_90 only (softmax_divergence_sm90.cuh): a thread-block cluster holds
//                      one row of student and teacher in its distributed shared memory, so
//                      the forward-with-gradient reads each once and writes the gradient once.
//   host loop          the same row code on the CPU, one thread: the ops on CPU tensors (tests).
//
// Template parameters: divergence (6) x element type (3) x variant (3, kd_variant in kd_row.cuh:
// the flags that shape the hot loops, soft term, logit caps, the hard term's own logsumexp).
// The rest (labels, which gradients, transform scales) is read at run time. Pass 1 sums
// 2^{(u - m) c} with ex2.approx, log2 e and 1/T folded into c, plain per-thread partial sums
// compensated at flushes and in the group's reduction (KDPass1Thread).
#include "kd_row.cuh"

#include <cuda_runtime.h>

#include <climits>

namespace pydistill {

// Two CTAs of 512 threads per SM need <= 64 registers: the plain variant fits by itself (held
// to it, jsd spills), the others are held to it (unbounded they take 72..128).
template <int DIV, typename T, int VAR>
__global__ void __launch_bounds__(512, VAR == KD_PLAIN ? 1 : 2) kd_kernel(KDArgs a) {
  __shared__ double scratch[33];
  BlockGroup g{scratch};
  for (int64_t row = blockIdx.x; row < a.n_rows; row += gridDim.x) kd_row<DIV, T, VAR>(a, row, g);
}

// f(std::integral_constant-like) for the run-time variant
template <typename F>
const char* dispatch_variant(int var, F&& f) {
  switch (var) {
    case KD_PLAIN: return f(Count<KD_PLAIN>());
    case KD_PLAIN_CE: return f(Count<KD_PLAIN_CE>());
    default: return f(Count<KD_GENERIC>());
  }
}

// grad[row] *= scale[row]; a row whose scale is exactly 1 is skipped on the device.
template <typename T>
__global__ void scale_rows_kernel(T* grad, const float* scale, int64_t stride, int64_t n_rows, int64_t V) {
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const float f = scale[row * stride];
    if (f == 1.0f) continue;
    T* g = grad + row * V;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) g[j] = from_float<T>(to_float(g[j]) * f);
  }
}

}  // namespace pydistill

#include "softmax_divergence_sm90.cuh"

namespace pydistill {

const char* kd_launch(const KDArgs& a, int divergence, DType dtype, int device, void* stream) {
  if (a.n_rows == 0 || a.V == 0) return nullptr;
  return dispatch(divergence, dtype, [&](auto div, auto type) -> const char* {
    constexpr int DIV = decltype(div)::value;
    using T = typename decltype(type)::type;
    return dispatch_variant(kd_variant(a), [&](auto var) -> const char* {
      constexpr int VAR = decltype(var)::value;
      if (device < 0) {
        HostGroup g;
        for (int64_t row = 0; row < a.n_rows; ++row) kd_row<DIV, T, VAR>(a, row, g);
        return nullptr;
      }
      const int threads = threads_for_row(a.V, Vec<T>::N);
      const int64_t grid = a.n_rows < INT_MAX ? a.n_rows : INT_MAX;
      kd_kernel<DIV, T, VAR><<<static_cast<unsigned>(grid), threads, 0, static_cast<cudaStream_t>(stream)>>>(a);
      const cudaError_t err = cudaGetLastError();
      return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
    });
  });
}

const char* kd_scale_grad_launch(void* grad, DType dtype, const float* scale, int64_t stride,
                                 int64_t n_rows, int64_t V, int device, void* stream) {
  if (n_rows == 0 || V == 0) return nullptr;
  return dispatch(KL, dtype, [&](auto, auto type) -> const char* {
    using T = typename decltype(type)::type;
    T* g = static_cast<T*>(grad);
    if (device < 0) {
      for (int64_t row = 0; row < n_rows; ++row) {
        const float f = scale[row * stride];
        if (f == 1.0f) continue;
        for (int64_t j = 0; j < V; ++j) g[row * V + j] = from_float<T>(to_float(g[row * V + j]) * f);
      }
      return nullptr;
    }
    const int64_t grid = n_rows < INT_MAX ? n_rows : INT_MAX;
    scale_rows_kernel<T><<<static_cast<unsigned>(grid), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        g, scale, stride, n_rows, V);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  });
}

}  // namespace pydistill
