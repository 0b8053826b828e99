"""Fused LM-head distillation (``linear_kd_loss``): the reference, and the chunked algorithm
behind both backends.

Per row i (token), the student logits are a linear head ``s = h_s W_s^T (+ b_s)`` with
h_s (N, H_s), W_s (V_s, H_s), and the teacher's are one of ``t = h_t W_t^T (+ b_t)`` (V_t, H_t)
or given logits t (N, V_t). The loss is ``kd_loss``'s per-row loss on s and t
(pydistill/reference/softmax_divergence.py), reduced; when V_s != V_t the shorter vocabulary
is -inf beyond its end (zero probability, no gradient), V = max(V_s, V_t).

Chunked algorithm, C rows at a time, never more than C rows of logits in memory::

    z_s = h_s[c] W_s^T (+ b_s)           (C, V) float32 out, float32 accumulation   2 C V H_s
    z_t = h_t[c] W_t^T (+ b_t)           or the rows of the given teacher logits     2 C V H_t
    loss[c], g = step(z_s, z_t)          g = d(sum_i row_scale_i loss_i)/dz_s, written over z_s
    dh_s[c] = g W_s                                                                  2 C V H_s
    dW_s   += g^T h_s[c],  db_s += sum_rows g                                        2 C V H_s

``step`` is the fused divergence and its gradient: ``chunk_loss_and_grads`` (closed-form
PyTorch) for the torch backend, the Triton kernel ``kd_fwd(grad_s=...)`` for the triton one
(pydistill/ops/linear_kd.py), their top-k counterparts (topk_divergence family) for a top-k
teacher, and ``vocab_parallel_chunk_loss_and_grads`` (below) when the heads are sharded over
the vocabulary. Peak extra memory: the gradients themselves plus
(C, V) float32 buffers for z_s and z_t, and for bfloat16 / float16 weights a (C, V) buffer of
g in the weight's dtype, which the step writes directly (rounded once from its float32 value;
a head with a bias gradient has g written over z_s in float32, its bias gradient summed from
that, then rounded into the buffer). The logits are never rounded to the inputs' dtype before
the softmax.

Low-precision (bfloat16 / float16) weights: the logits GEMM runs with a float32 output
(``torch.mm(out_dtype=torch.float32)`` where the device has it, CUDA; else, on the CPU, the
weight is upcast block by block, 4 MB at a time, never as a whole). The two gradient GEMMs run
in the weight's dtype from one rounding of g (float32 accumulation inside each GEMM), and dW
accumulates across chunks in the weight's dtype with one ``addmm_`` per chunk: one rounding
per chunk. Measured relative error (Frobenius) of a bfloat16 dW against float64, N = 4096,
H = 256, V = 8000: one rounding of the exact dW 1.66e-3; K chunks accumulated in bfloat16
1.78e-3 (K = 1), 2.41e-3 (K = 4), 4.19e-3 (K = 16), 8.05e-3 (K = 64), growing like sqrt(K);
a float32 accumulator 1.78e-3 for any K but 4 V H extra bytes (2.1 GB at V = 128256,
H = 4096, twice the bfloat16 dW and more than the whole chunk working set), so dW is
accumulated in the weight's dtype. ``chunk_size="auto"`` takes the largest chunks that a fixed
budget of chunk buffers allows (AUTO_BUDGET_*), so that K, and the rounding sequence, depend
only on the shapes: 22 chunks of 384 rows at N = 8192, V = 128256.
Rounding g before dh costs nothing measurable (1.73e-3 against 1.66e-3 for dh).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from pydistill.reference.softmax_divergence import (
    KDConfig,
    _scale_rows_,
    chunk_loss_and_grads,
    chunk_row_scale,
    chunk_rows,
    compute_dtype,
    config_fields,
    divergence_terms,
    finish_student_chunk,
    hard_cross_entropy,
    kd_loss,
    reduce_rows,
    row_weights,
    transform_grad_,
    zero_ignored_rows,
)
from pydistill.reference.topk_divergence import topk_chunk_loss_and_grads

# chunk_size="auto": bytes of the per-chunk buffers (the (C, V) logits of student and teacher,
# the (C, V) gradient in the weight's dtype, the chunk's hidden rows, the vocabulary-parallel
# step's temporaries) that one chunk may use. A fixed budget, never the memory free at the
# time of the call: the rows per chunk, and with them the sequence of dW's bfloat16 roundings
# (module docstring), depend only on the shapes and dtypes, so a call gives the same gradients
# from call to call and on any machine. CPU: rows that large already run the GEMMs near the
# CPU's matmul rate (bench/bench_linear_kd.py), and the divergence step walks the chunk in
# cache-sized slices. Accelerators: 0.5 GB, 384 rows at V = 128256 with bfloat16 heads (10 B
# per logit: two float32 logits and the bfloat16 gradient), tensor-core-sized GEMMs. The
# environment variable AUTO_BUDGET_ENV (bytes) overrides both.
AUTO_BUDGET_CPU = 64 << 20
AUTO_BUDGET_ACCELERATOR = 500 * 10**6
AUTO_BUDGET_ENV = "PYDISTILL_AUTO_CHUNK_BYTES"
# Rows per chunk are rounded down to a multiple of this once there are that many (whole GEMM
# tiles on tensor cores).
ROW_MULTIPLE = 128
# (C, V)-sized float32 temporaries alive at once in vocab_parallel_chunk_loss_and_grads.
VOCAB_PARALLEL_TEMPORARIES = 8
# Elements of the float32 block of a low-precision weight upcast at a time on the CPU.
UPCAST_BLOCK_ELEMENTS = 1 << 20


# --------------------------------------------------------------------------------------
# The reference: materialised logits, then kd_loss (plain autograd)
# --------------------------------------------------------------------------------------


def pad_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """(..., V') logits padded with -inf to (..., vocab)."""
    missing = vocab - logits.shape[-1]
    if missing <= 0:
        return logits
    pad = logits.new_full(logits.shape[:-1] + (missing,), -math.inf)
    return torch.cat([logits, pad], dim=-1)


def head_logits(hidden, weight, bias=None):
    """``hidden @ weight^T (+ bias)`` materialised in float32 (float64 for float64 inputs)."""
    dtype = compute_dtype(hidden.dtype, weight.dtype)
    z = hidden.to(dtype) @ weight.to(dtype).T
    return z if bias is None else z + bias.to(dtype)


def linear_kd_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                   teacher_logits=None, student_bias=None, teacher_bias=None, labels=None,
                   cfg: KDConfig = KDConfig()):
    """The reference ``linear_kd_loss``: both logits materialised (N, V), the shorter vocabulary
    padded with -inf, ``kd_loss`` on them; plain autograd, any dtype (float64 in the tests)."""
    s = head_logits(student_hidden, student_weight, student_bias)
    t = teacher_logits if teacher_logits is not None else head_logits(
        teacher_hidden, teacher_weight, teacher_bias)
    vocab = max(s.shape[-1], t.shape[-1])
    return kd_loss(pad_vocab(s, vocab), pad_vocab(t, vocab), labels, cfg)


# --------------------------------------------------------------------------------------
# Chunk plan and the parts of the chunked algorithm
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkPlan:
    """How ``linear_kd_loss`` walks the rows: ``chunk_size`` ("auto" or rows per chunk, validated
    by the API) and the vocabulary-parallel ``group`` (None: the heads are whole)."""

    chunk_size: Union[int, str] = "auto"
    group: Optional[object] = None
    entropy: bool = False  # also return the student's per-row entropy (return_entropy)
    components: bool = False  # also return the soft and hard terms (return_components)
    # vocab_mismatch ("restrict" / "error") under a process_group: every rank's student and
    # teacher blocks must be of one size, checked across the ranks (None: not checked)
    equal_blocks: Optional[str] = None


def auto_budget_bytes(device: torch.device) -> int:
    """Bytes of chunk buffers ``chunk_size="auto"`` sizes its chunks for on ``device``: the
    AUTO_BUDGET_ENV override, else AUTO_BUDGET_CPU on the CPU and AUTO_BUDGET_ACCELERATOR
    elsewhere. Never queries the free memory (see AUTO_BUDGET_ACCELERATOR)."""
    override = os.environ.get(AUTO_BUDGET_ENV)
    if override is not None and override.strip():
        try:
            value = int(override)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"{AUTO_BUDGET_ENV}: expected a positive number of bytes, got {override!r}")
        return value
    return AUTO_BUDGET_CPU if device.type == "cpu" else AUTO_BUDGET_ACCELERATOR


def auto_chunk_rows(n_rows: int, bytes_per_row: int, device: torch.device) -> int:
    rows = auto_budget_bytes(device) // max(bytes_per_row, 1)
    if rows >= ROW_MULTIPLE:
        rows -= rows % ROW_MULTIPLE
    return max(1, min(rows, n_rows))


@functools.lru_cache(maxsize=None)
def _mm_has_out_dtype(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=, out=)`` runs here for these dtypes (CUDA has it for
    bfloat16 / float16 -> float32 since torch 2.8; the CPU does not). Probed once, on a strided
    destination like a padded logits buffer."""
    try:
        a = torch.ones((2, 2), dtype=dtype, device=device)
        out = torch.empty((2, 4), dtype=out_dtype, device=device)[:, :2]
        torch.mm(a, a, out_dtype=out_dtype, out=out)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out = x @ weight^T`` accumulated and stored in out's dtype (float32 / float64), never
    rounded to the inputs' lower precision on the way."""
    if x.dtype == out.dtype:
        return torch.mm(x, weight.T, out=out)
    if _mm_has_out_dtype(x.device, x.dtype, out.dtype):
        return torch.mm(x, weight.T, out_dtype=out.dtype, out=out)
    # No mixed-precision GEMM here (the CPU): upcast the weight one block of rows at a time
    # (a float32 copy of a whole 128k-row head would be GBs; the blocks' conversion costs 1/C
    # of the GEMM's work).
    x = x.to(out.dtype)
    block = max(1, UPCAST_BLOCK_ELEMENTS // max(weight.shape[1], 1))
    for v0 in range(0, weight.shape[0], block):
        torch.mm(x, weight[v0:v0 + block].to(out.dtype).T, out=out[:, v0:v0 + block])
    return out


class LinearHead:
    """One linear head over row chunks: its logits ``hidden @ weight^T (+ bias)`` written into a
    float32 (float64) buffer, and its gradients accumulated from the logits' gradient.

    ``need`` = (hidden, weight, bias) gradients wanted; a frozen weight allocates no dW.
    ``counted``: (N,) bool, the rows the loss counts (None: all). The hidden states of the
    others never enter a GEMM: they may hold anything (NaN at padding positions is common), and
    one NaN row would reach every entry of dW through 0 * NaN."""

    read_without_soft = False  # both steps read the teacher only for the divergence term

    def __init__(self, hidden, weight, bias, need, dtype, slot=0, counted=None):
        self.slot = slot  # of ``hidden`` in the Function's tensors
        self.shape = hidden.shape
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.counted = counted
        self._chunk = None  # (slice, its hidden rows with the ignored ones zeroed)
        self.weight, self.bias = weight, bias
        self.vocab = weight.shape[0]
        self.need_grad = any(need)
        # the gradient GEMMs run in the weight's dtype from one rounding of g
        self.round_grad = self.need_grad and weight.dtype != dtype
        device = weight.device
        # contiguous whatever the inputs' strides, so that .view(shape) always works
        self.grad_hidden = torch.empty(self.hidden.shape, dtype=hidden.dtype, device=device) if need[0] else None
        self.grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=device) if need[1] else None
        self.grad_bias = torch.zeros(self.vocab, dtype=dtype, device=device) if need[2] else None
        self.scratch = None
        self.direct_grad = False  # set by callers whose steps write g in the weight's dtype

    @property
    def n_rows(self) -> int:
        return self.hidden.shape[0]

    def bytes_per_row(self, vocab: int, dtype) -> int:
        """Chunk buffers per row: its (C, vocab) logits, g in the weight's dtype, and the copy
        of its hidden row when some rows are ignored."""
        logits = vocab * torch.empty((), dtype=dtype).element_size()
        grad = vocab * self.weight.element_size() if self.round_grad else 0
        hidden = self.hidden.shape[-1] * self.hidden.element_size() if self.counted is not None else 0
        return logits + grad + hidden

    @property
    def grad_in_place(self) -> bool:
        """Whether the step writes g over the float32 logits, else straight into the buffer in
        the weight's dtype that the GEMMs read (``direct_grad``: a step that writes any float
        dtype): float32 weights, and a bias gradient, which is summed from the unrounded g."""
        return not (self.direct_grad and self.round_grad) or self.grad_bias is not None

    def rows(self, sl: slice) -> torch.Tensor:
        """hidden[sl], its ignored rows zeroed (one (C, H) copy per chunk, kept for the
        chunk's gradient GEMMs)."""
        if self.counted is None:
            return self.hidden[sl]
        if self._chunk is None or self._chunk[0] != sl:
            h = self.hidden[sl].masked_fill(~self.counted[sl, None], 0)
            self._chunk = (sl, h)
        return self._chunk[1]

    def logits(self, sl: slice, out: torch.Tensor) -> torch.Tensor:
        own = out[:, :self.vocab]
        linear_into(own, self.rows(sl), self.weight)
        if self.bias is not None:
            own.add_(self.bias)
        out[:, self.vocab:] = -math.inf  # padded vocabulary (refilled: g may have overwritten it)
        return out

    def _scratch(self, shape) -> torch.Tensor:
        """The (C, width) buffer of g in the weight's dtype, allocated at the first (largest)
        chunk."""
        if self.scratch is None or self.scratch.shape[0] < shape[0] or self.scratch.shape[1] != shape[1]:
            self.scratch = torch.empty(shape, dtype=self.weight.dtype, device=self.weight.device)
        return self.scratch[:shape[0]]

    def grad_out(self, sl: slice, z: torch.Tensor) -> torch.Tensor:
        """Where the step writes the logits' gradient: over the logits, or (low-precision
        weights) rounded once, straight into the buffer the gradient GEMMs read: no float32 g
        written and read back for a copy."""
        return z if self.grad_in_place else self._scratch(z.shape)

    def backward(self, sl: slice, grad_logits: torch.Tensor):
        g = grad_logits[:, :self.vocab]
        if self.grad_bias is not None:
            self.grad_bias.add_(g.sum(0))
        if g.dtype != self.weight.dtype:  # g written in float32 (the bias): rounded once here
            g = self._scratch(g.shape).copy_(g)
        if self.grad_hidden is not None:
            torch.mm(g, self.weight, out=self.grad_hidden[sl])
        if self.grad_weight is not None:
            self.grad_weight.addmm_(g.T, self.rows(sl))

    def grads(self):
        dh = self.grad_hidden.view(self.shape) if self.grad_hidden is not None else None
        db = self.grad_bias.to(self.bias.dtype) if self.grad_bias is not None else None
        return [dh, self.grad_weight, db]

    def sum_over_ranks(self, group):
        """Hidden states are replicated across the vocabulary shards: d(hidden) is the sum of
        every shard's contribution. Weight and bias gradients stay local (each rank's shard)."""
        if self.grad_hidden is not None:
            torch.distributed.all_reduce(self.grad_hidden, group=group)


class GivenLogits:
    """A teacher given as logits (..., V_t): its rows are handed to the step as they are, or
    copied into the chunk buffer when the vocabulary must be padded."""

    slot = 6  # of teacher_logits in the Function's tensors
    read_without_soft = False

    def __init__(self, logits, need_grad: bool, vocab: int):
        self.shape = logits.shape
        self.values = logits.reshape(-1, logits.shape[-1])
        self.vocab = logits.shape[-1]
        self.padded = self.vocab < vocab
        self.need_grad = need_grad
        self.grad = torch.empty(self.values.shape, dtype=logits.dtype, device=logits.device) if need_grad else None

    def bytes_per_row(self, vocab: int, dtype) -> int:
        return vocab * torch.empty((), dtype=dtype).element_size() if self.padded else 0

    def logits(self, sl: slice, out: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.padded:
            return self.values[sl]
        out[:, :self.vocab] = self.values[sl]
        out[:, self.vocab:] = -math.inf
        return out

    def grad_out(self, sl: slice, z: torch.Tensor) -> torch.Tensor:
        return z if self.padded else self.grad[sl]

    def backward(self, sl: slice, grad_logits: torch.Tensor):
        if self.padded:
            self.grad[sl] = grad_logits[:, :self.vocab]

    def grads(self):
        return [self.grad.view(self.shape) if self.grad is not None else None]

    def sum_over_ranks(self, group):
        pass  # each rank holds the gradient of its own shard


class GivenTopK:
    """A top-k teacher (log-probs, token ids), both (..., K): its rows handed to the top-k step
    (pydistill/reference/topk_divergence.py) as a pair. A constant."""

    slot = 7  # of the log-probs in the Function's tensors
    read_without_soft = True  # the top-k step reads it for its ignored-row handling too
    need_grad = False

    def __init__(self, logprobs, indices):
        k = logprobs.shape[-1]
        self.values = (logprobs.reshape(-1, k), indices.reshape(-1, k))

    def bytes_per_row(self, vocab: int, dtype) -> int:
        return 0

    def logits(self, sl: slice, out) -> tuple:
        return tuple(x[sl] for x in self.values)

    def grads(self):
        return [None, None]


def _topk_chunk(s, t, labels, cfg, row_scale, out_s=None, out_t=None, entropy=None):
    assert entropy is None, "return_entropy: refused with a top-k teacher by the API"
    return topk_chunk_loss_and_grads(s, t[0], t[1], labels, cfg, row_scale, out_s)


def torch_chunk_step(s, t, labels, cfg: KDConfig, row_scale, out_s=None, out_t=None,
                     entropy=None, *, fn=chunk_loss_and_grads):
    """``chunk_loss_and_grads`` (or ``fn`` of the same contract) over cache-sized slices of the
    chunk's rows (its CHUNK_ELEMENTS): the GEMM chunk is sized for the GEMMs and the memory
    budget, the divergence's ~10 temporaries for the cache. ``t``: rows, or a tuple of rows.
    ``entropy``: a (rows,) buffer for the student's per-row entropy, or None."""
    n, step = s.shape[0], chunk_rows(s.shape[-1])
    rows = torch.empty(n, dtype=compute_dtype(s.dtype), device=s.device)
    per_row = isinstance(row_scale, torch.Tensor) and row_scale.dim() > 0
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        rows[sl] = fn(
            s[sl], tuple(x[sl] for x in t) if isinstance(t, tuple) else t[sl],
            labels[sl] if labels is not None else None, cfg,
            row_scale[sl] if per_row else row_scale,
            out_s[sl] if out_s is not None else None, out_t[sl] if out_t is not None else None,
            **({} if entropy is None else dict(entropy=entropy[sl])),
        )
    return rows


# --------------------------------------------------------------------------------------
# Vocabulary parallel: the heads sharded by vocabulary rows across a process group
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocabShard:
    """This rank's columns [offset, offset + width) of the global vocabulary (the blocks of
    the ranks in rank order), ``total`` the global width. offset and total are device tensors:
    they decide only which rank holds a label's column, on the device, without a sync."""

    width: int
    offset: torch.Tensor
    total: torch.Tensor


def vocab_shard(group, width: int, device: torch.device, blocks=None, mode=None) -> VocabShard:
    """One all-reduce of every rank's block width (collective: every rank calls it). With
    ``blocks`` = (student rows, teacher rows) of this rank, the same collective carries every
    rank's pair, and every rank raises the same ValueError (``vocab_mismatch=mode``) if any
    rank's two differ: one host read, so that no rank is left waiting in a collective."""
    dist = torch.distributed
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    widths = torch.zeros((world, 3), dtype=torch.int64, device=device)
    widths[rank, 0] = width
    if blocks is not None:
        widths[rank, 1], widths[rank, 2] = blocks
    dist.all_reduce(widths, group=group)
    if blocks is not None:
        pairs = widths[:, 1:].tolist()
        bad = [(r, s, t) for r, (s, t) in enumerate(pairs) if s != t]
        if bad:
            r, s, t = bad[0]
            raise ValueError(
                f"vocab_mismatch={mode!r}: with a process_group every rank's student and teacher "
                f"blocks must have one size (rank {r}: student {s} rows, teacher {t}); restricting "
                "a sharded teacher to the student's vocabulary is not supported. Pass "
                "vocab_mismatch='pad' for the sharded padded-vocabulary convention")
    widths = widths[:, 0]
    return VocabShard(width, widths[:rank].sum(), widths.sum())


def _sharded_log_softmax(xs, group):
    """log_softmax over the global vocabulary of each (rows, width) shard in ``xs``: the row
    maxima and exp-sums all-reduced (one collective each for all of them)."""
    dist = torch.distributed
    m = torch.stack([x.amax(-1) for x in xs], -1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(m == -math.inf, 0.0, m)  # a row -inf everywhere stays -inf, not NaN
    shifted = [x - m[:, k, None] for k, x in enumerate(xs)]
    sums = torch.stack([x.exp().sum(-1) for x in shifted], -1)
    dist.all_reduce(sums, group=group)
    # (x - m) - log l rather than x - (m + log l): no cancellation when |m| is large
    return [x.sub_(sums[:, k, None].log()) for k, x in enumerate(shifted)]


def vocab_parallel_chunk_loss_and_grads(s, t, labels, cfg: KDConfig, row_scale, out_s=None,
                                        out_t=None, entropy=None, *, group, shard: VocabShard):
    """``chunk_loss_and_grads`` for one vocabulary shard: s, t (rows, width) are this rank's
    columns of the global logits, labels global token ids. Every row reduction is all-reduced
    over ``group``: the maxima and exp-sums of the softmaxes, then in one collective the
    divergence D, the sums S_q = sum q h and S_p = sum p u of the gradient table
    (kernels/softmax_divergence.py) and -log softmax(s)[y] from the rank holding column y. The
    per-row losses (identical on every rank) and this shard's gradient columns equal the
    unsharded ones. Three collectives per chunk; every rank must call it the same number of
    times."""
    assert entropy is None, "return_entropy: refused with a process_group by the API"
    dtype = compute_dtype(s.dtype, t.dtype)
    counted = labels != cfg.ignore_index if labels is not None else None

    soft, hard = cfg.has_soft, cfg.hard_weight != 0.0
    need_t = out_t is not None and soft
    inv_t = 1.0 / cfg.temperature
    s = zero_ignored_rows(s.to(dtype), counted)  # ignored rows may hold anything, NaN included
    z_s = cfg.student_transform(s)
    if soft:
        t = zero_ignored_rows(t.to(dtype), counted)
    z_t = cfg.teacher_transform(t) if soft else None
    xs = [z_s * inv_t, z_t * inv_t] if soft else []
    separate_ce = hard and (not soft or cfg.temperature != 1.0)
    if separate_ce:
        xs.append(z_s)
    logs = _sharded_log_softmax(xs, group)

    partials = []
    if soft:
        log_q, log_p = logs[0], logs[1]
        q, p = log_q.exp(), log_p.exp()
        div, qh, _, pu, _ = divergence_terms(log_p, log_q, p, q, cfg.canonical_divergence(),
                                             cfg.beta, need_t)
        partials += [div, qh.sum(-1)] + ([pu.sum(-1)] if need_t else [])
    if hard:
        log_1 = logs[-1] if separate_ce else logs[0]  # the student's at T = 1
        local = labels.long() - shard.offset
        owned = counted & (local >= 0) & (local < z_s.shape[-1])
        target = torch.where(owned, local, 0)[:, None]
        partials.append(torch.where(owned, -log_1.gather(-1, target).squeeze(-1), 0.0))
    totals = torch.stack(partials, -1)
    torch.distributed.all_reduce(totals, group=group)

    rows = torch.zeros(s.shape[0], dtype=dtype, device=s.device)
    coef = cfg.soft_scale * inv_t  # the soft gradient is carried without it
    g_s = None
    if soft:
        rows.add_(totals[:, 0], alpha=cfg.soft_scale)
        if out_s is not None:
            g_s = qh.sub_(q * totals[:, 1, None])
    hard_term = None
    if hard:  # -log softmax(z)[y] over the whole vocabulary, and its gradient on this shard
        in_range = (labels >= 0) & (labels < shard.total)
        ce = torch.where(in_range, totals[:, -1], math.nan)
        soft1 = None
        if out_s is not None:
            soft1 = log_1.exp().scatter_add_(-1, target, -owned.to(dtype)[:, None])
        hard_term = (ce, soft1)
    rows = finish_student_chunk(rows, g_s, coef, z_s, labels, counted, cfg, row_scale, out_s,
                                hard=hard_term, raw=s)
    if out_t is not None:
        if need_t:
            g_t = pu.sub_(p.mul_(totals[:, 2, None])).mul_(coef)
            transform_grad_(g_t, z_t, cfg.teacher_logit_scale, cfg.teacher_softcap, raw=t)
            torch.mul(g_t, row_weights(row_scale, counted), out=out_t)
        else:  # no divergence term: the teacher does not enter the loss
            out_t.zero_()
    return rows


# --------------------------------------------------------------------------------------
# The autograd Function: the chunk loop, once for every backend
# --------------------------------------------------------------------------------------


class LinearKDState:
    """The parts of one ``linear_kd_loss`` call: student head, teacher (head or logits),
    labels, the vocabulary layout and the rows per chunk."""

    def __init__(self, cfg: KDConfig, plan: ChunkPlan, labels, tensors, need, steps):
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
         teacher_bias, teacher_logits, topk_logprobs, topk_indices) = tensors
        self.cfg, self.group = cfg, plan.group
        self.want_entropy = plan.entropy
        self.want_parts = plan.components
        self.dtype = compute_dtype(*(x.dtype for x in tensors if x is not None and x.is_floating_point()))
        self.device = student_hidden.device
        self.lead = student_hidden.shape[:-1]
        self.labels = labels.reshape(-1) if labels is not None else None
        counted = self.labels != cfg.ignore_index if labels is not None else None
        self.vocab = student_weight.shape[0]  # this rank's block when sharded
        dense_step, topk_step = steps
        self.step = dense_step
        self.student = LinearHead(student_hidden, student_weight, student_bias, need[0:3],
                                  self.dtype, counted=counted)
        if teacher_weight is not None:
            self.vocab = max(self.vocab, teacher_weight.shape[0])
            self.teacher = LinearHead(teacher_hidden, teacher_weight, teacher_bias, need[3:6],
                                      self.dtype, slot=3, counted=counted)
        elif teacher_logits is not None:
            self.vocab = max(self.vocab, teacher_logits.shape[-1])
            self.teacher = GivenLogits(teacher_logits, need[6], self.vocab)
        else:
            self.teacher = GivenTopK(topk_logprobs, topk_indices)
            self.step = topk_step
        for part in (self.student, self.teacher):  # every step writes g in any float dtype
            part.direct_grad = True
        if self.group is not None:
            blocks = None
            if plan.equal_blocks is not None:
                blocks = (self.student.vocab, self.teacher.vocab)
            self.shard = vocab_shard(self.group, self.vocab, self.device, blocks, plan.equal_blocks)
            self.step = functools.partial(vocab_parallel_chunk_loss_and_grads, group=self.group,
                                          shard=self.shard)
        # return_components: how the soft term D (times T^2 with t2) is had per row. From the
        # step's rows, rows = soft_weight T^2 D + hard_weight CE, with CE computed here from
        # the chunk's logits; by a loss-only step of its own when soft_weight = 0 (the step
        # then has no soft term); 0 when D is identically 0 (skew_* at beta = 1).
        self.kd_cfg = None
        if self.want_parts:
            self.kd_cfg = type(cfg)(**{**config_fields(cfg), "soft_weight": 1.0, "hard_weight": 0.0})
            self.kd_mode = ("zero" if not self.kd_cfg.has_soft else
                            "separate" if cfg.soft_weight == 0.0 else "from_rows")
        self.chunk = self._chunk_rows(plan.chunk_size)

    @property
    def n_rows(self) -> int:
        return self.student.n_rows

    @property
    def reads_teacher(self) -> bool:
        return (self.cfg.has_soft or self.teacher.read_without_soft
                or (self.want_parts and self.kd_mode == "separate"))

    def _chunk_ce(self, z_s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-row hard CE of one chunk's student logits (before the step overwrites them with
        their gradient), over cache-sized slices of rows; 0 on ignored rows, whatever they hold."""
        cfg, vocab = self.cfg, self.student.vocab
        out = torch.empty(z_s.shape[0], dtype=self.dtype, device=z_s.device)
        step = chunk_rows(vocab)
        for start in range(0, z_s.shape[0], step):
            sl = slice(start, min(z_s.shape[0], start + step))
            counted = labels[sl] != cfg.ignore_index
            z = cfg.student_transform(z_s[sl, :vocab].to(self.dtype)).masked_fill(~counted[:, None], 0.0)
            ce, _ = hard_cross_entropy(z, labels[sl], counted)
            out[sl] = torch.where(counted, ce, 0.0)
        return out

    def bytes_per_row(self) -> int:
        """Bytes of the chunk buffers per row of a chunk (those ``auto_budget_bytes`` bounds)."""
        per_row = self.student.bytes_per_row(self.vocab, self.dtype) + (
            self.teacher.bytes_per_row(self.vocab, self.dtype) if self.reads_teacher else 0)
        if self.group is not None:
            per_row += VOCAB_PARALLEL_TEMPORARIES * self.vocab * torch.empty((), dtype=self.dtype).element_size()
        return per_row

    def chunk_bytes(self) -> int:
        """Peak bytes of the chunk buffers of a sweep: the largest chunk's."""
        return max(1, min(self.chunk, self.n_rows)) * self.bytes_per_row()

    def _chunk_rows(self, chunk_size) -> int:
        if chunk_size not in ("auto", "tiled"):  # "tiled" here: a call the tiled path cannot run
            return chunk_size
        rows = auto_chunk_rows(self.n_rows, self.bytes_per_row(), self.device)
        if self.group is not None:
            # every rank must walk the same chunks (the step's collectives pair up): the
            # smallest choice wins. One host read per call, in the vocabulary-parallel path only.
            agreed = torch.tensor([rows], device=self.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=self.group)
            rows = int(agreed.item())
        return rows

    def sweep(self, row_scale, grads: bool):
        """One pass over the row chunks: the per-row losses, and with ``grads`` the gradients
        accumulated in the student and teacher parts (scaled per row by ``row_scale``: a number,
        a 0-dim tensor, or one value per row)."""
        cfg, student, teacher = self.cfg, self.student, self.teacher
        n = self.n_rows
        rows = torch.empty(n, dtype=self.dtype, device=self.device)
        self.entropy = torch.zeros(n, dtype=self.dtype, device=self.device) if self.want_entropy else None
        parts = self.want_parts
        self.kd_rows = torch.zeros(n, dtype=self.dtype, device=self.device) if parts else None
        self.ce_rows = torch.zeros(n, dtype=self.dtype, device=self.device) if parts else None
        need_s = grads and student.need_grad
        need_t = grads and teacher.need_grad and cfg.has_soft
        per_row = isinstance(row_scale, torch.Tensor) and row_scale.dim() > 0
        c_max = max(1, min(self.chunk, n))
        s_buf = torch.empty((c_max, self.vocab), dtype=self.dtype, device=self.device)
        t_buf = None
        if self.reads_teacher and teacher.bytes_per_row(self.vocab, self.dtype):
            t_buf = torch.empty((c_max, self.vocab), dtype=self.dtype, device=self.device)
        for start in range(0, n, self.chunk):
            sl = slice(start, min(n, start + self.chunk))
            c = sl.stop - sl.start
            z_s = student.logits(sl, s_buf[:c])
            z_t = z_s  # without a divergence term the teacher is not read: no GEMM for it
            if self.reads_teacher:
                z_t = teacher.logits(sl, t_buf[:c] if t_buf is not None else None)
            out_s = student.grad_out(sl, z_s) if need_s else None
            out_t = teacher.grad_out(sl, z_t) if need_t else None
            labels = self.labels[sl] if self.labels is not None else None
            if parts:  # before the step overwrites the logits with their gradient
                if labels is not None:
                    self.ce_rows[sl] = self._chunk_ce(z_s, labels)
                if self.kd_mode == "separate":
                    self.kd_rows[sl] = self.step(z_s, z_t, labels, self.kd_cfg, 1.0)
            rows[sl] = self.step(
                z_s, z_t, labels, cfg,
                row_scale[sl] if per_row else row_scale, out_s, out_t,
                **({} if self.entropy is None else dict(entropy=self.entropy[sl])),
            )
            if parts and self.kd_mode == "from_rows":
                kd = rows[sl]
                if labels is not None and cfg.hard_weight != 0.0:
                    kd = kd - cfg.hard_weight * self.ce_rows[sl]
                self.kd_rows[sl] = kd / cfg.soft_weight
            if need_s:
                student.backward(sl, out_s)
            if need_t:
                teacher.backward(sl, out_t)
        if grads and self.group is not None:
            student.sum_over_ranks(self.group)
            if need_t:
                teacher.sum_over_ranks(self.group)
        return rows

    def grads(self):
        """Gradients in the order of the Function's tensors (None where not wanted); a teacher
        that gets none from a loss without divergence term gets zeros."""
        teacher = self.teacher.grads()
        if not self.cfg.has_soft:
            teacher = [g.zero_() if g is not None else None for g in teacher]
        out = self.student.grads() + [None] * 6
        out[self.teacher.slot:self.teacher.slot + len(teacher)] = teacher
        return out


def linear_kd_forward(ctx, steps, cfg: KDConfig, plan: ChunkPlan, labels, tensors):
    """Forward of the chunked Functions; ``steps``: the backend's (dense teacher, top-k
    teacher) chunk steps. Scalar reductions: the gradients are computed here and the backward
    scales them by grad_output in place (once). ``none``: only the losses here; the backward
    runs the chunks again with grad_output as the per-row scale (it may run twice)."""
    need = ctx.needs_input_grad[3:]
    state = LinearKDState(cfg, plan, labels, tensors, need, steps)
    ctx.reduction = cfg.reduction
    if cfg.reduction == "none":
        ctx.args = (steps, cfg, plan, need)
        ctx.save_for_backward(labels, *tensors)
        count = None
        loss = state.sweep(1.0, grads=False).reshape(state.lead)
    else:
        count, row_scale = chunk_row_scale(state.labels, state.n_rows, cfg, state.dtype,
                                           state.device)
        rows = state.sweep(row_scale, grads=True)
        ctx.grads = state.grads()
        loss = reduce_rows(rows, count, cfg.reduction)
    parts = None
    if plan.components:
        parts = (state.kd_rows, state.ce_rows, count)
    return with_extras(ctx, cfg, loss, state.entropy, state.lead, parts)


def with_extras(ctx, cfg, loss, entropy, lead, parts=None):
    """The Functions' output: the loss, then with ``return_components`` (``parts`` = per-row
    soft and hard terms and the count of the reduction) the two reduced as the loss is, then
    with ``return_entropy`` the per-row entropy. The extras carry no gradient."""
    extras = []
    if parts is not None:
        kd, ce, count = parts
        extras += [x.reshape(lead) if cfg.reduction == "none" else reduce_rows(x, count, cfg.reduction)
                   for x in (kd, ce)]
    if entropy is not None:
        extras.append(entropy.reshape(lead))
    if not extras:
        return loss
    ctx.mark_non_differentiable(*extras)
    return (loss, *extras)


def scale_grad_rows_(g: torch.Tensor, grad_loss: torch.Tensor):
    """g *= grad_loss (a scalar tensor) in place, in float32 (float64), row chunk by row chunk;
    skipped when grad_loss is known to be 1 without a device sync (on the CPU)."""
    _scale_rows_(g.view(-1, g.shape[-1]) if g.dim() > 1 else g.view(1, -1), grad_loss, "sum")


def linear_kd_backward(ctx, grad_loss, scale_grad_=scale_grad_rows_):
    """The chunked Functions' backward. Scalar reductions: the forward's gradients scaled in
    place by grad_output with ``scale_grad_(g, grad_loss)`` (the backend's)."""
    if ctx.reduction == "none":
        steps, cfg, plan, need = ctx.args
        labels, *tensors = ctx.saved_tensors
        plan = ChunkPlan(plan.chunk_size, plan.group)  # the backward's sweep needs no extras
        state = LinearKDState(cfg, plan, labels, tensors, need, steps)
        state.sweep(grad_loss.reshape(-1).to(state.dtype), grads=True)
        grads = state.grads()
    else:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "linear_kd_loss computes its gradients in the forward pass and hands them over "
                "in the first backward; a second backward through the same loss "
                "(retain_graph=True) is not supported. Recompute the loss instead."
            )
        for g in grads:
            if g is not None:
                scale_grad_(g, grad_loss)
    return (None, None, None, *grads)


# The torch backend's chunk steps: (dense teacher, top-k teacher).
TORCH_STEPS = (torch_chunk_step, functools.partial(torch_chunk_step, fn=_topk_chunk))


class ChunkedLinearKDLoss(torch.autograd.Function):
    """``linear_kd_loss`` over row chunks with the divergence step in closed-form PyTorch
    (``chunk_loss_and_grads``); runs on any device and in float64. The backward of a scalar
    reduction hands over the gradients computed in the forward, so it runs once: a second
    backward (retain_graph=True) raises."""

    @staticmethod
    def forward(ctx, cfg, plan, labels, *tensors):
        return linear_kd_forward(ctx, TORCH_STEPS, cfg, plan, labels, tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_grad_extras):
        return linear_kd_backward(ctx, grad_loss)
