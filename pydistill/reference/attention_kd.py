"""Attention-map distillation (``attention_kd_loss``, ``relation_kd_loss``): the reference math,
written once, and the torch backend.

Inputs (B, H, L, d): queries of H heads, keys of H_k heads with H_k dividing H (grouped-query
attention: query head h reads key head h // (H / H_k), per model). Per batch b, query head h,
query row i and key j, with the scales c_s, c_t (default 1 / sqrt(d) of each model)::

    s_ij = c_s <Q_s[b, h, i], K_s[b, h // G_s, j]>        (student scores)
    t_ij = c_t <Q_t[b, h, i], K_t[b, h // G_t, j]>        (teacher scores)
    allowed(i, j) = mask[b, j] != 0  and  (j <= i if causal)
    valid(i)      = mask[b, i] != 0                       (everything, without a mask)

``kl`` (MiniLM's attention transfer), per valid query row::

    p_i = softmax over allowed j of t_ij,   q_i = the same of s_ij
    row_i = KL(p_i || q_i) = sum_j p_ij (log p_ij - log q_ij)
    mean  = sum_i row_i / (H * number of valid (b, i))        (0 when nothing is valid)

Padded query rows are 0 and not counted. A valid row always has a key (itself), so no counted
row is empty; a padded row may have none and is never evaluated.

``mse_scores`` (TinyBERT), every query row, padded ones included (TinyBERT's own code)::

    row_i = sum_j allowed(i, j) (s_ij - t_ij)^2               (disallowed entries are 0 in both)
    mean  = sum_i row_i / (B H L L)

computed without any L x L matrix: with q^_i = [c_s Q_s,i, -c_t Q_t,i] and
k^_j = [K_s,j, K_t,j] (allowed keys only), s_ij - t_ij = <q^_i, k^_j>, so

    row_i = q^_i^T G q^_i,   G = sum_j k^_j k^_j^T      ((d_s + d_t)^2 per head)

and under ``causal`` G is the prefix sum over j < the query block, plus each block's own
(block x block) lower triangle. Cost O(L (d_s + d_t)^2) instead of O(L^2 d). The expansion
subtracts terms of size |s| |t|, so its float32 error is relative to sum (|s_ij| + |t_ij|)^2,
not to the (possibly much smaller) loss.

Everything here is float32 (float64 for float64 inputs). ``attention_kd_loss`` materialises
the (B, H, L, L) maps and is the oracle of the tests; ``ChunkedAttentionKL`` is the torch
backend of ``kl`` (query blocks, O(block L) memory); ``mse_score_rows`` is the one
implementation of ``mse_scores`` for every backend (its autograd holds O(L d) tensors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from pydistill._utils import autocast_off, float32_backward
from pydistill.reference.softmax_divergence import compute_dtype

ATTENTION_LOSSES = ("kl", "mse_scores")
ATTENTION_REDUCTIONS = ("mean", "sum", "none")

# Elements of one (rows, block, keys) float32 score slab of the torch backend. About eight
# such intermediates live at once (~8 MB), as in the softmax_divergence family's chunks.
BLOCK_ELEMENTS = 1 << 18
# Query rows per block of the causal mse_scores (the diagonal blocks are formed explicitly).
MSE_CAUSAL_BLOCK = 128


@dataclass(frozen=True)
class AttentionKDConfig:
    """The hyper-parameters of ``attention_kd_loss``; validated when built by the API. A
    scale of None means 1 / sqrt(d) of that model (``with_scales``)."""

    loss: str = "kl"
    causal: bool = False
    student_scale: Optional[float] = None
    teacher_scale: Optional[float] = None
    reduction: str = "mean"


def with_scales(cfg: AttentionKDConfig, student_dim: int, teacher_dim: int) -> AttentionKDConfig:
    """``cfg`` with its default scales resolved: 1 / sqrt(d) of each model's head dim."""
    return replace(
        cfg,
        student_scale=cfg.student_scale if cfg.student_scale is not None else student_dim**-0.5,
        teacher_scale=cfg.teacher_scale if cfg.teacher_scale is not None else teacher_dim**-0.5,
    )


def expand_heads(k: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H_k, L, d) keys as (B, heads, L, d): key head h // (heads / H_k) for query head h."""
    if k.shape[1] == heads:
        return k
    return k.repeat_interleave(heads // k.shape[1], dim=1)


def key_valid(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The (B, L) bool mask of the positions that count (1 = attend), or None."""
    return None if attention_mask is None else attention_mask != 0


def allowed_keys(valid: Optional[torch.Tensor], rows: range, n_keys: int, causal: bool, device):
    """(B or 1, 1, len(rows), n_keys) bool: which keys each query row attends, or None when
    all do."""
    allowed = None
    if causal:
        i = torch.arange(rows.start, rows.stop, device=device)
        allowed = (torch.arange(n_keys, device=device)[None, :] <= i[:, None])[None, None]
    if valid is not None:
        keys = valid[:, None, None, :n_keys]
        allowed = keys if allowed is None else allowed & keys
    return allowed


def scores(q: torch.Tensor, k: torch.Tensor, scale: float, dtype) -> torch.Tensor:
    """scale * q k^T, (B, H, L, L), in ``dtype``, keys expanded to the query heads."""
    return scale * (q.to(dtype) @ expand_heads(k, q.shape[1]).to(dtype).transpose(-1, -2))


def per_row_loss(student_q, student_k, teacher_q, teacher_k, attention_mask, cfg: AttentionKDConfig):
    """Per-query-row losses (B, H, L) from the materialised maps, and the number of counted
    rows (a 0-dim device tensor with a mask, else an int: no tensor is made from a Python
    number on the device). The oracle: plain autograd, any dtype."""
    cfg = with_scales(cfg, student_q.shape[-1], teacher_q.shape[-1])
    dtype = compute_dtype(student_q.dtype, teacher_q.dtype)
    batch, heads, length = student_q.shape[:3]
    valid = key_valid(attention_mask)
    s = scores(student_q, student_k, cfg.student_scale, dtype)
    t = scores(teacher_q, teacher_k, cfg.teacher_scale, dtype)
    allowed = allowed_keys(valid, range(length), length, cfg.causal, s.device)
    if cfg.loss == "mse_scores":
        diff = s - t
        if allowed is not None:
            diff = torch.where(allowed, diff, 0.0)
        rows = (diff * diff).sum(-1)
        return rows, batch * heads * length * length
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
        t = t.masked_fill(~allowed, -math.inf)
    log_q = torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    p = log_p.exp()
    keep = p != 0  # masked keys carry no probability (and log p - log q = NaN there)
    rows = torch.where(keep, p * (torch.where(keep, log_p, 0.0) - torch.where(keep, log_q, 0.0)), 0.0).sum(-1)
    if valid is None:
        return rows, batch * heads * length
    rows = torch.where(valid[:, None, :], rows, 0.0)
    return rows, valid.sum() * heads


def mean_divisor(count, dtype):
    """max(count, 1): of a device tensor (a masked count), or of an int."""
    if isinstance(count, torch.Tensor):
        return count.clamp(min=1).to(dtype)
    return max(count, 1)


def reduce_rows(rows: torch.Tensor, count, reduction: str) -> torch.Tensor:
    """``count``: the counted rows, a 0-dim tensor or an int (``mean_divisor``)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / mean_divisor(count, total.dtype)


def attention_kd_loss(student_q, student_k, teacher_q, teacher_k, attention_mask=None,
                      cfg: AttentionKDConfig = AttentionKDConfig()):
    """The reference ``attention_kd_loss`` (materialises both (B, H, L, L) maps)."""
    rows, count = per_row_loss(student_q, student_k, teacher_q, teacher_k, attention_mask, cfg)
    return reduce_rows(rows, count, cfg.reduction)


# --------------------------------------------------------------------------------------
# mse_scores in closed form: every backend's implementation.
# --------------------------------------------------------------------------------------


def mse_score_rows(student_q, student_k, teacher_q, teacher_k, attention_mask, cfg: AttentionKDConfig):
    """Per-query-row sum_j allowed (s_ij - t_ij)^2, (B, H, L), from (d_s + d_t)-sized Gram
    matrices (module docstring); differentiable by autograd with O(L d) saved tensors."""
    cfg = with_scales(cfg, student_q.shape[-1], teacher_q.shape[-1])
    dtype = compute_dtype(student_q.dtype, teacher_q.dtype)
    heads, length = student_q.shape[1], student_q.shape[2]
    q_hat = torch.cat([cfg.student_scale * student_q.to(dtype), -cfg.teacher_scale * teacher_q.to(dtype)], -1)
    k_hat = torch.cat([expand_heads(student_k, heads).to(dtype), expand_heads(teacher_k, heads).to(dtype)], -1)
    valid = key_valid(attention_mask)
    if valid is not None:  # padded keys are 0 in both maps (they may hold anything, NaN included)
        k_hat = torch.where(valid[:, None, :, None], k_hat, 0.0)
    if not cfg.causal:
        gram = k_hat.transpose(-1, -2) @ k_hat
        return ((q_hat @ gram) * q_hat).sum(-1)
    rows = []
    prefix = None  # sum of k^ k^^T over the keys before the block
    for start in range(0, length, MSE_CAUSAL_BLOCK):
        stop = min(length, start + MSE_CAUSAL_BLOCK)
        q_blk, k_blk = q_hat[:, :, start:stop], k_hat[:, :, start:stop]
        diag = torch.tril(q_blk @ k_blk.transpose(-1, -2))
        r = (diag * diag).sum(-1)
        if prefix is not None:
            r = r + ((q_blk @ prefix) * q_blk).sum(-1)
        rows.append(r)
        gram = k_blk.transpose(-1, -2) @ k_blk
        prefix = gram if prefix is None else prefix + gram
    return torch.cat(rows, dim=-1)


def mse_scores_loss(student_q, student_k, teacher_q, teacher_k, attention_mask, cfg: AttentionKDConfig):
    """``attention_kd_loss(loss="mse_scores")`` in closed form, reduced; its backward runs with
    autocast off (float32 Gram GEMMs, even when ``backward()`` is called inside an autocast
    region)."""
    rows = float32_backward(lambda sq, sk, tq, tk: mse_score_rows(sq, sk, tq, tk, attention_mask, cfg),
                            student_q, student_k, teacher_q, teacher_k)
    batch, heads, length = rows.shape
    if cfg.reduction == "none":
        return rows
    total = rows.sum()
    if cfg.reduction == "sum":
        return total
    return total / max(batch * heads * length * length, 1)


# --------------------------------------------------------------------------------------
# The torch backend of kl: query blocks, gradient in closed form.
#   d row_i / d s_ij = q_ij - p_ij,   d row_i / d t_ij = p_ij (log p_ij - log q_ij - row_i)
#   dQ_i = c sum_j g_ij K_j,   dK_j = c sum_i g_ij Q_i   (g: the row-weighted derivative)
# --------------------------------------------------------------------------------------


def _block_shape(length: int, elements: int):
    """(rows of B*H, query rows) per block, so that a block's score slab holds ~elements."""
    block = min(length, max(16, elements // max(length, 1)))
    return max(1, elements // max(block * length, 1)), block


def _kl_blocks(qs, ks, qt, kt, valid_bh, cfg: AttentionKDConfig, rows_out, weight, grads):
    """Loop over (head rows, query block) slabs of the flattened (B*H, L, d) inputs (queries
    already multiplied by their scale, keys expanded to the query heads, both zeroed where
    padded; ``valid_bh``: (B*H, L) bool or None). Writes the per-row KL into ``rows_out``
    (B*H, L). With ``weight`` ((B*H, L): d loss / d row_i) it also writes the gradients into
    ``grads`` = [dqs, dks, dqt, dkt] (zero-filled buffers; None where not wanted). In place
    wherever a slab is dead: on the CPU the passes over the slabs cost as much as the GEMMs."""
    n_bh, length = qs.shape[0], qs.shape[1]
    n_rows, block = _block_shape(length, BLOCK_ELEMENTS)
    dqs, dks, dqt, dkt = grads if grads is not None else (None,) * 4
    need_t = dqt is not None or dkt is not None
    for r0 in range(0, n_bh, n_rows):
        r1 = min(n_bh, r0 + n_rows)
        v = valid_bh[r0:r1] if valid_bh is not None else None
        for i0 in range(0, length, block):
            i1 = min(length, i0 + block)
            n_keys = i1 if cfg.causal else length  # causal: later keys are all masked
            allowed = allowed_keys(v, range(i0, i1), n_keys, cfg.causal, qs.device)
            q_s, q_t = qs[r0:r1, i0:i1], qt[r0:r1, i0:i1]
            k_s, k_t = ks[r0:r1, :n_keys], kt[r0:r1, :n_keys]
            s = torch.matmul(q_s, k_s.transpose(-1, -2))
            t = torch.matmul(q_t, k_t.transpose(-1, -2))
            if allowed is not None:
                allowed = allowed[:, 0]
                s.masked_fill_(~allowed, -math.inf)
                t.masked_fill_(~allowed, -math.inf)
            log_q = torch.log_softmax(s, dim=-1)
            del s
            log_p = torch.log_softmax(t, dim=-1)
            del t
            p = log_p.exp()
            log_ratio = log_p.sub_(log_q)
            if allowed is not None:  # -inf - -inf at the masked keys, where p = 0
                log_ratio.masked_fill_(~allowed, 0.0)
            row = (log_ratio * p if need_t else log_ratio.mul_(p)).sum(-1)
            if v is not None:
                row = torch.where(v[:, i0:i1], row, 0.0)
            rows_out[r0:r1, i0:i1] = row
            if weight is None:
                continue
            w = weight[r0:r1, i0:i1, None]
            padded = ~v[:, i0:i1, None] if v is not None else None  # may have no key: NaN
            if need_t:  # d row / d t_ij = p_ij (log p_ij - log q_ij - row_i)
                g = log_ratio.sub_(row[..., None]).mul_(p).mul_(w)
                if padded is not None:
                    g.masked_fill_(padded, 0.0)
                if dqt is not None:
                    torch.matmul(g, k_t, out=dqt[r0:r1, i0:i1]).mul_(cfg.teacher_scale)
                if dkt is not None:
                    dkt[r0:r1, :n_keys].add_(torch.matmul(g.transpose(-1, -2), q_t))
            if dqs is not None or dks is not None:  # d row / d s_ij = q_ij - p_ij
                g = log_q.exp_().sub_(p).mul_(w)
                if padded is not None:
                    g.masked_fill_(padded, 0.0)
                if dqs is not None:
                    torch.matmul(g, k_s, out=dqs[r0:r1, i0:i1]).mul_(cfg.student_scale)
                if dks is not None:
                    dks[r0:r1, :n_keys].add_(torch.matmul(g.transpose(-1, -2), q_s))


def _prepare(q, k, valid, heads, scale, dtype):
    """(B*H, L, d) queries times ``scale`` and keys expanded to the query heads, in ``dtype``,
    padded positions zeroed (they may hold anything, NaN included, and are never part of a
    counted term)."""
    q, k = q.to(dtype) * scale, expand_heads(k, heads).to(dtype)
    if valid is not None:
        vv = valid[:, None, :, None]
        q, k = torch.where(vv, q, 0.0), torch.where(vv, k, 0.0)
    return q.reshape(-1, q.shape[2], q.shape[3]), k.reshape(-1, k.shape[2], k.shape[3])


def _fold_heads(dk: torch.Tensor, heads: int, shape, dtype) -> torch.Tensor:
    """A (B*H, L, d) key gradient of the keys expanded to the H query heads, summed back onto
    the H_k key heads of ``shape``."""
    batch, kv_heads, length, dim = shape
    dk = dk.view(batch, heads, length, dim)
    if heads != kv_heads:
        dk = dk.view(batch, kv_heads, heads // kv_heads, length, dim).sum(2)
    return dk.to(dtype)


class ChunkedAttentionKL(torch.autograd.Function):
    """``attention_kd_loss(loss="kl")`` over query blocks: per block, both score slabs,
    their log-softmaxes and the closed-form gradients; peak extra memory is one block's
    working set (~8 slabs of ``BLOCK_ELEMENTS``) plus O(B H L d) for the expanded keys and
    the gradients, never (B, H, L, L).

    For ``mean`` / ``sum`` the gradients are computed in the forward (the scores are formed
    once) and the backward multiplies them by grad_output; for ``none`` the backward
    recomputes the blocks with grad_output as the row weights.
    """

    @staticmethod
    def forward(ctx, student_q, student_k, teacher_q, teacher_k, attention_mask, cfg: AttentionKDConfig):
        cfg = with_scales(cfg, student_q.shape[-1], teacher_q.shape[-1])
        dtype = compute_dtype(student_q.dtype, teacher_q.dtype)
        batch, heads, length = student_q.shape[:3]
        valid = key_valid(attention_mask)
        valid_bh = valid.repeat_interleave(heads, 0) if valid is not None else None
        qs, ks = _prepare(student_q.detach(), student_k.detach(), valid, heads, cfg.student_scale, dtype)
        qt, kt = _prepare(teacher_q.detach(), teacher_k.detach(), valid, heads, cfg.teacher_scale, dtype)
        rows = torch.empty(batch * heads, length, dtype=dtype, device=qs.device)
        count = valid.sum() * heads if valid is not None else batch * heads * length
        need = ctx.needs_input_grad[:4]
        grads = None
        if any(need) and cfg.reduction != "none":
            w = 1.0 / mean_divisor(count, dtype) if cfg.reduction == "mean" else 1.0
            if valid_bh is None:
                weight = rows.new_ones(()).mul_(w).expand(rows.shape)  # w: a Python float here
            else:
                weight = torch.where(valid_bh, w, 0.0)
            grads = _grad_buffers(need, qs, ks, qt, kt)
            _kl_blocks(qs, ks, qt, kt, valid_bh, cfg, rows, weight, grads)
        else:
            _kl_blocks(qs, ks, qt, kt, valid_bh, cfg, rows, None, None)
        ctx.cfg = cfg
        ctx.meta = [(x.shape, x.dtype) for x in (student_q, student_k, teacher_q, teacher_k)]
        ctx.grads = grads
        if grads is None and any(need):
            ctx.save_for_backward(qs, ks, qt, kt, valid_bh)
        return reduce_rows(rows.view(batch, heads, length), count, cfg.reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        with autocast_off(grad_loss.device):  # a backward run under autocast: float32 GEMMs
            return ChunkedAttentionKL._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        need = ctx.needs_input_grad[:4]
        if ctx.grads is not None:
            grads, scale = ctx.grads, grad_loss
        else:  # reduction 'none': recompute with grad_output as the row weights
            qs, ks, qt, kt, valid_bh = ctx.saved_tensors
            weight = grad_loss.to(qs.dtype).reshape(qs.shape[:2])
            if valid_bh is not None:
                weight = torch.where(valid_bh, weight, 0.0)
            grads = _grad_buffers(need, qs, ks, qt, kt)
            rows = torch.empty(qs.shape[:2], dtype=qs.dtype, device=qs.device)
            _kl_blocks(qs, ks, qt, kt, valid_bh, ctx.cfg, rows, weight, grads)
            scale = None
        heads = ctx.meta[0][0][1]
        out = []
        for g, (shape, dtype), is_key in zip(grads, ctx.meta, (False, True, False, True)):
            if g is None:
                out.append(None)
                continue
            if scale is not None:  # out of place: a second backward finds the gradients intact
                g = g * scale.to(g.dtype)
            out.append(_fold_heads(g, heads, shape, dtype) if is_key else g.view(shape).to(dtype))
        return (*out, None, None)


def _grad_buffers(need, qs, ks, qt, kt):
    return [torch.zeros_like(x) if n else None for n, x in zip(need, (qs, ks, qt, kt))]
