"""``attention_kd_loss(loss="kl")`` on the Triton kernels: the autograd Function.

Forward: one streaming pass, 16 bytes of statistics per query row kept for the backward
(kernels/attention_kd.py). Backward: the score tiles are recomputed, nothing L x L is ever
stored; grad_output enters as the row weights, so the backward can run more than once
(``retain_graph=True``). The teacher is a constant here: asking for its gradient raises.
"""
from __future__ import annotations

import torch

from pydistill.reference.attention_kd import (
    AttentionKDConfig, mean_divisor, reduce_rows, with_scales,
)

# Widest head dim of either model the kernels take (padded to a power of two in registers).
MAX_HEAD_DIM = 256


def refuse_teacher_grad(backend: str):
    """The Triton backend treats the teacher's queries and keys as constants: a teacher whose
    gradient is asked for is an error naming the way out, never a silently missing gradient."""
    raise ValueError(
        f"teacher_q / teacher_k: require grad, but attention_kd_loss(loss='kl', "
        f"backend={backend!r}) treats the teacher as a constant and computes no gradient for "
        "it; pass teacher_q.detach() and teacher_k.detach(), or use backend='torch', which "
        "differentiates the teacher too"
    )


class TritonAttentionKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_q, student_k, teacher_q, teacher_k, attention_mask, cfg: AttentionKDConfig):
        from pydistill.kernels import attention_kd as K

        cfg = with_scales(cfg, student_q.shape[-1], teacher_q.shape[-1])
        batch, heads, length = student_q.shape[:3]
        mask = None
        if attention_mask is not None:
            mask = (attention_mask != 0).to(torch.int8).contiguous()
        rows, stats = K.attention_kl_fwd(
            student_q, student_k, teacher_q, teacher_k, mask, cfg.causal,
            cfg.student_scale, cfg.teacher_scale,
        )
        # counted rows: on the device with a mask, else a Python int (no tensor made from it)
        count = mask.sum() * heads if mask is not None else rows.numel()
        ctx.cfg = cfg
        ctx.count = None if mask is not None else count
        ctx.save_for_backward(student_q, student_k, teacher_q, teacher_k, mask, stats,
                              count if mask is not None else None)
        return reduce_rows(rows, count, cfg.reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        from pydistill.kernels import attention_kd as K

        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            refuse_teacher_grad("triton")  # the API refuses earlier; this is for direct callers
        student_q, student_k, teacher_q, teacher_k, mask, stats, count = ctx.saved_tensors
        count = count if count is not None else ctx.count
        cfg = ctx.cfg
        batch, heads, length = student_q.shape[:3]
        device = student_q.device
        valid = (mask[:, None, :] != 0) if mask is not None else torch.ones((1, 1, 1), dtype=torch.bool, device=device)
        g = grad_loss.to(torch.float32)
        if cfg.reduction == "none":
            # weights normalised to |w| <= 1 (kernels/attention_kd.py: float16 products)
            g = torch.where(valid, g, 0.0)
            scale = g.abs().amax() if g.numel() else torch.ones((), device=device)
            scale = torch.where(scale == 0, 1.0, scale)
            weight = (g / scale).reshape(-1)
        else:
            scale = g.reshape(())
            if cfg.reduction == "mean":
                scale = scale / mean_divisor(count, torch.float32)
            weight = valid.to(torch.float32).expand(batch, heads, length).reshape(-1)
        dq, dk = K.attention_kl_bwd(
            student_q, student_k, teacher_q, teacher_k, mask, cfg.causal, cfg.student_scale,
            cfg.teacher_scale, stats, weight.contiguous(), scale.reshape(1).contiguous(),
        )
        return dq, dk, None, None, None, None
