"""TRL's generalized JSD loss on pydistill's fused kernels.

``generalized_jsd_loss`` has the signature and the semantics of
``GKDTrainer.generalized_jsd_loss`` in TRL (``trl/experimental/gkd/gkd_trainer.py``, TRL 1.16;
``trl/trainer/gkd_trainer.py`` before), so a GKD user swaps one line::

    from pydistill.integrations import generalized_jsd_loss
    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

What TRL computes, per position, with p = softmax(t / T) (teacher), q = softmax(s / T) (student),
no T² factor:

- beta = 0: KL(p || q); beta = 1: KL(q || p); otherwise
  beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (beta weights the teacher);
- positions whose label is -100 are dropped (when ``labels`` is given);
- ``num_items_in_batch`` given: the sum over kept positions divided by it (gradient
  accumulation over the number of tokens of the whole accumulated batch);
- otherwise ``reduction``: ``"batchmean"`` divides the sum by the number of kept positions
  (at least 1) when ``labels`` is given, and by ``student_logits.size(0)`` (the batch size, not
  the number of tokens) when it is not; ``"sum"``; ``"mean"`` divides by the number of
  elements, kept positions x V (as ``Tensor.mean`` on TRL's per-element tensor: NaN when no
  position is kept); ``"none"`` returns TRL's per-element terms, (kept positions, V) with
  ``labels`` and the shape of the logits without.

pydistill's ``kd_loss(divergence="jsd", beta=beta, t2=False)`` computes exactly this per-row
divergence (the same beta convention, beta = 0 and 1 included), in float32 whatever the logits'
dtype; the reductions are applied to its per-row sums. Only ``"none"`` needs the per-element
terms, which the fused kernels never form: it is computed in plain PyTorch.

``linear_generalized_jsd_loss`` is the same loss from hidden states and LM-head weights
(``student_hidden @ student_weight^T`` and the teacher's likewise), through
:func:`pydistill.linear_kd_loss`, so the (N, V) logits are never formed: for a training loop
of one's own (TRL 1.16's ``GKDTrainer`` has no hidden-state path; it forms both logits).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from pydistill import functional as F
from pydistill.integrations.trl import check_trl_version

__all__ = ["generalized_jsd_loss", "linear_generalized_jsd_loss"]

_GKD_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _check_reduction(reduction):
    if reduction not in _GKD_REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_GKD_REDUCTIONS}, got {reduction!r}")


def _reduce(total, count, leading, vocab, labels, reduction, num_items_in_batch):
    """TRL's reductions of the sum ``total`` over the kept rows (``count`` of them)."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (count * vocab)
    if labels is not None:  # batchmean over kept positions, at least 1
        return total / count.clamp_min(1)
    return total / max(leading, 1)


def _count(labels, rows, device):
    if labels is None:
        return torch.tensor(rows, dtype=torch.float32, device=device)
    return (labels != -100).sum().to(torch.float32)


def _elementwise_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL's per-element terms (before the sum over the vocabulary), in float32 (float64 for
    float64 logits)."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)

    def term(log_w, log_v):  # w (log w - log v), 0 where w = 0
        w = log_w.exp()
        return torch.where(w > 0, w * (log_w - log_v), torch.zeros_like(w))

    if beta == 0.0:
        return term(log_p, log_q)
    if beta == 1.0:
        return term(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * term(log_p, log_m) + (1.0 - beta) * term(log_q, log_m)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """TRL's ``generalized_jsd_loss`` (GKD, Agarwal et al. 2024, Eq. 1) on pydistill's kernels.

    Same arguments, defaults and value as TRL's (see the module docstring for the exact
    semantics): beta weights the teacher, beta = 0 is forward KL(p || q) and beta = 1 reverse
    KL(q || p); labels equal to -100 mask positions; ``num_items_in_batch`` divides the sum;
    reductions ``batchmean`` (default), ``sum``, ``mean``, ``none``. The result is float32
    (float64 for float64 logits) where TRL's has the logits' dtype; the gradient is the logits'
    dtype. ``backend`` is pydistill's (keyword only).

    Args:
        student_logits: (B, T, V) (any (..., V)).
        teacher_logits: same shape.
        labels: (B, T) or None; positions equal to -100 are ignored.
        beta: in [0, 1].
        temperature: T > 0, applied to both logits (no T² factor).
        reduction: ``"batchmean"`` | ``"sum"`` | ``"mean"`` | ``"none"``.
        num_items_in_batch: int or tensor: when given, the loss is the sum over the kept
            positions divided by it, whatever ``reduction`` says.
    """
    check_trl_version()
    _check_reduction(reduction)
    if reduction == "none" and num_items_in_batch is None:
        F.kd_config(divergence="jsd", beta=beta, temperature=temperature)  # validate
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"teacher_logits: expected shape {tuple(student_logits.shape)} (that of "
                             f"student_logits), got {tuple(teacher_logits.shape)}")
        jsd = _elementwise_jsd(student_logits, teacher_logits, beta, temperature)
        return jsd if labels is None else jsd[labels != -100]
    total = F.kd_loss(student_logits, teacher_logits, divergence="jsd", beta=beta,
                      temperature=temperature, labels=labels, t2=False, reduction="sum",
                      backend=backend)
    rows = student_logits.numel() // max(student_logits.shape[-1], 1)
    count = _count(labels, rows, total.device)
    return _reduce(total, count, student_logits.shape[0], student_logits.shape[-1], labels,
                   reduction, num_items_in_batch)


def linear_generalized_jsd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size="auto",
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`generalized_jsd_loss` of the logits ``student_hidden @ student_weight^T
    (+ student_bias)`` and ``teacher_hidden @ teacher_weight^T (+ teacher_bias)``, computed with
    :func:`pydistill.linear_kd_loss` (row chunks; the (N, V) logits are never formed).

    The inputs are the backbones' last hidden states (B, T, H_s) / (B, T, H_t) and their
    ``lm_head`` weights (V, H_s) / (V, H_t), already shifted like the logits would be. Same value as
    ``generalized_jsd_loss(h_s @ W_s.T, h_t @ W_t.T, labels, ...)`` (to float32 rounding of
    the logits GEMMs); ``reduction="none"`` is refused (it needs the per-element terms of the
    full logits). Vocabularies may differ in size (padded heads), as in ``linear_kd_loss``.
    """
    _check_reduction(reduction)
    if reduction == "none":
        raise ValueError("reduction: 'none' returns per-element (N, V) terms, which the fused "
                         "head never forms; use generalized_jsd_loss on logits for it")
    total = F.linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                             student_bias=student_bias, teacher_bias=teacher_bias,
                             chunk_size=chunk_size, divergence="jsd", beta=beta,
                             temperature=temperature, labels=labels, t2=False, reduction="sum",
                             backend=backend)
    rows = student_hidden.numel() // max(student_hidden.shape[-1], 1)
    count = _count(labels, rows, total.device)
    return _reduce(total, count, student_hidden.shape[0], student_weight.shape[0], labels,
                   reduction, num_items_in_batch)
