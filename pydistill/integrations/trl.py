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

- heads that are DTensors (FSDP2, e.g. an LM head under its own ``fully_shard``) are gathered
  once with ``full_tensor()``, the weight cast to its hidden states' dtype; the student's
  gradient goes back to its shards averaged over the processes (``Partial("avg")``, as FSDP2
  reduces every other gradient), where TRL's plain ``full_tensor()`` leaves each process its
  own batch's gradient (wrong, and different on every process);
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
import functools
import sys
from typing import Optional, Union

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from pydistill import functional as F
from pydistill.integrations.distributed import gather_head_parameter

__all__ = ["trl_chunked_divergence_loss", "check_trl_version", "patch_trl", "TRL_VERSIONS"]

_IGNORE = -100

# The TRL releases whose private names and semantics the drop-ins were written for and are
# tested against (trl.trainer.distillation_trainer._chunked_divergence_loss, called by
# DistillationTrainer._compute_loss by that module-level name; GKDTrainer.generalized_jsd_loss).
TRL_VERSIONS = SpecifierSet(">=1.16,<1.17")


def check_trl_version(version: Optional[str] = None) -> None:
    """``RuntimeError`` unless TRL's version is in :data:`TRL_VERSIONS` (compared with
    ``packaging``), the range the TRL drop-ins reproduce the private names and the values of.
    ``version``: the version to check; None: that of the imported ``trl`` module, if ``trl`` is
    imported (if not, nothing is patched and nothing is checked). The drop-ins
    (:func:`trl_chunked_divergence_loss`, :func:`~pydistill.integrations.generalized_jsd_loss`)
    call it, so a patch applied by hand to another TRL release fails on its first step."""
    if version is None:
        trl = sys.modules.get("trl")
        if trl is None:
            return
        version = getattr(trl, "__version__", None)
        if version is None:
            return
    _check_trl_version(str(version))


@functools.lru_cache(maxsize=8)
def _check_trl_version(version: str) -> None:
    try:
        parsed = Version(version)
    except InvalidVersion as e:
        raise RuntimeError(f"trl: cannot read its version {version!r} ({e}); pydistill's TRL "
                           f"drop-ins were written for TRL {TRL_VERSIONS}") from e
    if not TRL_VERSIONS.contains(parsed, prereleases=True):
        raise RuntimeError(
            f"trl: version {version} is installed; pydistill's TRL drop-ins were written for TRL "
            f"{TRL_VERSIONS} (they replace TRL's private "
            f"trl.trainer.distillation_trainer._chunked_divergence_loss and "
            f"GKDTrainer.generalized_jsd_loss, whose names, signatures and semantics change "
            f"between TRL releases). Install a TRL in that range, or call pydistill.linear_kd_loss "
            f"/ pydistill.kd_loss directly")


def patch_trl(distillation_trainer: bool = True, gkd_trainer: bool = True) -> None:
    """Make TRL's trainers compute their losses with pydistill's kernels, after checking TRL's
    version (:func:`check_trl_version`) and that the names replaced exist:

    - ``distillation_trainer``: ``trl.trainer.distillation_trainer._chunked_divergence_loss``
      (``DistillationTrainer``'s loss) becomes :func:`trl_chunked_divergence_loss`;
    - ``gkd_trainer``: ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` becomes
      :func:`pydistill.integrations.generalized_jsd_loss`.
    """
    import trl

    check_trl_version(trl.__version__)
    if distillation_trainer:
        import trl.trainer.distillation_trainer as dt

        uses = getattr(getattr(getattr(dt, "DistillationTrainer", None), "_compute_loss", None),
                       "__code__", None)
        if not hasattr(dt, "_chunked_divergence_loss") or uses is None or \
                "_chunked_divergence_loss" not in uses.co_names:
            raise RuntimeError(f"trl {trl.__version__}: DistillationTrainer._compute_loss does not "
                               f"call trl.trainer.distillation_trainer._chunked_divergence_loss; "
                               f"nothing to patch")
        dt._chunked_divergence_loss = trl_chunked_divergence_loss
    if gkd_trainer:
        from trl.experimental.gkd import gkd_trainer as gkd

        from pydistill.integrations.gkd import generalized_jsd_loss

        gkd.GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)


def _is_dtensor(x) -> bool:
    if x is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def _gathered(weight, bias, hidden):
    """TRL's FSDP2 step: a DTensor head as one plain tensor (one all-gather, differentiable),
    the weight in the hidden states' dtype. Unlike TRL's ``full_tensor()``, the gradient goes
    back to the shards as the average of the processes' gradients (``Partial("avg")``, FSDP2's
    own reduction): a plain ``full_tensor()`` treats it as replicated, and each process keeps its
    shard of its own batch's gradient (TRL 1.16's head gradient under its own ``fully_shard``)."""
    if _is_dtensor(weight):
        weight = gather_head_parameter(weight).to(hidden.dtype)
        bias = gather_head_parameter(bias)
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
    check_trl_version()
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
