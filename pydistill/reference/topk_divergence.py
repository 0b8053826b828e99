"""Top-k (offline teacher) distillation loss (``topk_kd_loss``): the reference math, written once.

Offline distillation stores, per row (token), only the teacher's top-K log-probabilities
``lp_1..lp_K`` and their token ids ``i_1..i_K`` (distinct, in [0, V)), taken from the teacher
at its generation temperature T_gen (``teacher_temperature``; required by the public API,
which refuses None; in this module's config None means T_gen = T). The
student is dense. Per row, with student logits s (size V) and temperature T::

    z      = c * tanh(s / c)          (optional soft-capping, student only; -inf stays -inf)
    log q  = log_softmax(z / T)       over the FULL vocabulary
    q_S    = (q_{i_1}, ..., q_{i_K}),    Q_tail = 1 - sum q_S   (student mass off the support)

Teacher re-tempering, a = T_gen / T (a = 1: none). The stored probabilities p_k = e^{lp_k}
leave a tail t = max(0, 1 - sum_k p_k), taken as spread uniformly over the M = V - K missing
tokens (r = t / M each). Every probability is raised to the power a and renormalised::

    p'_k = p_k^a / Z,    t' = M r^a / Z,    Z = sum_k p_k^a + M r^a

which is exact if the teacher's tail really is uniform (and exact whatever it is when a = 1,
where Z = max(1, sum p)). There is no tail (t' = 0) when K = V or t = 0. An entry of
``lp`` equal to -inf (a row with fewer than K candidates, padded) is a listed token of
teacher probability 0: it stays an outcome of its own (not part of the uniform tail).

The divergence, by ``tail``::

    bucket (default)  P = (p'_1, ..., p'_K, t'),   Q = (q_S, Q_tail):       D over K + 1 outcomes
    renormalize       P = p' / sum p',             Q = q_S / sum q_S:        D over K outcomes
                      (= softmax of the K gathered student logits; the gradient lives on the
                      support only)
    ignore            P = p'_S,                    Q = q_S, both as they are (unnormalised):
                      D by the same formulas, summed over the support

with D one of the six divergences of softmax_divergence.py (``divergence`` there, applied to
the outcomes' log-probabilities), and the per-row loss, reductions, ``ignore_index`` and the
hard term exactly those of ``kd_loss``::

    loss_i = hard_weight * CE(z, y_i) + soft_weight * T^2 * D(P, Q)       (T^2 only if t2)

Gradient (the closed form of the torch backend and the kernels). With h_o = dD/dQ_o per
outcome and S_q = sum_o Q_o h_o (over the K or K + 1 outcomes), the softmax chain rule gives
dD/ds_j = (1/T) q_j (h_j - S_q), where h_j = h_k for j = i_k, h_tail off the support
(bucket) or 0 there (ignore). In terms of the elementwise ``q h`` of softmax_divergence's
gradient table (evaluated at the outcomes):

    on the support, j = i_k:   (1/T) (Q_k h_k - Q_k S_q)
    off the support:           (1/T) e^{x_j - lse_off} (Q_tail h_tail - S_q Q_tail)
                               (Q_tail h_tail = 0 for ignore), x = z / T
    renormalize:               (1/T) (Q_k h_k - Q_k S_q) with Q the renormalised student,
                               and 0 off the support

so the gradient is dense only through the student softmax, and no dense teacher is formed.
The table's ``q h`` may drop a term q_j (a constant shift of h, which cancels in h - S_q when
Q sums to 1): skew_reverse_kl's does, and ``ignore`` (Q unnormalised) adds it back.

Numerics. Q_tail = 1 - sum q_S cancels catastrophically when the support holds nearly all
of q (float32 leaves ~1e-7 absolute error, i.e. no correct digit once Q_tail < 1e-7, which
is common: the student agrees with the teacher on its top tokens). Every backend therefore
works with the off-support logsumexp lse_off (the student logits with the support masked to
-inf): log Q_tail = lse_off - lse, exact to the float32 rounding of the tail itself, and the
off-support gradient factor e^{x_j - lse_off} = q_j / Q_tail is well conditioned. The
teacher's t = 1 - sum p cancels the same way; it is computed in float64 from the stored
log-probs in every backend (K values per row: negligible).

This module is the oracle every backend is tested against (in float64), the baseline of the
benchmarks, and, through ``ChunkedTopKKDLoss`` / ``topk_chunk_loss_and_grads``, the
``torch`` backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from pydistill.reference.softmax_divergence import (
    KDConfig,
    _scale_rows_,
    chunk_row_scale,
    chunk_rows,
    compute_dtype,
    divergence,
    divergence_terms,
    divergence_value,
    finish_student_chunk,
    hard_cross_entropy,
    reduce_rows,
    row_chunks,
    zero_ignored_rows,
)

TAILS = ("bucket", "renormalize", "ignore")


@dataclass(frozen=True)
class TopKConfig(KDConfig):
    """The hyper-parameters of ``topk_kd_loss``: those of ``kd_loss`` plus the tail mode and
    the teacher's generation temperature; already validated when built by the API."""

    tail: str = "bucket"
    teacher_temperature: Optional[float] = None

    @property
    def teacher_power(self) -> float:
        """a = T_gen / T: the power the stored teacher probabilities are raised to."""
        if self.teacher_temperature is None:
            return 1.0
        return self.teacher_temperature / self.temperature


def teacher_log_probs(topk_logprobs: torch.Tensor, vocab: int, cfg: TopKConfig, dtype):
    """The teacher's outcome log-probabilities in ``dtype``: (log P over the support (..., K),
    log P_tail (...) or None for ``renormalize``), re-tempered as in the module docstring.
    Computed in float64 (the tail 1 - sum p cancels; K values per row cost nothing)."""
    lp = topk_logprobs.to(torch.float64)
    a = cfg.teacher_power
    scaled = lp if a == 1.0 else lp * a
    if cfg.tail == "renormalize":
        return torch.log_softmax(scaled, dim=-1).to(dtype), None
    missing = vocab - lp.shape[-1]
    tail = (1.0 - lp.exp().sum(-1)).clamp(min=0.0)
    has_tail = tail > 0 if missing > 0 else torch.zeros_like(tail, dtype=torch.bool)
    # log(M r^a) = a log t + (1 - a) log M; the inner where keeps the gradient NaN-free at t = 0
    log_tail = a * torch.log(torch.where(has_tail, tail, 1.0)) + (1.0 - a) * math.log(max(missing, 1))
    log_tail = torch.where(has_tail, log_tail, -math.inf)
    log_z = torch.logsumexp(torch.cat([scaled, log_tail[..., None]], dim=-1), dim=-1)
    return (scaled - log_z[..., None]).to(dtype), (log_tail - log_z).to(dtype)


def safe_indices(topk_indices: torch.Tensor, vocab: int):
    """(indices usable by gather / scatter, mask of the in-range ones). Out-of-range ids can
    reach here only from GPU tensors (the API checks CPU ones); they read column 0 instead and
    the caller turns their row into NaN."""
    valid = (topk_indices >= 0) & (topk_indices < vocab)
    return torch.where(valid, topk_indices, 0).long(), valid


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim: -inf, with a zero (not NaN) gradient, for an all -inf row."""
    empty = (x == -math.inf).all(-1, keepdim=True)
    out = torch.logsumexp(torch.where(empty, 0.0, x), dim=-1)
    return torch.where(empty.squeeze(-1), -math.inf, out)


def _sanitize_ignored(s, topk_logprobs, topk_indices, counted):
    """Ignored rows may hold anything (NaN, any ids): before any arithmetic they become a
    uniform student and the teacher that equals it under every tail (p = 1/V per listed id),
    so D and its gradient are 0 there and nothing leaks into the gradient through 0 * NaN."""
    keep = counted[..., None]
    vocab, k = s.shape[-1], topk_indices.shape[-1]
    ids = torch.arange(k, device=topk_indices.device, dtype=topk_indices.dtype)
    return (torch.where(keep, s, 0.0), torch.where(keep, topk_logprobs, -math.log(vocab)),
            torch.where(keep, topk_indices, ids))


def _nan_rows(log_p, log_q):
    """Rows with a NaN among what the loss reads (the teacher's log-probs, the student's row,
    or only its support under renormalize): the divergence formulas mask probabilities that are
    not > 0, which would turn NaN into 0; these rows are NaN instead."""
    return torch.isnan(log_p[..., 0]) | torch.isnan(log_q[..., 0])


def outcome_log_probs(z, topk_logprobs, topk_indices, cfg: TopKConfig):
    """(log P, log Q) over the outcomes of ``cfg.tail`` ((..., K + 1) for bucket, (..., K)
    otherwise) from the soft-capped student logits ``z`` (..., V), in z's dtype."""
    vocab = z.shape[-1]
    x = z / cfg.temperature
    ids, valid = safe_indices(topk_indices, vocab)
    x_support = torch.where(valid, x.gather(-1, ids), math.nan)
    log_p, log_p_tail = teacher_log_probs(topk_logprobs, vocab, cfg, z.dtype)
    if cfg.tail == "renormalize":
        return log_p, torch.log_softmax(x_support, dim=-1)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    log_q = x_support - lse
    if cfg.tail == "ignore":
        return log_p, log_q
    # the exact student tail: logsumexp with the support masked out (module docstring)
    log_q_tail = _logsumexp(x.scatter(-1, ids, -math.inf)) - lse.squeeze(-1)
    return (torch.cat([log_p, log_p_tail[..., None]], dim=-1),
            torch.cat([log_q, log_q_tail[..., None]], dim=-1))


def per_row_loss(student_logits, topk_logprobs, topk_indices, labels, cfg: TopKConfig):
    """Per-row losses (shape of the leading dims, ignored rows 0) and the count of counted
    rows (a 0-dim tensor on the device). Plain autograd, dtype-generic."""
    dtype = compute_dtype(student_logits.dtype, topk_logprobs.dtype)
    s = student_logits.to(dtype)
    lp, idx = topk_logprobs, topk_indices
    lead = s.shape[:-1]
    if labels is not None:
        counted = labels != cfg.ignore_index
        s, lp, idx = _sanitize_ignored(s, lp, idx, counted)
        count = counted.sum()
    else:
        counted = None
        count = torch.tensor(lead.numel(), device=s.device)
    loss = torch.zeros(lead, dtype=dtype, device=s.device)
    z = cfg.student_transform(s)
    if cfg.soft_weight != 0.0:
        log_p, log_q = outcome_log_probs(z, lp, idx, cfg)
        div = divergence(log_p, log_q, cfg.divergence, cfg.beta)
        loss = loss + cfg.soft_scale * torch.where(_nan_rows(log_p, log_q), math.nan, div)
    if cfg.hard_weight != 0.0:
        ce, _ = hard_cross_entropy(z, labels, counted)
        loss = loss + cfg.hard_weight * ce
    if counted is not None:
        loss = torch.where(counted, loss, 0.0)
    return loss, count


def topk_kd_loss(student_logits, topk_logprobs, topk_indices, labels=None,
                 cfg: TopKConfig = TopKConfig()):
    """The reference ``topk_kd_loss``: plain autograd, any dtype (float64 in the tests);
    differentiable w.r.t. the teacher log-probs too."""
    rows, count = per_row_loss(student_logits, topk_logprobs, topk_indices, labels, cfg)
    return reduce_rows(rows, count, cfg.reduction)


# --------------------------------------------------------------------------------------
# The torch backend: the closed form of the module docstring, row chunk by row chunk, the
# gradient computed in the forward pass. Tests check it against autograd of the above.
# --------------------------------------------------------------------------------------


def topk_chunk_loss_and_grads(s, topk_logprobs, topk_indices, labels, cfg: TopKConfig, row_scale,
                              out_s=None):
    """Per-row losses of one chunk of rows (s: (rows, V); topk_logprobs, topk_indices:
    (rows, K); labels: (rows,) or None), and the gradient of sum(row_scale * loss) w.r.t. s in
    closed form, written into ``out_s`` (a contiguous (rows, V) buffer of any float dtype)
    when given: the contract of softmax_divergence.chunk_loss_and_grads. The teacher is a
    constant. Float32 math (float64 for float64 inputs), in place wherever a temporary is
    dead. ``row_scale``: a Python number, or a 0-dim or (rows,) tensor."""
    dtype = compute_dtype(s.dtype, topk_logprobs.dtype)
    vocab = s.shape[-1]
    lp, idx = topk_logprobs, topk_indices
    counted = labels != cfg.ignore_index if labels is not None else None
    raw = zero_ignored_rows(s.to(dtype), counted)  # the soft-cap's slope is taken from it
    z = cfg.student_transform(raw)
    if counted is not None:
        z, lp, idx = _sanitize_ignored(z, lp, idx, counted)
    rows = torch.zeros(s.shape[0], dtype=dtype, device=s.device)
    g_s = None
    coef = cfg.soft_scale / cfg.temperature
    if cfg.has_soft:
        ids, valid = safe_indices(idx, vocab)
        x = z * (1.0 / cfg.temperature)  # a fresh tensor: masked in place below
        x_support = x.gather(-1, ids).masked_fill_(~valid, math.nan)
        x_support_raw = x_support.clone()  # log_q is built in place from x_support
        log_p, log_p_tail = teacher_log_probs(lp, vocab, cfg, dtype)
        if cfg.tail == "renormalize":
            log_q = torch.log_softmax(x_support, dim=-1)
        else:
            lse_support = torch.logsumexp(x_support, dim=-1)
            x.scatter_(-1, ids, -math.inf)  # off-support logits only, from here on
            lse_off = torch.logsumexp(x, dim=-1)
            lse = torch.logaddexp(lse_off, lse_support)
            log_q = x_support.sub_(lse[:, None])
            log_q_tail = lse_off - lse
        if cfg.tail == "bucket":
            log_p = torch.cat([log_p, log_p_tail[:, None]], dim=-1)
            log_q = torch.cat([log_q, log_q_tail[:, None]], dim=-1)
        q, p = log_q.exp(), log_p.exp()
        div, qh, _, _, _ = divergence_terms(log_p, log_q, p, q, cfg.canonical_divergence(),
                                            cfg.beta, False)
        if cfg.tail != "ignore":  # P and Q each sum to 1: the value as Bregman terms
            w = _outcome_log_ratio(x, x_support_raw, lse_off if cfg.tail == "bucket" else None,
                                   lp, ids, vocab, cfg)
            exact = divergence_value(log_p, log_q, p, q, w.to(dtype), cfg.canonical_divergence(),
                                     cfg.beta)
            div = torch.where(torch.isfinite(w).all(-1), exact, div)
        rows.add_(div.masked_fill_(_nan_rows(log_p, log_q), math.nan), alpha=cfg.soft_scale)
        if out_s is not None:
            if cfg.tail == "ignore" and cfg.canonical_divergence() == "skew_reverse_kl":
                qh.add_(q)  # the term the table drops (module docstring)
            # S_q summed as computed: under ``ignore`` neither P nor Q sums to 1
            s_q = qh.sum(-1, keepdim=True)
            k = idx.shape[-1]
            member = qh[:, :k].sub_(q[:, :k] * s_q)
            if cfg.tail == "renormalize":
                g_s = torch.zeros_like(z)
            else:
                # e^{x - lse_off} (Q_tail h_tail - S_q Q_tail); x is -inf on the support, and
                # a row without off-support mass (K = V) has lse_off = -inf: no NaN from it
                q_tail = log_q_tail.exp()[:, None]
                c_off = (qh[:, k:] if cfg.tail == "bucket" else 0.0) - s_q * q_tail
                shift = torch.where(lse_off == -math.inf, 0.0, lse_off)
                g_s = x.sub_(shift[:, None]).exp_().mul_(c_off)
            g_s.scatter_(-1, ids, member)
        # the soft gradient is carried without its factor soft_scale / T until the end
    return finish_student_chunk(rows, g_s, coef, z, labels, counted, cfg, row_scale, out_s,
                                raw=raw)


def _outcome_log_ratio(x, x_support, lse_off, topk_logprobs, ids, vocab: int, cfg: TopKConfig):
    """w = log P - log Q over the outcomes of ``cfg.tail`` (bucket or renormalize), in float64,
    with rounding relative to w itself (softmax_divergence.tempered_log_ratio's idea): at a
    large temperature P and Q are near uniform, w is O(1/T) and the divergence O(1/T^2).

    ``x``: the tempered student logits with the support already masked to -inf and
    ``lse_off`` their logsumexp (bucket; unused for renormalize), ``x_support``: the K gathered
    ones. With m the student's max (a shift) and ll its log-sum, log Q_o = a_o - ll,
    a_k = x_{i_k} - m and, for the tail, a_tail = lse_off - m; above T = 4 (where the tail may
    be near uniform), in rows where the off-support logits are (E / M > -1/2),
    a_tail = (m_off - m) + log M + log1p(E / M), E = sum_off expm1(x_j - m_off): relative
    rounding, where lse_off (~log M) rounds at its own size. The teacher's
    log P is float64 already, and the shared ll (rounded at ~log V) enters the Bregman sum at
    second order only (softmax_divergence's block comment on the divergence value)."""
    f64 = torch.float64
    log_p, log_p_tail = teacher_log_probs(topk_logprobs, vocab, cfg, f64)
    x_s = x_support.to(f64)
    if cfg.tail == "renormalize":
        m = x_s.amax(-1, keepdim=True)
        a = x_s - torch.where(m.abs() == math.inf, 0.0, m)
        return (log_p + torch.logsumexp(a, -1, keepdim=True)) - a
    missing = vocab - ids.shape[-1]
    lse_off = lse_off.to(f64)[:, None]
    m = torch.maximum(lse_off, x_s.amax(-1, keepdim=True))  # any shift >= the max will do
    m = torch.where(m.abs() == math.inf, 0.0, m)
    a = x_s - m
    a_tail = lse_off - m
    if missing > 0 and cfg.temperature > 4.0:
        m_off = x.amax(-1, keepdim=True)
        shift_off = torch.where(m_off.abs() == math.inf, 0.0, m_off)
        e_off = torch.expm1(x - shift_off).scatter_(-1, ids, 0.0).sum(-1, keepdim=True) / missing
        near = (e_off > -0.5).to(f64)
        e_off = e_off.to(f64)
        near_tail = (shift_off.to(f64) - m) + math.log(missing) + torch.log1p(e_off * near)
        a_tail = torch.where(near.bool() & torch.isfinite(a_tail), near_tail, a_tail)
    a = torch.cat([a, a_tail], dim=-1)
    log_p = torch.cat([log_p, log_p_tail[:, None]], dim=-1)
    return (log_p + torch.logsumexp(a, -1, keepdim=True)) - a


def refuse_teacher_grad(backend: str):
    """The backends treat the teacher as a constant: a teacher whose gradient is asked for is
    an error naming the backend, never a silently missing gradient (the API raises before the
    forward; the backwards raise too, for direct callers of the Functions)."""
    raise ValueError(
        f"teacher_topk_logprobs: requires grad, but topk_kd_loss(backend={backend!r}) treats "
        "the teacher as a constant and computes no gradient for it; pass "
        "teacher_topk_logprobs.detach(), or use the reference "
        "pydistill.reference.topk_divergence.topk_kd_loss, which differentiates it"
    )


class ChunkedTopKKDLoss(torch.autograd.Function):
    """``topk_kd_loss`` over row chunks, as ``ChunkedKDLoss``: each chunk's loss and
    closed-form gradient are computed in the forward and written into one preallocated
    gradient; peak extra memory is the gradient plus one chunk's working set. The backward
    scales the stored gradient in place, so it runs once (a second backward raises). The
    teacher is a constant (the API refuses a teacher that requires grad)."""

    @classmethod
    def apply(cls, student_logits, topk_logprobs, topk_indices, labels, cfg: TopKConfig):
        # under no_grad a Function's forward still sees needs_input_grad set from requires_grad:
        # the value alone is computed here, with no (N, V) gradient buffer (as ChunkedKDLoss)
        if torch.is_grad_enabled():
            return super().apply(student_logits, topk_logprobs, topk_indices, labels, cfg)
        return cls.run(student_logits, topk_logprobs, topk_indices, labels, cfg, False)[0]

    @staticmethod
    def run(student_logits, topk_logprobs, topk_indices, labels, cfg: TopKConfig, need_s: bool):
        """(the loss, the student gradient as a contiguous (N, V) tensor or None) for
        grad_output = 1. The student is read chunk by chunk through its own strides (a causal
        shift logits[:, :-1] is not copied)."""
        vocab, k = student_logits.shape[-1], topk_indices.shape[-1]
        lead = student_logits.shape[:-1]
        n_rows = lead.numel()
        lp2 = topk_logprobs.reshape(-1, k)
        idx2 = topk_indices.reshape(-1, k)
        y = labels.reshape(-1) if labels is not None else None
        dtype = compute_dtype(student_logits.dtype, topk_logprobs.dtype)
        device = student_logits.device
        count, row_scale = chunk_row_scale(y, n_rows, cfg, dtype, device)
        grad_s = (torch.empty((n_rows, vocab), dtype=student_logits.dtype, device=device)
                  if need_s else None)
        rows_out = torch.empty(n_rows, dtype=dtype, device=device)
        for sl, (s_c,) in row_chunks((student_logits,), chunk_rows(vocab)):
            rows_out[sl] = topk_chunk_loss_and_grads(
                s_c.detach(), lp2[sl].detach(), idx2[sl], y[sl] if y is not None else None,
                cfg, row_scale, grad_s[sl] if grad_s is not None else None,
            )
        if cfg.reduction == "none":
            return rows_out.reshape(lead), grad_s
        return reduce_rows(rows_out, count, cfg.reduction), grad_s

    @staticmethod
    def forward(ctx, student_logits, topk_logprobs, topk_indices, labels, cfg: TopKConfig):
        loss, grad_s = ChunkedTopKKDLoss.run(student_logits, topk_logprobs, topk_indices, labels,
                                             cfg, ctx.needs_input_grad[0])
        ctx.grad, ctx.shape, ctx.reduction = grad_s, student_logits.shape, cfg.reduction
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.needs_input_grad[1]:
            refuse_teacher_grad("torch")
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "topk_kd_loss(backend='torch') computes its gradient in the forward pass and "
                "hands it over in the first backward; a second backward through the same loss "
                "(retain_graph=True) is not supported. Recompute the loss instead."
            )
        _scale_rows_(grad, grad_loss, ctx.reduction)
        return grad.view(ctx.shape), None, None, None, None
