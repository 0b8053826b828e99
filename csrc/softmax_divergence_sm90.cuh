// kd_loss forward-with-gradient on Hopper: one thread-block cluster per row, the row kept in
// the cluster's distributed shared memory between the statistics and the gradient.
//
// A row of V = 128,256 bf16 logits is 256 KB per tensor, 512 KB for student + teacher: more
// than one SM's shared memory (228 KB), not more than a cluster's. Each of the C CTAs of a
// cluster (C a power of two <= 16, the smallest whose slice fits kClusterSliceBytes) loads
// its contiguous slice of both rows into its own shared memory while folding it into the
// online statistics (pass 1), publishes its partial statistics in shared memory, and after
// cluster.sync() every CTA combines all C partials read through map_shared_rank (in one
// fixed order, so every CTA holds bit-identical row statistics). jsd / tvd / skew_* run
// pass 2 over the slices in shared memory the same way. The gradient is then computed from
// shared memory and written once. Global traffic: read student and teacher once, write the
// gradient once: the 3-transfer floor that a two-pass kernel cannot reach.
//
// Requirements, checked by kd_cluster_try before it launches (else the portable kernel
// runs): compute capability >= 9.0 and the kernel's code built for it (not JIT-ed from an
// older PTX, where the body below is empty), V a multiple of the 16-byte vector, every row of
// student, teacher and gradients 16-byte aligned, the slice within the shared memory limit,
// and cudaOccupancyMaxActiveClusters > 0 for the chosen cluster size.
//
// NOT YET RUN ON HARDWARE: it compiles for sm_90 (tests/test_cuda_ext.py builds it); its
// results and speed are to be checked on an H100 with tests/test_softmax_divergence.py
// (PYDISTILL_KD_GRAD=forward) and bench/bench_softmax_divergence.py.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdlib>

namespace pydistill {

constexpr int64_t kClusterSliceBytes = 96 * 1024;  // two CTAs per SM (__launch_bounds__ below)
constexpr int kClusterMax = 16;                    // 16 needs the non-portable attribute
constexpr int kClusterThreads = 512;

// What one CTA publishes for the other CTAs of its cluster.
struct KDClusterPartial {
  float s_m, s_l, t_m, t_l, one_m, one_l, acc;
  float d, qh, pu;
};

template <int DIV, typename T>
__global__ void __launch_bounds__(kClusterThreads, 2) kd_cluster_kernel(KDArgs a, int64_t vec_per_cta) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int N = Vec<T>::N;
  extern __shared__ uint4 slice[];  // student vectors, then teacher vectors
  __shared__ double scratch[33];
  __shared__ KDClusterPartial part;
  __shared__ KDRowState shared_st;

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int n_cta = static_cast<int>(cluster.num_blocks());
  const int64_t row = blockIdx.x / n_cta;
  BlockGroup g{scratch};
  const int tid = threadIdx.x, nthreads = blockDim.x;

  const T* s_row = kd_student_row<T>(a, row);
  const T* t_row = a.has_soft ? kd_teacher_row<T>(a, row) : nullptr;
  uint4* s_sm = slice;
  uint4* t_sm = slice + vec_per_cta;
  const int64_t nvec = a.V / N;
  const int64_t v0 = rank * vec_per_cta;
  const int64_t v1 = v0 + vec_per_cta < nvec ? v0 + vec_per_cta : nvec;
  const bool need_pass2 = kd_needs_pass2<DIV>(a);

  KDRowState st;
  st.label = a.labels ? a.labels[row] : -1;
  st.active = a.labels ? st.label != a.ignore_index : true;

  // one vector of raw logits (kept raw in shared memory), transformed by its model's f
  auto unpack = [&](const uint4& u, const LogitTransform& f, float* z) {
    T v[N];
    memcpy(v, &u, 16);
#pragma unroll
    for (int i = 0; i < N; ++i) z[i] = transform_logit(f, to_float(v[i]));
  };
  auto unpack_raw = [&](const uint4& u, float* x) {
    T v[N];
    memcpy(v, &u, 16);
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = to_float(v[i]);
  };

  if (st.active) {
    // ---- pass 1: global -> shared memory, folded into the statistics on the way -------------
    KDPass1Thread<DIV, KD_GENERIC> p1(a);  // plain sums of a few vectors, flushed at the end
    for (int64_t i = v0 + tid; i < v1; i += nthreads) {
      float zs[N], zt[N];
      const uint4 us = reinterpret_cast<const uint4*>(s_row)[i];
      s_sm[i - v0] = us;
      unpack(us, a.student, zs);
      if (a.has_soft) {
        const uint4 ut = reinterpret_cast<const uint4*>(t_row)[i];
        t_sm[i - v0] = ut;
        unpack(ut, a.teacher, zt);
      }
      p1.add(zs, zt, a);
    }
    const KDPass1 r = p1.to_pass1(a).template reduce<DIV>(g, a);
    if (tid == 0) {
      part.s_m = r.s.m; part.s_l = r.s.l(); part.t_m = r.t.m; part.t_l = r.t.l();
      part.one_m = r.one.m; part.one_l = r.one.l(); part.acc = r.acc.value();
    }
    cluster.sync();
    if (tid == 0) {
      // the cluster's statistics: the block reduction's combine, over the CTAs in rank order
      KDPass1 full;
      for (int c = 0; c < n_cta; ++c) {
        const KDClusterPartial* q = cluster.map_shared_rank(&part, c);
        full.s.m = pd_max(full.s.m, q->s_m);
        full.t.m = pd_max(full.t.m, q->t_m);
        full.one.m = pd_max(full.one.m, q->one_m);
      }
      for (int c = 0; c < n_cta; ++c) {
        const KDClusterPartial* q = cluster.map_shared_rank(&part, c);
        if (DIV == KL) full.acc.add(kl_move(q->acc, q->t_l, q->t_m, full.t.m, q->s_m, full.s.m));
        if (DIV == REVERSE_KL) full.acc.add(kl_move(q->acc, q->s_l, q->s_m, full.s.m, q->t_m, full.t.m));
        full.s.sum.add(q->s_l == 0.0f ? 0.0f : q->s_l * pd_exp(q->s_m - finite_or_zero(full.s.m)));
        full.t.sum.add(q->t_l == 0.0f ? 0.0f : q->t_l * pd_exp(q->t_m - finite_or_zero(full.t.m)));
        full.one.sum.add(q->one_l == 0.0f ? 0.0f : q->one_l * pd_exp(q->one_m - finite_or_zero(full.one.m)));
      }
      KDRowState s1 = st;
      kd_finish_pass1<DIV>(full, a, s1);
      shared_st = s1;
    }
    __syncthreads();
    st = shared_st;

    // ---- pass 2 (jsd, tvd, skew_*): from shared memory -------------------------------------
    if (need_pass2) {
      KDPass2 p2;
      for (int64_t i = tid; i < v1 - v0; i += nthreads) {
        float zs[N], zt[N];
        unpack(s_sm[i], a.student, zs);
        unpack(t_sm[i], a.teacher, zt);
        p2.template add<DIV>(zs, zt, a, st);
      }
      float d, qh, pu;
      p2.reduce(g, d, qh, pu);
      if (tid == 0) { part.d = d; part.qh = qh; part.pu = pu; }
      cluster.sync();
      if (tid == 0) {
        KSum fd, fqh, fpu;
        for (int c = 0; c < n_cta; ++c) {
          const KDClusterPartial* q = cluster.map_shared_rank(&part, c);
          fd.add(q->d); fqh.add(q->qh); fpu.add(q->pu);
        }
        shared_st.div = fd.value();
        shared_st.s_q = fqh.value();
        shared_st.s_p = fpu.value();
        kd_closed_sums<DIV>(shared_st);
      }
      __syncthreads();
      st = shared_st;
    }
  }

  if (rank == 0 && tid == 0 && a.loss) a.loss[row] = kd_row_loss(a, s_row, st);

  // ---- the gradient, from shared memory, written once -----------------------------------
  const float scale = kd_row_scale(a, row);
  T* gs_row = a.gs ? static_cast<T*>(a.gs) + row * a.V : nullptr;
  T* gt_row = a.gt ? static_cast<T*>(a.gt) + row * a.V : nullptr;
  for (int64_t i = tid; i < v1 - v0; i += nthreads) {
    float outs[N], outt[N];
    if (st.active) {
      float rs[N], rt[N];  // raw: kd_grad_chunk transforms them and takes the slopes there
      unpack_raw(s_sm[i], rs);
      if (a.has_soft) unpack_raw(t_sm[i], rt);
      kd_grad_chunk<DIV, KD_GENERIC>(rs, rt, (v0 + i) * N, a, st, scale, gs_row != nullptr,
                                     gt_row != nullptr, outs, outt);
    } else {
      for (int k = 0; k < N; ++k) outs[k] = outt[k] = 0.0f;
    }
    if (gs_row) store_chunk(gs_row, (v0 + i) * N, N, outs);
    if (gt_row) store_chunk(gt_row, (v0 + i) * N, N, outt);
  }
  // no CTA may leave while another can still read its shared memory
  cluster.sync();
#endif
}

// Launches the cluster kernel if the device, the build and the inputs allow it; false means
// "not launched" (the caller runs the portable kernel).
bool kd_cluster_launch(const KDArgs& a, int divergence, DType dtype, int device, void* stream) {
  if (device < 0 || a.n_rows == 0 || a.V == 0 || std::getenv("PYDISTILL_NO_CLUSTER") != nullptr)
    return false;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9)
    return false;
  const char* launched = dispatch(divergence, dtype, [&](auto div, auto type) -> const char* {
    constexpr int DIV = decltype(div)::value;
    using T = typename decltype(type)::type;
    constexpr int N = Vec<T>::N;
    const char* no = "";
    auto kernel = kd_cluster_kernel<DIV, T>;
    // the code must be built for sm_90 (PTX of an older architecture JIT-ed to sm_90 has the
    // empty body)
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess || attr.ptxVersion < 90) {
      cudaGetLastError();
      return no;
    }
    if (a.V % N != 0) return no;
    // every row start 16-byte aligned: base pointers and row strides
    const int64_t esz = sizeof(T);
    auto aligned = [&](const void* p, int64_t so, int64_t si) {
      return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (so * esz) % 16 == 0 &&
                              (si * esz) % 16 == 0);
    };
    if (!aligned(a.s, a.s_so, a.s_si) || !aligned(a.has_soft ? a.t : nullptr, a.t_so, a.t_si) ||
        !aligned(a.gs, a.V, a.V) || !aligned(a.gt, a.V, a.V))
      return no;
    const int64_t nvec = a.V / N;
    const int64_t tensors = a.has_soft ? 2 : 1;
    int n_cta = 1;
    while (n_cta < kClusterMax && (nvec + n_cta - 1) / n_cta * 16 * tensors > kClusterSliceBytes) n_cta *= 2;
    const int64_t vec_per_cta = (nvec + n_cta - 1) / n_cta;
    if (vec_per_cta * 16 * tensors > kClusterSliceBytes || a.n_rows * n_cta > INT_MAX) return no;
    // the teacher slice starts at slice + vec_per_cta: reserved even without a teacher
    const size_t dyn = static_cast<size_t>(vec_per_cta * 16 * 2);
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn)) != cudaSuccess ||
        (n_cta > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)) {
      cudaGetLastError();
      return no;
    }
    cudaLaunchConfig_t config = {};
    cudaLaunchAttribute attrs[1];
    attrs[0].id = cudaLaunchAttributeClusterDimension;
    attrs[0].val.clusterDim.x = n_cta;
    attrs[0].val.clusterDim.y = 1;
    attrs[0].val.clusterDim.z = 1;
    config.gridDim = dim3(static_cast<unsigned>(a.n_rows * n_cta));
    config.blockDim = dim3(kClusterThreads);
    config.dynamicSmemBytes = dyn;
    config.stream = static_cast<cudaStream_t>(stream);
    config.attrs = attrs;
    config.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess || clusters < 1) {
      cudaGetLastError();
      return no;
    }
    if (cudaLaunchKernelEx(&config, kernel, a, vec_per_cta) != cudaSuccess) {
      cudaGetLastError();
      return no;
    }
    return nullptr;  // launched
  });
  return launched == nullptr;
}

}  // namespace pydistill
