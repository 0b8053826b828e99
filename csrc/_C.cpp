// The pydistill operator library: every op's schema, in one place. The CUDA (and host) kernels
// register their implementations per family (csrc/<family>.cu, TORCH_LIBRARY_IMPL); the
// fake (meta) implementations and the autograd formulas are registered from Python
// (pydistill/_cuda_ext.py), as torch.library expects for custom ops.
//
// Integer codes: divergence as pydistill.kernels.softmax_divergence.DIVERGENCE_CODES, tail as
// pydistill.kernels.topk_divergence.TAIL_CODES. soft_scale is 0 where the divergence term is
// absent (soft_weight = 0, or D identically 0).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pydistill, m) {
  // kd_loss. Per-row losses (N,) float32 and per-row statistics (N, 8) float32. Each model's
  // logits are transformed, z = cap(scale * logits) with cap(x) = c tanh(x / c) where its
  // softcap c is given, before the temperature; the hard term uses the student's z.
  m.def(
      "kd_fwd(Tensor student, Tensor teacher, Tensor? labels, int divergence, float temperature, "
      "float beta, float hard_weight, float soft_scale, float student_scale, "
      "float? student_softcap, float teacher_scale, float? teacher_softcap, int ignore_index) "
      "-> (Tensor, Tensor)");
  // Gradients of sum_i grad_rows[i] * loss_i; an unwanted gradient is an empty (0,) tensor.
  m.def(
      "kd_bwd(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? labels, Tensor stats, "
      "int divergence, float temperature, float beta, float hard_weight, float soft_scale, "
      "float student_scale, float? student_softcap, float teacher_scale, float? teacher_softcap, "
      "int ignore_index, bool grad_student, bool grad_teacher) -> (Tensor, Tensor)");
  // Per-row losses and, in the same kernel, the gradients of sum_i row_scale[i] * loss_i
  // (row_scale: N values or one). On sm_90 the thread-block-cluster kernel.
  m.def(
      "kd_fwd_grad(Tensor student, Tensor teacher, Tensor? labels, Tensor row_scale, int divergence, "
      "float temperature, float beta, float hard_weight, float soft_scale, float student_scale, "
      "float? student_softcap, float teacher_scale, float? teacher_softcap, int ignore_index, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
  // grad (N, V, contiguous) *= scale[row] in place, skipping rows whose scale is exactly 1.
  m.def("kd_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");

  // topk_kd_loss. teacher_logprobs float32 and teacher_indices int64, (N, K), sorted by id.
  // Per-row losses (N,) float32 and per-row statistics (N, 8) float32. Only the student's
  // logits are transformed (the teacher arrives as log-probabilities).
  m.def(
      "topk_fwd(Tensor student, Tensor teacher_logprobs, Tensor teacher_indices, Tensor? labels, "
      "int divergence, int tail, float temperature, float teacher_power, float beta, "
      "float hard_weight, float soft_scale, float student_scale, float? student_softcap, "
      "int ignore_index) -> (Tensor, Tensor)");
  // The student gradient of sum_i grad_rows[i] * loss_i.
  m.def(
      "topk_bwd(Tensor grad_rows, Tensor student, Tensor teacher_logprobs, Tensor teacher_indices, "
      "Tensor? labels, Tensor stats, int divergence, int tail, float temperature, "
      "float teacher_power, float beta, float hard_weight, float soft_scale, float student_scale, "
      "float? student_softcap, int ignore_index) -> Tensor");
}

// `import pydistill._C` loads the library (and so runs the registrations above); the module
// itself is empty. pydistill/_cuda_ext.py loads it with torch.ops.load_library instead.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
