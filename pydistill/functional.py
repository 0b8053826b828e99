"""The public loss functions. Each validates its arguments, picks a backend from the one
dispatch table (pydistill/_dispatch.py) and calls that backend's autograd Function."""
from __future__ import annotations

from typing import Optional

import torch

from pydistill import _dispatch
from pydistill import _validation as check
from pydistill.reference.softmax_divergence import DIVERGENCES, REDUCTIONS, KDConfig

__all__ = ["kd_loss"]


def kd_config(*, divergence="kl", temperature=1.0, beta=0.5, ignore_index=-100,
              hard_weight=0.0, soft_weight=1.0, t2=True, softcap=None, reduction="mean") -> KDConfig:
    """Validate the hyper-parameters shared by the logit-distillation losses."""
    return KDConfig(
        divergence=check.choice("divergence", divergence, DIVERGENCES),
        temperature=check.real("temperature", temperature, low=0.0, low_open=True),
        beta=check.real("beta", beta, low=0.0, high=1.0),
        ignore_index=check.integer("ignore_index", ignore_index),
        hard_weight=check.real("hard_weight", hard_weight),
        soft_weight=check.real("soft_weight", soft_weight),
        t2=check.boolean("t2", t2),
        softcap=None if softcap is None else check.real("softcap", softcap, low=0.0, low_open=True),
        reduction=check.choice("reduction", reduction, REDUCTIONS),
    )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    t2: bool = True,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Knowledge-distillation loss on logits: temperature softmax + a divergence, fused.

    Per row i (every leading position of the (..., V) logits)::

        p = softmax(cap(t_i) / T)   q = softmax(cap(s_i) / T)   cap(z) = c tanh(z / c)
        loss_i = hard_weight * CE(cap(s_i), y_i) + soft_weight * T^2 * D(p, q)

    ``D`` is ``divergence``:

    ===================  ======================================================
    ``kl``               KL(p || q) = sum p (log p - log q)  (Hinton 2015)
    ``reverse_kl``       KL(q || p)
    ``jsd``              beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q;
                         beta = 0 gives ``kl``, beta = 1 ``reverse_kl`` (TRL's
                         ``generalized_jsd_loss`` convention, matched to float32 rounding)
    ``tvd``              1/2 sum |p - q|
    ``skew_kl``          KL(p || beta p + (1 - beta) q)  (DistiLLM; beta is alpha)
    ``skew_reverse_kl``  KL(q || beta q + (1 - beta) p)
    ===================  ======================================================

    Args:
        student_logits: (..., V) float16 / bfloat16 / float32 (float64: torch backend).
        teacher_logits: (..., V), same shape; a constant unless it requires grad, in which case
            its gradient is computed too.
        divergence: see the table; default ``"kl"``.
        temperature: T > 0, default 1. The hard term always uses T = 1.
        beta: mixture weight in [0, 1] of ``jsd`` / ``skew_kl`` / ``skew_reverse_kl``.
        labels: (...) int64/int32 targets; needed when ``hard_weight != 0``, and otherwise only
            used to skip rows equal to ``ignore_index``. Out-of-range labels raise on CPU
            tensors and give a NaN loss on GPU tensors (checking would synchronise).
        ignore_index: rows whose label equals it contribute 0 and are not counted (-100).
        hard_weight: weight of the hard-label cross-entropy (default 0).
        soft_weight: weight of the divergence (default 1).
        t2: multiply the divergence by T^2 (default True: Hinton, torchdistill, DistilBERT;
            TRL and TextBrewer do not, pass ``t2=False`` to match them).
        softcap: Gemma-2 style soft-capping c applied to both logits first (None: off).
        reduction: ``"mean"`` (sum over counted rows / their number, 0 when none count),
            ``"batchmean"`` (the same; the name of nn.KLDivLoss and TRL), ``"sum"``,
            ``"none"`` (per-row losses of shape (...), ignored rows 0).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (``"cuda"`` is reserved);
            ``PYDISTILL_BACKEND`` replaces ``auto``.

    Returns:
        The loss, float32 (float64 for float64 inputs); gradients come back in the dtype of
        the logits. Logits equal to -inf carry zero probability (masked or padded vocabulary;
        they stay -inf under softcap). NaN in a counted row propagates to the loss.
    """
    cfg = kd_config(
        divergence=divergence, temperature=temperature, beta=beta, ignore_index=ignore_index,
        hard_weight=hard_weight, soft_weight=soft_weight, t2=t2, softcap=softcap,
        reduction=reduction,
    )
    check.logits_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    if cfg.hard_weight != 0.0 and labels is None:
        raise ValueError(f"labels: required when hard_weight != 0 (got hard_weight={cfg.hard_weight})")
    labels = check.labels(
        "labels", labels, student_logits.shape[:-1], "student_logits", student_logits,
        vocab=student_logits.shape[-1], ignore_index=cfg.ignore_index,
        check_range=cfg.hard_weight != 0.0,
    )
    backend = _dispatch.resolve(
        "kd_loss", backend, student_logits.device, (student_logits.dtype, teacher_logits.dtype)
    )
    fn = _dispatch.implementation("kd_loss", backend)
    return fn.apply(student_logits, teacher_logits, labels, cfg)
