"""Universal Logit Distillation (``uld_loss``): the reference math, written once.

ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", arXiv 2402.12030) compares two models whose vocabularies differ
(in size and in meaning) without any token mapping: per aligned position i, each model's
probability vector is sorted in decreasing order, the shorter one padded with zeros, and the
loss is the L1 distance between the sorted vectors, which is the Wasserstein-1 distance
between the two distributions of "probability mass by rank"::

    z_s    = cap_s(a_s s),   z_t = cap_t(a_t t)     (each model's logit transform, as kd_loss)
    q      = softmax(z_s / T)      (student, V_s entries)
    p      = softmax(z_t / T)      (teacher, V_t entries)
    q_(j)  = j-th largest entry of q,   p_(j) likewise, 0 beyond the vocabulary's end
    loss_i = sum_{j < K} |q_(j) - p_(j)|,      K = max(V_s, V_t)   (top_k=None)
                                               K = top_k           (top_k set)

Conventions (those of TRL's GOLD trainer, ``trl.experimental.gold.ULDLoss``, where it has one):

* temperature: ``softmax(logits / T)`` on each side, and no T^2 factor (ULD and GOLD have
  none). GOLD's separate ``uld_student_temperature`` / ``uld_teacher_temperature`` T_s, T_t
  are ``temperature = T_s, teacher_logit_scale = T_s / T_t`` here (without soft-caps).
* ``top_k``: the sum runs over the first K ranks of both sorted vectors, of the full-vocabulary
  probabilities, **not renormalised** over the top K. So the truncated loss is the first K
  terms of the full one (a lower bound of it, equal to it at K = V_s = V_t), and its gradient
  still flows through each full softmax. GOLD has no truncation (it sorts everything:
  ``top_k=None`` here); 1 <= top_k <= min(V_s, V_t), so no padding is needed when it is set.
* reduction: ``mean`` divides the sum over counted rows by their number (GOLD divides each
  sequence's sum by its number of aligned positions, then averages the sequences: the same
  whenever the sequences have equal numbers of aligned positions, e.g. one sequence).
  ``batchmean`` is an alias of ``mean``; ``sum``; ``none`` (per-row, ignored rows 0). Rows
  whose label equals ``ignore_index`` contribute 0 and are not counted; the labels do nothing
  else (ULD has no hard term here: add a cross-entropy yourself, as GOLD's
  ``uld_crossentropy_weight`` does).

Gradient. The sort is piecewise a fixed permutation, so the gradient flows through it as
through a gather (autograd of ``torch.sort(...).values`` does exactly that). With
g_j = sign(q_(j) - p_(j)) for the ranks j < K (sign(q_(j)) where the teacher's vector is
padded; sign(0) = 0, as torch.abs' gradient at 0) and S = sum_{j<K} q_(j) g_j, the softmax
chain rule gives, for the student entry v of rank r(v)::

    dloss/dz_s,v = (1/T) q_v (G_v - S),     G_v = g_{r(v)} if r(v) < K else 0

i.e. a dense term -S q_v / T plus the K ranked entries' g_j q_(j) / T scattered to their token
ids; the transform's slope a (1 - (z / c)^2) multiplies it. The teacher's is the same with
g_j replaced by -g_j (its own padded tail: sign(p_(j))). Ties inside the sort (two equal
probabilities) are a non-differentiable point; any consistent tie order gives a valid
subgradient, and the backends may break ties differently there.

The module holds the oracle (``uld_loss``, plain autograd, float64 in the tests), the
closed-form chunk step (``uld_chunk_loss_and_grads``) and ``ChunkedULDLoss``, the ``torch``
backend, plus the linear (hidden-state) variant ``ChunkedLinearULDLoss``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from pydistill.reference.linear_kd import GivenLogits, LinearHead, auto_chunk_rows, head_logits, torch_chunk_step
from pydistill.reference.softmax_divergence import (
    REDUCTIONS,
    _scale_rows_,
    chunk_rows,
    compute_dtype,
    counted_rows,
    grad_once_error,
    hand_over_grads,
    reduce_rows,
    transform_grad_,
    transform_logits,
)

ULD_REDUCTIONS = REDUCTIONS  # mean, batchmean (= mean), sum, none


@dataclass(frozen=True)
class ULDConfig:
    """The hyper-parameters of ``uld_loss``; already validated when built by the API."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    ignore_index: int = -100
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: Optional[float] = None
    teacher_softcap: Optional[float] = None
    reduction: str = "mean"

    def student_transform(self, z: torch.Tensor) -> torch.Tensor:
        return transform_logits(z, self.student_logit_scale, self.student_softcap)

    def teacher_transform(self, z: torch.Tensor) -> torch.Tensor:
        return transform_logits(z, self.teacher_logit_scale, self.teacher_softcap)

    def side(self, teacher: bool):
        """(scale, softcap) of one model's transform."""
        if teacher:
            return self.teacher_logit_scale, self.teacher_softcap
        return self.student_logit_scale, self.student_softcap


# --------------------------------------------------------------------------------------
# The reference: plain autograd
# --------------------------------------------------------------------------------------


def sorted_probs(probs: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """The entries of ``probs`` (..., V) in decreasing order: all of them, or the top_k largest."""
    if top_k is None:
        return torch.sort(probs, dim=-1, descending=True).values
    return torch.topk(probs, top_k, dim=-1, largest=True, sorted=True).values


def pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """x (..., n) padded with zeros to (..., size)."""
    if x.shape[-1] >= size:
        return x
    return torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def wasserstein_rows(q_sorted: torch.Tensor, p_sorted: torch.Tensor) -> torch.Tensor:
    """sum_j |q_(j) - p_(j)| per row, the shorter vector padded with zeros."""
    size = max(q_sorted.shape[-1], p_sorted.shape[-1])
    return (pad_last(q_sorted, size) - pad_last(p_sorted, size)).abs().sum(-1)


def per_row_loss(student_logits, teacher_logits, labels, cfg: ULDConfig):
    """Per-row ULD losses (shape of the leading dims, ignored rows 0) and the count of counted
    rows (a 0-dim tensor on the device)."""
    s, t, counted, count = counted_rows(student_logits, teacher_logits, labels, cfg.ignore_index)
    q = torch.softmax(cfg.student_transform(s) / cfg.temperature, dim=-1)
    p = torch.softmax(cfg.teacher_transform(t) / cfg.temperature, dim=-1)
    rows = wasserstein_rows(sorted_probs(q, cfg.top_k), sorted_probs(p, cfg.top_k))
    if counted is not None:
        rows = torch.where(counted, rows, 0.0)
    return rows, count


def uld_loss(student_logits, teacher_logits, labels=None, cfg: ULDConfig = ULDConfig()):
    """The reference ``uld_loss``: plain autograd, any dtype (float64 in the tests)."""
    rows, count = per_row_loss(student_logits, teacher_logits, labels, cfg)
    return reduce_rows(rows, count, cfg.reduction)


def linear_uld_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                    teacher_logits=None, student_bias=None, teacher_bias=None, labels=None,
                    cfg: ULDConfig = ULDConfig()):
    """The reference ``linear_uld_loss``: both logits materialised, then ``uld_loss``."""
    s = head_logits(student_hidden, student_weight, student_bias)
    t = teacher_logits if teacher_logits is not None else head_logits(
        teacher_hidden, teacher_weight, teacher_bias)
    return uld_loss(s, t, labels, cfg)


# --------------------------------------------------------------------------------------
# The torch backend: closed form, row chunk by row chunk, gradient in the forward pass
# --------------------------------------------------------------------------------------


def select_ranked(x: torch.Tensor, top_k: Optional[int]):
    """(values, token ids) of the top_k largest entries of x (rows, V) in decreasing order, or
    of all of them (a full sort) when top_k is None. x is the tempered logits: the order of
    the probabilities is theirs."""
    if top_k is None:
        return torch.sort(x, dim=-1, descending=True)
    return torch.topk(x, top_k, dim=-1, largest=True, sorted=True)


def log_normaliser(x: torch.Tensor):
    """(m, log l) of each row's logsumexp m + log l, kept as two terms: log q = (x - m) - log l
    keeps the precision that folding them into one number loses when |m| is large. A row
    with no finite entry gives NaN, as the softmax of the reference does."""
    m = x.amax(-1)
    return m, torch.log(torch.exp(x - m[:, None]).sum(-1))


def ranked_signs(q_sorted: torch.Tensor, p_sorted: torch.Tensor):
    """(g_s, g_t): d loss_i / d q_(j) and d loss_i / d p_(j) per rank, each of its own length
    (the other vector padded with zeros): sign(q_(j) - p_(j)) and its negative on the common
    ranks, sign of the longer vector's own entries on its padded tail."""
    m = min(q_sorted.shape[-1], p_sorted.shape[-1])
    common = torch.sign(q_sorted[:, :m] - p_sorted[:, :m])
    g_s = torch.cat([common, torch.sign(q_sorted[:, m:])], dim=-1)
    g_t = torch.cat([-common, torch.sign(p_sorted[:, m:])], dim=-1)
    return g_s, g_t


def _side_grad(x, norm, sorted_q, ids, g, weight, inv_t, raw, scale, softcap):
    """d(weight * loss)/d(logits) of one model from its ranked entries: q (G - S) / T, times
    the transform's slope at the untransformed logits ``raw``. ``g``: the per-rank signs;
    ``weight``: (rows, 1) or a number."""
    m, log_l = norm
    q = torch.exp((x - m[:, None]) - log_l[:, None])
    s_sum = (sorted_q * g).sum(-1, keepdim=True)
    grad = q.mul_(-s_sum)
    grad.scatter_add_(-1, ids, sorted_q * g)
    grad.mul_(weight * inv_t)
    return transform_grad_(grad, None, scale, softcap, raw=raw)


def uld_chunk_loss_and_grads(s, t, labels, cfg: ULDConfig, row_scale, out_s=None, out_t=None):
    """Per-row ULD losses of one chunk of rows (s: (rows, V_s), t: (rows, V_t); labels (rows,)
    or None) and the gradients of sum(row_scale * loss) w.r.t. s and t in closed form, written
    into ``out_s`` / ``out_t`` ((rows, V) buffers of the inputs' dtypes; they may be s or t
    themselves: both are read in full before anything is written). Float32 math (float64 for
    float64 inputs)."""
    dtype = compute_dtype(s.dtype, t.dtype)
    counted = labels != cfg.ignore_index if labels is not None else None
    inv_t = 1.0 / cfg.temperature
    sides = []
    for z_raw, teacher in ((s, False), (t, True)):
        scale, cap = cfg.side(teacher)
        raw = z_raw.to(dtype)
        if counted is not None:  # ignored rows may hold anything, NaN included
            raw = raw.masked_fill(~counted[:, None], 0.0)
        z = transform_logits(raw, scale, cap)
        x = z * inv_t if inv_t != 1.0 else z
        norm = log_normaliser(x)
        values, ids = select_ranked(x, cfg.top_k)
        sorted_q = torch.exp((values - norm[0][:, None]) - norm[1][:, None])
        sides.append((raw, x, norm, values, ids, sorted_q, scale, cap))
    rows = wasserstein_rows(sides[0][5], sides[1][5])
    if counted is not None:
        rows = torch.where(counted, rows, 0.0)
    if out_s is None and out_t is None:
        return rows
    weight = row_scale
    if counted is not None:
        weight = torch.where(counted, row_scale, 0.0)
    if isinstance(weight, torch.Tensor) and weight.dim():
        weight = weight[:, None]
    if isinstance(weight, torch.Tensor):
        weight = weight.to(dtype)
    signs = ranked_signs(sides[0][5], sides[1][5])
    for out, side, g in ((out_s, sides[0], signs[0]), (out_t, sides[1], signs[1])):
        if out is not None:
            raw, x, norm, _, ids, sorted_q, scale, cap = side
            out.copy_(_side_grad(x, norm, sorted_q, ids, g, weight, inv_t, raw, scale, cap))
    return rows


def row_scale_of(labels, n_rows: int, cfg: ULDConfig, dtype, device):
    """(count of counted rows, d loss / d row loss) of a chunked backend: device tensors when
    labels decide them (no host sync), Python numbers when every row counts."""
    mean = cfg.reduction in ("mean", "batchmean")
    if labels is not None:
        count = (labels != cfg.ignore_index).sum()
        scale = 1.0 / count.clamp(min=1).to(dtype) if mean else torch.ones((), dtype=dtype, device=device)
        return count, scale
    return n_rows, (1.0 / max(n_rows, 1) if mean else 1.0)


def _rows_per_chunk(vocab_s: int, vocab_t: int) -> int:
    return chunk_rows(max(vocab_s, vocab_t))


class ChunkedULDLoss(torch.autograd.Function):
    """``uld_loss`` over row chunks (about 2^18 elements each): each chunk's loss and closed-form
    gradients are computed in the forward and written into preallocated gradients; the
    backward scales them by grad_output in place and hands them over, so it can run once
    (a second backward raises; use the reference ``uld_loss`` for that). Peak extra memory: the
    gradients plus one chunk's working set (the tempered logits, probabilities and ranked
    ids of both models)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, cfg: ULDConfig):
        vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
        lead = student_logits.shape[:-1]
        s2 = student_logits.reshape(-1, vs)
        t2 = teacher_logits.reshape(-1, vt)
        y = labels.reshape(-1) if labels is not None else None
        n_rows = s2.shape[0]
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = compute_dtype(student_logits.dtype, teacher_logits.dtype)
        count, row_scale = row_scale_of(y, n_rows, cfg, dtype, s2.device)
        grad_s = torch.empty(s2.shape, dtype=s2.dtype, device=s2.device) if need_s else None
        grad_t = torch.empty(t2.shape, dtype=t2.dtype, device=t2.device) if need_t else None
        rows = torch.empty(n_rows, dtype=dtype, device=s2.device)
        step = _rows_per_chunk(vs, vt)
        for start in range(0, n_rows, step):
            sl = slice(start, min(n_rows, start + step))
            rows[sl] = uld_chunk_loss_and_grads(
                s2[sl].detach(), t2[sl].detach(), y[sl] if y is not None else None, cfg, row_scale,
                grad_s[sl] if need_s else None, grad_t[sl] if need_t else None)
        ctx.grads = (grad_s, grad_t)
        ctx.shapes = (student_logits.shape, teacher_logits.shape)
        ctx.reduction = cfg.reduction
        if cfg.reduction == "none":
            return rows.reshape(lead)
        return reduce_rows(rows, count, cfg.reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return (*hand_over_grads(ctx, grad_loss, "uld_loss(backend='torch')"), None, None)


# --------------------------------------------------------------------------------------
# The linear (hidden-state) variant: the chunked algorithm of linear_kd (reference/linear_kd.py)
# with the ULD step. Per chunk of C rows: the student logits (C, V_s) from its head, the
# teacher's (C, V_t) from its head or its given rows, the step's loss and logits gradients
# (written over the logits buffers), then the gradient GEMMs. Never more than C rows of logits.
# --------------------------------------------------------------------------------------

# (C, V)-sized float32 temporaries of the step per model (tempered logits, probabilities,
# gradient, ranked values / ids), counted by chunk_size="auto" next to the logits buffers.
STEP_TEMPORARIES = 4


class LinearULDState:
    """The parts of one ``linear_uld_loss`` call: the student head, the teacher (head or given
    logits), the labels and the rows per chunk. ``tensors``: (student_hidden, student_weight,
    student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits)."""

    def __init__(self, cfg: ULDConfig, chunk_size, labels, tensors, need, step):
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
         teacher_bias, teacher_logits) = tensors
        self.cfg, self.step = cfg, step
        self.dtype = compute_dtype(*(x.dtype for x in tensors if x is not None))
        self.device = student_hidden.device
        self.lead = student_hidden.shape[:-1]
        self.labels = labels.reshape(-1) if labels is not None else None
        # ignored rows' hidden states never enter a GEMM (LinearHead): NaN padding stays out
        counted = self.labels != cfg.ignore_index if labels is not None else None
        self.student = LinearHead(student_hidden, student_weight, student_bias, need[0:3],
                                  self.dtype, counted=counted)
        self.vocab_s = student_weight.shape[0]
        if teacher_weight is not None:
            self.teacher = LinearHead(teacher_hidden, teacher_weight, teacher_bias, need[3:6],
                                      self.dtype, slot=3, counted=counted)
            self.vocab_t = teacher_weight.shape[0]
        else:
            self.vocab_t = teacher_logits.shape[-1]
            self.teacher = GivenLogits(teacher_logits, need[6], self.vocab_t)
        if chunk_size == "auto":
            size = torch.empty((), dtype=self.dtype).element_size()
            per_row = (self.student.bytes_per_row(self.vocab_s, self.dtype)
                       + self.teacher.bytes_per_row(self.vocab_t, self.dtype)
                       + STEP_TEMPORARIES * (self.vocab_s + self.vocab_t) * size)
            chunk_size = auto_chunk_rows(self.n_rows, per_row, self.device)
        self.chunk = chunk_size

    @property
    def n_rows(self) -> int:
        return self.student.n_rows

    def sweep(self, row_scale, grads: bool):
        """One pass over the chunks: the per-row losses and, with ``grads``, the gradients
        accumulated in the heads (scaled per row by ``row_scale``)."""
        student, teacher = self.student, self.teacher
        n = self.n_rows
        rows = torch.empty(n, dtype=self.dtype, device=self.device)
        need_s = grads and student.need_grad
        need_t = grads and teacher.need_grad
        per_row = isinstance(row_scale, torch.Tensor) and row_scale.dim() > 0
        c_max = max(1, min(self.chunk, n))
        s_buf = torch.empty((c_max, self.vocab_s), dtype=self.dtype, device=self.device)
        t_buf = None
        if teacher.bytes_per_row(self.vocab_t, self.dtype):
            t_buf = torch.empty((c_max, self.vocab_t), dtype=self.dtype, device=self.device)
        for start in range(0, n, self.chunk):
            sl = slice(start, min(n, start + self.chunk))
            c = sl.stop - sl.start
            z_s = student.logits(sl, s_buf[:c])
            z_t = teacher.logits(sl, t_buf[:c] if t_buf is not None else None)
            out_t = teacher.grad_out(sl, z_t) if need_t else None
            rows[sl] = self.step(
                z_s, z_t, self.labels[sl] if self.labels is not None else None, self.cfg,
                row_scale[sl] if per_row else row_scale, z_s if need_s else None, out_t)
            if need_s:
                student.backward(sl, z_s)
            if need_t:
                teacher.backward(sl, out_t)
        return rows

    def grads(self):
        out = self.student.grads() + [None] * 4
        teacher = self.teacher.grads()
        out[self.teacher.slot:self.teacher.slot + len(teacher)] = teacher
        return out


def linear_uld_forward(ctx, step, cfg: ULDConfig, chunk_size, labels, tensors):
    """Forward of the chunked linear Functions (``step``: the backend's chunk step). Scalar
    reductions compute the gradients here and the backward scales them by grad_output (once);
    ``none`` computes only the losses here and the backward sweeps again with grad_output as
    the per-row scale (it may run more than once)."""
    need = ctx.needs_input_grad[3:]
    state = LinearULDState(cfg, chunk_size, labels, tensors, need, step)
    ctx.reduction = cfg.reduction
    if cfg.reduction == "none":
        ctx.args = (step, cfg, chunk_size, need)
        ctx.save_for_backward(labels, *tensors)
        return state.sweep(1.0, grads=False).reshape(state.lead)
    count, row_scale = row_scale_of(state.labels, state.n_rows, cfg, state.dtype, state.device)
    rows = state.sweep(row_scale, grads=True)
    ctx.grads = state.grads()
    return reduce_rows(rows, count, cfg.reduction)


def linear_uld_backward(ctx, grad_loss):
    if ctx.reduction == "none":
        step, cfg, chunk_size, need = ctx.args
        labels, *tensors = ctx.saved_tensors
        state = LinearULDState(cfg, chunk_size, labels, tensors, need, step)
        state.sweep(grad_loss.reshape(-1).to(state.dtype), grads=True)
        grads = state.grads()
    else:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise grad_once_error("linear_uld_loss")
        for g in grads:
            if g is not None:
                _scale_rows_(g.view(-1, g.shape[-1]) if g.dim() > 1 else g.view(1, -1), grad_loss, "sum")
    return (None, None, None, *grads)


# The torch backend's step: the closed form over cache-sized slices of the chunk's rows.
TORCH_STEP = functools.partial(torch_chunk_step, fn=uld_chunk_loss_and_grads)


class ChunkedLinearULDLoss(torch.autograd.Function):
    """``linear_uld_loss`` over row chunks with the closed-form PyTorch step; any device,
    float64 too. Arguments: (cfg, chunk_size, labels, *tensors) in ``LinearULDState``'s order."""

    @staticmethod
    def forward(ctx, cfg, chunk_size, labels, *tensors):
        return linear_uld_forward(ctx, TORCH_STEP, cfg, chunk_size, labels, tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return linear_uld_backward(ctx, grad_loss)
