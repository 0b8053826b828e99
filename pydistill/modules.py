"""nn.Module wrappers: each holds the hyper-parameters of one loss and calls its function."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pydistill import _validation as check
from pydistill import functional as F
from pydistill.reference.topk_divergence import TAILS

__all__ = ["KDLoss", "LinearKDLoss", "TopKKDLoss"]


class KDLoss(nn.Module):
    """Module form of :func:`pydistill.kd_loss`; the arguments are the same and are
    validated at construction. ``forward(student_logits, teacher_logits, labels=None)``."""

    def __init__(
        self,
        *,
        divergence: str = "kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        ignore_index: int = -100,
        hard_weight: float = 0.0,
        soft_weight: float = 1.0,
        t2: bool = True,
        softcap: Optional[float] = None,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        self.cfg = F.kd_config(
            divergence=divergence, temperature=temperature, beta=beta,
            ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
            t2=t2, softcap=softcap, reduction=reduction,
        )
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.cfg
        return F.kd_loss(
            student_logits, teacher_logits, divergence=c.divergence, temperature=c.temperature,
            beta=c.beta, labels=labels, ignore_index=c.ignore_index, hard_weight=c.hard_weight,
            soft_weight=c.soft_weight, t2=c.t2, softcap=c.softcap, reduction=c.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"divergence={c.divergence!r}, temperature={c.temperature}, beta={c.beta}, "
            f"hard_weight={c.hard_weight}, soft_weight={c.soft_weight}, t2={c.t2}, "
            f"softcap={c.softcap}, reduction={c.reduction!r}, backend={self.backend!r}"
        )


class TopKKDLoss(KDLoss):
    """Module form of :func:`pydistill.topk_kd_loss` (an offline top-k teacher): ``kd_loss``'s
    hyper-parameters plus ``tail`` and ``teacher_temperature``, validated at construction.
    ``forward(student_logits, teacher_topk_logprobs, teacher_topk_indices, labels=None)``."""

    def __init__(self, *, tail: str = "bucket", teacher_temperature: Optional[float] = None,
                 backend: str = "auto", **kd_kwargs):
        super().__init__(backend=backend, **kd_kwargs)
        self.cfg = F.topk_config(tail=tail, teacher_temperature=teacher_temperature, **kd_kwargs)

    def forward(self, student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                teacher_topk_indices: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.cfg
        return F.topk_kd_loss(
            student_logits, teacher_topk_logprobs, teacher_topk_indices,
            labels=labels, backend=self.backend, **{f: getattr(c, f) for f in c.__dataclass_fields__},
        )

    def extra_repr(self) -> str:
        c = self.cfg
        return f"tail={c.tail!r}, teacher_temperature={c.teacher_temperature}, {super().extra_repr()}"


class LinearKDLoss(KDLoss):
    """Module form of :func:`pydistill.linear_kd_loss` (the distillation loss fused with the
    student's LM head): ``kd_loss``'s hyper-parameters plus ``chunk_size``, ``process_group``
    and the top-k teacher's ``tail`` / ``teacher_temperature``, validated at construction.
    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
    teacher_logits=None, teacher_topk=None, student_bias=None, teacher_bias=None, labels=None)``.
    """

    def __init__(self, *, chunk_size="auto", process_group=None, tail: str = "bucket",
                 teacher_temperature: Optional[float] = None, **kd_kwargs):
        super().__init__(**kd_kwargs)
        self.chunk_size = check.chunk_size("chunk_size", chunk_size)
        self.process_group = check.process_group("process_group", process_group)
        self.tail = check.choice("tail", tail, TAILS)
        self.teacher_temperature = None if teacher_temperature is None else check.real(
            "teacher_temperature", teacher_temperature, low=0.0, low_open=True)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: Optional[torch.Tensor] = None,
                teacher_weight: Optional[torch.Tensor] = None, *,
                teacher_logits: Optional[torch.Tensor] = None, teacher_topk=None,
                student_bias: Optional[torch.Tensor] = None,
                teacher_bias: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.cfg
        return F.linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            teacher_logits=teacher_logits, teacher_topk=teacher_topk, student_bias=student_bias,
            teacher_bias=teacher_bias, chunk_size=self.chunk_size,
            process_group=self.process_group, tail=self.tail,
            teacher_temperature=self.teacher_temperature, divergence=c.divergence,
            temperature=c.temperature, beta=c.beta, labels=labels, ignore_index=c.ignore_index,
            hard_weight=c.hard_weight, soft_weight=c.soft_weight, t2=c.t2, softcap=c.softcap,
            reduction=c.reduction, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size!r}"
