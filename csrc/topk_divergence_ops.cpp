// topk_kd_loss: the ops (schemas in _C.cpp) over the kernels of topk_divergence.cu. Inputs,
// layouts and outputs are handled here with ATen; the kernels see plain pointers (args.h).
#include "ops_common.h"

#include <torch/library.h>

#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

namespace pydistill {
namespace {

using at::Tensor;

struct TopKCall {
  TopKArgs a{};
  RowLayout s;
  Tensor lp, idx, labels;
  DType dtype;
  int divergence;
};

TopKCall topk_prepare(const Tensor& student, const Tensor& lp, const Tensor& idx,
                      const c10::optional<Tensor>& labels, int64_t divergence, int64_t tail,
                      double temperature, double teacher_power, double beta, double hard_weight,
                      double soft_scale, double student_scale,
                      c10::optional<double> student_softcap, int64_t ignore_index) {
  TORCH_CHECK(student.dim() >= 1, "student: expected shape (..., V)");
  TORCH_CHECK(divergence >= 0 && divergence < 6, "divergence: expected a code in [0, 6), got ", divergence);
  TORCH_CHECK(tail >= 0 && tail <= 2, "tail: expected a code in [0, 3), got ", tail);
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  TopKCall c;
  TopKArgs& a = c.a;
  c.dtype = dtype_code(student.scalar_type(), "student");
  c.divergence = static_cast<int>(divergence);
  a.V = student.size(-1);
  a.n_rows = a.V ? student.numel() / a.V : 0;
  TORCH_CHECK(lp.dim() >= 1 && idx.sizes() == lp.sizes() && lp.numel() == a.n_rows * lp.size(-1),
              "teacher_logprobs, teacher_indices: expected (N, K) with N = ", a.n_rows, ", got ",
              lp.sizes(), " and ", idx.sizes());
  a.K = lp.size(-1);
  TORCH_CHECK(a.K >= 1 && a.K <= TOPK_MAX_K, "teacher_indices: expected 1 <= K <= ", TOPK_MAX_K,
              ", got K = ", a.K);
  TORCH_CHECK(lp.device() == student.device() && idx.device() == student.device(),
              "teacher_logprobs, teacher_indices: expected the student's device");
  a.n_inner = row_layouts(student, c.s, nullptr, nullptr);
  a.s = c.s.x.data_ptr();
  a.s_so = c.s.stride_outer;
  a.s_si = c.s.stride_inner;
  c.lp = lp.to(at::kFloat).contiguous();
  c.idx = idx.to(at::kLong).contiguous();
  a.lp = c.lp.data_ptr<float>();
  a.idx = c.idx.data_ptr<int64_t>();
  c.labels = labels_as_int64(labels, a.n_rows);
  a.labels = c.labels.defined() ? c.labels.data_ptr<int64_t>() : nullptr;
  a.ignore_index = ignore_index;
  a.tail = static_cast<int>(tail);
  a.inv_t = static_cast<float>(1.0 / temperature);
  a.power = static_cast<float>(teacher_power);
  a.student = logit_transform(student_scale, student_softcap, "student");
  a.beta = static_cast<float>(beta);
  a.beta_c = static_cast<float>(1.0 - beta);
  a.hard_weight = static_cast<float>(hard_weight);
  a.soft_scale = static_cast<float>(soft_scale);
  a.has_hard = hard_weight != 0.0;
  a.has_soft = soft_scale != 0.0;
  a.ce_separate = a.has_hard && temperature != 1.0;
  TORCH_CHECK(!a.has_hard || a.labels, "labels: required when hard_weight != 0");
  return c;
}

void run(TopKCall& c, const Tensor& like) {
  int device = -1;
  void* stream = nullptr;
  if (like.is_cuda()) {
    device = like.device().index();
    stream = c10::cuda::getCurrentCUDAStream(device).stream();
  }
  check_launch(topk_launch(c.a, c.divergence, c.dtype, device, stream));
}

std::tuple<Tensor, Tensor> topk_fwd(const Tensor& student, const Tensor& lp, const Tensor& idx,
                                    const c10::optional<Tensor>& labels, int64_t divergence,
                                    int64_t tail, double temperature, double teacher_power,
                                    double beta, double hard_weight, double soft_scale,
                                    double student_scale, c10::optional<double> student_softcap,
                                    int64_t ignore_index) {
  const c10::OptionalDeviceGuard guard(student.device());
  TopKCall c = topk_prepare(student, lp, idx, labels, divergence, tail, temperature,
                            teacher_power, beta, hard_weight, soft_scale, student_scale,
                            student_softcap, ignore_index);
  auto f32 = student.options().dtype(at::kFloat);
  Tensor loss = at::empty({c.a.n_rows}, f32);
  Tensor stats = at::empty({c.a.n_rows, TOPK_STATS}, f32);
  c.a.loss = loss.data_ptr<float>();
  c.a.stats = stats.data_ptr<float>();
  c.a.compute_stats = true;
  run(c, student);
  return {loss, stats};
}

Tensor topk_bwd(const Tensor& grad_rows, const Tensor& student, const Tensor& lp, const Tensor& idx,
                const c10::optional<Tensor>& labels, const Tensor& stats, int64_t divergence,
                int64_t tail, double temperature, double teacher_power, double beta,
                double hard_weight, double soft_scale, double student_scale,
                c10::optional<double> student_softcap, int64_t ignore_index) {
  const c10::OptionalDeviceGuard guard(student.device());
  TopKCall c = topk_prepare(student, lp, idx, labels, divergence, tail, temperature,
                            teacher_power, beta, hard_weight, soft_scale, student_scale,
                            student_softcap, ignore_index);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == c.a.n_rows * TOPK_STATS,
              "stats: expected ", c.a.n_rows, " x ", TOPK_STATS, " float32 values");
  Tensor st = stats.contiguous();
  Tensor scale = row_factors(grad_rows, c.a.n_rows, c.a.row_scale_stride);
  Tensor gs = at::empty(student.sizes(), student.options());
  c.a.stats = st.data_ptr<float>();
  c.a.row_scale = scale.data_ptr<float>();
  c.a.gs = gs.data_ptr();
  c.a.compute_stats = false;
  run(c, student);
  return gs;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill, CUDA, m) {
  m.impl("topk_fwd", &topk_fwd);
  m.impl("topk_bwd", &topk_bwd);
}

// The kernels' row code on one host thread: what CPU tensors run (tests without a GPU).
TORCH_LIBRARY_IMPL(pydistill, CPU, m) {
  m.impl("topk_fwd", &topk_fwd);
  m.impl("topk_bwd", &topk_bwd);
}

}  // namespace pydistill
