// topk_kd_loss: the CUDA kernels and their launcher (the ops are in topk_divergence_ops.cpp,
// the schemas in _C.cpp). CUDA headers only: nvcc's per-architecture passes parse no ATen.
//
// Math: kernels/topk_divergence.py (docstring) and pydistill/reference/topk_divergence.py (the
// oracle, with the derivation). The row algorithm lives in topk_row.cuh, shared by
//
//   topk_kernel   one thread block per row (grid-stride over rows); the row's K sorted ids,
//                 teacher log-probs, gathered student logits and member gradients in shared
//                 memory (20 bytes per entry, K <= 4096); one pass over V for the exact
//                 off-support logsumexp (each 16-byte vector finds its support members by one
//                 binary search in the sorted ids); the gradient pass writes every column,
//                 then, after a barrier, the K members over them. Logits-sized transfers,
//                 forward + backward: 1 + (1 + 1) = 3 (floor 2); renormalize without a hard
//                 term reads no row at all.
//   host loop     the same row code on the CPU, one thread: the ops on CPU tensors (tests).
//
// Template parameters: divergence (6) x element type (3); the tail mode and the options are
// run-time flags.
#include "topk_row.cuh"

#include <cuda_runtime.h>

#include <climits>
#include <vector>

namespace pydistill {

constexpr int64_t kWorkBytesPerK = sizeof(int64_t) + 3 * sizeof(float);

template <int DIV, typename T>
__global__ void __launch_bounds__(512) topk_kernel(TopKArgs a) {
  __shared__ double scratch[33];
  extern __shared__ int64_t work[];
  BlockGroup g{scratch};
  TopKWork w;
  w.ids = work;
  w.z_sup = reinterpret_cast<float*>(work + a.K);
  w.log_p = w.z_sup + a.K;
  w.member = w.log_p + a.K;
  for (int64_t row = blockIdx.x; row < a.n_rows; row += gridDim.x) topk_row<T, DIV>(a, row, w, g);
}

const char* topk_launch(const TopKArgs& a, int divergence, DType dtype, int device, void* stream) {
  if (a.n_rows == 0 || a.V == 0) return nullptr;
  return dispatch(divergence, dtype, [&](auto div, auto type) -> const char* {
    constexpr int DIV = decltype(div)::value;
    using T = typename decltype(type)::type;
    if (device < 0) {
      std::vector<int64_t> ids(a.K);
      std::vector<float> buf(3 * a.K);
      TopKWork w{ids.data(), buf.data(), buf.data() + a.K, buf.data() + 2 * a.K};
      HostGroup g;
      for (int64_t row = 0; row < a.n_rows; ++row) topk_row<T, DIV>(a, row, w, g);
      return nullptr;
    }
    auto kernel = topk_kernel<DIV, T>;
    const size_t smem = static_cast<size_t>(a.K * kWorkBytesPerK);
    if (smem > 48 * 1024 &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) != cudaSuccess)
      return cudaGetErrorString(cudaGetLastError());
    int threads = threads_for_row(a.V, Vec<T>::N);
    while (threads < 512 && threads < a.K) threads *= 2;
    const int64_t grid = a.n_rows < INT_MAX ? a.n_rows : INT_MAX;
    kernel<<<static_cast<unsigned>(grid), threads, smem, static_cast<cudaStream_t>(stream)>>>(a);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  });
}

}  // namespace pydistill
