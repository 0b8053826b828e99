"""nn.Module wrappers: each holds the hyper-parameters of one loss and calls its function."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pydistill import functional as F

__all__ = ["KDLoss"]


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
