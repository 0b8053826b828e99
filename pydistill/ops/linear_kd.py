"""``linear_kd_loss`` with the Triton divergence kernel as the chunk step.

The chunked algorithm is pydistill/reference/linear_kd.py's, unchanged: per chunk of rows
the logits GEMMs (float32 out), then ``kd_fwd(..., grad_s=z_s)`` of
kernels/softmax_divergence.py computes the per-row losses and writes the gradient over the
float32 logits in the same kernel (each row's tiles are read before they are overwritten),
then the dh / dW GEMMs. One kernel per chunk instead of the ~20 PyTorch ops of the torch step.
The vocabulary-parallel path (``process_group``) uses the torch closed form for both backends:
its row reductions must be all-reduced between the kernel's passes.

A tiled kernel that never writes a logits tile to memory (DESIGN.md section 3) is a separate
implementation to come; this one is chosen by ``chunk_size`` ("auto" or rows per chunk).
"""
from __future__ import annotations

import torch

from pydistill.reference.linear_kd import ChunkedLinearKDLoss, linear_kd_forward
from pydistill.reference.softmax_divergence import KDConfig


def _kernel_scale(row_scale):
    """``row_scale`` as the kernels take it: (a float, None or float32 device values)."""
    if isinstance(row_scale, torch.Tensor):  # 1 / count on the device, or one value per row
        return 1.0, row_scale.reshape(-1).to(torch.float32)
    return float(row_scale), None


def kd_chunk_step(s, t, labels, cfg: KDConfig, row_scale, out_s=None, out_t=None):
    """The step of reference/linear_kd.py on the Triton kernel: per-row losses (float32) and
    the gradients of sum(row_scale * loss) written into ``out_s`` / ``out_t``."""
    from pydistill.kernels import softmax_divergence as K

    grad_scale, scale = _kernel_scale(row_scale)
    rows, _ = K.kd_fwd(
        s, t, labels, cfg, cfg.canonical_divergence(), grad_s=out_s,
        grad_t=out_t if cfg.has_soft else None, grad_scale=grad_scale, scale=scale,
    )
    if out_t is not None and not cfg.has_soft:
        out_t.zero_()
    return rows


def topk_chunk_step(s, t, labels, cfg, row_scale, out_s=None, out_t=None):
    """The same for a top-k teacher ``t`` = (log-probs, ids), on the top-k family's kernel
    (the teacher is a constant: ``out_t`` is never asked for)."""
    from pydistill.kernels import topk_divergence as K

    grad_scale, scale = _kernel_scale(row_scale)
    return K.topk_loss_and_grad(s, t[0], t[1], labels, cfg, out_s, grad_scale=grad_scale, scale=scale)


class TritonLinearKDLoss(ChunkedLinearKDLoss):
    """``linear_kd_loss`` over row chunks with the Triton kernel as the divergence step; the
    backward is the chunked one (gradients from the forward, scaled by grad_output)."""

    @staticmethod
    def forward(ctx, cfg, plan, labels, *tensors):
        return linear_kd_forward(ctx, (kd_chunk_step, topk_chunk_step), cfg, plan, labels, tensors)
