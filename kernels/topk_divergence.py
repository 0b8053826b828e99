"""Top-k (offline teacher) divergence: the Triton kernels behind ``topk_kd_loss``.

Math (pydistill/reference/topk_divergence.py is the oracle and has the derivation). Per row:
student logits s (V), the teacher's top-K ids i_k and log-probs lp_k (at T_gen), z = cap(a_s s)
(the student's logit transform, as in kernels/softmax_divergence.py), x = z / T, a = T_gen / T::

    teacher   t = max(0, 1 - sum e^{lp}) (float64),  M = V - K,
              log P_k = a lp_k - log Z,  log P_tail = a log t + (1 - a) log M - log Z
              (renormalize: log P = log_softmax(a lp))
    student   lse_off = logsumexp of x off the support (support masked to -inf),
              lse = logaddexp(lse_off, logsumexp(x_S)),
              log Q_k = x_{i_k} - lse,  log Q_tail = lse_off - lse
              (renormalize: log Q = log_softmax(x_S))
    loss      hard_weight (lse(z) - z_y) + soft_scale D(P, Q)     (K or K + 1 outcomes)

Forward, one program per row, fp32 math (the teacher's tail mass in fp64):

  support  K ids (sorted by the launcher), K log-probs and the K gathered student logits, held
           as BLOCK_K-vectors (K padded to a power of two, masked).
  pass 1   (bucket / ignore, or a hard term) the vocabulary in tiles of BLOCK_V: the online
           max / sum-exp of x with the support masked out, exactly: the ids being sorted, the
           members of a tile are one run of them, compared with the tile's columns one by one
           (K compares of a tile each per row in all, not V x K). Also the online logsumexp of z
           for the hard term when T != 1. Read: s once.
  then     the K (+ 1) outcomes: D, and the gradient terms below. renormalize without a hard
           term reads only the K gathered logits: no pass over V at all.

Gradient (reference module docstring), with q h and S_q = sum_o Q_o h_o from softmax_divergence's
table evaluated at the outcomes, soft_coef = soft_scale / T:

    j = i_k          soft_coef (Q_k h_k - Q_k S_q)                      ("member")
    j off support    soft_coef e^{(x_j - m_off) - ll_off} c_off,
                     c_off = Q_tail h_tail - S_q Q_tail (bucket), -S_q Q_tail (ignore), none
                     (renormalize: the gradient lives on the support)
    hard term        + hard_weight (softmax(z)_j - [j = y]);  transform: x a sech^2(a s / c)

The gradient pass writes every column with the off-support formula (a dense tile store; no
reads at all for renormalize without a hard term), then, after a barrier (``tl.debug_barrier``:
other threads of the program may have written those addresses), scatters the K member values
over it. It runs at the end of the forward (``topk_fwd(..., grad_s=...)``; the LM-head loss
uses this with its own buffer) or in the backward from 8 floats of per-row stats
(``topk_bwd``). Logits-sized transfers, forward + backward: recompute 1 + (1 + 1) = 3; gradient
in the forward 1 + 1 + 1 = 3 when grad_output = 1, 5 otherwise. Floor: 2 (read s, write the
gradient); renormalize without a hard term needs 0 + 1.

Limits: K <= MAX_K = 4096 (the support vectors live in registers; 16 warps from K = 1024 on,
where ptxas reports ~120 registers and no spill at K = 4096); ids must be distinct within a
row (not checked here). An id outside [0, V) is never dereferenced: it makes its row NaN.
Cost of the exact masking: one K-wide compare per tile, and per member one BLOCK_V-wide
compare with a scalar id load (K of them per row): small beside the tile loads at K <= 256;
at K = 1024 it is of the order of the pass itself.
"""
import triton
import triton.language as tl

from pydistill.kernels.softmax_divergence import (
    DIVERGENCE_CODES,
    _div_term,
    _exp,
    _expm1_small,
    _fold_lse,
    _flag,
    _finite_or_zero,
    _hard_ce,
    _load_logits,
    _load_raw,
    _log1p_small,
    _online_lse_lanes,
    _temper,
    _transform,
    _transform_slope,
    _pointwise_b,
    _row_offset,
    _row_scale,
    _shift,
)

TAIL_CODES = {"bucket": 0, "renormalize": 1, "ignore": 2}
# Globals read inside @triton.jit code must be constexpr.
BUCKET = tl.constexpr(TAIL_CODES["bucket"])
RENORMALIZE = tl.constexpr(TAIL_CODES["renormalize"])
IGNORE = tl.constexpr(TAIL_CODES["ignore"])
SKEW_REVERSE_KL = tl.constexpr(DIVERGENCE_CODES["skew_reverse_kl"])
# Per-row statistics kept for the backward: max and log-sum of x over all columns and off the
# support, and of z (hard term); each logsumexp as its two terms, as in softmax_divergence.
N_STATS = tl.constexpr(8)


@triton.jit
def _shift_expm1(e, n, m_old, m_new):
    # E = sum (e^{x_j - m} - 1) over n columns moved to the max m_new >= m: E' = e^{d} E + n
    # expm1(d), d = m - m' <= 0; no term changes sign, so E keeps its relative rounding (a
    # near-uniform tail's log-sum log M + log1p(E / M) then rounds relative to its O(1/T) part,
    # not at the size of log M)
    d = _shift(m_old) - _shift(m_new)
    small = tl.abs(d) < 0.25
    em1 = tl.where(small, _expm1_small(tl.where(small, d, 0.0)), _exp(d) - 1.0)
    return _exp(d) * e + n * em1


@triton.jit
def _online_expm1(m_old, m_new, e, n, d, off):
    # the lanes' E (_shift_expm1) over the off-support columns seen so far, with this tile's
    # (``off``; d = x - shift(m_new), per lane) added
    small_u = tl.abs(d) < 0.25
    t = tl.where(small_u, _expm1_small(tl.where(small_u, d, 0.0)), _exp(d) - 1.0)
    e = _shift_expm1(e, n, m_old, m_new) + tl.sum(tl.where(off, t, 0.0), axis=1)
    return e, n + tl.sum(off.to(tl.float32), axis=1)


@triton.jit
def _row_support(row, s_ptr, idx_ptr, labels_ptr, n_inner, s_stride_outer, s_stride_inner,
                 V, n_k, ignore_index, s_scale, s_cap,
                 S_CAP: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_K: tl.constexpr):
    # The row's student pointer, label, whether it counts, and its support: sorted ids, which
    # of them are in the vocabulary, and the transformed student logits there (NaN for an id
    # outside [0, V): never loaded, it poisons its row instead; nothing loaded for an ignored row).
    s_row = s_ptr + _row_offset(row, n_inner, s_stride_outer, s_stride_inner)
    label = tl.full([], -1, tl.int64)
    active = tl.full([], 1, tl.int1)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        active = _flag(label != ignore_index)
    k_offs = tl.arange(0, BLOCK_K)
    k_mask = k_offs < n_k
    idx = tl.load(idx_ptr + row * n_k + k_offs, mask=k_mask & active, other=0).to(tl.int64)
    in_vocab = (idx >= 0) & (idx < V)
    z_sup = _load_logits(s_row, idx, k_mask & in_vocab & active, s_scale, s_cap, S_CAP)
    z_sup = tl.where(k_mask & (~in_vocab), float("nan"), z_sup)
    return s_row, label, active, idx, k_mask, in_vocab, z_sup


@triton.jit
def _teacher(lp_row, k_offs, mask, V, n_k, power, TAIL: tl.constexpr):
    # The teacher's outcome log-probabilities, re-tempered (module docstring). The tail mass
    # 1 - sum p cancels when the top-K hold nearly everything: summed in fp64 (K terms).
    lp = tl.load(lp_row + k_offs, mask=mask, other=float("-inf")).to(tl.float32)
    scaled = lp * power
    if TAIL == RENORMALIZE:
        m = _finite_or_zero(tl.max(scaled, axis=0))
        ll = tl.log(tl.sum(_exp(scaled - m), axis=0))
        log_p = (scaled - m) - ll
        log_p_tail = float("-inf")
        y_off = float("-inf")
        log_z = m + ll
    else:
        tail = tl.maximum(1.0 - tl.sum(tl.exp(lp.to(tl.float64)), axis=0), 0.0)
        missing = V - n_k
        has_tail = (missing > 0) & (tail > 0.0)
        log_m = tl.log(tl.maximum(missing, 1).to(tl.float32))
        # y_off = a log(t / M): the log-weight of one missing token, log(M r^a) = log M + y_off
        y_off = power * (tl.log(tl.where(has_tail, tail, 1.0).to(tl.float32)) - log_m)
        log_tail = power * tl.log(tl.where(has_tail, tail, 1.0).to(tl.float32)) + (
            1.0 - power) * log_m
        log_tail = tl.where(has_tail, log_tail, float("-inf"))
        y_off = tl.where(has_tail, y_off, float("-inf"))
        m = _finite_or_zero(tl.maximum(tl.max(scaled, axis=0), log_tail))
        log_z = m + tl.log(tl.sum(_exp(scaled - m), axis=0) + _exp(log_tail - m))
        log_p = scaled - log_z
        log_p_tail = log_tail - log_z
    return log_p, log_p_tail, scaled, log_z, y_off


@triton.jit
def _soft_terms(lp_row, k_offs, t_mask, x_sup, V, n_k, power, beta, beta_c, m_all, ll_all, m_off,
                ll_off, y_tail, DIV: tl.constexpr, TAIL: tl.constexpr):
    # D over the outcomes, the members' (Q h - Q S_q) and the off-support factor c_off.
    # bucket / renormalize: D as the Bregman terms of w = log P - log Q (_div_term), each w
    # grouped as (per-outcome log-weights) - (teacher log-sum - student log-sum): rounding
    # relative to w, the shared log-sums' entering at second order only (reference:
    # _outcome_log_ratio). y_tail: E / M of _online_expm1 (> -1/2: a near-uniform tail whose
    # log-sum is log M + log1p(y_tail)), or -1 where it was not summed.
    # The shared c = (teacher log-sum) - (student log-sum) is summed in fp64 from the same
    # per-outcome terms as w (the tail's from E where it is near uniform): D is O(1/T^2), so
    # even a second-order error of float32's eps log V would show at T = 1e4.
    log_p, log_p_tail, y_t, log_z, y_off = _teacher(lp_row, k_offs, t_mask, V, n_k, power, TAIL)
    f64: tl.constexpr = tl.float64
    y64 = tl.where(t_mask, y_t, float("-inf")).to(f64)
    if TAIL == RENORMALIZE:
        m_s = _finite_or_zero(tl.max(x_sup, axis=0))
        ll_s = tl.log(tl.sum(_exp(x_sup - m_s), axis=0))
        a_q = x_sup - m_s
        log_q = a_q - ll_s
        m_t = _finite_or_zero(tl.max(y64, axis=0))
        c = ((m_t + tl.log(tl.sum(tl.exp(y64 - m_t), axis=0)))
             - tl.log(tl.sum(tl.where(t_mask, tl.exp(a_q.to(f64)), 0.0), axis=0))).to(tl.float32)
        a_off = 0.0
        near = False
        l1p = 0.0
    else:
        a_q = x_sup - _shift(m_all)
        log_q = a_q - ll_all
        a_off = m_off - _shift(m_all)
        near = y_tail > -0.5
        y = tl.where(near, y_tail, 0.0)
        l1p = tl.where(tl.abs(y) < 0.3, _log1p_small(tl.where(tl.abs(y) < 0.3, y, 0.0)),
                       tl.log(1.0 + y))
        n_miss = (V - n_k).to(f64)
        log_tail64 = tl.log(tl.maximum(n_miss, 1.0)) + y_off.to(f64)
        m_t = _finite_or_zero(tl.maximum(tl.max(y64, axis=0), log_tail64))
        log_z64 = m_t + tl.log(tl.sum(tl.exp(y64 - m_t), axis=0) + tl.exp(log_tail64 - m_t))
        s_off = tl.where(near, n_miss * (1.0 + y.to(f64)), tl.exp(ll_off.to(f64)))
        ll64 = tl.log(s_off * tl.exp(a_off.to(f64))
                      + tl.sum(tl.where(t_mask, tl.exp(a_q.to(f64)), 0.0), axis=0))
        c = (log_z64 - ll64).to(tl.float32)
    p, q, d, qh, pu = _pointwise_b(log_p, log_q, beta, beta_c, DIV)
    w = (y_t - a_q) - c
    plain = tl.sum(d, axis=0)
    if TAIL != IGNORE:
        d = tl.where(t_mask, _div_term(log_p, log_q, p, q, w, beta, beta_c, DIV), 0.0)
    if TAIL == IGNORE:
        if DIV == SKEW_REVERSE_KL:
            qh += q  # the table drops this constant shift of h; unnormalised Q needs it
    div = tl.sum(d, axis=0)
    bad = tl.sum(((w != w) & t_mask).to(tl.int32), axis=0) > 0  # non-finite: the plain terms
    s_q = tl.sum(qh, axis=0)
    # d masks probabilities that are not > 0, NaN included: a NaN among the inputs read (teacher
    # log-probs, student row) must still make the row NaN
    nan_row = tl.sum(((log_p != log_p) | (log_q != log_q)).to(tl.int32), axis=0) > 0
    c_off = 0.0
    if TAIL != RENORMALIZE:
        log_q_tail = (m_off - m_all) + (ll_off - ll_all)
        if TAIL == BUCKET:
            p_t, q_t, d_t, qh_t, pu_t = _pointwise_b(log_p_tail, log_q_tail, beta, beta_c, DIV)
            w_t = tl.where(near, (y_off - a_off) - l1p, log_p_tail + log_z - (a_off + ll_off)) - c
            div += _div_term(log_p_tail, log_q_tail, p_t, q_t, w_t, beta, beta_c, DIV)
            bad = bad | (w_t != w_t)
            plain += d_t
            s_q += qh_t
            c_off = qh_t - s_q * q_t
        else:
            c_off = -s_q * _exp(log_q_tail)
    if TAIL != IGNORE:
        div = tl.where(bad, plain, div)
    div = tl.where(nan_row, float("nan"), div)
    return div, qh - q * s_q, c_off


@triton.jit
def _grad_pass(
    s_row, g_row, idx, k_mask, in_vocab, member, c_off, label, active, V, n_tiles,
    inv_t, s_scale, s_cap, hard_weight, soft_coef, row_scale, m_off, ll_off, m_1, ll_1,
    TAIL: tl.constexpr, S_CAP: tl.constexpr, HAS_HARD: tl.constexpr,
    HAS_SOFT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # The support's raw logits, for the slope of its transform, re-read before any store: the
    # gradient may overwrite the logits in place (linear_kd's chunks). Kept from the forward,
    # they would be one more K-sized array live across its pass (spills at K = 4096).
    raw_sup = _load_raw(s_row, idx, k_mask & in_vocab & active)
    # Every column with the off-support formula (zeros for an ignored row, whose loads are
    # masked off), tiles in reverse order (the first re-read are the last pass 1 read) ...
    offs = tl.arange(0, BLOCK_V)
    for k in range(0, n_tiles):
        cols = (n_tiles - 1 - k) * BLOCK_V + offs
        in_row = cols < V
        g = tl.zeros([BLOCK_V], dtype=tl.float32)
        if (HAS_SOFT and TAIL != RENORMALIZE) or HAS_HARD:
            raw = _load_raw(s_row, cols, in_row & active)
            z = _transform(raw, s_scale, s_cap, S_CAP, True)
            if HAS_SOFT and TAIL != RENORMALIZE:
                # q_j / Q_tail; 0 at masked entries and in a row with no off-support mass
                x = z * inv_t
                g = (soft_coef * c_off) * tl.where(x == float("-inf"), 0.0, _exp((x - m_off) - ll_off))
            if HAS_HARD:
                g += hard_weight * (_exp((z - m_1) - ll_1) - tl.where(cols == label, 1.0, 0.0))
            g = _transform_slope(g, raw, s_scale, s_cap, S_CAP)
            g = tl.where(active, g * row_scale, 0.0)
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=in_row)
    # ... then the support's own values over them. Other threads of this program wrote some of
    # these addresses above: the barrier orders their stores before these.
    tl.debug_barrier()
    gm = tl.zeros_like(raw_sup)
    if HAS_SOFT:
        gm = soft_coef * member
    if HAS_HARD:
        z_sup = _transform(raw_sup, s_scale, s_cap, S_CAP, True)
        gm += hard_weight * (_exp((z_sup - m_1) - ll_1) - tl.where(idx == label, 1.0, 0.0))
    gm = _transform_slope(gm, raw_sup, s_scale, s_cap, S_CAP)
    gm = tl.where(active, gm * row_scale, 0.0)
    tl.store(g_row + idx, gm.to(g_row.dtype.element_ty), mask=k_mask & in_vocab)


@triton.jit
def _topk_fwd_kernel(
    s_ptr, lp_ptr, idx_ptr, labels_ptr, loss_ptr, stats_ptr, gs_ptr, scale_ptr,
    n_inner, s_stride_outer, s_stride_inner, scale_stride,
    V, n_k, inv_t, s_scale, s_cap, power, beta, beta_c, hard_weight, soft_scale, grad_scale,
    ignore_index,
    DIV: tl.constexpr, TAIL: tl.constexpr, S_CAP: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr, HAS_SOFT: tl.constexpr, CE_SEPARATE: tl.constexpr,
    TAIL_SUM: tl.constexpr,
    HAS_SCALE_PTR: tl.constexpr, GRAD_S: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, S_SCALED: tl.constexpr = True,
    TEMPERED: tl.constexpr = True, LANE: tl.constexpr = 1,
):
    row = tl.program_id(0).to(tl.int64)
    s_row, label, active, idx, k_mask, in_vocab, z_sup = _row_support(
        row, s_ptr, idx_ptr, labels_ptr, n_inner, s_stride_outer, s_stride_inner, V, n_k,
        ignore_index, s_scale, s_cap, S_CAP, HAS_LABELS, BLOCK_K,
    )
    x_sup = z_sup * inv_t
    n_tiles = tl.cdiv(V, BLOCK_V)
    offs = tl.arange(0, BLOCK_V)
    # soft term off the support (bucket / ignore): the masked logsumexp; otherwise a pass over
    # V runs only for the hard term, over all columns
    MASKED: tl.constexpr = HAS_SOFT and TAIL != RENORMALIZE

    # ---- pass 1: online logsumexps ------------------------------------------------------
    # per lane (LANES, LANE), no reduction across threads in the loop: kernels/
    # softmax_divergence.py's first pass; the lanes fold into the row's after it
    LANES: tl.constexpr = BLOCK_V // LANE
    lane_offs = tl.arange(0, LANES)[:, None] * LANE + tl.arange(0, LANE)[None, :]
    zero = tl.zeros([LANES], dtype=tl.float32)
    m_a = zero + float("-inf")
    l_a = zero
    m_1 = zero + float("-inf")
    l_1 = zero
    e_off = zero  # TAIL_SUM: _online_expm1's E and its count of off-support columns
    n_off = zero
    if MASKED or HAS_HARD:
        # the next member (ids sorted; past the last one, a column no tile reaches)
        lo = 0
        col_lo = tl.load(idx_ptr + row * n_k + lo, mask=lo < n_k, other=V + BLOCK_V)
        for k in range(0, tl.where(active, n_tiles, 0)):
            cols = k * BLOCK_V + lane_offs
            in_row = cols < V
            z = _transform(tl.load(s_row + cols, mask=in_row, other=float("-inf")).to(tl.float32),
                           s_scale, s_cap, S_CAP, S_SCALED)
            if MASKED or not CE_SEPARATE:
                zm = z
                off = in_row
                if MASKED:
                    # this tile's members: the next run of the sorted ids
                    while col_lo < (k + 1) * BLOCK_V:
                        zm = tl.where(cols == col_lo, float("-inf"), zm)
                        off = off & (cols != col_lo)
                        lo += 1
                        col_lo = tl.load(idx_ptr + row * n_k + lo, mask=lo < n_k, other=V + BLOCK_V)
                # the running max before this tile (TAIL_SUM), bound on every path: the compiler,
                # unlike Python, scopes a name first bound inside an `if` to that branch
                m_prev = m_a
                m_a, l_a, d_a, _e = _online_lse_lanes(m_a, l_a, zm, inv_t, TEMPERED)
                if MASKED:
                    if TAIL_SUM:
                        e_off, n_off = _online_expm1(m_prev, m_a, e_off, n_off, d_a, off)
            if CE_SEPARATE:
                m_1, l_1, _d, _e1 = _online_lse_lanes(m_1, l_1, z, 1.0, False)
    # fold the lanes (the tail's E first: it moves from the lanes' maxima to the row's)
    m_row = tl.max(m_a, axis=0)
    e_off = tl.sum(_shift_expm1(e_off, n_off, m_a, m_row), axis=0)
    n_off = tl.sum(n_off, axis=0)
    m_a, l_a = _fold_lse(m_a, l_a)
    m_1, l_1 = _fold_lse(m_1, l_1)
    if MASKED:
        m_off = m_a
        ll_off = tl.log(l_a)
        m_all = tl.maximum(m_off, tl.max(x_sup, axis=0))
        m_f = _finite_or_zero(m_all)
        ll_all = tl.log(l_a * _exp(m_off - m_f) + tl.sum(_exp(x_sup - m_f), axis=0))
    else:
        m_off = float("-inf")
        ll_off = float("-inf")
        m_all = m_a
        ll_all = tl.log(l_a)
    if CE_SEPARATE:
        ll_1 = tl.log(l_1)
    else:
        m_1 = m_all
        ll_1 = ll_all

    # ---- the outcomes -----------------------------------------------------------------------
    div = 0.0
    member = tl.zeros([BLOCK_K], dtype=tl.float32)
    c_off = 0.0
    if HAS_SOFT:
        y_tail = -1.0
        if TAIL_SUM:
            y_tail = e_off / tl.maximum(n_off, 1.0)
        div, member, c_off = _soft_terms(
            lp_ptr + row * n_k, tl.arange(0, BLOCK_K), k_mask & active, x_sup, V, n_k, power,
            beta, beta_c, m_all, ll_all, m_off, ll_off, y_tail, DIV, TAIL,
        )
    loss = soft_scale * div
    if HAS_HARD:
        loss += hard_weight * _hard_ce(s_row, label, active, V, s_scale, s_cap, m_1, ll_1, S_CAP)
    tl.store(loss_ptr + row, tl.where(active, loss, 0.0))

    if STORE_STATS:
        st = stats_ptr + row * N_STATS
        tl.store(st + 0, m_all)
        tl.store(st + 1, ll_all)
        tl.store(st + 2, m_off)
        tl.store(st + 3, ll_off)
        tl.store(st + 4, m_1)
        tl.store(st + 5, ll_1)

    if GRAD_S:
        row_scale = _row_scale(grad_scale, scale_ptr, row, scale_stride, HAS_SCALE_PTR)
        _grad_pass(
            s_row, gs_ptr + row * V, idx, k_mask, in_vocab, member, c_off, label, active,
            V, n_tiles, inv_t, s_scale, s_cap, hard_weight, soft_scale * inv_t, row_scale,
            m_off, ll_off, m_1, ll_1, TAIL, S_CAP, HAS_HARD, HAS_SOFT, BLOCK_V,
        )


@triton.jit
def _topk_bwd_kernel(
    s_ptr, lp_ptr, idx_ptr, labels_ptr, stats_ptr, gs_ptr, scale_ptr,
    n_inner, s_stride_outer, s_stride_inner, scale_stride,
    V, n_k, inv_t, s_scale, s_cap, power, beta, beta_c, hard_weight, soft_scale, grad_scale,
    ignore_index,
    DIV: tl.constexpr, TAIL: tl.constexpr, S_CAP: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr, HAS_SOFT: tl.constexpr, HAS_SCALE_PTR: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row, label, active, idx, k_mask, in_vocab, z_sup = _row_support(
        row, s_ptr, idx_ptr, labels_ptr, n_inner, s_stride_outer, s_stride_inner, V, n_k,
        ignore_index, s_scale, s_cap, S_CAP, HAS_LABELS, BLOCK_K,
    )
    st = stats_ptr + row * N_STATS
    m_all = tl.load(st + 0)
    ll_all = tl.load(st + 1)
    m_off = tl.load(st + 2)
    ll_off = tl.load(st + 3)
    member = tl.zeros([BLOCK_K], dtype=tl.float32)
    c_off = 0.0
    if HAS_SOFT:
        # the K-sized terms are recomputed (K loads) rather than stored (K floats per row)
        div, member, c_off = _soft_terms(
            lp_ptr + row * n_k, tl.arange(0, BLOCK_K), k_mask & active, z_sup * inv_t, V, n_k,
            power, beta, beta_c, m_all, ll_all, m_off, ll_off, -1.0, DIV, TAIL,
        )
    row_scale = _row_scale(grad_scale, scale_ptr, row, scale_stride, HAS_SCALE_PTR)
    _grad_pass(
        s_row, gs_ptr + row * V, idx, k_mask, in_vocab, member, c_off, label, active,
        V, tl.cdiv(V, BLOCK_V), inv_t, s_scale, s_cap, hard_weight, soft_scale * inv_t, row_scale,
        m_off, ll_off, tl.load(st + 4), tl.load(st + 5), TAIL, S_CAP, HAS_HARD, HAS_SOFT,
        BLOCK_V,
    )


# ------------------------------------------------------------------------------------------
# Launchers: validate, allocate, compute the grid. Inputs arrive validated by the API.
# ------------------------------------------------------------------------------------------
import torch  # noqa: E402  (kept below the kernels: this file reads kernel-first)

from pydistill._utils import empty  # noqa: E402
from pydistill.kernels.softmax_divergence import (  # noqa: E402
    LAUNCH_OPTIONS, _lane, _leading_dims, _num_warps, transform_args,
)

# Largest K: the support's vectors are held in registers (module docstring).
MAX_K = 4096
# Above this temperature the forward also sums E = sum expm1(x - m) off the support (pass 1,
# one more exp-like polynomial per element), which a near-uniform tail's log-probability needs
# to keep the value's relative precision (~eps T log M without it); as kd_loss's ONE_PASS_MAX_T.
TAIL_SUM_MIN_T = 4.0
# Tile size override for tests (small tiles exercise the multi-tile paths at small V).
BLOCK_V_OVERRIDE = None


def _block_v(vocab: int) -> int:
    if BLOCK_V_OVERRIDE is not None:
        return BLOCK_V_OVERRIDE
    return min(4096, triton.next_power_of_2(vocab))


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _warps(block_v: int, block_k: int) -> int:
    # at BLOCK_K >= 1024 the support vectors need 16 warps' registers (ptxas: 8 warps spill
    # at K = 1024 and use 239 registers at K = 4096; 16 warps: ~120, no spill)
    return max(_num_warps(block_v), 16 if block_k >= 1024 else 4)


def support_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) top-k log-probs or ids as the kernels address them: (N, K) rows, row r at
    r * K, unit stride along K. Every launcher passes its top-k arrays through this (a view
    such as ``ids.t().contiguous().t()``, or the output of torch.sort, which keeps its input's
    strides, would otherwise be read as another row's entries)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def sort_support(topk_logprobs: torch.Tensor, topk_indices: torch.Tensor):
    """(log-probs, ids) as contiguous (N, K) rows sorted by token id, the layout the kernels
    read: the members of a vocabulary tile are then one run of a row's ids. One torch.sort of
    the (N, K) ids, negligible beside the (N, V) logits."""
    k = topk_indices.shape[-1]
    if k > MAX_K:
        raise ValueError(
            f"teacher_topk_indices: backend='triton' supports K <= {MAX_K}, got K = {k}; "
            "use backend='torch'"
        )
    idx, order = topk_indices.reshape(-1, k).sort(dim=-1)
    return support_rows(topk_logprobs.reshape(-1, k).gather(-1, order)), support_rows(idx)


def _student_rows(student: torch.Tensor):
    """The student with unit stride along V, its rows addressed as
    base + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner (slices such as
    logits[:, :-1] need no copy; anything the layout cannot express is made contiguous)."""
    s, dims = _leading_dims(student)
    if dims is None:
        s = student.contiguous()
        dims = [(s.numel() // s.shape[-1], s.shape[-1])]
    if len(dims) == 2:
        return s, dims[1][0], dims[0][1], dims[1][1]
    row_stride = dims[0][1] if dims else 0
    return s, 1, row_stride, row_stride


def _launch_args(student, topk_logprobs, topk_indices, labels, cfg, divergence, grad_s,
                 grad_scale, scale, placeholder):
    """Keyword arguments shared by the forward and backward kernels. ``placeholder`` stands
    in for pointers a variant never dereferences (absent labels, gradient, scale)."""
    vocab, k = student.shape[-1], topk_indices.shape[-1]
    s, n_inner, stride_outer, stride_inner = _student_rows(student)
    if grad_s is not None and not (grad_s.is_contiguous() and grad_s.numel() == student.numel()):
        raise ValueError(f"grad_s: expected a contiguous buffer of {tuple(student.shape)} elements, "
                         f"got shape {tuple(grad_s.shape)}")
    block = _block_v(vocab)
    return dict(
        s_ptr=s, lp_ptr=support_rows(topk_logprobs), idx_ptr=support_rows(topk_indices),
        labels_ptr=labels.reshape(-1).contiguous() if labels is not None else placeholder,
        gs_ptr=grad_s if grad_s is not None else placeholder,
        scale_ptr=scale if scale is not None else placeholder,
        n_inner=n_inner, s_stride_outer=stride_outer, s_stride_inner=stride_inner,
        scale_stride=scale.stride(0) if scale is not None and scale.numel() > 1 else 0,
        V=vocab, n_k=k, inv_t=1.0 / cfg.temperature,
        **transform_args(cfg, teacher=False),
        power=float(cfg.teacher_power), beta=float(cfg.beta), beta_c=float(1.0 - cfg.beta),
        hard_weight=float(cfg.hard_weight), soft_scale=float(cfg.soft_scale),
        grad_scale=float(grad_scale), ignore_index=int(cfg.ignore_index),
        DIV=DIVERGENCE_CODES[divergence], TAIL=TAIL_CODES[cfg.tail],
        HAS_LABELS=labels is not None,
        HAS_HARD=cfg.hard_weight != 0.0, HAS_SOFT=cfg.has_soft,
        HAS_SCALE_PTR=scale is not None,
        BLOCK_V=block, BLOCK_K=_block_k(k), num_warps=_warps(block, _block_k(k)), **LAUNCH_OPTIONS,
    )


def topk_fwd(student, topk_logprobs, topk_indices, labels, cfg, divergence, *, grad_s=None,
             grad_scale=1.0, scale=None, store_stats=False):
    """Per-row losses (float32, N) and, with ``store_stats``, the (N, N_STATS) per-row stats that
    ``topk_bwd`` needs. ``topk_logprobs`` / ``topk_indices``: (N, K) from ``sort_support``.
    With ``grad_s`` (a contiguous buffer of N x V elements, any float dtype) the gradient of
    sum(grad_scale * scale[row] * loss) is written too (``scale``: 1 or N float32 values)."""
    n_rows = student.numel() // student.shape[-1]
    loss = empty(n_rows, dtype=torch.float32, device=student.device)
    stats = empty((n_rows, N_STATS.value), dtype=torch.float32, device=student.device) if store_stats else loss
    if n_rows > 0:
        args = _launch_args(student, topk_logprobs, topk_indices, labels, cfg, divergence, grad_s,
                            grad_scale, scale, placeholder=loss)
        _topk_fwd_kernel[(n_rows,)](
            loss_ptr=loss, stats_ptr=stats, GRAD_S=grad_s is not None, STORE_STATS=store_stats,
            CE_SEPARATE=cfg.hard_weight != 0.0 and cfg.temperature != 1.0,
            TAIL_SUM=cfg.tail == "bucket" and cfg.has_soft and cfg.temperature > TAIL_SUM_MIN_T,
            # the unit logit scale and T = 1 as compile-time facts; the first pass's lanes
            S_SCALED=float(cfg.student_logit_scale) != 1.0, TEMPERED=float(cfg.temperature) != 1.0,
            LANE=_lane(args["BLOCK_V"], student), **args,
        )
    return loss, stats


def topk_bwd(student, topk_logprobs, topk_indices, labels, stats, cfg, divergence, *, grad_s,
             grad_scale=1.0, scale=None):
    """The gradient pass alone, from the stats saved by ``topk_fwd(store_stats=True)``."""
    n_rows = student.numel() // student.shape[-1]
    if n_rows > 0:
        args = _launch_args(student, topk_logprobs, topk_indices, labels, cfg, divergence, grad_s,
                            grad_scale, scale, placeholder=stats)
        _topk_bwd_kernel[(n_rows,)](stats_ptr=stats, **args)


def topk_loss_and_grad(student, topk_logprobs, topk_indices, labels, cfg, grad_s, *,
                       grad_scale=1.0, scale=None):
    """One call for a chunk of the fused LM-head loss: per-row losses (float32) of the
    (rows, V) student logits against the unsorted (rows, K) top-k teacher, with the gradient
    of sum(grad_scale * scale[row] * loss) written into ``grad_s`` (contiguous (rows, V), any
    float dtype, fp32 included) during the same forward."""
    lp, idx = sort_support(topk_logprobs, topk_indices)
    loss, _ = topk_fwd(student, lp, idx, labels, cfg, cfg.canonical_divergence(), grad_s=grad_s,
                       grad_scale=grad_scale, scale=scale)
    return loss
