"""The public loss functions. Each validates its arguments, picks a backend from the one
dispatch table (pydistill/_dispatch.py) and calls that backend's autograd Function (under
torch.compile through the custom ops of pydistill/_custom_ops.py)."""
from __future__ import annotations

from typing import Optional

import torch

from pydistill import _custom_ops, _dispatch
from pydistill import _validation as check
from pydistill._utils import autocast_off
from pydistill.reference.attention_kd import (
    ATTENTION_LOSSES, ATTENTION_REDUCTIONS, AttentionKDConfig, mse_scores_loss, with_scales,
)
from pydistill.reference.linear_kd import ChunkPlan
from pydistill.reference.softmax_divergence import DIVERGENCES, REDUCTIONS, KDConfig, config_fields
from pydistill.reference.topk_divergence import TAILS, TopKConfig, refuse_teacher_grad
from pydistill.reference import representation
from pydistill.reference.representation import AT_MODES

# linear_kd_loss(vocab_mismatch=...): what V_s != V_t means (its docstring)
VOCAB_MISMATCH = ("restrict", "pad", "error")

__all__ = ["kd_loss", "linear_kd_loss", "topk_kd_loss", "attention_transfer_loss", "hint_loss",
           "rkd_loss", "attention_kd_loss", "relation_kd_loss", "uld_loss", "linear_uld_loss",
           "sampled_kd_loss", "offline_kd_loss", "linear_offline_kd_loss"]


def kd_config(*, divergence="kl", temperature=1.0, beta=0.5, ignore_index=-100,
              hard_weight=0.0, soft_weight=1.0, t2=True, softcap=None, student_logit_scale=1.0,
              teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
              reduction="mean") -> KDConfig:
    """Validate the hyper-parameters shared by the logit-distillation losses. ``softcap`` is the
    shorthand for ``student_softcap = teacher_softcap``; giving it with either is an error."""
    if softcap is not None:
        given = ", ".join(f"{n}={v}" for n, v in (("student_softcap", student_softcap),
                                                  ("teacher_softcap", teacher_softcap)) if v is not None)
        if given:
            raise ValueError(f"softcap: the shorthand for student_softcap = teacher_softcap, got "
                             f"softcap={softcap} together with {given}; give one form")
        student_softcap = teacher_softcap = softcap
    return KDConfig(
        divergence=check.choice("divergence", divergence, DIVERGENCES),
        temperature=check.real("temperature", temperature, low=0.0, low_open=True),
        beta=check.real("beta", beta, low=0.0, high=1.0),
        ignore_index=check.integer("ignore_index", ignore_index),
        hard_weight=check.real("hard_weight", hard_weight),
        soft_weight=check.real("soft_weight", soft_weight),
        t2=check.boolean("t2", t2),
        student_logit_scale=check.real("student_logit_scale", student_logit_scale, low=0.0,
                                       low_open=True),
        teacher_logit_scale=check.real("teacher_logit_scale", teacher_logit_scale, low=0.0,
                                       low_open=True),
        student_softcap=_cap("softcap" if softcap is not None else "student_softcap", student_softcap),
        teacher_softcap=_cap("softcap" if softcap is not None else "teacher_softcap", teacher_softcap),
        reduction=check.choice("reduction", reduction, REDUCTIONS),
    )


def _cap(name, value):
    return None if value is None else check.real(name, value, low=0.0, low_open=True)


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
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Knowledge-distillation loss on logits: temperature softmax + a divergence, fused.

    Per row i (every leading position of the (..., V) logits)::

        z_s = cap_s(a_s s_i)   z_t = cap_t(a_t t_i)         cap(x) = c tanh(x / c)
        p = softmax(z_t / T)   q = softmax(z_s / T)
        loss_i = hard_weight * CE(z_s, y_i) + soft_weight * T^2 * D(p, q)

    Each model's logits get their own transform first, in TRL's order (its
    ``DistillationTrainer``): the logit scale a (Cohere's ``logit_scale``, Granite's
    1 / ``logits_scaling``), then the soft-cap c (Gemma-2's ``final_logit_softcapping``), then
    the temperature. Both are identities by default.

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
        softcap: shorthand for ``student_softcap = teacher_softcap = softcap`` (None: off);
            giving it together with either per-model one is an error.
        student_logit_scale, teacher_logit_scale: a > 0 multiplying each model's logits before
            its soft-cap (default 1).
        student_softcap, teacher_softcap: c > 0, each model's Gemma-2 style soft-cap
            c tanh(x / c), applied after its scale (None: off). Gradients include a (1 - (z/c)^2).
        reduction: ``"mean"`` (sum over counted rows / their number, 0 when none count),
            ``"batchmean"`` (the same; the name of nn.KLDivLoss and TRL), ``"sum"``,
            ``"none"`` (per-row losses of shape (...), ignored rows 0).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (``"cuda"`` is reserved);
            ``PYDISTILL_BACKEND`` replaces ``auto``.

    Returns:
        The loss, float32 (float64 for float64 inputs); gradients come back in the dtype of
        the logits. Logits equal to -inf carry zero probability (masked or padded vocabulary;
        they stay -inf under the transforms). NaN in a counted row propagates to the loss.
    """
    cfg = kd_config(
        divergence=divergence, temperature=temperature, beta=beta, ignore_index=ignore_index,
        hard_weight=hard_weight, soft_weight=soft_weight, t2=t2, softcap=softcap,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, reduction=reduction,
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
    return _custom_ops.kd_loss(student_logits, teacher_logits, labels, cfg, backend)


def topk_config(*, tail="bucket", teacher_temperature=None, **kd_kwargs) -> TopKConfig:
    """Validate the hyper-parameters of ``topk_kd_loss``: those of ``kd_config`` plus ``tail``
    and ``teacher_temperature``, which a top-k teacher requires (stored log-probs carry no
    temperature of their own; guessing T re-tempers them wrongly whenever it is not theirs)."""
    cfg = kd_config(**kd_kwargs)
    if teacher_temperature is None:
        raise ValueError(
            "teacher_temperature: required with a top-k teacher, got None. It is the temperature "
            "the stored log-probabilities were computed at (1.0 for log_softmax(logits), T_gen "
            "for log_softmax(logits / T_gen)); they are re-tempered from it to temperature="
            f"{cfg.temperature}. Pass it explicitly, e.g. teacher_temperature=1.0"
        )
    return TopKConfig(
        **config_fields(cfg),
        tail=check.choice("tail", tail, TAILS),
        teacher_temperature=check.real("teacher_temperature", teacher_temperature, low=0.0,
                                       low_open=True),
    )


def full_support_config(cfg: TopKConfig, k: int, vocab: int) -> TopKConfig:
    """``tail="bucket"`` over a support of the whole vocabulary (k = V) is ``"renormalize"``:
    no token is missing, so the bucket holds no teacher mass (1 - sum p is rounding alone) and
    no student mass. Computed as ``renormalize``, whose sums keep float32's precision at large
    T; the bucket's outcome of two zeros lost it as T^2 eps (10 % of the value at T = 100)."""
    if cfg.tail != "bucket" or k < vocab:
        return cfg
    return TopKConfig(**{**config_fields(cfg), "tail": "renormalize"})


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    *,
    tail: str = "bucket",
    teacher_temperature: Optional[float] = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    t2: bool = True,
    softcap: Optional[float] = None,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Distillation from an offline top-k teacher: the teacher's top-K log-probabilities and
    token ids per position (e.g. K = 64 of V = 152k, stored ahead of time) against the student's
    full-vocabulary logits, without forming a dense teacher.

    Per row i, with q = softmax(z_s / T) over all V tokens, z_s = cap_s(a_s s_i) the student's
    transform of :func:`kd_loss` (student only: the teacher arrives as log-probabilities), the
    teacher's ids i_1..i_K and probabilities p_k = exp(lp_k)::

        loss_i = hard_weight * CE(z_s, y_i) + soft_weight * T^2 * D(P, Q)

    Re-tempering: the log-probs were stored at T_gen = ``teacher_temperature`` (required: stored
    log-probs do not carry their temperature, and assuming T_gen = T silently re-tempers
    log-probs stored at 1.0 when T != 1). With a = T_gen / T, the tail mass t = 1 - sum p
    (floored at 0) is taken as spread uniformly over the V - K missing tokens and every
    probability raised to the power a:
    p'_k = p_k^a / Z, t' = (V - K) (t / (V - K))^a / Z, Z = sum p_k^a + (V - K) (t / (V - K))^a.
    Exact if the teacher's tail is uniform (whatever it is, when a = 1). No tail when K = V or
    t = 0.

    ``tail`` decides P and Q:

    ===============  ============================================================================
    ``bucket``       K + 1 outcomes: P = (p'_1..p'_K, t'), Q = (q_{i_1}..q_{i_K}, 1 - sum_k q_{i_k})
                     (the student's mass off the support is its (K + 1)-th bucket). Default.
    ``renormalize``  K outcomes, both renormalised over the support: P = p' / sum p',
                     Q = softmax of the K gathered student logits / T (the gradient lives on the
                     support only).
    ``ignore``       K outcomes as they are (unnormalised): P = p'_S, Q = q_S, D's formulas
                     summed over the support (kl with sum p = 1: dD/ds_j = (q_j - p_j) / T on the
                     support, q_j / T elsewhere).
    ===============  ============================================================================

    ``D`` is any of :func:`kd_loss`'s six divergences. With K = V and ``bucket`` or
    ``renormalize`` the loss equals ``kd_loss`` on the dense teacher log-probs (at T_gen).

    Args:
        student_logits: (..., V) float16 / bfloat16 / float32 (float64: torch backend).
        teacher_topk_logprobs: (..., K) floating, 1 <= K <= V: the teacher's log-probabilities
            of its top-K tokens at ``teacher_temperature``. Entries equal to -inf (a row with
            fewer than K candidates, padded) are listed tokens of probability 0. A constant: if
            it requires grad the backends raise (the reference
            ``pydistill.reference.topk_divergence.topk_kd_loss`` differentiates it). Values that
            cannot be log-probabilities (an entry above 0, or a row summing above 1, beyond 0.02
            nats of rounding: e.g. raw logits stored by mistake) raise a ValueError on CPU
            tensors; GPU tensors are checked by ``pydistill.offline_kd_loss(validate=True)``.
        teacher_topk_indices: (..., K) int64 / int32 token ids in [0, V), distinct within each
            row the loss counts, in any order. Rows ``labels`` ignores are never read nor checked
            (a collated batch's padding rows may hold anything). Checked on CPU tensors; on CUDA
            (where checking would synchronise) an out-of-range id is never dereferenced and makes
            its row's loss and gradient NaN, and repeated ids in a counted row give an undefined
            result.
        tail: ``"bucket"`` | ``"renormalize"`` | ``"ignore"``, see the table.
        teacher_temperature: T_gen > 0 (finite), the temperature the log-probs were stored at:
            1.0 for ``log_softmax(logits)``. Required (None raises a ValueError); pass
            ``temperature`` itself to use stored log-probs as they are.
        divergence, temperature, beta, labels, ignore_index, hard_weight, soft_weight, t2,
        softcap, student_logit_scale, student_softcap, reduction, backend: as in
            :func:`kd_loss` (``softcap`` is ``student_softcap`` here: the transform applies to
            the student logits only; ``labels`` has the leading dims of ``student_logits``).
            The Triton backend takes K <= 4096.

    Returns:
        The loss, float32 (float64 for float64 inputs); the gradient comes back in the dtype of
        the student logits. The student's off-support mass is computed as a logsumexp over the
        off-support logits, not as 1 - sum q (which cancels when the support holds nearly all
        of q), and the teacher's as 1 - sum p in float64.
    """
    if softcap is not None and student_softcap is not None:
        raise ValueError(f"softcap: the shorthand for student_softcap here, got softcap={softcap} "
                         f"together with student_softcap={student_softcap}; give one form")
    cfg = topk_config(
        tail=tail, teacher_temperature=teacher_temperature, divergence=divergence,
        temperature=temperature, beta=beta, ignore_index=ignore_index, hard_weight=hard_weight,
        soft_weight=soft_weight, t2=t2, student_logit_scale=student_logit_scale,
        student_softcap=softcap if softcap is not None else student_softcap, reduction=reduction,
    )
    check.topk_inputs("student_logits", student_logits, "teacher_topk_logprobs",
                      teacher_topk_logprobs, "teacher_topk_indices", teacher_topk_indices,
                      labels=labels, ignore_index=cfg.ignore_index)
    if cfg.hard_weight != 0.0 and labels is None:
        raise ValueError(f"labels: required when hard_weight != 0 (got hard_weight={cfg.hard_weight})")
    labels = check.labels(
        "labels", labels, student_logits.shape[:-1], "student_logits", student_logits,
        vocab=student_logits.shape[-1], ignore_index=cfg.ignore_index,
        check_range=cfg.hard_weight != 0.0,
    )
    cfg = full_support_config(cfg, teacher_topk_logprobs.shape[-1], student_logits.shape[-1])
    backend = _dispatch.resolve(
        "topk_kd_loss", backend, student_logits.device,
        (student_logits.dtype, teacher_topk_logprobs.dtype),
    )
    if teacher_topk_logprobs.requires_grad and torch.is_grad_enabled():
        refuse_teacher_grad(backend)
    return _custom_ops.topk_kd_loss(student_logits, teacher_topk_logprobs, teacher_topk_indices,
                                    labels, cfg, backend)


def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    teacher_topk=None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size="auto",
    process_group=None,
    vocab_mismatch: str = "restrict",
    tail: str = "bucket",
    teacher_temperature: Optional[float] = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    t2: bool = True,
    softcap: Optional[float] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    reduction: str = "mean",
    return_entropy: bool = False,
    return_components: bool = False,
    backend: str = "auto",
):
    r"""Distillation loss fused with the student's LM head: ``kd_loss`` on
    ``student_hidden @ student_weight^T (+ student_bias)`` without materialising the (N, V)
    logits beyond one chunk of rows.

    Per row i (every leading position of ``student_hidden``)::

        s_i = h_i W_s^T + b_s                        (V_s)    student logits
        t_i = teacher (one of the three kinds below)  (V_t)
        loss_i = hard_weight * CE(cap(s_i), y_i) + soft_weight * T^2 * D(p_i, q_i)

    exactly :func:`kd_loss`'s per-row loss (its six divergences, temperature, ``t2``, hard CE,
    the per-model logit transforms, ``ignore_index``, reductions). When V_s != V_t (padded
    vocabularies, e.g. a teacher head padded to 152064 rows beside a student's 151936),
    ``vocab_mismatch`` decides; see below.

    The teacher is exactly one of:

    - ``teacher_hidden`` (..., H_t) + ``teacher_weight`` (V_t, H_t) (+ ``teacher_bias`` (V_t,)):
      its logits are computed chunk by chunk as well; H_t may differ from H_s, and its dtype
      from the student's;
    - ``teacher_logits`` (..., V_t);
    - ``teacher_topk`` = (log-probs (..., K), token ids (..., K)): the offline top-k teacher of
      :func:`topk_kd_loss`, with its ``tail`` and ``teacher_temperature`` (which apply only to
      it).

    Args:
        student_hidden: (..., H_s) float16 / bfloat16 / float32 (float64: torch backend).
        student_weight: (V_s, H_s), the dtype of ``student_hidden``. Frozen (requires_grad
            False): no weight gradient is computed or allocated.
        teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk: the teacher,
            see above. A constant unless its tensors require grad; then their gradients are
            computed too (not for ``teacher_topk``: an error).
        student_bias: optional (V_s,), the dtype of ``student_weight``.
        chunk_size: rows per chunk (a positive int), or ``"auto"``: as many rows as fit a
            fixed budget for the chunk's buffers (two (C, V) float32 logits, plus the (C, V)
            gradient in the weight's dtype for bfloat16 / float16): 64 MiB on the CPU, 0.5 GB
            on a GPU (384 rows at V = 128256), or the bytes in the environment variable
            ``PYDISTILL_AUTO_CHUNK_BYTES``; never the momentarily free memory, so the chunks,
            and the rounding of a bfloat16 d(weight) accumulated over them, are the same from
            call to call and machine to machine. Peak extra memory: the gradients plus the
            chunk's buffers.
            ``"tiled"``: the tiled ("flash") Triton kernels (kernels/linear_kd.py), which write
            no logits tile to memory: the forward keeps 8 floats per row, the backward
            recomputes the logits tiles (so it may run more than once) and accumulates
            d(hidden), d(weight), d(bias) with float32 atomics (not bitwise reproducible).
            Extra memory: O(N) for float32 heads; for bfloat16 / float16 heads also a float32
            d(hidden) (N x H_s) and a float32 d(weight) slab of at most 128 MiB. It costs 6
            logits-sized GEMMs for kl / reverse_kl and 8 for the other divergences, against the
            chunked path's 4. Implemented for a student head with a teacher head or teacher
            logits that need no gradient, whole heads, ``backend="triton"``; anything else (a
            top-k teacher, a teacher that requires grad, ``process_group``, the torch
            backend, a temperature above 4, where the tiled forward's online value would lose
            precision as T^2 eps) runs the chunked path at ``"auto"`` instead. ``"auto"`` stays chunked until
            a GPU measures which is faster where.
        process_group: vocabulary parallelism. ``student_weight`` / ``student_bias`` (and
            ``teacher_weight`` / ``teacher_bias`` or ``teacher_logits``) hold this rank's
            contiguous block of vocabulary rows, the blocks in rank order (ragged sizes
            allowed); hidden states and labels (global token ids) are replicated. Rank r's
            block covers global columns [o_r, o_r + w_r), w_r = max(its student rows, its
            teacher rows) and o_r the sum of the lower ranks' w; a model whose shard is shorter
            than w_r is -inf on the rest of the block. So the result equals the unsharded loss
            when student and teacher are sharded alike, or when the shorter vocabulary falls
            short only at its end (e.g. V_s = 32000 as 16032 + 15968 against V_t = 32064 as
            16032 + 16032). Loss, d(hidden) (summed over ranks) and each rank's weight / bias /
            logits gradient equal the unsharded ones. The row maxima, exp-sums, divergence
            partials and the hard term's target log-probability are all-reduced per chunk, with
            the closed-form PyTorch step whatever ``backend`` says (the kernel's passes would
            need the collectives between them). Every rank must call it, with the same rows.
            ``chunk_size="auto"`` agrees on the rows per chunk with one all-reduce and one host
            read per call; pass an int to avoid that sync. Labels are not range-checked.
        vocab_mismatch: what V_s != V_t (a teacher head or teacher logits) means.
            ``"restrict"`` (default): the teacher is restricted to the student's vocabulary: a
            longer teacher is truncated to its first V_s logits and renormalised there (its
            extra tokens, padding rows of the head, carry no probability), a shorter one is
            -inf beyond its end (zero probability and no gradient there). ``"pad"``: the
            shorter side is -inf beyond its end, V = max(V_s, V_t): a teacher with tokens the
            student lacks then makes ``kl`` (and the soft term of jsd's endpoints / skew_kl
            where they reduce to it) infinite, as the math says; a student with extra tokens
            makes ``reverse_kl`` infinite. ``"error"``: V_s != V_t raises a ValueError naming
            both sizes. A top-k teacher's ids index the student vocabulary: no effect there.
            With ``process_group`` the sizes are those of each rank's blocks: ``"restrict"``
            and ``"error"`` then need every rank's student and teacher blocks of one size
            (checked across the ranks with one host read per call; all ranks raise together),
            and ``"pad"`` is the sharded convention described under ``process_group``.
        tail, teacher_temperature: ``teacher_topk`` only (see :func:`topk_kd_loss`);
            ``teacher_temperature`` is required with it (the temperature its log-probs were
            stored at, e.g. 1.0).
        divergence, temperature, beta, labels, ignore_index, hard_weight, soft_weight, t2,
        softcap, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap,
        reduction: as in :func:`kd_loss` (the transforms apply to the computed logits
            z = h W^T + b, the teacher's to its head or given logits; a top-k teacher takes
            none); ``labels`` has the leading dims of ``student_hidden`` and indexes the
            student vocabulary.
        return_entropy: also return the student's per-row entropy -sum q log q (nats) of
            q = softmax(z_s / T), computed in the same pass (the TRL trainer logs it): shape
            the leading dims, float32 (float64 for float64 inputs), 0 on ignored rows, no
            gradient. For a teacher head or teacher logits; not with ``teacher_topk`` or
            ``process_group``.
        return_components: also return the loss's two terms from the same pass, as
            ``(loss, parts)`` with ``parts`` a dict of detached tensors, float32 (float64 for
            float64 inputs), each reduced exactly as the loss is (mean over the counted rows,
            sum, or per row for ``"none"``, 0 on ignored rows), so that
            ``loss == soft_weight * parts["kd"] + hard_weight * parts["ce"]``:
            ``parts["kd"]`` the soft term T^2 * D (D without ``t2``), not weighted by
            ``soft_weight``; ``parts["ce"]`` the hard cross-entropy CE(cap(s_i), y_i), not
            weighted by ``hard_weight``, present whenever ``labels`` are given (then computed
            even at ``hard_weight=0``, labels range-checked; 0, not NaN, when no row counts).
            With ``return_entropy`` too the entropy is ``parts["entropy"]`` and the return is
            still ``(loss, parts)``. Every teacher kind and chunk size; not with
            ``process_group``. The soft term comes from the step's own per-row losses
            (less the hard term, computed here from the chunk's logits: one more read of
            them), so at ``soft_weight=0`` (no soft term in the loss) the chunked path runs
            a loss-only divergence step for it, and ``"tiled"`` runs chunked.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``. Both run the chunked algorithm and
            differ in the per-chunk divergence step: the Triton kernel of :func:`kd_loss`
            (writing the gradient over the chunk's float32 logits) or its closed form in PyTorch
            (any device, float64 too). Only Triton has the tiled path (``chunk_size``).

    Returns:
        The loss, float32 (float64 for float64 inputs); ``(loss, entropy)`` with
        ``return_entropy``; ``(loss, parts)`` with ``return_components``. Gradients come back in
        the dtype of each input. The logits GEMMs accumulate and output float32 (never rounded to bfloat16
        before the softmax); the gradient GEMMs run in the weight's dtype from one rounding of
        the logits' gradient, and the weight gradient accumulates in the weight's dtype, one
        rounding per chunk (pydistill/reference/linear_kd.py has the measured errors). As with
        ``kd_loss(backend="torch")``, the chunked path computes the gradients in the forward
        pass and the backward scales them by grad_output, so a scalar loss can be
        back-propagated once (``reduction="none"`` and ``chunk_size="tiled"`` recompute in the
        backward instead).
    """
    kd_kwargs = dict(
        divergence=divergence, temperature=temperature, beta=beta, ignore_index=ignore_index,
        hard_weight=hard_weight, soft_weight=soft_weight, t2=t2, softcap=softcap,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, reduction=reduction,
    )
    return_entropy = check.boolean("return_entropy", return_entropy)
    return_components = check.boolean("return_components", return_components)
    if teacher_topk is not None:
        if teacher_logit_scale != 1.0 or teacher_softcap is not None:
            raise ValueError(
                "teacher_logit_scale / teacher_softcap: a top-k teacher arrives as log-probs and "
                f"takes no logit transform, got teacher_logit_scale={teacher_logit_scale}, "
                f"teacher_softcap={teacher_softcap}")
        if return_entropy:
            raise ValueError("return_entropy: not supported with teacher_topk (a teacher head or "
                             "teacher logits only)")
        if softcap is not None:  # the shorthand means the student's cap for a top-k teacher
            if student_softcap is not None:
                raise ValueError(f"softcap: the shorthand for student_softcap with teacher_topk, got "
                                 f"softcap={softcap} together with student_softcap={student_softcap}; "
                                 f"give one form")
            kd_kwargs.update(softcap=None, student_softcap=softcap)
        cfg = topk_config(tail=tail, teacher_temperature=teacher_temperature, **kd_kwargs)
        # (a vocabulary shard's rows are not V; malformed arguments are reported further on)
        shapes_known = (isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2
                        and isinstance(teacher_topk[0], torch.Tensor)
                        and isinstance(student_weight, torch.Tensor) and student_weight.dim() == 2)
        if process_group is None and shapes_known:
            cfg = full_support_config(cfg, teacher_topk[0].shape[-1], student_weight.shape[0])
    else:
        cfg = kd_config(**kd_kwargs)
        check.choice("tail", tail, TAILS)
        if teacher_temperature is not None:
            raise ValueError(
                f"teacher_temperature: applies only to teacher_topk (the temperature its "
                f"log-probs were stored at), got {teacher_temperature} with another teacher"
            )
    check.linear_head("student_hidden", student_hidden, "student_weight", student_weight,
                      "student_bias", student_bias)
    lead = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    _one_teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk)
    floating = [student_hidden, student_weight, student_bias]
    if teacher_weight is not None:
        check.linear_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight,
                          "teacher_bias", teacher_bias)
        check.leading_dims("teacher_hidden", teacher_hidden, lead, "student_hidden", student_hidden)
        floating += [teacher_hidden, teacher_weight, teacher_bias]
    elif teacher_logits is not None:
        check.tensor("teacher_logits", teacher_logits)
        check.leading_dims("teacher_logits", teacher_logits, lead, "student_hidden", student_hidden)
        if teacher_logits.shape[-1] == 0:
            raise ValueError(f"teacher_logits: expected a vocabulary size V >= 1, got shape {tuple(teacher_logits.shape)}")
        floating.append(teacher_logits)
    else:
        _check_topk_teacher(teacher_topk, student_hidden, vocab, process_group, labels,
                            cfg.ignore_index)
        floating.append(teacher_topk[0])
    if cfg.hard_weight != 0.0 and labels is None:
        raise ValueError(f"labels: required when hard_weight != 0 (got hard_weight={cfg.hard_weight})")
    vocab_mismatch = check.choice("vocab_mismatch", vocab_mismatch, VOCAB_MISMATCH)
    if return_components and process_group is not None:
        raise ValueError("return_components: not supported with a process_group (whole heads only)")
    group = check.process_group("process_group", process_group)
    if return_entropy and group is not None:
        raise ValueError("return_entropy: not supported with a process_group (whole heads only)")
    labels = check.labels(
        "labels", labels, lead, "student_hidden", student_hidden, vocab=vocab,
        ignore_index=cfg.ignore_index,
        check_range=(cfg.hard_weight != 0.0 or return_components) and group is None,
    )
    chunk_size = check.chunk_size("chunk_size", chunk_size)
    topk_logprobs, topk_indices = teacher_topk if teacher_topk is not None else (None, None)
    equal_blocks = None
    if teacher_topk is None:
        vocab_t = teacher_weight.shape[0] if teacher_weight is not None else teacher_logits.shape[-1]
        if group is not None:
            equal_blocks = vocab_mismatch if vocab_mismatch != "pad" else None
        elif vocab_t != vocab and vocab_mismatch == "error":
            raise ValueError(
                f"vocab_mismatch='error': the student's vocabulary has V_s = {vocab} tokens "
                f"(student_weight rows), the teacher's V_t = {vocab_t} "
                f"({'teacher_weight rows' if teacher_weight is not None else 'teacher_logits columns'})")
        elif vocab_t > vocab and vocab_mismatch == "restrict":
            # the teacher's first V_s logits (views: no copy; autograd carries any teacher
            # gradient back to the whole tensors, zero on the dropped rows)
            if teacher_weight is not None:
                teacher_weight = teacher_weight[:vocab]
                teacher_bias = teacher_bias[:vocab] if teacher_bias is not None else None
            else:
                teacher_logits = teacher_logits[..., :vocab]
    backend = _dispatch.resolve(
        "linear_kd_loss", backend, student_hidden.device, tuple(x.dtype for x in floating if x is not None)
    )
    plan = ChunkPlan(chunk_size=chunk_size, group=group, entropy=return_entropy,
                     components=return_components, equal_blocks=equal_blocks)
    tensors = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
               teacher_bias, teacher_logits, topk_logprobs, topk_indices)
    out = _custom_ops.linear_kd_loss(cfg, plan, labels, tensors, backend)
    if not return_components:
        return out
    loss, kd, ce, *entropy = out
    parts = {"kd": kd.detach()}
    if labels is not None:
        parts["ce"] = ce.detach()
    if entropy:
        parts["entropy"] = entropy[0]
    return loss, parts


def _one_teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk):
    """Exactly one teacher kind, each complete."""
    if (teacher_hidden is None) != (teacher_weight is None):
        given, missing = ("teacher_hidden", "teacher_weight") if teacher_weight is None else (
            "teacher_weight", "teacher_hidden")
        raise ValueError(f"{missing}: required with {given} (the teacher's logits are "
                         f"teacher_hidden @ teacher_weight^T), got None")
    if teacher_bias is not None and teacher_weight is None:
        raise ValueError("teacher_bias: applies only to a teacher given as teacher_hidden + "
                         "teacher_weight, got a bias without them")
    given = [name for name, x in (("teacher_hidden + teacher_weight", teacher_weight),
                                  ("teacher_logits", teacher_logits),
                                  ("teacher_topk", teacher_topk)) if x is not None]
    if len(given) != 1:
        raise ValueError(
            "teacher: expected exactly one of teacher_hidden + teacher_weight, teacher_logits, "
            f"teacher_topk; got {' and '.join(given) if given else 'none'}"
        )


def _check_topk_teacher(teacher_topk, student_hidden, vocab: int, process_group, labels,
                        ignore_index: int):
    """A (log-probs, ids) pair checked as topk_kd_loss checks it, against the student logits'
    shape (a zero-stride view: nothing is materialised); a constant, on whole heads."""
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError(
            "teacher_topk: expected a pair (logprobs (..., K), indices (..., K)), got "
            f"{type(teacher_topk).__name__}" + (f" of length {len(teacher_topk)}"
                                                 if isinstance(teacher_topk, (tuple, list)) else "")
        )
    logprobs, indices = teacher_topk
    shape = student_hidden.new_empty(()).expand(*student_hidden.shape[:-1], vocab)
    check.topk_inputs("student logits (student_hidden @ student_weight^T)", shape,
                      "teacher_topk[0] (logprobs)", logprobs, "teacher_topk[1] (indices)", indices,
                      labels=labels, ignore_index=ignore_index)
    if logprobs.requires_grad:
        raise ValueError("teacher_topk: gradients w.r.t. the top-k teacher's log-probs are not "
                         "supported by linear_kd_loss; pass teacher_topk[0].detach()")
    if process_group is not None:
        raise ValueError("process_group: not supported with teacher_topk (the top-k ids index the "
                         "whole vocabulary)")


# ---------------------------------------------------------------------------------------------
# attention-map distillation: MiniLM attention transfer, MiniLMv2 relations, TinyBERT scores
# ---------------------------------------------------------------------------------------------


def attention_config(*, loss="kl", causal=False, student_scale=None, teacher_scale=None,
                     reduction="mean") -> AttentionKDConfig:
    """Validate the hyper-parameters of ``attention_kd_loss``; a scale left None stays None
    until the head dims are known (``with_scales``)."""
    return AttentionKDConfig(
        loss=check.choice("loss", loss, ATTENTION_LOSSES),
        causal=check.boolean("causal", causal),
        student_scale=None if student_scale is None else check.real(
            "student_scale", student_scale, low=0.0, low_open=True),
        teacher_scale=None if teacher_scale is None else check.real(
            "teacher_scale", teacher_scale, low=0.0, low_open=True),
        reduction=check.choice("reduction", reduction, ATTENTION_REDUCTIONS),
    )


def attention_kd_loss(
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    *,
    loss: str = "kl",
    attention_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    student_scale: Optional[float] = None,
    teacher_scale: Optional[float] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Attention-map distillation from queries and keys, without forming the L x L maps.

    Per batch b, query head h, query row i and key j (key head h // (H / H_k) of each model:
    grouped-query attention)::

        s_ij = student_scale <Q_s,i, K_s,j>      t_ij = teacher_scale <Q_t,i, K_t,j>
        allowed(i, j) = attention_mask[b, j] == 1  and  (j <= i if causal)

    ``loss``:

    ================  =========================================================================
    ``kl``            MiniLM's attention transfer: p_i = softmax over the allowed j of t_i,
                      q_i the same of s_i, row_i = KL(p_i || q_i). Only valid query rows
                      (attention_mask[b, i] == 1) count; ``mean`` divides the sum by
                      H * (number of valid (b, i)), i.e. the mean over heads and valid rows
                      (0 when no row is valid). A valid row always attends at least itself,
                      so no counted row is empty, with ``causal`` and a mask together too; a
                      padded row is 0 whether or not it has keys.
    ``mse_scores``    TinyBERT: row_i = sum_j (s_ij - t_ij)^2 over the allowed j (disallowed
                      entries are 0 in both maps), every query row counted, padded ones
                      included (TinyBERT's own code; TextBrewer's ``att_mse`` also drops padded
                      rows); ``mean`` divides by B H L L. Computed from (d_s + d_t)-sized Gram
                      matrices (sum_ij (a_ij - b_ij)^2 as traces of d x d products), O(L d^2)
                      work; its float32 error is relative to sum (|s| + |t|)^2, not to the loss.
    ================  =========================================================================

    Args:
        student_q: (B, H, L, d_s) float16 / bfloat16 / float32 (float64: torch backend).
        student_k: (B, H_k, L, d_s), H_k dividing H; the student's dtype.
        teacher_q: (B, H, L, d_t): the same B, L and H; d_t may differ from d_s.
        teacher_k: (B, H_kt, L, d_t), H_kt dividing H. The teacher may have another dtype
            than the student. It is a constant for ``kl`` on the Triton backend (a teacher
            that requires grad is an error there); the torch backend and ``mse_scores``
            differentiate it.
        loss: ``"kl"`` (default) or ``"mse_scores"``, see the table.
        attention_mask: (B, L) bool or integer, 1 = attend / a real token, 0 = padding
            (Hugging Face's ``attention_mask``; float masks are refused, an additive one would
            read inverted). Applies to keys (both losses) and to query rows (``kl``).
            Positions it masks are never read for ``kl`` (they may hold anything, NaN
            included); for ``mse_scores`` their queries count, their keys are not read.
        causal: also mask the keys j > i.
        student_scale, teacher_scale: score scales > 0; default 1 / sqrt(d) of each model.
        reduction: ``"mean"`` (see the table), ``"sum"``, or ``"none"``: the (B, H, L) rows
            row_i (0 on padded rows for ``kl``), whose sum is the ``sum`` reduction.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``; ``PYDISTILL_BACKEND`` replaces
            ``auto``. ``mse_scores`` runs the same GEMM closed form on every backend. The
            Triton kernels take head dims up to 256.

    Returns:
        The loss, float32 (float64 for float64 inputs); gradients in the inputs' dtypes. The
        scores are computed in float32 under ``torch.autocast`` too (autocast is turned off
        inside, in the forward and in the backward, even a ``backward()`` called inside the
        region; half inputs are upcast as without it). ``mse_scores`` is first-order only (a
        second derivative raises). An
        empty batch gives 0 with zero gradients; NaN in a counted position propagates. With
        ``kl`` on the Triton backend the gradient of student_q is summed with float32
        atomics (not bitwise reproducible from run to run).
    """
    cfg = attention_config(loss=loss, causal=causal, student_scale=student_scale,
                           teacher_scale=teacher_scale, reduction=reduction)
    check.attention_inputs(("student_q", "student_k", "teacher_q", "teacher_k"),
                           student_q, student_k, teacher_q, teacher_k)
    attention_mask = check.attention_mask("attention_mask", attention_mask, student_q.shape[0],
                                          student_q.shape[2], "student_q", student_q)
    cfg = with_scales(cfg, student_q.shape[-1], teacher_q.shape[-1])
    backend = _dispatch.resolve("attention_kd_loss", backend, student_q.device,
                                (student_q.dtype, teacher_q.dtype))
    if backend == "triton" and cfg.loss == "kl":
        from pydistill.ops.attention_kd import MAX_HEAD_DIM, refuse_teacher_grad

        for name, x in (("student_q", student_q), ("teacher_q", teacher_q)):
            if x.shape[-1] > MAX_HEAD_DIM:
                raise ValueError(f"{name}: backend='triton' takes head dims up to {MAX_HEAD_DIM}, "
                                 f"got {x.shape[-1]}; use backend='torch'")
        if (teacher_q.requires_grad or teacher_k.requires_grad) and torch.is_grad_enabled():
            refuse_teacher_grad(backend)
    with autocast_off(student_q.device):  # the score GEMMs stay float32 (Returns)
        if cfg.loss == "mse_scores":
            return mse_scores_loss(student_q, student_k, teacher_q, teacher_k, attention_mask, cfg)
        return _custom_ops.attention_kd_loss(student_q, student_k, teacher_q, teacher_k,
                                             attention_mask, cfg, backend)


def relation_kd_loss(
    student_x,
    teacher_x,
    *,
    num_relation_heads: int,
    attention_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""MiniLMv2's multi-head self-attention relation distillation.

    Each model's concatenated-head projection x (B, L, W) (e.g. its queries, all heads side by
    side) is re-split into R = ``num_relation_heads`` relation heads of width d_r = W / R (the
    widths, hence d_r, may differ between the models; R is shared), and per relation head::

        relation = softmax_j(<x_i, x_j> / sqrt(d_r))          (the self-attention relation)
        loss     = KL(teacher relation || student relation)

    i.e. ``attention_kd_loss(x_s, x_s, x_t, x_t, loss="kl")`` on the re-split inputs, with its
    conventions (mask, causal, ``mean`` over relation heads and valid rows). Given tuples
    (e.g. (Q, K, V) of both models) the relations are formed per pair (Q-Q, K-K, V-V) and their
    losses summed, as in the MiniLMv2 paper (all relation weights 1).

    Args:
        student_x: (B, L, W_s) float tensor, or a tuple / list of them.
        teacher_x: (B, L, W_t), or a tuple / list of the same length as ``student_x``.
        num_relation_heads: R >= 1, dividing every W.
        attention_mask, causal, reduction, backend: as in :func:`attention_kd_loss`
            (``reduction="none"``: (B, R, L), summed over the relations).

    Returns:
        The loss, float32 (float64 for float64 inputs).
    """
    heads = check.integer("num_relation_heads", num_relation_heads)
    if heads < 1:
        raise ValueError(f"num_relation_heads: expected an int >= 1, got {heads}")
    pairs = _relation_pairs(student_x, teacher_x)
    total = None
    for k, (xs, xt) in enumerate(pairs):
        tag = f"[{k}]" if isinstance(student_x, (tuple, list)) else ""
        split = []
        for name, x in ((f"student_x{tag}", xs), (f"teacher_x{tag}", xt)):
            check.tensor(name, x)
            if x.dim() != 3:
                raise ValueError(f"{name}: expected shape (B, L, W), got {tuple(x.shape)}")
            if x.shape[-1] % heads != 0:
                raise ValueError(f"{name}: expected a width W divisible by num_relation_heads = "
                                 f"{heads}, got W = {x.shape[-1]}")
            split.append(x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2))
        if xt.shape[:2] != xs.shape[:2]:
            raise ValueError(f"teacher_x{tag}: expected shape ({xs.shape[0]}, {xs.shape[1]}, W) (B and L "
                             f"of student_x{tag}), got {tuple(xt.shape)}")
        (s, t) = split
        term = attention_kd_loss(s, s, t, t, loss="kl", attention_mask=attention_mask,
                                 causal=causal, reduction=reduction, backend=backend)
        total = term if total is None else total + term
    return total


def _relation_pairs(student_x, teacher_x):
    """[(student, teacher), ...] from two tensors or two sequences of equal length >= 1."""
    seqs = [isinstance(x, (tuple, list)) for x in (student_x, teacher_x)]
    if seqs[0] != seqs[1]:
        raise TypeError("teacher_x: expected the same kind as student_x (a tensor, or a tuple / list "
                        f"of tensors), got {type(teacher_x).__name__} for {type(student_x).__name__}")
    if not seqs[0]:
        return [(student_x, teacher_x)]
    if len(student_x) == 0 or len(teacher_x) != len(student_x):
        raise ValueError(f"teacher_x: expected {len(student_x)} tensors (as many as student_x, at least "
                         f"one), got {len(teacher_x)}")
    return list(zip(student_x, teacher_x))


# ---------------------------------------------------------------------------------------------
# representation distillation: attention transfer, FitNets hints, relational KD
# (one PyTorch implementation on every device, pydistill/reference/representation.py: a few
# GEMMs and elementwise ops, so these take no ``backend=``)
# ---------------------------------------------------------------------------------------------


def attention_transfer_loss(student_features, teacher_features, *, p: float = 2,
                            mode: str = "code") -> torch.Tensor:
    r"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017) between CNN feature maps.

    Per sample b, the attention map of features x (B, C, *spatial) is the channel mean of
    |x|^p over the flattened positions, L2-normalised (``F.normalize``, eps 1e-12)::

        at(x)_b = normalize(mean_c |x_{b,c,:}|^p)
        mode="code":   mean over (b, position) of (at(s) - at(t))^2
        mode="paper":  mean over b of || at(s)_b - at(t)_b ||_2     (the norm, not squared)

    Conventions. Both modes are torchdistill's ``ATLoss`` modes, value and gradient (to
    float64 rounding): ``"code"`` is the authors' ``utils.at_loss``, ``"paper"`` Eq. (2) of
    the paper. The paper weights the sum over layers by beta / 2 (beta = 1000), which
    torchdistill's modes and this function leave to the caller (multiply the result).
    torchdistill's ``"paper"`` map sums over channels where ``"code"`` averages: identical
    after the normalisation, so both modes average here. Its maps are always x^2; ``p`` is
    the paper's F^p_sum exponent (p = 2 computes x^2, other p |x|^p, whose gradient at x = 0
    is NaN for p < 1). The maps are computed from x / max |x| per sample (the eps rescaled to
    match), so features of any scale (1e20 in float32) give the finite result of the formula
    instead of an overflowing |x|^p.

    Args:
        student_features: (B, C_s, *spatial) floating tensor (at least 3 dims), or a list /
            tuple of them, one per layer.
        teacher_features: (B, C_t, *spatial) with the student's batch and spatial dims
            (channels may differ), or a list / tuple of the same length. With lists the loss
            is the sum of the per-layer losses (torchdistill's ``at_pairs`` with weight 1;
            each layer's mean is over its own batch, which is what torchdistill computes when
            every layer has the same B). Its gradient is computed if it requires grad.
        p: exponent > 0 of the attention map (default 2).
        mode: ``"code"`` (default) or ``"paper"``.

    Returns:
        A 0-dim float32 tensor (float64 if an input is float64); half inputs are computed in
        float32, under ``torch.autocast`` too. An empty batch (B = 0) gives 0 with a zero
        gradient; NaN propagates.
    """
    p = check.real("p", p, low=0.0, low_open=True)
    mode = check.choice("mode", mode, AT_MODES)
    if isinstance(student_features, (list, tuple)) or isinstance(teacher_features, (list, tuple)):
        for name, x in (("student_features", student_features), ("teacher_features", teacher_features)):
            if not isinstance(x, (list, tuple)):
                raise TypeError(f"{name}: expected a list / tuple of tensors like the other "
                                f"features argument, got {type(x).__name__}")
        if len(student_features) == 0 or len(teacher_features) != len(student_features):
            raise ValueError(f"teacher_features: expected {len(student_features)} feature maps "
                             f"(one per entry of student_features, at least one), got "
                             f"{len(teacher_features)}")
        for i, (s, t) in enumerate(zip(student_features, teacher_features)):
            check.feature_maps(f"student_features[{i}]", s, f"teacher_features[{i}]", t)
            check.same_device(f"student_features[{i}]", s, "student_features[0]", student_features[0])
    else:
        check.feature_maps("student_features", student_features, "teacher_features", teacher_features)
    return representation.attention_transfer_loss(student_features, teacher_features, p, mode)


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
              regressor=None) -> torch.Tensor:
    r"""FitNets hint loss (Romero et al., ICLR 2015): the mean squared error between the
    (regressed) student features and the teacher's::

        loss = mean over all elements of (regressor(s) - t)^2       (regressor None: s)

    Conventions. The mean over elements is torchdistill's FitNets (``nn.MSELoss`` between its
    regressor's output and the teacher's hint layer); the paper writes 1/2 ||t - r(s)||^2
    summed, i.e. (number of elements) / 2 times this.

    The regressor. A function cannot own trainable parameters across calls, so this one only
    applies what it is given: ``regressor`` is any callable (usually an ``nn.Module`` that the
    optimiser already holds). For a built-in one use the Module :class:`pydistill.HintLoss`
    ``(student_channels, teacher_channels)``, which owns a 1x1 convolution for (B, C, H, W)
    features and a linear map over the last dim otherwise
    (:class:`pydistill.modules.HintRegressor`, also usable on its own here).

    Args:
        student_features: floating tensor, any shape.
        teacher_features: floating tensor of the shape of ``regressor(student_features)``
            (of ``student_features`` when ``regressor`` is None). Its gradient is computed if
            it requires grad.
        regressor: None or a callable mapping the student features to a tensor of the
            teacher's shape.

    Returns:
        A 0-dim float32 tensor (float64 if an input is float64), under ``torch.autocast`` too;
        the regressor runs under the caller's autocast (it is a layer of the student). No
        elements (e.g. B = 0): 0 with a zero gradient. NaN propagates.
    """
    check.tensor("student_features", student_features)
    check.tensor("teacher_features", teacher_features)
    check.same_device("teacher_features", teacher_features, "student_features", student_features)
    if regressor is not None and not callable(regressor):
        raise TypeError(f"regressor: expected None or a callable (e.g. an nn.Module), got "
                        f"{type(regressor).__name__}")
    if regressor is None:
        if teacher_features.shape != student_features.shape:
            raise ValueError(
                f"teacher_features: expected shape {tuple(student_features.shape)} (that of "
                f"student_features; pass regressor= to map the student features to the teacher's "
                f"shape, or use pydistill.HintLoss(student_channels, teacher_channels), which owns "
                f"one), got {tuple(teacher_features.shape)}")
        return representation.hint_loss(student_features, teacher_features)
    regressed = regressor(student_features)
    check.tensor("regressor(student_features)", regressed)
    if regressed.shape != teacher_features.shape:
        raise ValueError(f"teacher_features: expected shape {tuple(regressed.shape)} (that of "
                         f"regressor(student_features)), got {tuple(teacher_features.shape)}")
    check.same_device("regressor(student_features)", regressed, "teacher_features", teacher_features)
    return representation.hint_loss(regressed, teacher_features)


def rkd_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor, *,
             distance_weight: float = 1.0, angle_weight: float = 2.0) -> torch.Tensor:
    r"""Relational knowledge distillation (Park et al., CVPR 2019): distance and angle terms.

    Embeddings are flattened to (B, D) (student and teacher D may differ)::

        d_ij  = ||x_i - x_j||, 0 on the diagonal;     psi_D = d / (mean of d_ij over i != j)
        e_ab  = (x_b - x_a) / ||x_b - x_a|| (0 if x_b = x_a);   psi_A(a, b, c) = <e_ab, e_ac>
        loss  = distance_weight * mean_{B^2 pairs} smooth_l1(psi_D(s) - psi_D(t))
              + angle_weight * mean_{B^3 triplets} smooth_l1(psi_A(s) - psi_A(t))

    smooth_l1 has beta = 1. Triplets with b = a or c = a (degenerate) are 0 in both models.

    Conventions. torchdistill's ``RKDLoss(dist_factor=1, angle_factor=2, reduction="mean")``
    and the authors' code, value and gradient (to float64 rounding on distinct embeddings):
    the means are over all B^2 pairs (diagonal included) and all B^3 triplets; distances are
    sqrt(max(squared distance, 1e-12)), so the "mean of the positive distances" is the mean
    over the B (B - 1) off-diagonal pairs; the weights 1 and 2 are the paper's and
    torchdistill's defaults. Two differences: torchdistill computes the teacher's relations
    under ``no_grad``, while here a teacher that requires grad gets its gradient (detach it to
    match); and pairs closer than the precision allows (about 2e-3 of the centred embedding
    norm in float32, 1e-7 in float64) count as coincident, direction 0 with no gradient, where
    torchdistill takes their rounded direction (and for exact duplicates a gradient scaled by
    1e12 through ``F.normalize``'s eps). Triplets on a line (|psi_A| within rounding of 1) get
    no gradient, as in exact arithmetic (cos is extremal there). Every relation is
    scale-invariant, so each model's embeddings are divided by their largest |entry| first (a
    constant for autograd; the distance floor is rescaled with them): any scale, 1e-20 or
    1e20, gives the loss and gradient of scale 1 (gradient divided by the scale).

    Memory. The angle term is computed from the squared-distance matrix (Gram form, no
    (B, B, D) difference tensor; no (B, B, B) angle tensor either: the triplets are produced
    in blocks of anchors, in the forward and again in the backward), so the extra memory is
    O(B^2) and the work O(B^2 D + B^3), against torchdistill's O(B^2 D + B^3) memory and
    O(B^3 D) batched matmul. Not twice differentiable.

    Args:
        student_embeddings: (B, ...) floating tensor, at least 2 dims, B >= 2 (relations need
            two samples; a smaller batch raises).
        teacher_embeddings: (B, ...) with the same B; its gradient is computed if it requires
            grad.
        distance_weight, angle_weight: finite weights >= 0 (1 and 2); a term whose weight is 0
            is not computed (then a NaN in it cannot reach the loss).

    Returns:
        A 0-dim float32 tensor (float64 if an input is float64); half inputs are computed in
        float32, under ``torch.autocast`` too, backward included (even a ``backward()`` called
        inside the region). First-order only (a second derivative raises). NaN anywhere in an
        input makes the loss NaN.
    """
    distance_weight = check.real("distance_weight", distance_weight, low=0.0)
    angle_weight = check.real("angle_weight", angle_weight, low=0.0)
    check.embeddings("student_embeddings", student_embeddings, "teacher_embeddings",
                     teacher_embeddings, min_batch=2)
    return representation.rkd_loss(student_embeddings, teacher_embeddings, distance_weight,
                                   angle_weight)


# ---------------------------------------------------------------------------------------------
# cross-tokenizer distillation: Universal Logit Distillation (ULD)
# ---------------------------------------------------------------------------------------------


def uld_config(*, temperature=1.0, top_k=None, ignore_index=-100, student_logit_scale=1.0,
               teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
               reduction="mean"):
    """Validate the hyper-parameters of ``uld_loss`` / ``linear_uld_loss`` (``top_k`` against
    the vocabularies later, once their sizes are known)."""
    from pydistill.reference.uld import ULD_REDUCTIONS, ULDConfig

    if top_k is not None:
        top_k = check.integer("top_k", top_k)
        if top_k < 1:
            raise ValueError(f"top_k: expected None (every rank) or an int >= 1, got {top_k}")
    return ULDConfig(
        temperature=check.real("temperature", temperature, low=0.0, low_open=True),
        top_k=top_k,
        ignore_index=check.integer("ignore_index", ignore_index),
        student_logit_scale=check.real("student_logit_scale", student_logit_scale, low=0.0,
                                       low_open=True),
        teacher_logit_scale=check.real("teacher_logit_scale", teacher_logit_scale, low=0.0,
                                       low_open=True),
        student_softcap=_cap("student_softcap", student_softcap),
        teacher_softcap=_cap("teacher_softcap", teacher_softcap),
        reduction=check.choice("reduction", reduction, ULD_REDUCTIONS),
    )


def _uld_top_k(top_k, vocab_s: int, vocab_t: int):
    if top_k is not None and top_k > min(vocab_s, vocab_t):
        raise ValueError(f"top_k: expected at most min(V_s, V_t) = {min(vocab_s, vocab_t)} (the "
                         f"smaller vocabulary; V_s = {vocab_s}, V_t = {vocab_t}), got {top_k}")


def _uld_vocab(name: str, x: torch.Tensor, what: str = "V") -> int:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape (..., {what}) with {what} >= 1, got {tuple(x.shape)}")
    return x.shape[-1]


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Universal Logit Distillation (Boizard et al. 2024): distillation between models whose
    tokenizers differ, vocabularies of any sizes, no token mapping.

    Per row i (an aligned position: the same text prefix for both models, e.g. from
    :mod:`pydistill.alignment`), with each model's logit transform
    z = cap(scale * logits), cap(y) = c tanh(y / c), applied before the temperature::

        q = softmax(z_s / T)  (V_s)       p = softmax(z_t / T)  (V_t)
        loss_i = sum_{j < K} |q_(j) - p_(j)|      q_(j), p_(j): the j-th largest, 0 past the end

    the Wasserstein-1 distance between the probabilities sorted in decreasing order, the
    shorter vector padded with zeros (K = max(V_s, V_t)), or, with ``top_k``, the first
    ``top_k`` ranks of both. Gradients flow through the sort (the permutation is a constant):
    d loss / d z_s,v = (1/T) q_v (g_rank(v) - S), g_j = sign(q_(j) - p_(j)), S = sum_j q_(j) g_j.

    Conventions, those of TRL's GOLD trainer (``trl.experimental.gold.ULDLoss``, matched to
    float32 rounding in the tests): softmax(logits / T) on each side and no T^2 factor (GOLD's
    two temperatures T_s, T_t: ``temperature=T_s, teacher_logit_scale=T_s / T_t``); no
    renormalisation over the top k (the probabilities are the full softmax; the truncated loss
    is the first ``top_k`` terms of the full one); ``mean`` over the counted rows (GOLD means
    over each sequence's positions, then over sequences: equal when they have equally many).
    GOLD always sorts the whole vocabulary (``top_k=None``). There is no hard term: add a
    cross-entropy yourself (GOLD's ``uld_crossentropy_weight``).

    Args:
        student_logits: (..., V_s) float16 / bfloat16 / float32 (float64: torch backend).
        teacher_logits: (..., V_t), the same leading dims, any V_t >= 1 and any floating dtype.
            A constant unless it requires grad; then its gradient is computed too.
        temperature: T > 0 of both softmaxes (default 1).
        top_k: None (every rank, a full sort of each row) or 1 <= top_k <= min(V_s, V_t): the
            ranks compared. The Triton backend selects up to 1024 ranks in its fused kernel
            (one read of the logits); a larger ``top_k`` or None sorts with torch.
        labels: optional (...) int64 / int32, used only to skip rows: those equal to
            ``ignore_index`` contribute 0, are not counted and may hold anything, NaN included
            (e.g. ``torch.where(index >= 0, 0, -100)`` for the unaligned positions).
        ignore_index: default -100.
        student_logit_scale, teacher_logit_scale: each model's logit scale a > 0 (default 1).
        student_softcap, teacher_softcap: each model's soft-cap c > 0, or None (off).
        reduction: ``"mean"`` (counted rows; 0 when none count), ``"batchmean"`` (the same),
            ``"sum"``, ``"none"`` (per-row losses of shape (...), ignored rows 0).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``; ``PYDISTILL_BACKEND`` replaces
            ``auto``. Not wired into torch.compile's custom ops (a graph break there).

    Returns:
        The loss, float32 (float64 for float64 inputs); gradients in each input's dtype. The
        loss lies in [0, 2]. Logits equal to -inf carry zero probability; a row that is all
        -inf, or holds a NaN, gives NaN. The torch backend computes the gradients in the
        forward (a second backward raises); the Triton one recomputes them in the backward.
    """
    cfg = uld_config(temperature=temperature, top_k=top_k, ignore_index=ignore_index,
                     student_logit_scale=student_logit_scale,
                     teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                     teacher_softcap=teacher_softcap, reduction=reduction)
    check.tensor("student_logits", student_logits)
    check.tensor("teacher_logits", teacher_logits)
    vocab_s = _uld_vocab("student_logits", student_logits, "V_s")
    vocab_t = _uld_vocab("teacher_logits", teacher_logits, "V_t")
    lead = student_logits.shape[:-1]
    check.leading_dims("teacher_logits", teacher_logits, lead, "student_logits", student_logits)
    _uld_top_k(cfg.top_k, vocab_s, vocab_t)
    labels = check.labels("labels", labels, lead, "student_logits", student_logits, vocab=vocab_s,
                          ignore_index=cfg.ignore_index, check_range=False)
    backend = _dispatch.resolve("uld_loss", backend, student_logits.device,
                                (student_logits.dtype, teacher_logits.dtype))
    return _dispatch.implementation("uld_loss", backend).apply(student_logits, teacher_logits,
                                                                labels, cfg)


def linear_uld_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    top_k: Optional[int] = None,
    chunk_size="auto",
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r""":func:`uld_loss` fused with the student's LM head: ``uld_loss`` on
    ``student_hidden @ student_weight^T (+ student_bias)`` without materialising the (N, V_s)
    logits beyond one chunk of rows.

    The teacher is exactly one of ``teacher_hidden`` (..., H_t) + ``teacher_weight`` (V_t, H_t)
    (+ ``teacher_bias``), whose logits are formed chunk by chunk too, or ``teacher_logits``
    (..., V_t) (e.g. the rows gathered by :func:`pydistill.alignment.gather_rows`). V_t, H_t
    and the teacher's dtype may differ from the student's.

    Chunked algorithm (that of :func:`linear_kd_loss`), C rows at a time: both heads' logits
    (C, V) in float32 (float64 for float64 inputs), the ULD loss and its logits gradients (the
    backend's step, written over the logits buffers), then d(hidden) = g W and d(weight) += g^T h
    for each head that needs them. Peak extra memory: the gradients plus the chunk's (C, V_s) and
    (C, V_t) buffers and the step's temporaries. ``top_k`` is what makes the step cheap on the
    Triton backend (its fused selection); with ``top_k=None`` each chunk is fully sorted.

    Args:
        student_hidden: (..., H_s) float16 / bfloat16 / float32 (float64: torch backend).
        student_weight: (V_s, H_s), the dtype of ``student_hidden``. Frozen (requires_grad
            False): no weight gradient is computed or allocated.
        teacher_hidden, teacher_weight, teacher_bias, teacher_logits: the teacher, see above;
            constants unless they require grad (then their gradients are computed too).
        student_bias: optional (V_s,), the dtype of ``student_weight``.
        top_k: as in :func:`uld_loss` (1 <= top_k <= min(V_s, V_t), or None).
        chunk_size: rows per chunk (a positive int), or ``"auto"``: as many as fit the budget
            of :func:`linear_kd_loss`'s ``"auto"`` (64 MiB on the CPU, 0.5 GB on a GPU, or
            ``PYDISTILL_AUTO_CHUNK_BYTES``) for the logits buffers and the step's temporaries.
        temperature, labels, ignore_index, student_logit_scale, teacher_logit_scale,
        student_softcap, teacher_softcap, reduction, backend: as in :func:`uld_loss`
            (``labels`` has the leading dims of ``student_hidden``).

    Returns:
        The loss, float32 (float64 for float64 inputs); gradients in each input's dtype. For
        scalar reductions the gradients are computed in the forward and the backward scales
        them (a second backward raises); ``reduction="none"`` recomputes in the backward.
    """
    cfg = uld_config(temperature=temperature, top_k=top_k, ignore_index=ignore_index,
                     student_logit_scale=student_logit_scale,
                     teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                     teacher_softcap=teacher_softcap, reduction=reduction)
    check.linear_head("student_hidden", student_hidden, "student_weight", student_weight,
                      "student_bias", student_bias)
    lead = student_hidden.shape[:-1]
    vocab_s = student_weight.shape[0]
    if (teacher_hidden is None) != (teacher_weight is None):
        given, missing = ("teacher_hidden", "teacher_weight") if teacher_weight is None else (
            "teacher_weight", "teacher_hidden")
        raise ValueError(f"{missing}: required with {given} (the teacher's logits are "
                         f"teacher_hidden @ teacher_weight^T), got None")
    if (teacher_weight is None) == (teacher_logits is None):
        raise ValueError("teacher: expected exactly one of teacher_hidden + teacher_weight or "
                         "teacher_logits, got " + ("both" if teacher_logits is not None else "neither"))
    if teacher_bias is not None and teacher_weight is None:
        raise ValueError("teacher_bias: applies only to a teacher given as teacher_hidden + "
                         "teacher_weight, got a bias with teacher_logits")
    floating = [student_hidden, student_weight, student_bias]
    if teacher_weight is not None:
        check.linear_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight,
                          "teacher_bias", teacher_bias)
        check.leading_dims("teacher_hidden", teacher_hidden, lead, "student_hidden", student_hidden)
        vocab_t = teacher_weight.shape[0]
        floating += [teacher_hidden, teacher_weight, teacher_bias]
    else:
        check.tensor("teacher_logits", teacher_logits)
        vocab_t = _uld_vocab("teacher_logits", teacher_logits, "V_t")
        check.leading_dims("teacher_logits", teacher_logits, lead, "student_hidden", student_hidden)
        floating.append(teacher_logits)
    _uld_top_k(cfg.top_k, vocab_s, vocab_t)
    labels = check.labels("labels", labels, lead, "student_hidden", student_hidden, vocab=vocab_s,
                          ignore_index=cfg.ignore_index, check_range=False)
    if chunk_size == "tiled":
        raise ValueError("chunk_size: linear_uld_loss has no tiled path; expected 'auto' or a "
                         "positive int (rows per chunk), got 'tiled'")
    chunk_size = check.chunk_size("chunk_size", chunk_size)
    backend = _dispatch.resolve("linear_uld_loss", backend, student_hidden.device,
                                tuple(x.dtype for x in floating if x is not None))
    tensors = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
               teacher_bias, teacher_logits)
    return _dispatch.implementation("linear_uld_loss", backend).apply(cfg, chunk_size, labels,
                                                                       *tensors)


# offline teachers (a sampled teacher's estimator; a batch's stored teacher): their own module,
# built on topk_kd_loss / linear_kd_loss above
from pydistill.ops.sampled_kd import (  # noqa: E402
    linear_offline_kd_loss, offline_kd_loss, sampled_kd_loss,
)
