"""``linear_kd_loss`` with the Triton divergence kernel as the chunk step.

The chunked algorithm is pydistill/reference/linear_kd.py's, unchanged: per chunk of rows
the logits GEMMs (float32 out), then ``kd_fwd(..., grad_s=z_s)`` of
kernels/softmax_divergence.py computes the per-row losses and writes the gradient over the
float32 logits in the same kernel (each row's tiles are read before they are overwritten),
then the dh / dW GEMMs. One kernel per chunk instead of the ~20 PyTorch ops of the torch step.
The vocabulary-parallel path (``process_group``) uses the torch closed form for both backends:
its row reductions must be all-reduced between the kernel's passes.

``chunk_size="tiled"`` selects the tiled kernels of kernels/linear_kd.py instead (no logits
tile in memory; the forward keeps per-row statistics, the backward recomputes the tiles), for
what they implement: a student head with a teacher head or teacher logits that need no
gradient, whole heads (no ``process_group``). Anything else runs the chunked path at
``chunk_size="auto"`` (``tiled_unsupported`` says why).
"""
from __future__ import annotations

import torch

from pydistill.reference.linear_kd import (
    ChunkPlan,
    ChunkedLinearKDLoss,
    linear_kd_backward,
    linear_kd_forward,
    scale_grad_rows_,
    with_extras,
)
from pydistill.reference.softmax_divergence import KDConfig, chunk_row_scale, reduce_rows


def _kernel_scale(row_scale):
    """``row_scale`` as the kernels take it: (a float, None or float32 device values)."""
    if isinstance(row_scale, torch.Tensor):  # 1 / count on the device, or one value per row
        return 1.0, row_scale.reshape(-1).to(torch.float32)
    return float(row_scale), None


def kd_chunk_step(s, t, labels, cfg: KDConfig, row_scale, out_s=None, out_t=None, entropy=None):
    """The step of reference/linear_kd.py on the Triton kernel: per-row losses (float32) and
    the gradients of sum(row_scale * loss) written into ``out_s`` / ``out_t`` (and the
    student's per-row entropy into ``entropy``), in one kernel."""
    from pydistill.kernels import softmax_divergence as K

    grad_scale, scale = _kernel_scale(row_scale)
    rows, _ = K.kd_fwd(
        s, t, labels, cfg, cfg.canonical_divergence(), grad_s=out_s,
        grad_t=out_t if cfg.has_soft else None, grad_scale=grad_scale, scale=scale,
        entropy=entropy,
    )
    if out_t is not None and not cfg.has_soft:
        out_t.zero_()
    return rows


def topk_chunk_step(s, t, labels, cfg, row_scale, out_s=None, out_t=None, entropy=None):
    """The same for a top-k teacher ``t`` = (log-probs, ids), on the top-k family's kernel
    (the teacher is a constant: ``out_t`` is never asked for)."""
    from pydistill.kernels import topk_divergence as K

    assert entropy is None, "return_entropy: refused with a top-k teacher by the API"
    grad_scale, scale = _kernel_scale(row_scale)
    return K.topk_loss_and_grad(s, t[0], t[1], labels, cfg, out_s, grad_scale=grad_scale, scale=scale)


# The tiled forward sums the divergence online, a difference of O(1/T) sums: 2e-4 relative at
# T = 100 and off by its own size at T = 1e4 (the chunked kernels' Bregman pass 2 keeps ~1e-7);
# at T <= 4 its rounding is below 1e-6 of the loss.
TILED_MAX_T = 4.0


def tiled_unsupported(cfg: KDConfig, plan: ChunkPlan, tensors, needs):
    """Why the tiled kernels cannot run this call (None: they can). ``needs``: which of the
    Function's tensors want a gradient."""
    if plan.group is not None:
        return "vocabulary-parallel heads (process_group)"
    if tensors[7] is not None:
        return "a top-k teacher"
    if any(needs[3:7]):
        return "a teacher that requires grad"
    if plan.components and cfg.soft_weight == 0.0:
        return "return_components with soft_weight=0 (the tiled kernels then skip the teacher)"
    if cfg.temperature > TILED_MAX_T:
        return (f"temperature {cfg.temperature} > {TILED_MAX_T} (the tiled forward's online value "
                f"loses ~T^2 eps of precision above it; the chunked path's does not)")
    return None


def _tiled_heads(cfg, labels, tensors, ce=False):
    from pydistill.kernels import linear_kd as K

    return K.Heads(*tensors[:7], labels, cfg, cfg.canonical_divergence(), ce=ce)


def tiled_forward(ctx, cfg: KDConfig, plan: ChunkPlan, labels, tensors):
    """Per-row statistics only; the backward recomputes the logits tiles (so it may run twice,
    and ``reduction="none"`` needs nothing more)."""
    from pydistill.kernels import linear_kd as K

    heads = _tiled_heads(cfg, labels, tensors, ce=plan.components)
    entropy = torch.empty(heads.n, dtype=torch.float32, device=heads.device) if plan.entropy else None
    parts = torch.empty((2, heads.n), dtype=torch.float32, device=heads.device) if plan.components else None
    rows, stats = K.linear_kd_fwd(heads, entropy=entropy, components=parts)
    ctx.tiled = True
    ctx.cfg = cfg
    ctx.save_for_backward(labels, stats, *tensors[:7])
    lead = tensors[0].shape[:-1]
    if cfg.reduction == "none":
        ctx.row_scale = None
        return with_extras(ctx, cfg, rows.reshape(lead), entropy, lead,
                           None if parts is None else (parts[0], parts[1], None))
    count, row_scale = chunk_row_scale(heads.labels, heads.n, cfg, torch.float32, heads.device)
    ctx.row_scale = row_scale
    return with_extras(ctx, cfg, reduce_rows(rows, count, cfg.reduction), entropy, lead,
                       None if parts is None else (parts[0], parts[1], count))


def tiled_backward(ctx, grad_loss):
    from pydistill.kernels import linear_kd as K

    labels, stats, *tensors = ctx.saved_tensors
    cfg = ctx.cfg
    heads = _tiled_heads(cfg, labels, tensors)
    grad_loss = grad_loss.to(torch.float32)
    if ctx.row_scale is None:
        scale = grad_loss.reshape(-1).contiguous()
    else:
        scale = (grad_loss * ctx.row_scale).reshape(1).expand(heads.n).contiguous()
    need_dh, need_dw, need_db = ctx.needs_input_grad[3:6]
    need = (need_dh, need_dw, need_db and tensors[2] is not None)
    dh, dw, db = K.linear_kd_bwd(heads, stats, scale, need)
    student_hidden, _, student_bias = tensors[:3]
    if dh is not None:
        dh = dh.to(student_hidden.dtype).view(student_hidden.shape)
    if db is not None:
        db = db.to(student_bias.dtype)
    return (None, None, None, dh, dw, db) + (None,) * 6


def scale_grad_(g: torch.Tensor, grad_loss: torch.Tensor):
    """The chunked backward's scaling of a gradient by grad_output: one kernel, in place, that
    reads and writes nothing when grad_output is 1 (the torch path's row chunks of casts and
    products move ~5x the bytes, and run whatever grad_output is)."""
    from pydistill.kernels import linear_kd as K

    if g.dtype in (torch.float32, torch.bfloat16, torch.float16) and g.is_contiguous():
        K.scale_grad_(g, grad_loss)
    else:
        scale_grad_rows_(g, grad_loss)


class TritonLinearKDLoss(ChunkedLinearKDLoss):
    """``linear_kd_loss`` with the Triton kernels: over row chunks with the divergence kernel as
    the step (the backward then scales the forward's gradients by grad_output), or, with
    ``chunk_size="tiled"`` where ``tiled_unsupported`` allows, the tiled kernels."""

    @staticmethod
    def forward(ctx, cfg, plan, labels, *tensors):
        if plan.chunk_size == "tiled":
            if tiled_unsupported(cfg, plan, tensors, ctx.needs_input_grad[3:]) is None:
                return tiled_forward(ctx, cfg, plan, labels, tensors)
        ctx.tiled = False
        return linear_kd_forward(ctx, (kd_chunk_step, topk_chunk_step), cfg, plan, labels, tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_grad_extras):
        if ctx.tiled:
            return tiled_backward(ctx, grad_loss)
        return linear_kd_backward(ctx, grad_loss, scale_grad_)
