// kd_loss: the ops (schemas in _C.cpp) over the kernels of softmax_divergence.cu. Inputs,
// layouts and outputs are handled here with ATen; the kernels see plain pointers (args.h).
#include "ops_common.h"

#include <torch/library.h>

#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

namespace pydistill {
namespace {

using at::Tensor;

// Everything the entry points share: layouts (kept alive here), flags, scalars.
struct KDCall {
  KDArgs a{};
  RowLayout s, t;
  Tensor labels;
  DType dtype;
  int divergence;
};

KDCall kd_prepare(const Tensor& student, const Tensor& teacher, const c10::optional<Tensor>& labels,
                  int64_t divergence, double temperature, double beta, double hard_weight,
                  double soft_scale, double student_scale, c10::optional<double> student_softcap,
                  double teacher_scale, c10::optional<double> teacher_softcap,
                  int64_t ignore_index) {
  TORCH_CHECK(student.dim() >= 1 && student.sizes() == teacher.sizes(),
              "student and teacher: expected one shape (..., V), got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "student and teacher: expected one dtype, got ", student.scalar_type(), " and ",
              teacher.scalar_type());
  TORCH_CHECK(student.device() == teacher.device(), "student and teacher: expected one device");
  TORCH_CHECK(divergence >= 0 && divergence < 6, "divergence: expected a code in [0, 6), got ", divergence);
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  KDCall c;
  c.dtype = dtype_code(student.scalar_type(), "student");
  c.divergence = static_cast<int>(divergence);
  KDArgs& a = c.a;
  a.V = student.size(-1);
  a.n_rows = a.V ? student.numel() / a.V : 0;
  a.n_inner = row_layouts(student, c.s, &teacher, &c.t);
  a.s = c.s.x.data_ptr();
  a.t = c.t.x.data_ptr();
  a.s_so = c.s.stride_outer; a.s_si = c.s.stride_inner;
  a.t_so = c.t.stride_outer; a.t_si = c.t.stride_inner;
  c.labels = labels_as_int64(labels, a.n_rows);
  a.labels = c.labels.defined() ? c.labels.data_ptr<int64_t>() : nullptr;
  a.ignore_index = ignore_index;
  a.inv_t = static_cast<float>(1.0 / temperature);
  a.student = logit_transform(student_scale, student_softcap, "student");
  a.teacher = logit_transform(teacher_scale, teacher_softcap, "teacher");
  a.beta = static_cast<float>(beta);
  a.beta_c = static_cast<float>(1.0 - beta);
  a.hard_weight = static_cast<float>(hard_weight);
  a.soft_scale = static_cast<float>(soft_scale);
  a.has_hard = hard_weight != 0.0;
  a.has_soft = soft_scale != 0.0;  // the caller passes 0 where D is identically 0
  a.ce_separate = a.has_hard && temperature != 1.0;
  TORCH_CHECK(!a.has_hard || a.labels, "labels: required when hard_weight != 0");
  return c;
}

// The device index (-1: the host implementation) and the stream to launch on.
struct Where {
  int device;
  void* stream;
};

Where where(const Tensor& like) {
  if (!like.is_cuda()) return {-1, nullptr};
  return {like.device().index(), c10::cuda::getCurrentCUDAStream(like.device().index()).stream()};
}

Tensor empty_grad(const Tensor& like, bool wanted) {
  return wanted ? at::empty(like.sizes(), like.options()) : at::empty({0}, like.options());
}

std::tuple<Tensor, Tensor> kd_fwd(const Tensor& student, const Tensor& teacher,
                                  const c10::optional<Tensor>& labels, int64_t divergence,
                                  double temperature, double beta, double hard_weight,
                                  double soft_scale, double student_scale,
                                  c10::optional<double> student_softcap, double teacher_scale,
                                  c10::optional<double> teacher_softcap, int64_t ignore_index) {
  const c10::OptionalDeviceGuard guard(student.device());
  KDCall c = kd_prepare(student, teacher, labels, divergence, temperature, beta, hard_weight,
                        soft_scale, student_scale, student_softcap, teacher_scale,
                        teacher_softcap, ignore_index);
  auto f32 = student.options().dtype(at::kFloat);
  Tensor loss = at::empty({c.a.n_rows}, f32);
  Tensor stats = at::empty({c.a.n_rows, KD_STATS}, f32);
  c.a.loss = loss.data_ptr<float>();
  c.a.stats = stats.data_ptr<float>();
  c.a.compute_stats = true;
  const Where w = where(student);
  check_launch(kd_launch(c.a, c.divergence, c.dtype, w.device, w.stream));
  return {loss, stats};
}

std::tuple<Tensor, Tensor> kd_bwd(const Tensor& grad_rows, const Tensor& student,
                                  const Tensor& teacher, const c10::optional<Tensor>& labels,
                                  const Tensor& stats, int64_t divergence, double temperature,
                                  double beta, double hard_weight, double soft_scale,
                                  double student_scale, c10::optional<double> student_softcap,
                                  double teacher_scale, c10::optional<double> teacher_softcap,
                                  int64_t ignore_index, bool grad_student, bool grad_teacher) {
  const c10::OptionalDeviceGuard guard(student.device());
  KDCall c = kd_prepare(student, teacher, labels, divergence, temperature, beta, hard_weight,
                        soft_scale, student_scale, student_softcap, teacher_scale,
                        teacher_softcap, ignore_index);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == c.a.n_rows * KD_STATS,
              "stats: expected ", c.a.n_rows, " x ", KD_STATS, " float32 values");
  Tensor st = stats.contiguous();
  Tensor scale = row_factors(grad_rows, c.a.n_rows, c.a.row_scale_stride);
  Tensor gs = empty_grad(student, grad_student);
  Tensor gt = empty_grad(teacher, grad_teacher);
  c.a.stats = st.data_ptr<float>();
  c.a.row_scale = scale.data_ptr<float>();
  c.a.gs = grad_student ? gs.data_ptr() : nullptr;
  c.a.gt = grad_teacher ? gt.data_ptr() : nullptr;
  c.a.compute_stats = false;
  const Where w = where(student);
  check_launch(kd_launch(c.a, c.divergence, c.dtype, w.device, w.stream));
  return {gs, gt};
}

std::tuple<Tensor, Tensor, Tensor> kd_fwd_grad(
    const Tensor& student, const Tensor& teacher, const c10::optional<Tensor>& labels,
    const Tensor& row_scale, int64_t divergence, double temperature, double beta,
    double hard_weight, double soft_scale, double student_scale,
    c10::optional<double> student_softcap, double teacher_scale,
    c10::optional<double> teacher_softcap, int64_t ignore_index, bool grad_student,
    bool grad_teacher) {
  const c10::OptionalDeviceGuard guard(student.device());
  KDCall c = kd_prepare(student, teacher, labels, divergence, temperature, beta, hard_weight,
                        soft_scale, student_scale, student_softcap, teacher_scale,
                        teacher_softcap, ignore_index);
  Tensor scale = row_factors(row_scale, c.a.n_rows, c.a.row_scale_stride);
  Tensor loss = at::empty({c.a.n_rows}, student.options().dtype(at::kFloat));
  Tensor gs = empty_grad(student, grad_student);
  Tensor gt = empty_grad(teacher, grad_teacher);
  c.a.loss = loss.data_ptr<float>();
  c.a.row_scale = scale.data_ptr<float>();
  c.a.gs = grad_student ? gs.data_ptr() : nullptr;
  c.a.gt = grad_teacher ? gt.data_ptr() : nullptr;
  c.a.compute_stats = true;
  const Where w = where(student);
  if (!kd_cluster_launch(c.a, c.divergence, c.dtype, w.device, w.stream))
    check_launch(kd_launch(c.a, c.divergence, c.dtype, w.device, w.stream));
  return {loss, gs, gt};
}

void kd_scale_grad_(Tensor grad, const Tensor& scale) {
  TORCH_CHECK(grad.is_contiguous() && grad.dim() >= 1, "grad: expected a contiguous (..., V) tensor");
  const c10::OptionalDeviceGuard guard(grad.device());
  const int64_t V = grad.size(-1), n_rows = V ? grad.numel() / V : 0;
  int64_t stride = 0;
  Tensor s = row_factors(scale, n_rows, stride);
  const Where w = where(grad);
  check_launch(kd_scale_grad_launch(grad.data_ptr(), dtype_code(grad.scalar_type(), "grad"),
                                    s.data_ptr<float>(), stride, n_rows, V, w.device, w.stream));
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill, CUDA, m) {
  m.impl("kd_fwd", &kd_fwd);
  m.impl("kd_bwd", &kd_bwd);
  m.impl("kd_fwd_grad", &kd_fwd_grad);
  m.impl("kd_scale_grad_", &kd_scale_grad_);
}

// The kernels' row code on one host thread: what CPU tensors run (tests without a GPU).
TORCH_LIBRARY_IMPL(pydistill, CPU, m) {
  m.impl("kd_fwd", &kd_fwd);
  m.impl("kd_bwd", &kd_bwd);
  m.impl("kd_fwd_grad", &kd_fwd_grad);
  m.impl("kd_scale_grad_", &kd_scale_grad_);
}

}  // namespace pydistill
