// The boundary between the op implementations (*_ops.cpp: ATen, compiled by the host compiler
// only) and the kernels (*.cu: CUDA headers only, so nvcc's per-architecture passes never
// parse the ATen headers). Plain structs and launch functions; no CUDA or ATen types.
#pragma once

#include <cstdint>

namespace pydistill {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// One model's logit transform z = cap(scale * x), cap(y) = c tanh(y / c) when has_cap (the
// identity at scale 1 without a cap), applied where its logits are loaded, before the
// temperature; its slope scale (1 - (z / c)^2) multiplies that model's gradient
// (transform_logit / transform_slope in common.cuh).
struct LogitTransform {
  float scale;  // > 0
  float cap;    // c, read only when has_cap
  bool has_cap;
};

// ---- kd_loss ------------------------------------------------------------------------------
// Per-row statistics kept between forward and backward: the running max and log-sum of
// x_s = z_s / T, x_t = z_t / T and z_s (z: the transformed logits; each logsumexp as its
// two terms), then S_q and S_p.
constexpr int KD_STATS = 8;

struct KDArgs {
  const void* s;            // student rows, addressed with (n_inner, s_so, s_si)
  const void* t;            // teacher rows, addressed with (n_inner, t_so, t_si)
  const int64_t* labels;    // N labels or null
  void* gs;                 // contiguous (N, V) student gradient or null
  void* gt;                 // contiguous (N, V) teacher gradient or null
  float* loss;              // N per-row losses or null
  float* stats;             // (N, KD_STATS): written when compute_stats, else read
  const float* row_scale;   // gradient factor per row (stride row_scale_stride) or null: 1
  int64_t row_scale_stride;
  int64_t n_rows, V, n_inner, s_so, s_si, t_so, t_si;
  int64_t ignore_index;
  LogitTransform student, teacher;  // the hard term uses the student's, at temperature 1
  float inv_t, beta, hard_weight, soft_scale;
  float beta_c;             // 1 - beta from float64: beta = 1 - 1e-9 rounds to 1 in float32
  bool has_hard, has_soft, ce_separate;
  bool compute_stats;       // forward: passes over the row; else the stats are read
};

// Each returns nullptr, or an error message. `stream` is a cudaStream_t; `device` < 0 runs
// the host implementation.
const char* kd_launch(const KDArgs& a, int divergence, DType dtype, int device, void* stream);
// The sm_90 cluster kernel (forward with gradient); false where it does not apply.
bool kd_cluster_launch(const KDArgs& a, int divergence, DType dtype, int device, void* stream);
// grad (n_rows, V, contiguous) *= scale[row * stride], rows whose scale is 1 skipped.
const char* kd_scale_grad_launch(void* grad, DType dtype, const float* scale, int64_t stride,
                                 int64_t n_rows, int64_t V, int device, void* stream);

// ---- topk_kd_loss -------------------------------------------------------------------------
constexpr int TOPK_STATS = 8;
constexpr int64_t TOPK_MAX_K = 4096;

struct TopKArgs {
  const void* s;              // student rows (n_inner, s_so, s_si)
  const float* lp;            // (N, K) teacher log-probs, sorted by id
  const int64_t* idx;         // (N, K) token ids, sorted
  const int64_t* labels;      // N or null
  void* gs;                   // contiguous (N, V) gradient or null
  float* loss;                // N or null
  float* stats;               // (N, TOPK_STATS): written when compute_stats, else read
  const float* row_scale;     // per-row gradient factor (stride row_scale_stride) or null
  int64_t row_scale_stride;
  int64_t n_rows, V, K, n_inner, s_so, s_si, ignore_index;
  int tail;
  LogitTransform student;     // the teacher arrives as log-probabilities: no transform
  float inv_t, power, beta, hard_weight, soft_scale;
  float beta_c;               // 1 - beta from float64, as KDArgs's
  bool has_hard, has_soft, ce_separate, compute_stats;
};

const char* topk_launch(const TopKArgs& a, int divergence, DType dtype, int device, void* stream);

}  // namespace pydistill
