"""``topk_kd_loss`` on the Triton kernels: the autograd Function.

The gradient schedule is the one ``kd_loss`` uses, chosen by the same ``PYDISTILL_KD_GRAD``:

``recompute`` (default)
    forward: one read of the student logits (none for ``renormalize`` without a hard term),
    8 floats per row kept; backward: one more read and the gradient written once, with
    grad_output folded in. 3 logits-sized transfers whatever grad_output is (floor: 2).
``forward``
    the forward also writes the gradient (read + write: 3 transfers in all) and the backward
    only scales it, skipped on the device when grad_output is 1; 5 transfers otherwise.

Counted in logits-sized transfers the two tie at grad_output = 1 (3 each; the forward
schedule's re-read may partly hit L2, its last pass walking the row backwards) and
``recompute`` wins otherwise (3 against 5), holds no (N, V) buffer from forward to backward
and allows a second backward, so it is the default here too. The teacher arrays (N x K ids
and log-probs, sorted once per forward by ``sort_support``) are re-read by the backward:
K (4 + 8) bytes per row, under 0.1% of a bf16 row at K = 64, V = 152k.
"""
from __future__ import annotations

import torch

from pydistill._utils import empty
from pydistill.ops.softmax_divergence import _grad_scale, _mean_weight, _reduce, grad_mode
from pydistill.reference.topk_divergence import TopKConfig, refuse_teacher_grad


class TritonTopKKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, topk_logprobs, topk_indices, labels, cfg: TopKConfig):
        from pydistill.kernels import topk_divergence as K

        vocab = student_logits.shape[-1]
        lead = student_logits.shape[:-1]
        n_rows = lead.numel()
        divergence = cfg.canonical_divergence()
        inv_count, row_factor = _mean_weight(labels, n_rows, cfg)
        lp, idx = K.sort_support(topk_logprobs, topk_indices)

        mode = grad_mode() if ctx.needs_input_grad[0] else None
        grad_s = None
        if mode == "forward":
            grad_s = empty((n_rows, vocab), dtype=student_logits.dtype, device=student_logits.device)
        rows, stats = K.topk_fwd(
            student_logits, lp, idx, labels, cfg, divergence, grad_s=grad_s,
            grad_scale=row_factor, scale=inv_count,
            store_stats=mode == "recompute",
        )

        ctx.cfg, ctx.divergence, ctx.mode, ctx.row_factor = cfg, divergence, mode, row_factor
        ctx.shape, ctx.dtype = student_logits.shape, student_logits.dtype
        if mode == "recompute":
            ctx.save_for_backward(student_logits, lp, idx, labels, stats, inv_count)
        else:
            ctx.grad = grad_s

        return _reduce(rows, lead, cfg.reduction, inv_count, row_factor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        from pydistill.kernels import softmax_divergence as KD
        from pydistill.kernels import topk_divergence as K

        cfg = ctx.cfg
        if ctx.needs_input_grad[1]:
            refuse_teacher_grad("triton")
        if ctx.mode == "recompute":
            student, lp, idx, labels, stats, inv_count = ctx.saved_tensors
            grad_s = empty((ctx.shape[:-1].numel(), ctx.shape[-1]), dtype=ctx.dtype,
                           device=student.device)
            K.topk_bwd(
                student, lp, idx, labels, stats, cfg, ctx.divergence, grad_s=grad_s,
                grad_scale=ctx.row_factor, scale=_grad_scale(grad_loss, cfg.reduction, inv_count),
            )
        elif ctx.mode == "forward":
            grad_s, ctx.grad = ctx.grad, None
            if grad_s is None:
                raise RuntimeError(
                    "topk_kd_loss(backend='triton') with PYDISTILL_KD_GRAD=forward computes its "
                    "gradient in the forward pass and hands it over in the first backward; a "
                    "second backward through the same loss (retain_graph=True) needs "
                    "PYDISTILL_KD_GRAD=recompute."
                )
            KD.kd_scale_grad_(grad_s, _grad_scale(grad_loss, cfg.reduction, None))
        else:
            return None, None, None, None, None
        return grad_s.view(ctx.shape), None, None, None, None


# ------------------------------------------------------------------------------------------
# The CUDA C++ backend (csrc/topk_divergence.cu): torch.ops.pydistill.topk_fwd, differentiable
# through torch.library.register_autograd (pydistill/_cuda_ext.py), whose backward is
# topk_bwd (the recompute schedule above: 3 transfers). Reductions as in kd_loss's CudaKDLoss.
# ------------------------------------------------------------------------------------------

CUDA_MAX_K = 4096  # the row's support lives in shared memory (csrc/topk_divergence.cu)


class CudaTopKKDLoss:
    """``topk_kd_loss`` on the CUDA C++ kernels; ``apply`` keeps the other backends' calling
    convention (the op itself carries the autograd)."""

    @staticmethod
    def apply(student_logits, topk_logprobs, topk_indices, labels, cfg: TopKConfig):
        from pydistill import _cuda_ext
        from pydistill.ops.softmax_divergence import _mean_weight, _reduce, cuda_kd_args
        from pydistill.reference.topk_divergence import TAILS

        k = topk_indices.shape[-1]
        if k > CUDA_MAX_K:
            raise ValueError(
                f"teacher_topk_indices: backend='cuda' supports K <= {CUDA_MAX_K}, got K = {k}; "
                "use backend='torch'"
            )
        ops = _cuda_ext.ops()
        # the kernels read each row's support sorted by token id (one sort of the (N, K) ids),
        # as contiguous rows (torch.sort keeps its input's strides)
        idx, order = topk_indices.reshape(-1, k).sort(dim=-1)
        idx = idx.contiguous()
        lp = topk_logprobs.reshape(-1, k).gather(-1, order).float().contiguous()
        lead = student_logits.shape[:-1]
        inv_count, row_factor = _mean_weight(labels, lead.numel(), cfg)
        # only the student's logit transform: the teacher arrives as log-probabilities
        (div, temperature, beta, hard_weight, soft_scale, student_scale, student_softcap, _, _,
         ignore_index) = cuda_kd_args(cfg)
        rows, _ = ops.topk_fwd(student_logits, lp, idx, labels, div, TAILS.index(cfg.tail),
                               temperature, float(cfg.teacher_power), beta, hard_weight,
                               soft_scale, student_scale, student_softcap, ignore_index)
        return _reduce(rows, lead, cfg.reduction, inv_count, row_factor)
