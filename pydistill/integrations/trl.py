"""TRL's ``DistillationTrainer`` loss on pydistill's fused LM-head kernels.

``trl_chunked_divergence_loss`` has the signature and the return value of
``trl.trainer.distillation_trainer._chunked_divergence_loss`` (TRL 1.16), the function
``DistillationTrainer._compute_loss`` calls by its module-level name, so a TRL user swaps one
line::

    import trl.trainer.distillation_trainer
    from pydistill.integrations import trl_chunked_divergence_loss
    trl.trainer.distillation_trainer._chunked_divergence_loss = trl_chunked_divergence_loss

What TRL computes, per completion position i (``completion_mask != 0``), from the hidden states
and LM heads of both models::

    z_s = cap_s(a_s (h_s W_s^T + b_s)),   z_t = cap_t(a_t (h_t W_t^T + b_t))
    q = softmax(z_s / T) (student),       p = softmax(z_t / T) (teacher)
    D_i = KL(p || q)                                    beta = 0 (forward)
        = KL(q || p)                                    beta = 1 (reverse)
        = beta KL(p || m) + (1 - beta) KL(q || m),      m = beta p + (1 - beta) q, otherwise

with a = ``*_logit_scale`` and cap(x) = c tanh(x / c), c = ``*_final_logit_softcapping`` (no
cap when None), and returns ``(loss, entropy_sum, n_valid)``: ``loss`` = sum_i D_i divided by
``num_items_in_batch`` when given (an int or a tensor), else by max(n_valid, 1);
``entropy_sum`` = sum_i H(q_i) in nats (no gradient); ``n_valid`` = the number of completion
positions (an int64 tensor). No T^2 factor. The gradient reaches the student's hidden states,
weight and bias only: the teacher's tensors are detached, as TRL's autograd function gives
them none.

That is :func:`pydistill.linear_kd_loss` with ``divergence="jsd"`` and TRL's ``beta`` (the same
convention: beta weights the teacher, and beta = 0 / 1 are the forward / reverse KL),
``t2=False``, the per-model transforms, ``reduction="sum"`` and ``return_entropy=True``, the
mask as ``labels`` (0 where it is nonzero, ``ignore_index`` elsewhere) with ``hard_weight=0``.
Also as TRL:

- heads that are DTensors (FSDP2) are gathered once with ``full_tensor()`` (the student's
  keeps its gradient through it), the weight cast to its hidden states' dtype;
- each model computes in its hidden states' dtype, or in the autocast dtype when autocast is
  on for their device (the weight and bias are cast to it); the logits are float32 whatever
  it is. Unlike TRL the bias is cast too (pydistill takes a bias of the weight's dtype; TRL
  adds it in float32) and the loss is float64 for float64 inputs (TRL: float32).

Differences: pydistill projects every position and skips none (TRL on CUDA gathers the valid
ones first, a host synchronisation), and heads of different vocabulary sizes, which TRL's
trainer refuses, follow :func:`pydistill.linear_kd_loss` (the shorter is -inf beyond its end).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from pydistill import functional as F

__all__ = ["trl_chunked_divergence_loss"]

_IGNORE = -100


def _is_dtensor(x) -> bool:
    if x is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def _gathered(weight, bias, hidden):
    """TRL's FSDP2 step: a DTensor head as one plain tensor (one all-gather, differentiable),
    the weight in the hidden states' dtype."""
    if _is_dtensor(weight):
        weight = weight.full_tensor().to(hidden.dtype)
        if bias is not None:
            bias = bias.full_tensor()
    return weight, bias


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _autocast_off(device: torch.device):
    """Autocast would recast the float32 logits GEMMs inside the loss: turn it off there (the
    inputs are already in the dtype it gave)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _head(hidden, weight, bias, dtype):
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    weight = weight.to(dtype)
    return hidden, weight, None if bias is None else bias.to(dtype)


def trl_chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: Union[torch.Tensor, int, None] = None,
    student_lm_head_bias: Optional[torch.Tensor] = None,
    teacher_lm_head_bias: Optional[torch.Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None,
    teacher_final_logit_softcapping: Optional[float] = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL 1.16's ``_chunked_divergence_loss`` (``DistillationTrainer``'s generalized JSD from
    hidden states and LM heads) on :func:`pydistill.linear_kd_loss`: same arguments, defaults
    and return value (see the module docstring for the exact semantics).

    Args:
        student_hidden_states: (B, K, H_s), the student's last hidden states at the completion
            positions (any (..., H_s)).
        teacher_hidden_states: (B, K, H_t), the teacher's at the same positions (no gradient).
        student_lm_head_weight: (V, H_s); teacher_lm_head_weight: (V, H_t) (no gradient).
        completion_mask: (B, K); nonzero marks the positions in the loss.
        beta: in [0, 1]; 0 forward KL(teacher || student), 1 reverse KL, else the generalized
            JSD with mixture beta p_teacher + (1 - beta) p_student.
        num_items_in_batch: int or tensor: the loss is the sum divided by it (the valid tokens
            of the whole accumulated batch); None: by the number of valid positions here (at
            least 1).
        student_lm_head_bias, teacher_lm_head_bias: optional (V,).
        student_logit_scale, teacher_logit_scale: each model's logit multiplier (> 0), first.
        student_final_logit_softcapping, teacher_final_logit_softcapping: each model's soft-cap
            c (c tanh(x / c), after the scale), or None.
        temperature: T > 0, after the transforms, on both models; no T^2 factor.

    Returns:
        ``(loss, entropy_sum, n_valid)``: the scalar loss (float32), the sum over the valid
        positions of the student's entropy at temperature T in nats (float32, no gradient), and
        the number of valid positions (int64), all over this batch.
    """
    w_s, b_s = _gathered(student_lm_head_weight, student_lm_head_bias, student_hidden_states)
    w_t, b_t = _gathered(teacher_lm_head_weight, teacher_lm_head_bias, teacher_hidden_states)
    device = student_hidden_states.device
    h_s, w_s, b_s = _head(student_hidden_states, w_s, b_s, _compute_dtype(student_hidden_states))
    h_t, w_t, b_t = _head(teacher_hidden_states.detach(), w_t.detach(),
                          None if b_t is None else b_t.detach(),
                          _compute_dtype(teacher_hidden_states))
    valid = completion_mask.reshape(-1).to(device) != 0
    n_valid = valid.sum()
    labels = torch.where(valid, 0, _IGNORE)
    with _autocast_off(device):
        loss, entropy = F.linear_kd_loss(
            h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, divergence="jsd", beta=beta,
            temperature=temperature, labels=labels, ignore_index=_IGNORE, hard_weight=0.0,
            soft_weight=1.0, t2=False, student_logit_scale=student_logit_scale,
            teacher_logit_scale=teacher_logit_scale,
            student_softcap=student_final_logit_softcapping,
            teacher_softcap=teacher_final_logit_softcapping, reduction="sum",
            return_entropy=True)
    if num_items_in_batch is None:
        # a fully masked batch: 0, not 0 / 0 (TRL's clamp)
        loss = loss / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy.sum(), n_valid
