"""``uld_loss`` and ``linear_uld_loss`` on the Triton kernels (kernels/uld.py): the autograd
Functions.

Per model, the forward keeps only what the backward needs besides the inputs: the two terms of
the tempered logsumexp (2 floats per row) and the K ranked transformed logits (untempered) with
their token ids and raw logits (the soft-cap's slope is taken from those). The loss (K-sized) is computed from those in PyTorch, and the backward
recomputes the probabilities from them and from the logits (it may run more than once:
retain_graph=True works) with grad_output folded into the per-rank signs. Selection, by
``top_k``:

- ``top_k <= MAX_FUSED_TOPK`` (1024): the fused kernel (online logsumexp + running top-k, one
  read of the logits);
- a larger ``top_k``, or ``None`` (the full sort): ``torch.topk`` / ``torch.sort`` of the float32
  transformed logits, which holds an (N, V) float32 copy, its sorted values and int64 ids
  (about 16 bytes per logit) until the backward.

The backward kernels are the same in both cases. A teacher that requires grad gets its gradient
(the same kernels on its side).
"""
from __future__ import annotations

import torch

from pydistill._utils import empty
from pydistill.reference.softmax_divergence import compute_dtype, reduce_rows, transform_logits
from pydistill.reference.uld import (
    ULDConfig,
    linear_uld_backward,
    linear_uld_forward,
    log_normaliser,
    ranked_signs,
    select_ranked,
    wasserstein_rows,
)


def _kernels():
    from pydistill.kernels import uld

    return uld


def _select_torch(z, labels, cfg: ULDConfig, scale, cap):
    """The selection of the unfused path, in the fused kernel's output format."""
    raw = z.reshape(-1, z.shape[-1]).to(torch.float32)
    if labels is not None:  # ignored rows may hold anything; their weight is 0
        raw = raw.masked_fill((labels.reshape(-1) == cfg.ignore_index)[:, None], 0.0)
    z2 = transform_logits(raw, scale, cap)
    m, log_l = log_normaliser(z2 * (1.0 / cfg.temperature))
    vals, ids = select_ranked(z2, cfg.top_k)
    raws = raw.gather(1, ids)
    return torch.stack([m, log_l], dim=-1), vals.contiguous(), raws.contiguous(), ids.contiguous()


def select(z, labels, cfg: ULDConfig, teacher: bool):
    """(stats (N, 2), ranked transformed logits (N, K), their raw logits (N, K), their ids
    (N, K)) of one model."""
    scale, cap = cfg.side(teacher)
    K = _kernels()
    if cfg.top_k is not None and cfg.top_k <= K.MAX_FUSED_TOPK:
        return K.uld_select(z, labels, cfg.top_k, cfg.temperature, scale, cap, cfg.ignore_index)
    return _select_torch(z, labels, cfg, scale, cap)


def ranked_probs(stats, vals, cfg: ULDConfig):
    """q_(j) from the ranked transformed logits z_(j): exp((z_(j) / T - m) - log l), the
    product z * (1 / T) as the kernels form it."""
    return torch.exp((vals * (1.0 / cfg.temperature) - stats[:, :1]) - stats[:, 1:])


def _counted(labels, cfg: ULDConfig):
    return labels.reshape(-1) != cfg.ignore_index if labels is not None else None


def _losses(sel_s, sel_t, counted, cfg: ULDConfig):
    q_s, q_t = ranked_probs(sel_s[0], sel_s[1], cfg), ranked_probs(sel_t[0], sel_t[1], cfg)
    rows = wasserstein_rows(q_s, q_t)
    if counted is not None:
        rows = torch.where(counted, rows, 0.0)
    return rows, q_s, q_t


def _write_grads(inputs, labels, sels, q, weight, cfg: ULDConfig, outs):
    """The gradients of sum(weight * loss) into ``outs`` (None: not wanted), per model."""
    signs = ranked_signs(q[0], q[1])
    K = _kernels()
    for teacher, (z, sel, q_r, g, out) in enumerate(zip(inputs, sels, q, signs, outs)):
        if out is None:
            continue
        g = (g * weight[:, None]).contiguous()
        s_sum = (q_r * g).sum(-1).contiguous()
        scale, cap = cfg.side(bool(teacher))
        K.uld_grad(z, labels, *sel, g, s_sum, out, cfg.temperature, scale,
                   cap, cfg.ignore_index)


class TritonULDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, cfg: ULDConfig):
        lead = student_logits.shape[:-1]
        n_rows = lead.numel()
        sel_s = select(student_logits, labels, cfg, False)
        sel_t = select(teacher_logits, labels, cfg, True)
        counted = _counted(labels, cfg)
        rows, _, _ = _losses(sel_s, sel_t, counted, cfg)
        count = counted.sum() if counted is not None else n_rows
        ctx.cfg, ctx.count = cfg, count
        ctx.shapes = (student_logits.shape, teacher_logits.shape)
        ctx.save_for_backward(student_logits, teacher_logits, labels, *sel_s, *sel_t)
        if cfg.reduction == "none":
            return rows.reshape(lead)
        return reduce_rows(rows, count, cfg.reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        cfg = ctx.cfg
        student, teacher, labels, *saved = ctx.saved_tensors
        sel_s, sel_t = tuple(saved[:4]), tuple(saved[4:])
        need = ctx.needs_input_grad[:2]
        n_rows = ctx.shapes[0][:-1].numel()
        counted = _counted(labels, cfg)
        _, q_s, q_t = _losses(sel_s, sel_t, counted, cfg)
        g = grad_loss.to(torch.float32)
        if cfg.reduction == "none":
            weight = g.reshape(-1)
        else:
            weight = g.reshape(1).expand(n_rows)
            if cfg.reduction in ("mean", "batchmean"):
                count = ctx.count
                weight = weight / (count.clamp(min=1).to(torch.float32) if isinstance(count, torch.Tensor)
                                   else float(max(count, 1)))
        if counted is not None:
            weight = torch.where(counted, weight, 0.0)
        outs = [empty((n_rows, shape[-1]), dtype=x.dtype, device=x.device) if n else None
                for n, shape, x in zip(need, ctx.shapes, (student, teacher))]
        _write_grads((student, teacher), labels, (sel_s, sel_t), (q_s, q_t), weight, cfg, outs)
        grads = [o.view(shape) if o is not None else None for o, shape in zip(outs, ctx.shapes)]
        return grads[0], grads[1], None, None


def triton_chunk_step(s, t, labels, cfg: ULDConfig, row_scale, out_s=None, out_t=None):
    """The linear variant's chunk step on the kernels (the contract of
    ``pydistill.reference.uld.uld_chunk_loss_and_grads``); ``out_s`` / ``out_t`` may be the
    (contiguous float32) logits buffers themselves."""
    sel_s = select(s, labels, cfg, False)
    sel_t = select(t, labels, cfg, True)
    counted = _counted(labels, cfg)
    rows, q_s, q_t = _losses(sel_s, sel_t, counted, cfg)
    if out_s is not None or out_t is not None:
        if isinstance(row_scale, torch.Tensor):
            weight = row_scale.to(torch.float32).expand(s.shape[0])
        else:  # a Python number: filled on the device, no copy from the host
            weight = s.new_full((s.shape[0],), float(row_scale), dtype=torch.float32)
        if counted is not None:
            weight = torch.where(counted, weight, 0.0)
        _write_grads((s, t), labels, (sel_s, sel_t), (q_s, q_t), weight, cfg, (out_s, out_t))
    return rows.to(compute_dtype(s.dtype, t.dtype))


class TritonLinearULDLoss(torch.autograd.Function):
    """``linear_uld_loss`` over row chunks (reference/uld.py's chunk loop and GEMMs) with the
    kernels' step. Arguments: (cfg, chunk_size, labels, *tensors)."""

    @staticmethod
    def forward(ctx, cfg, chunk_size, labels, *tensors):
        return linear_uld_forward(ctx, triton_chunk_step, cfg, chunk_size, labels, tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return linear_uld_backward(ctx, grad_loss)
