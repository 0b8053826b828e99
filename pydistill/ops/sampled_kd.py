"""Offline teachers in the loss: the sampled teacher's unbiased estimator, and the losses of a
batch that carries a stored teacher (``pydistill.offline``'s collated batches).

Sampled teacher. Per row, S token ids are drawn i.i.d. from the teacher p = softmax(t / T) and
stored as their distinct ids with log(count / S); the empirical distribution p^ = count / S has
E[p^] = p. The loss is the soft cross-entropy against the student's full-vocabulary softmax
q = softmax(z / T)::

    CE^ = - sum_j p^_j log q_j,      d CE^ / d z_j = (q_j - p^_j) / T,      E[d CE^] = (q - p) / T

so the gradient is an unbiased estimate of forward KL's, d KL(p || q) / dz = (q - p) / T (the
teacher's entropy H(p), the difference between the two, does not depend on the student), and
the value an unbiased estimate of the cross-entropy H(p) + KL(p || q), not of KL: KL needs
H(p), which S samples do not give without bias (E[H(p^)] < H(p)). Scaled as every soft term:
soft_weight * T^2 * CE^ (T^2 only if t2).

It runs on the fused top-k path unchanged: with the support the drawn ids, P = p^ (summing to 1)
and ``tail="ignore"``, forward KL's gradient there is (q_j - p^_j) / T on the support and q_j / T
off it, exactly the one above, and its value is KL(p^ || q) = CE^ - H(p^); H(p^) (a constant: K
values per row) is added back. The drawn ids are taken at the loss temperature: no re-tempering
(counts are not probabilities one can raise to a power), so the stored temperature must equal
``temperature``. A store's unused slots (fewer than S distinct ids: id 0, log-prob -inf) are
moved to distinct ids the row does not list (a listed id of probability 0 is an off-support
token for this loss) so that the kernels' distinct-ids contract holds.

This is a separate entry point rather than a fourth ``tail``: the kernels and the reference
keep their three tails, and the estimator is the ``ignore`` tail plus a constant.
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from pydistill import _validation as check
from pydistill.reference.softmax_divergence import reduce_rows
from pydistill.reference.topk_divergence import TopKConfig, teacher_log_probs

TEACHER_METHODS = ("topk", "sample")
# the keys of a batch's stored teacher (pydistill.offline.OfflineCollator)
TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_temperature", "teacher_method")

__all__ = ["sampled_kd_loss", "offline_kd_loss", "linear_offline_kd_loss"]


def sampled_support(teacher_sample_logprobs: torch.Tensor, teacher_sample_indices: torch.Tensor,
                    vocab: int) -> torch.Tensor:
    """The ids with every unused slot (log-prob -inf) moved to a distinct id that its row does not
    list: the u-th unused slot of a row takes the u-th smallest unlisted id of
    [0, min(2K, V)), which holds at least K - (drawn ids) >= u of them. (N, K) work on the
    device, no synchronisation; drawn ids are left as they are (the checks judge them)."""
    k = teacher_sample_indices.shape[-1]
    ids = teacher_sample_indices.reshape(-1, k).long()
    unused = teacher_sample_logprobs.reshape(-1, k) == -math.inf
    c = min(2 * k, vocab)
    col = torch.where(~unused & (ids >= 0) & (ids < c), ids, c)  # column c: not a candidate
    taken = torch.zeros((ids.shape[0], c + 1), dtype=torch.int8, device=ids.device)
    taken = taken.scatter_(1, col, 1)[:, :c]
    free = taken.argsort(dim=1, stable=True)[:, :k]  # unlisted candidates first, ascending
    slot = (unused.long().cumsum(-1) - 1).clamp_(min=0)
    out = torch.where(unused, free.gather(1, slot), ids)
    return out.to(teacher_sample_indices.dtype).reshape(teacher_sample_indices.shape)


def _sample_entropy(teacher_sample_logprobs, vocab: int, counted, cfg: TopKConfig, dtype):
    """Per row T^2 * H(p^) (T^2 only if t2; float64 math), with P exactly as the ``ignore`` tail
    reads it; 0 on ignored rows. Shape: the leading dims."""
    k = teacher_sample_logprobs.shape[-1]
    log_p, _ = teacher_log_probs(teacher_sample_logprobs.detach().reshape(-1, k), vocab, cfg,
                                 torch.float64)
    h = -torch.where(log_p > -math.inf, log_p.exp() * log_p, 0.0).sum(-1)
    if counted is not None:
        h = torch.where(counted.reshape(-1), h, 0.0)
    t2 = cfg.temperature ** 2 if cfg.t2 else 1.0
    return (t2 * h).to(dtype).reshape(teacher_sample_logprobs.shape[:-1])


def _sample_config(temperature, teacher_temperature, **kw) -> TopKConfig:
    from pydistill.functional import topk_config

    cfg = topk_config(tail="ignore", teacher_temperature=teacher_temperature,
                      temperature=temperature, divergence="kl", **kw)
    if not math.isclose(cfg.teacher_temperature, cfg.temperature, rel_tol=1e-6):
        raise ValueError(
            f"teacher_temperature: a sampled teacher's ids were drawn at teacher_temperature="
            f"{cfg.teacher_temperature} and cannot be re-tempered (counts are not probabilities); "
            f"expected temperature={cfg.temperature} to equal it, or a store sampled at "
            f"{cfg.temperature}")
    return cfg


def _entropy_term(loss, teacher_sample_logprobs, vocab, labels, cfg: TopKConfig):
    """T^2 * H(p^) (T^2 only if t2), reduced as the loss is: what turns the soft term's
    T^2 KL(p^ || q) into T^2 CE^."""
    counted = labels != cfg.ignore_index if labels is not None else None
    rows = _sample_entropy(teacher_sample_logprobs, vocab, counted, cfg, loss.dtype)
    count = counted.sum() if counted is not None else rows.numel()
    return reduce_rows(rows, count, cfg.reduction)


def sampled_kd_loss(
    student_logits: torch.Tensor,
    teacher_sample_logprobs: torch.Tensor,
    teacher_sample_indices: torch.Tensor,
    *,
    teacher_temperature: float,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    t2: bool = True,
    softcap: Optional[float] = None,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    reduction: str = "mean",
    validate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Distillation from a sampled teacher: per row the distinct token ids drawn from the
    teacher (S draws at ``teacher_temperature``) with log(count / S), against the student's
    full-vocabulary logits, through an unbiased estimator of forward KL's gradient (module
    docstring)::

        loss_i = hard_weight * CE(z_s, y_i) + soft_weight * T^2 * (- sum_j p^_j log q_j)

    The gradient's expectation over the draws is that of ``kd_loss(divergence="kl")`` against
    the dense teacher; the soft term's value is an unbiased estimate of the cross-entropy
    H(p) + KL(p || q), which exceeds KL by the teacher's entropy (not known from samples).

    Args:
        student_logits: (..., V), as in :func:`pydistill.topk_kd_loss`.
        teacher_sample_logprobs: (..., K) floating: log(count / S) of each drawn id; unused
            slots (fewer than K distinct ids) -inf. In each counted row they sum to 1 (up to
            rounding; checked with ``topk_kd_loss``'s log-probability check).
        teacher_sample_indices: (..., K) int64 / int32: the drawn ids, distinct in the counted
            rows; unused slots hold any id (a store writes 0). Rows ``labels`` ignores are never
            read.
        teacher_temperature: the temperature the ids were drawn at; required, and equal to
            ``temperature`` (the draws cannot be re-tempered).
        temperature, labels, ignore_index, hard_weight, soft_weight, t2, softcap,
        student_logit_scale, student_softcap, reduction, backend: as in
            :func:`pydistill.topk_kd_loss` (the divergence is forward KL).
        validate: False (default): values (ids in range and distinct, log-probs that can be
            log-probs) are checked on CPU tensors, not on GPU ones (checking would
            synchronise). True: checked on any device (one host synchronisation; e.g. on the
            first batch of a run).
    """
    if softcap is not None and student_softcap is not None:
        raise ValueError(f"softcap: the shorthand for student_softcap here, got softcap={softcap} "
                         f"together with student_softcap={student_softcap}; give one form")
    cap = softcap if softcap is not None else student_softcap
    cfg = _sample_config(temperature, teacher_temperature, ignore_index=ignore_index,
                         hard_weight=hard_weight, soft_weight=soft_weight, t2=t2,
                         student_logit_scale=student_logit_scale, student_softcap=cap,
                         reduction=reduction)
    validate = check.boolean("validate", validate)
    check.topk_inputs("student_logits", student_logits, "teacher_sample_logprobs",
                      teacher_sample_logprobs, "teacher_sample_indices", teacher_sample_indices,
                      check_values=False)
    vocab = student_logits.shape[-1]
    ids = sampled_support(teacher_sample_logprobs, teacher_sample_indices, vocab)
    if validate:
        check.topk_inputs("student_logits", student_logits, "teacher_sample_logprobs",
                          teacher_sample_logprobs, "teacher_sample_indices", ids,
                          labels=labels, ignore_index=cfg.ignore_index, check_values=True)
    from pydistill.functional import topk_kd_loss

    loss = topk_kd_loss(student_logits, teacher_sample_logprobs, ids, tail="ignore",
                        teacher_temperature=cfg.teacher_temperature, divergence="kl",
                        temperature=cfg.temperature, labels=labels, ignore_index=cfg.ignore_index,
                        hard_weight=cfg.hard_weight, soft_weight=cfg.soft_weight, t2=cfg.t2,
                        student_logit_scale=cfg.student_logit_scale,
                        student_softcap=cfg.student_softcap, reduction=cfg.reduction,
                        backend=backend)
    if not cfg.has_soft:
        return loss
    return loss + cfg.soft_weight * _entropy_term(loss, teacher_sample_logprobs, vocab, labels, cfg)


# ---------------------------------------------------------------------------------------------
# A batch's stored teacher (pydistill.offline): its temperature and method travel with it
# ---------------------------------------------------------------------------------------------


def stored_teacher(teacher: Mapping, temperature: Optional[float]):
    """(log-probs, ids, stored temperature, method) of a batch's stored teacher, its
    temperature checked against the requested one (None: the stored one)."""
    if not isinstance(teacher, Mapping):
        raise TypeError(f"teacher: expected a mapping with keys {TEACHER_KEYS} (a batch of "
                        f"pydistill.offline.OfflineCollator), got {type(teacher).__name__}")
    missing = [key for key in TEACHER_KEYS if key not in teacher]
    if missing:
        raise ValueError(f"teacher: expected the keys {TEACHER_KEYS} (a batch of "
                         f"pydistill.offline.OfflineCollator), missing {missing}")
    if teacher.get("teacher_log_weights") is not None:
        raise ValueError(
            "teacher: the batch carries teacher_log_weights (ids drawn at a proposal temperature "
            "other than the stored temperature, with importance weights); the loss takes ids drawn "
            "at the loss temperature only. Capture with proposal_temperature equal to temperature")
    stored = teacher["teacher_temperature"]
    if isinstance(stored, torch.Tensor) and stored.numel() == 1 and stored.device.type == "cpu":
        stored = stored.item()
    stored = check.real("teacher['teacher_temperature']", stored, low=0.0, low_open=True)
    method = teacher["teacher_method"]
    if method not in TEACHER_METHODS:
        raise ValueError(f"teacher['teacher_method']: expected one of {TEACHER_METHODS}, "
                         f"got {method!r}")
    if temperature is not None:
        temperature = check.real("temperature", temperature, low=0.0, low_open=True)
        if not math.isclose(temperature, stored, rel_tol=1e-6):
            raise ValueError(
                f"temperature: the stored teacher was captured at temperature {stored}, got "
                f"temperature={temperature}; a stored teacher is never re-tempered silently. "
                f"Train at temperature={stored} (or None: the stored one), capture again at "
                f"{temperature}, or call pydistill.topk_kd_loss(teacher_temperature={stored}, "
                f"temperature={temperature}) to re-temper a top-k teacher explicitly")
    return teacher["teacher_logprobs"], teacher["teacher_ids"], stored, method


def causal_targets(teacher: Mapping, labels, ignore_index: int):
    """``labels`` as given; else the batch's causal-LM ``labels`` (unshifted, as the collators
    give them) shifted: row j is scored against token j + 1, the last row against nothing."""
    if labels is not None or teacher.get("labels") is None:
        return labels
    y = teacher["labels"]
    return F.pad(y[..., 1:], (0, 1), value=ignore_index)


def _method_args(method: str, tail: Optional[str], divergence: str):
    if method == "topk":
        return "bucket" if tail is None else tail
    if tail is not None:
        raise ValueError(f"tail: applies to a top-k teacher; a sampled teacher's loss has no tail "
                         f"choice (it is unbiased as it is), got tail={tail!r}")
    if divergence != "kl":
        raise ValueError(f"divergence: a sampled teacher's estimator is unbiased for forward KL "
                         f"only, expected 'kl', got {divergence!r}")
    return None


def offline_kd_loss(
    student_logits: torch.Tensor,
    teacher: Mapping,
    *,
    labels: Optional[torch.Tensor] = None,
    temperature: Optional[float] = None,
    tail: Optional[str] = None,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    t2: bool = True,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    reduction: str = "mean",
    validate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Distillation from a stored teacher as a batch carries it (``pydistill.offline``'s
    collator): ``teacher["teacher_logprobs"]`` (..., K) and ``teacher["teacher_ids"]`` (..., K)
    aligned with the student's rows (row j: the teacher's distribution of the token after
    position j), ``teacher["teacher_temperature"]`` (the temperature it was captured at) and
    ``teacher["teacher_method"]``:

    - ``"topk"``: :func:`pydistill.topk_kd_loss` with ``teacher_temperature`` the stored one;
    - ``"sample"``: :func:`sampled_kd_loss` (forward KL only, no ``tail``); ids drawn at a
      proposal temperature other than the stored one (a batch with ``teacher_log_weights``)
      are refused.

    The stored temperature is the loss's: ``temperature=None`` takes it, another value raises
    (nothing is re-tempered silently; :func:`pydistill.topk_kd_loss` re-tempers a top-k teacher
    when asked explicitly).

    Args:
        student_logits: (..., V), the rows of the teacher arrays (e.g. a causal LM's
            ``logits`` (B, L, V) for a (B, L, K) teacher).
        teacher: the batch (a mapping with the four keys above; its other keys are read only
            for ``labels``).
        labels: the target of each row, aligned with the rows (already shifted), or None: the
            batch's ``labels`` (the collator's causal-LM labels, unshifted, -100 at padding)
            shifted by one (row j against ``labels[..., j + 1]``, the last row ignored); with
            neither, every row counts. Rows they ignore are never read (padding rows may hold
            anything).
        tail: a top-k teacher's (``topk_kd_loss``'s; None: ``"bucket"``); None for a sampled one.
        divergence, beta, ignore_index, hard_weight, soft_weight, t2, student_logit_scale,
        student_softcap, reduction, backend: as in :func:`pydistill.topk_kd_loss`.
        validate: as in :func:`sampled_kd_loss`: True checks the stored values on any device
            (one host synchronisation); False (default) on CPU tensors only.
    """
    lp, ids, stored, method = stored_teacher(teacher, temperature)
    tail = _method_args(method, tail, divergence)
    labels = causal_targets(teacher, labels, ignore_index)
    common = dict(temperature=stored, labels=labels, ignore_index=ignore_index,
                  hard_weight=hard_weight, soft_weight=soft_weight, t2=t2,
                  student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                  reduction=reduction, backend=backend)
    if method == "sample":
        return sampled_kd_loss(student_logits, lp, ids, teacher_temperature=stored,
                               validate=validate, **common)
    if check.boolean("validate", validate):
        check.topk_inputs("student_logits", student_logits, "teacher['teacher_logprobs']", lp,
                          "teacher['teacher_ids']", ids, labels=labels, ignore_index=ignore_index,
                          check_values=True)
    from pydistill.functional import topk_kd_loss

    return topk_kd_loss(student_logits, lp, ids, tail=tail, teacher_temperature=stored,
                        divergence=divergence, beta=beta, **common)


def linear_offline_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: Mapping,
    *,
    student_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    temperature: Optional[float] = None,
    tail: Optional[str] = None,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    t2: bool = True,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    reduction: str = "mean",
    chunk_size="auto",
    return_components: bool = False,
    validate: bool = False,
    backend: str = "auto",
):
    r""":func:`offline_kd_loss` fused with the student's LM head: the student logits are
    ``student_hidden @ student_weight^T (+ student_bias)``, never formed beyond one chunk of
    rows (:func:`pydistill.linear_kd_loss` with ``teacher_topk``). The stored teacher, its
    temperature and method, ``labels`` and ``validate`` as in :func:`offline_kd_loss`; a sampled
    teacher runs the estimator of :func:`sampled_kd_loss` on this path.

    ``chunk_size``, ``return_components``: as in :func:`pydistill.linear_kd_loss`; with a
    sampled teacher ``parts["kd"]`` is the soft term's unbiased cross-entropy estimate
    (T^2 CE^, not weighted by ``soft_weight``), so ``loss == soft_weight * kd + hard_weight * ce``
    still holds.
    """
    from pydistill.functional import linear_kd_loss

    lp, ids, stored, method = stored_teacher(teacher, temperature)
    tail = _method_args(method, tail, divergence)
    labels = causal_targets(teacher, labels, ignore_index)
    return_components = check.boolean("return_components", return_components)
    vocab = student_weight.shape[0] if isinstance(student_weight, torch.Tensor) else None
    cfg = None
    if method == "sample":
        cfg = _sample_config(stored, stored, ignore_index=ignore_index, hard_weight=hard_weight,
                             soft_weight=soft_weight, t2=t2,
                             student_logit_scale=student_logit_scale,
                             student_softcap=student_softcap, reduction=reduction)
        if vocab is not None and isinstance(ids, torch.Tensor) and isinstance(lp, torch.Tensor):
            ids = sampled_support(lp, ids, vocab)
        tail = "ignore"
    if check.boolean("validate", validate) and vocab is not None and isinstance(
            student_hidden, torch.Tensor):
        shape = student_hidden.new_empty(()).expand(*student_hidden.shape[:-1], vocab)
        check.topk_inputs("student logits (student_hidden @ student_weight^T)", shape,
                          "teacher['teacher_logprobs']", lp, "teacher['teacher_ids']", ids,
                          labels=labels, ignore_index=ignore_index, check_values=True)
    out = linear_kd_loss(
        student_hidden, student_weight, student_bias=student_bias, teacher_topk=(lp, ids),
        chunk_size=chunk_size, tail=tail, teacher_temperature=stored, divergence=divergence,
        temperature=stored, beta=beta, labels=labels, ignore_index=ignore_index,
        hard_weight=hard_weight, soft_weight=soft_weight, t2=t2,
        student_logit_scale=student_logit_scale, student_softcap=student_softcap,
        reduction=reduction, return_components=return_components, backend=backend)
    if cfg is None or not cfg.has_soft:
        return out
    loss, parts = out if return_components else (out, None)
    term = _entropy_term(loss, lp, vocab, labels, cfg)
    loss = loss + cfg.soft_weight * term
    if parts is None:
        return loss
    return loss, dict(parts, kd=parts["kd"] + term)
