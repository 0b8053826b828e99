// What the CUDA kernels of every family share: element types, 16-byte vector access, the
// per-element divergence terms, online logsumexp steps, and a "group" abstraction over the
// threads that work on one row.
//
// Everything here is __host__ __device__: the same row code runs as a CUDA thread block
// (BlockGroup) and as a single host thread (HostGroup). The host instantiation implements
// the ops for CPU tensors, which lets a machine without a GPU test the math, the edge cases
// (masked vocabulary, NaN, ignored rows, misaligned rows) and the op registration.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "args.h"

#define PD_HD __host__ __device__ __forceinline__

namespace pydistill {

constexpr float kNegInf = -INFINITY;

// Divergence codes: pydistill.kernels.softmax_divergence.DIVERGENCE_CODES.
enum Divergence : int { KL = 0, REVERSE_KL = 1, JSD = 2, TVD = 3, SKEW_KL = 4, SKEW_REVERSE_KL = 5 };

// ------------------------------------------------------------------------------------------
// math that resolves to the device intrinsics in device code and to libm on the host
// ------------------------------------------------------------------------------------------
PD_HD float pd_exp(float x) { return expf(x); }
// 2^x for the hot loops' max-subtracted arguments (x <= 0 but for a +inf logit): the device's
// ex2.approx.ftz (MUFU.EX2, 2 ulp; results below 2^-126 flush to 0), libm's exp2f on the host
PD_HD float pd_exp2_fast(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}
constexpr double kLog2e = 1.4426950408889634;  // log2(e): e^x = 2^(x log2 e)
PD_HD float pd_log(float x) { return logf(x); }
PD_HD float pd_max(float a, float b) { return fmaxf(a, b); }  // NaN is dropped: see Pass1
// A running max as the shift of e^{x - shift}: 0 where it is infinite. At -inf (nothing but
// masked entries so far) the sum stays 0; at +inf the +inf entry adds e^{+inf}, so the sum
// and the logsumexp are +inf, as torch.logsumexp's (e^{x - inf} would make the sum NaN).
PD_HD float finite_or_zero(float m) { return isinf(m) ? 0.0f : m; }

// cap * tanh(z / cap) from one exp of a non-positive argument; -inf stays -inf.
PD_HD float softcap(float z, float cap) {
  float y = z / cap;
  float e = pd_exp(-2.0f * fabsf(y));
  float th = (1.0f - e) / (1.0f + e);
  th = y < 0.0f ? -th : th;
  return z == kNegInf ? z : cap * th;
}

// d cap(y) / dy = sech^2(y / c) from the uncapped y, as 4 e / (1 + e)^2 with
// e = e^{-2 |y| / c} <= 1: no cancellation where the cap saturates (1 - (cap(y) / c)^2 loses
// every digit there, cap(y) / c rounding towards 1); 0 at masked (-inf) entries.
PD_HD float softcap_slope(float y, float cap) {
  const float e = pd_exp(-2.0f * fabsf(y / cap));
  const float d = 1.0f + e;
  return y == kNegInf ? 0.0f : 4.0f * e / (d * d);
}

// One model's logit transform (args.h): cap(scale * x); -inf stays -inf (scale > 0).
PD_HD float transform_logit(const LogitTransform& f, float x) {
  const float z = f.scale * x;
  return f.has_cap ? softcap(z, f.cap) : z;
}

// cap(scale x) and, in slope, its derivative d z / d x, from one exp: the values of
// transform_logit and transform_slope.
PD_HD float transform_logit_slope(const LogitTransform& f, float x, float& slope) {
  const float z = f.scale * x;
  if (!f.has_cap) {
    slope = f.scale;
    return z;
  }
  const float y = z / f.cap;
  const float e = pd_exp(-2.0f * fabsf(y));
  const float d = 1.0f + e;
  float th = (1.0f - e) / d;
  th = y < 0.0f ? -th : th;
  slope = z == kNegInf ? 0.0f : f.scale * (4.0f * e / (d * d));
  return z == kNegInf ? z : f.cap * th;
}

// d z / d x at the untransformed logit x: scale sech^2(scale x / c) with a cap (0 at -inf),
// else scale. Taken from x, not from z = cap(scale x), which has lost the slope's digits
// where the cap saturates.
PD_HD float transform_slope(const LogitTransform& f, float x) {
  return f.has_cap ? f.scale * softcap_slope(f.scale * x, f.cap) : f.scale;
}

// ------------------------------------------------------------------------------------------
// element types: load in the input dtype, compute in float32, round once on store
// ------------------------------------------------------------------------------------------
PD_HD float to_float(float x) { return x; }
PD_HD float to_float(__half x) { return __half2float(x); }
PD_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> PD_HD T from_float(float x);
template <> PD_HD float from_float<float>(float x) { return x; }
template <> PD_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> PD_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements per 16-byte vector.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

// A chunk's element count as a type: for_chunks hands it to its callable, whose arrays and
// loops then have a compile-time size (a run-time count puts them in local memory). It also
// converts to int.
template <int K> struct Count {
  static constexpr int value = K;
  PD_HD constexpr operator int() const { return K; }
};

// A chunk is either one 16-byte vector (n == Vec<T>::N, aligned) or one element (n == 1).
template <typename T>
PD_HD void load_chunk(const T* p, int64_t j, int n, float* out) {
  constexpr int N = Vec<T>::N;
  if (n == N) {
    T v[N];
#ifdef __CUDA_ARCH__
    uint4 u = *reinterpret_cast<const uint4*>(p + j);
    memcpy(v, &u, 16);
#else
    memcpy(v, p + j, 16);
#endif
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(v[i]);
  } else {
    out[0] = to_float(p[j]);
  }
}

// load_chunk with a compile-time count
template <typename T, int CNT>
PD_HD void load_count(const T* p, int64_t j, float (&out)[CNT]) {
  static_assert(CNT == 1 || CNT == Vec<T>::N, "a chunk is one element or one vector");
  load_chunk(p, j, CNT, out);
}

template <typename T>
PD_HD void store_chunk(T* p, int64_t j, int n, const float* in) {
  constexpr int N = Vec<T>::N;
  if (n == N) {
    T v[N];
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = from_float<T>(in[i]);
#ifdef __CUDA_ARCH__
    uint4 u;
    memcpy(&u, v, 16);
    *reinterpret_cast<uint4*>(p + j) = u;
#else
    memcpy(p + j, v, 16);
#endif
  } else {
    p[j] = from_float<T>(in[0]);
  }
}

// Misalignment of a row start, in elements, within a 16-byte vector.
template <typename T>
PD_HD int misalignment(const void* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) % 16) / sizeof(T));
}

// How one row splits into chunks: a scalar head up to the first address where every pointer
// the pass touches is 16-byte aligned, whole vectors, a scalar tail. Pointers that disagree
// on their misalignment (e.g. a sliced student against a contiguous gradient) cannot share
// vectors: then the whole row is scalar.
struct RowSplit {
  int64_t head;  // scalar elements [0, head)
  int64_t nvec;  // vectors [head, head + nvec * N)
};

template <typename T>
PD_HD RowSplit row_split(int64_t V, const void* a, const void* b, const void* c, const void* d) {
  constexpr int N = Vec<T>::N;
  const void* ptrs[4] = {a, b, c, d};
  int mis = -1;
  for (int i = 0; i < 4; ++i) {
    if (ptrs[i] == nullptr) continue;
    int m = misalignment<T>(ptrs[i]);
    if (mis >= 0 && m != mis) return RowSplit{V, 0};
    mis = m;
  }
  if (mis < 0) mis = 0;
  int64_t head = (N - mis) % N;
  if (head > V) head = V;
  return RowSplit{head, (V - head) / N};
}

// Calls f(col, n) for the chunks of a row that thread `tid` of `nthreads` owns: consecutive
// threads take consecutive vectors (coalesced). `reverse` walks the vectors from the row's end
// (a pass right after another one then starts on what is most likely still in L2). n is a
// Count<1> or Count<N>. flush() is called at the end and, on the host (one thread sums the
// whole row), after every kStretch vectors: a caller that sums its terms plainly folds them into
// a compensated sum there. A GPU thread sums a few dozen vectors (threads_for_row) plainly: its
// rounding, independent of the other threads', averages out in the group's sum.
constexpr int kStretch = 16;
struct NoFlush {
  PD_HD void operator()() const {}
};

template <typename T, typename F, typename Flush = NoFlush>
PD_HD void for_chunks(int64_t V, RowSplit sp, int tid, int nthreads, bool reverse, F&& f,
                      Flush&& flush = Flush()) {
  constexpr int N = Vec<T>::N;
  for (int64_t j = tid; j < sp.head; j += nthreads) f(j, Count<1>());
  int k = 0;
  (void)k;
  if (reverse) {
    for (int64_t i = sp.nvec - 1 - tid; i >= 0; i -= nthreads) {
      f(sp.head + i * N, Count<N>());
#ifndef __CUDA_ARCH__
      if (++k == kStretch) { k = 0; flush(); }
#endif
    }
  } else {
    for (int64_t i = tid; i < sp.nvec; i += nthreads) {
      f(sp.head + i * N, Count<N>());
#ifndef __CUDA_ARCH__
      if (++k == kStretch) { k = 0; flush(); }
#endif
    }
  }
  for (int64_t j = sp.head + sp.nvec * N + tid; j < V; j += nthreads) f(j, Count<1>());
  flush();
}

// ------------------------------------------------------------------------------------------
// thread groups: the threads that share one row
// ------------------------------------------------------------------------------------------
struct HostGroup {
  PD_HD int tid() const { return 0; }
  PD_HD int size() const { return 1; }
  PD_HD float sum(float x) { return x; }
  PD_HD double sum_d(double x) { return x; }
  PD_HD float max(float x) { return x; }
  PD_HD void sync() {}
};

#ifdef __CUDACC__
// One thread block; blockDim.x a multiple of 32, at most 1024. Each reduction returns the
// block-wide result to every thread.
struct BlockGroup {
  double* scratch;  // 33 doubles of shared memory
#ifdef __CUDA_ARCH__
  PD_HD int tid() const { return threadIdx.x; }
  PD_HD int size() const { return blockDim.x; }
  PD_HD void sync() { __syncthreads(); }
#else  // never instantiated for the host; defined so that host passes of nvcc see no device calls
  PD_HD int tid() const { return 0; }
  PD_HD int size() const { return 1; }
  PD_HD void sync() {}
#endif

  template <bool IS_MAX, typename V>
  PD_HD V reduce(V x) {
#ifdef __CUDA_ARCH__
    V* buf = reinterpret_cast<V*>(scratch);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      V y = __shfl_xor_sync(0xffffffffu, x, o);
      x = IS_MAX ? (y > x || x != x ? y : x) : x + y;  // max drops NaN, as fmaxf
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    if (lane == 0) buf[warp] = x;
    __syncthreads();
    if (warp == 0) {
      x = lane < nwarps ? buf[lane] : (IS_MAX ? V(kNegInf) : V(0));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        V y = __shfl_xor_sync(0xffffffffu, x, o);
        x = IS_MAX ? (y > x || x != x ? y : x) : x + y;  // max drops NaN, as fmaxf
      }
      if (lane == 0) buf[32] = x;
    }
    __syncthreads();
    return buf[32];
#else
    return x;
#endif
  }
  PD_HD float sum(float x) { return reduce<false>(x); }
  PD_HD double sum_d(double x) { return reduce<false>(x); }
  PD_HD float max(float x) { return reduce<true>(x); }
};
#endif

// Neumaier's compensated sum. A row's terms are summed serially per thread (hundreds of them
// at large V; all of them in the host implementation) before the tree reduction across
// threads; sums that are later subtracted from a term (S_q in h_j - S_q, near +-1/2 for tvd)
// need the extra digits.
// Once the sum is infinite (a +inf term: a KL whose student is -inf where the teacher is not)
// or NaN, the compensation (inf - inf) is meaningless and the sum is that value itself.
struct KSum {
  float s = 0.0f, c = 0.0f;
  PD_HD void add(float x) {
    const float t = s + x;
    if (isfinite(t)) c += fabsf(s) >= fabsf(x) ? (s - t) + x : (x - t) + s;
    s = t;
  }
  PD_HD float value() const { return isfinite(s) ? s + c : s; }
};

// ------------------------------------------------------------------------------------------
// online logsumexp
// ------------------------------------------------------------------------------------------

// Running max m and sum l of e^{x - m} (compensated: one thread may sum a whole row).
struct Lse {
  float m = kNegInf;
  KSum sum;

  // Folds n values into the state. The max skips NaN (fmaxf), the sum does not: a NaN
  // value makes l NaN, so the row's loss is NaN.
  PD_HD void add(const float* x, int n) {
    float mc = m;
    for (int i = 0; i < n; ++i) mc = pd_max(mc, x[i]);
    const float mf = finite_or_zero(mc);
    if (mc != m) {
      const float f = pd_exp(m - mf);
      sum.s *= f;
      sum.c = isfinite(sum.s) && sum.s != 0.0f ? sum.c * f : 0.0f;
    }
    for (int i = 0; i < n; ++i) sum.add(pd_exp(x[i] - mf));
    m = mc;
  }
  PD_HD float l() const { return sum.value(); }
  // The group-wide state, in every thread.
  template <typename G>
  PD_HD Lse reduce(G& g) const {
    Lse r;
    r.m = g.max(m);
    const float lv = l();
    r.sum.s = g.sum(lv == 0.0f ? 0.0f : lv * pd_exp(m - finite_or_zero(r.m)));
    return r;
  }
  PD_HD float log_l() const { return pd_log(l()); }
};

// The kl accumulator of one partial state, moved from the maxima it was taken at (m_a, m_b)
// to new ones (M_a, M_b):  A = sum_j e^{a_j - m_a} ((a_j - m_a) - (b_j - m_b)).
// Maxima as shifts (finite_or_zero), as in the Triton kernel. Where the rescale factor
// underflows to 0 (maxima 1e38 apart) the carried sum is 0, as torch's underflowed p = 0 is,
// even if the log-ratio beside it overflowed.
PD_HD float kl_move(float acc, float l_a, float m_a, float M_a, float m_b, float M_b) {
  float ma = finite_or_zero(m_a), Ma = finite_or_zero(M_a);
  float mb = finite_or_zero(m_b), Mb = finite_or_zero(M_b);
  const float f = pd_exp(ma - Ma);
  // f applied to each part first: l_a times a log-ratio of 1e38 may overflow where f l_a times it does not
  return l_a > 0.0f && f != 0.0f ? f * acc + (f * l_a) * ((ma - Ma) - (mb - Mb)) : 0.0f;
}

// ------------------------------------------------------------------------------------------
// per-element divergence terms (table in kernels/softmax_divergence.py's docstring)
// ------------------------------------------------------------------------------------------
struct Terms {
  float p, q, d, qh, pu;
};

// Every product with a probability is masked where that probability is exactly 0, so
// entries that are -inf in the logits contribute 0 and never NaN, while a NaN probability
// propagates.
// beta_c = 1 - beta (from float64 where the caller has it)
template <int DIV>
PD_HD Terms pointwise(float log_p, float log_q, float beta, float beta_c) {
  Terms r;
  const float p = pd_exp(log_p), q = pd_exp(log_q);
  r.p = p;
  r.q = q;
  if (DIV == KL) {
    r.d = p != 0.0f ? p * (log_p - log_q) : 0.0f;
    r.qh = -p;
    r.pu = p != 0.0f ? p * (log_p - log_q + 1.0f) : 0.0f;
  } else if (DIV == REVERSE_KL) {
    r.d = q != 0.0f ? q * (log_q - log_p) : 0.0f;
    r.qh = q != 0.0f ? q * (log_q - log_p + 1.0f) : 0.0f;
    r.pu = -q;
  } else if (DIV == JSD) {
    // m underflows to 0 only where p and q are both below ~1e-38: their terms are then
    // negligible, not infinite
    const float m = beta * p + beta_c * q;
    const float log_m = pd_log(m);
    r.pu = beta * (p != 0.0f && m != 0.0f ? p * (log_p - log_m) : 0.0f);
    r.qh = beta_c * (q != 0.0f && m != 0.0f ? q * (log_q - log_m) : 0.0f);
    r.d = r.pu + r.qh;
  } else if (DIV == TVD) {
    const float g = q > p ? 0.5f : (q < p ? -0.5f : 0.0f);
    r.d = 0.5f * fabsf(p - q);
    r.qh = q * g;
    r.pu = -p * g;
  } else if (DIV == SKEW_KL) {
    const float m = beta * p + beta_c * q;
    const float ratio = m != 0.0f ? p / m : 0.0f;
    const float log_ratio = log_p - pd_log(m);
    r.d = p != 0.0f && m != 0.0f ? p * log_ratio : 0.0f;
    r.qh = -beta_c * q * ratio;
    r.pu = p != 0.0f && m != 0.0f ? p * (log_ratio - beta * ratio) : 0.0f;
  } else {  // SKEW_REVERSE_KL
    const float m = beta * q + beta_c * p;
    const float ratio = m != 0.0f ? q / m : 0.0f;
    const float log_ratio = log_q - pd_log(m);
    r.d = q != 0.0f && m != 0.0f ? q * log_ratio : 0.0f;
    r.qh = q != 0.0f && m != 0.0f ? q * (log_ratio - beta * ratio) : 0.0f;
    r.pu = -beta_c * p * ratio;
  }
  return r;
}

template <int DIV>
PD_HD Terms pointwise(float log_p, float log_q, float beta) {
  return pointwise<DIV>(log_p, log_q, beta, 1.0f - beta);
}

// ------------------------------------------------------------------------------------------
// the divergence's value, per element, in a form whose rounding does not grow with T
// (pydistill/reference/softmax_divergence.py: divergence_value, and its block comment)
// ------------------------------------------------------------------------------------------

// kl and reverse_kl get their value online in pass 1 up to this temperature (~T^2 eps log V
// relative to the loss: 1e-6 at T = 4); above it, in pass 2 from div_term.
constexpr float kOnePassMaxT = 4.0f;

// a log(a / b) - a + b >= 0 from u = log(a / b): the series of phi(u) = u - 1 + e^{-u} where
// |u| < 1/2, a u - a + b elsewhere, b where a = 0
PD_HD float bregman(float a, float b, float u) {
  if (a == 0.0f) return b;
  if (!(fabsf(u) < 0.5f)) return a * u - a + b;
  const float phi = u * u * (1.0f / 2 + u * (-1.0f / 6 + u * (1.0f / 24 + u * (-1.0f / 120 + u * (
      1.0f / 720 + u * (-1.0f / 5040 + u / 40320.0f))))));
  return a * phi;
}

// log(a / m), m = (1 - weight_other) a + weight_other b, from w = log(a / b): -log1p(y),
// y = weight_other expm1(-w), where |w| or |y| is small (weight_other within 1e-9 of 0: m is a
// and log a - log m cancels)
PD_HD float log_ratio_to_mixture(float log_a, float log_m, float w, float weight_other) {
  const float y = weight_other * expm1f(-w);
  return fabsf(w) < 0.25f || fabsf(y) < 0.25f ? -log1pf(y) : log_a - log_m;
}

// w = log p - log q = (x_t - m_t) - (x_s - m_s) - (ll_t - ll_s): rounding relative to w
PD_HD float log_ratio(float x_t, float x_s, float m_t, float m_s, float ll_t, float ll_s) {
  return ((x_t - finite_or_zero(m_t)) - (x_s - finite_or_zero(m_s))) - (ll_t - ll_s);
}

template <int DIV>
PD_HD float div_term(float log_p, float log_q, float p, float q, float w, float beta,
                     float beta_c) {
  if (DIV == KL) return bregman(p, q, w);
  if (DIV == REVERSE_KL) return bregman(q, p, -w);
  if (DIV == TVD) return 0.5f * (fabsf(w) < 0.25f ? p * fabsf(expm1f(-w)) : fabsf(p - q));
  if (DIV == JSD) {
    const float m = beta * p + beta_c * q;
    if (m == 0.0f) return 0.0f;
    const float log_m = pd_log(m);
    return beta * bregman(p, m, log_ratio_to_mixture(log_p, log_m, w, beta_c)) +
           beta_c * bregman(q, m, log_ratio_to_mixture(log_q, log_m, -w, beta));
  }
  if (DIV == SKEW_KL) {
    const float m = beta * p + beta_c * q;
    return m == 0.0f ? 0.0f : bregman(p, m, log_ratio_to_mixture(log_p, pd_log(m), w, beta_c));
  }
  const float m = beta * q + beta_c * p;  // SKEW_REVERSE_KL
  return m == 0.0f ? 0.0f : bregman(q, m, log_ratio_to_mixture(log_q, pd_log(m), -w, beta_c));
}

// ------------------------------------------------------------------------------------------
// compile-time dispatch: f(DivTag<DIV>{}, TypeTag<T>{}) for run-time codes (args.h DType)
// ------------------------------------------------------------------------------------------
template <int D> struct DivTag { static constexpr int value = D; };
template <typename T> struct TypeTag { using type = T; };

template <typename T, typename F>
const char* dispatch_divergence(int divergence, F&& f) {
  switch (divergence) {
    case KL: return f(DivTag<KL>{}, TypeTag<T>{});
    case REVERSE_KL: return f(DivTag<REVERSE_KL>{}, TypeTag<T>{});
    case JSD: return f(DivTag<JSD>{}, TypeTag<T>{});
    case TVD: return f(DivTag<TVD>{}, TypeTag<T>{});
    case SKEW_KL: return f(DivTag<SKEW_KL>{}, TypeTag<T>{});
    case SKEW_REVERSE_KL: return f(DivTag<SKEW_REVERSE_KL>{}, TypeTag<T>{});
    default: return "divergence: expected a code in [0, 6)";
  }
}

template <typename F>
const char* dispatch(int divergence, int dtype, F&& f) {
  switch (dtype) {
    case 0: return dispatch_divergence<float>(divergence, f);
    case 1: return dispatch_divergence<__half>(divergence, f);
    case 2: return dispatch_divergence<__nv_bfloat16>(divergence, f);
    default: return "dtype: expected float32, float16 or bfloat16";
  }
}

// Threads per row: 32..512, about four 16-byte vectors per thread.
inline int threads_for_row(int64_t V, int64_t elems_per_vec) {
  const int64_t want = (V / elems_per_vec + 3) / 4;
  int t = 32;
  while (t < 512 && t < want) t *= 2;
  return t;
}

// Row addressing of a (..., V) tensor whose leading dims collapse to (outer, inner).
PD_HD int64_t row_offset(int64_t row, int64_t n_inner, int64_t stride_outer, int64_t stride_inner) {
  return (row / n_inner) * stride_outer + (row % n_inner) * stride_inner;
}

}  // namespace pydistill
