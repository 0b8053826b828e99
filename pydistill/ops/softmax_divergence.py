"""``kd_loss`` on the Triton kernels: the autograd Function.

Two gradient schedules, chosen by ``PYDISTILL_KD_GRAD`` (read at each call):

``recompute`` (default)
    forward: one read of student and teacher for kl / reverse_kl (two for the others),
    keeping 16 floats per row; backward: one more read and the gradient written once, with
    grad_output folded in. 5 logits-sized transfers for kl, whatever grad_output is; nothing
    (N, V)-sized is held between forward and backward but the inputs themselves; backward may
    run more than once (retain_graph=True).
``forward``
    the gradient is written at the end of the forward (the kernel's last pass walks the row
    backwards, so part of it is served from L2) and the backward only multiplies it by
    grad_output, on the device, skipping the work where grad_output is exactly 1. Fewer
    transfers than ``recompute`` when grad_output is 1 (plain ``loss.backward()``), two more
    when it is not (gradient accumulation, loss weights, AMP loss scaling); holds an (N, V)
    gradient from forward to backward; backward can run only once.

``recompute`` is the default because it costs the same for every grad_output and keeps one
rounding of the gradient to the input dtype; bench/bench_softmax_divergence.py measures both
(``--grad-mode``) so the choice can be revisited per device.
"""
from __future__ import annotations

import os

import torch

from pydistill._utils import empty
from pydistill.reference.softmax_divergence import KDConfig

GRAD_MODES = ("recompute", "forward")


def grad_mode() -> str:
    mode = os.environ.get("PYDISTILL_KD_GRAD", "") or "recompute"
    if mode not in GRAD_MODES:
        raise ValueError(f"PYDISTILL_KD_GRAD: expected one of {GRAD_MODES}, got {mode!r}")
    return mode


def _inverse_count(labels, n_rows: int, cfg: KDConfig):
    """1 / (number of counted rows): a Python float when every row counts, else a 1-element
    float32 device tensor (the labels are counted on the device: no host sync)."""
    if labels is None:
        return 1.0 / max(n_rows, 1)
    count = (labels != cfg.ignore_index).sum()
    return 1.0 / count.clamp(min=1).to(torch.float32).reshape(1)


def _mean_weight(labels, n_rows: int, cfg: KDConfig):
    """Each row loss's weight in a mean, as the kernels take it: (a device scalar or None,
    a float) whose product is 1 / (number of counted rows); (None, 1.0) for sum and none."""
    if cfg.reduction not in ("mean", "batchmean"):
        return None, 1.0
    inv = _inverse_count(labels, n_rows, cfg)
    return (inv, 1.0) if isinstance(inv, torch.Tensor) else (None, inv)


def _reduce(rows, lead, reduction: str, inv_count, row_factor):
    """The loss from the kernel's per-row losses and ``_mean_weight``'s pair."""
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total * (inv_count.reshape(()) if inv_count is not None else row_factor)


def _grad_scale(grad_loss, reduction: str, inv_count):
    """grad_output as the kernel reads it: one float32 per row ('none') or a single one,
    with the 1 / count of 'mean' folded in when it lives on the device."""
    g = grad_loss.to(torch.float32)
    if reduction == "none":
        return g.reshape(-1).contiguous()
    g = g.reshape(1)
    if reduction in ("mean", "batchmean") and inv_count is not None:
        g = g * inv_count
    return g


class TritonKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, cfg: KDConfig):
        from pydistill.kernels import softmax_divergence as K

        vocab = student_logits.shape[-1]
        lead = student_logits.shape[:-1]
        n_rows = lead.numel()
        device = student_logits.device
        divergence = cfg.canonical_divergence()
        soft = cfg.has_soft
        need_s = ctx.needs_input_grad[0]
        need_t = ctx.needs_input_grad[1]
        inv_count, row_factor = _mean_weight(labels, n_rows, cfg)

        mode = grad_mode() if (need_s or (need_t and soft)) else None
        grad_s = grad_t = None
        if mode == "forward":
            if need_s:
                grad_s = empty((n_rows, vocab), dtype=student_logits.dtype, device=device)
            if need_t and soft:
                grad_t = empty((n_rows, vocab), dtype=teacher_logits.dtype, device=device)
        rows, stats = K.kd_fwd(
            student_logits, teacher_logits, labels, cfg, divergence,
            grad_s=grad_s, grad_t=grad_t, grad_scale=row_factor,
            scale=inv_count, store_stats=mode == "recompute",
        )

        ctx.cfg, ctx.divergence, ctx.mode = cfg, divergence, mode
        ctx.row_factor = row_factor
        ctx.need = (need_s, need_t)
        if mode == "recompute":
            ctx.save_for_backward(student_logits, teacher_logits, labels, stats, inv_count)
        else:
            ctx.grads = (grad_s, grad_t)
        ctx.shapes = (student_logits.shape, teacher_logits.shape)
        ctx.dtypes = (student_logits.dtype, teacher_logits.dtype)

        return _reduce(rows, lead, cfg.reduction, inv_count, row_factor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        from pydistill.kernels import softmax_divergence as K

        cfg = ctx.cfg
        need_s, need_t = ctx.need
        soft = cfg.has_soft
        (s_shape, t_shape), (s_dtype, t_dtype) = ctx.shapes, ctx.dtypes
        vocab = s_shape[-1]
        n_rows = s_shape[:-1].numel()

        if ctx.mode == "recompute":
            student, teacher, labels, stats, inv_count = ctx.saved_tensors
            device = student.device
            scale = _grad_scale(grad_loss, cfg.reduction, inv_count)
            row_factor = ctx.row_factor
            grad_s = empty((n_rows, vocab), dtype=s_dtype, device=device) if need_s else None
            grad_t = empty((n_rows, vocab), dtype=t_dtype, device=device) if need_t and soft else None
            K.kd_bwd(
                student, teacher, labels, stats, cfg, ctx.divergence,
                grad_s=grad_s, grad_t=grad_t, grad_scale=row_factor, scale=scale,
            )
        elif ctx.mode == "forward":
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(
                    "kd_loss(backend='triton') with PYDISTILL_KD_GRAD=forward computes its "
                    "gradient in the forward pass and hands it over in the first backward; a "
                    "second backward through the same loss (retain_graph=True) needs "
                    "PYDISTILL_KD_GRAD=recompute."
                )
            grad_s, grad_t = grads
            scale = _grad_scale(grad_loss, cfg.reduction, None)
            for g in grads:
                if g is not None:
                    K.kd_scale_grad_(g, scale)
        else:
            grad_s = grad_t = None

        if need_t and not soft:
            grad_t = torch.zeros(t_shape, dtype=t_dtype, device=grad_loss.device)
        out_s = grad_s.view(s_shape) if grad_s is not None else None
        out_t = grad_t.view(t_shape) if grad_t is not None else None
        return out_s, out_t, None, None


# ------------------------------------------------------------------------------------------
# The CUDA C++ backend (csrc/softmax_divergence.cu): the ops torch.ops.pydistill.kd_*, their
# autograd and fake implementations registered by pydistill/_cuda_ext.py. Reductions happen
# here, in PyTorch, on the kernels' per-row losses, so autograd hands the backward kernel the
# per-row factor of every reduction (1 / count of mean included) and the gradient schedules
# are those of the Triton backend, chosen by the same PYDISTILL_KD_GRAD.
# ------------------------------------------------------------------------------------------


def cuda_kd_args(cfg: KDConfig):
    """The scalar arguments every kd op takes after its tensors: divergence code, temperature,
    beta, hard_weight, soft_scale, then each model's logit transform (student_scale,
    student_softcap, teacher_scale, teacher_softcap), then ignore_index."""
    from pydistill.reference.softmax_divergence import DIVERGENCES

    def cap(c):
        return None if c is None else float(c)

    # DIVERGENCES is in the order of the kernels' divergence codes (DIVERGENCE_CODES)
    return (DIVERGENCES.index(cfg.canonical_divergence()), float(cfg.temperature), float(cfg.beta),
            float(cfg.hard_weight), float(cfg.soft_scale) if cfg.has_soft else 0.0,
            float(cfg.student_logit_scale), cap(cfg.student_softcap),
            float(cfg.teacher_logit_scale), cap(cfg.teacher_softcap), int(cfg.ignore_index))


def _same_dtype(student, teacher):
    # one element type per kernel instantiation: mixed inputs run in float32 (autograd casts the
    # gradients back to each input's dtype)
    if student.dtype != teacher.dtype:
        return student.float(), teacher.float()
    return student, teacher


class CudaKDLoss:
    """``kd_loss`` on the CUDA C++ kernels. Not a torch.autograd.Function: the op
    ``pydistill::kd_fwd`` is differentiable itself (torch.library.register_autograd), which is
    what lets torch.compile trace it; ``apply`` keeps the calling convention of the other
    backends. ``recompute`` (default): kd_fwd keeps 8 floats per row, the backward kernel reads
    the logits once more and writes the gradient once (5 transfers for kl). ``forward``: one
    kernel writes loss and gradient (on sm_90 the cluster kernel: 3 transfers), the backward
    scales the gradient in place, skipped on the device where grad_output is 1."""

    @staticmethod
    def apply(student_logits, teacher_logits, labels, cfg: KDConfig):
        from pydistill import _cuda_ext

        ops = _cuda_ext.ops()
        s, t = _same_dtype(student_logits, teacher_logits)
        wants_grad = torch.is_grad_enabled() and (s.requires_grad or t.requires_grad)
        if wants_grad and grad_mode() == "forward":
            return _CudaKDGradInForward.apply(s, t, labels, cfg)
        lead = s.shape[:-1]
        inv_count, row_factor = _mean_weight(labels, lead.numel(), cfg)
        rows, _ = ops.kd_fwd(s, t, labels, *cuda_kd_args(cfg))
        return _reduce(rows, lead, cfg.reduction, inv_count, row_factor)


class _CudaKDGradInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, cfg: KDConfig):
        from pydistill import _cuda_ext

        ops = _cuda_ext.ops()
        lead = student.shape[:-1]
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        inv_count, row_factor = _mean_weight(labels, lead.numel(), cfg)
        row_scale = inv_count if inv_count is not None else torch.full(
            (1,), row_factor, dtype=torch.float32, device=student.device)
        rows, gs, gt = ops.kd_fwd_grad(student, teacher, labels, row_scale, *cuda_kd_args(cfg),
                                       need_s, need_t)
        ctx.grads = (gs if need_s else None, gt if need_t else None)
        ctx.reduction = cfg.reduction
        return _reduce(rows, lead, cfg.reduction, inv_count, row_factor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        from pydistill import _cuda_ext

        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "kd_loss(backend='cuda') with PYDISTILL_KD_GRAD=forward computes its gradient in "
                "the forward pass and hands it over in the first backward; a second backward "
                "through the same loss (retain_graph=True) needs PYDISTILL_KD_GRAD=recompute."
            )
        scale = _grad_scale(grad_loss, ctx.reduction, None)
        for g in grads:
            if g is not None:
                _cuda_ext.ops().kd_scale_grad_(g, scale)
        return grads[0], grads[1], None, None
