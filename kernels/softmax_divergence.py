"""Fused temperature-softmax divergence: the Triton kernels behind ``kd_loss``.

Math (pydistill/reference/softmax_divergence.py is the oracle). Per row and per model,
z = cap(a * logits) (the model's logit scale a, then its optional soft-cap c tanh(. / c); -inf
stays -inf), x = z / T, p = softmax(x_t), q = softmax(x_s)::

    loss = hard_weight * (lse(z_s) - z_s[y]) + soft_scale * D(p, q),  soft_scale = w * T^2 (t2)

Forward, one program per row, the vocabulary streamed in tiles of BLOCK_V, fp32 math:

  pass 1   online max / sum-exp of x_s and x_t (and of z_s when T != 1, for the hard CE).
           kl and reverse_kl also get D itself in this pass, online and max-stabilised:
               A = sum_j e^{a_j - m_a} ((a_j - m_a) - (b_j - m_b)),
               KL(a || b) = A / l_a - log l_a + log l_b
           where A is rescaled by e^{m_a - m_a'} and shifted by l_a ((m_a - m_a') - (m_b - m_b'))
           whenever a running max moves (a = x_t, b = x_s for kl; swapped for reverse_kl).
           These running values are kept per lane (the LANE columns a thread loads as one
           16-byte vector) and the lanes fold into the row's after the loop by the same shift:
           no reduction across threads per tile.
           Read: s, t once. Write: one float per row (and N_STATS stats floats).
  pass 2   jsd / tvd / skew_*: with both logsumexps known, D, S_q and S_p (below). Tiles in
           reverse order, so the first tiles re-read are the ones pass 1 read last. D is summed
           as Bregman terms from w = log p - log q = (x_t - m_t) - (x_s - m_s) - (ll_t - ll_s)
           (_div_term; the reference's divergence_value has the derivation), whose rounding
           does not grow with T. kl and reverse_kl run it too above T = ONE_PASS_MAX_T (4),
           where pass 1's online value, a difference of O(1/T) sums, loses ~T^2 eps log V.

Gradient. With h_j = dD/dq_j and u_j = dD/dp_j, the softmax chain rule gives

    dD/ds_j = (1/T) q_j (h_j - S_q),  S_q = sum_k q_k h_k
    dD/dt_j = (1/T) p_j (u_j - S_p),  S_p = sum_k p_k u_k

    divergence        q h                           S_q      p u                            S_p
    kl                -p                            -1       p (log p - log q + 1)          D + 1
    reverse_kl        q (log q - log p + 1)         D + 1    -q                             -1
    jsd               (1-b) q (log q - log m)       pass 2   b p (log p - log m)            pass 2
    tvd               q g,  g = sign(q - p) / 2     pass 2   -p g                           pass 2
    skew_kl           -(1-a) q p / m                pass 2   p (log p - log m - a p / m)    pass 2
    skew_reverse_kl   q (log q - log m - a q / m)   pass 2   -(1-a) p q / m                 pass 2

    m = b p + (1-b) q (jsd), a p + (1-a) q (skew_kl), a q + (1-a) p (skew_reverse_kl)

so kl and reverse_kl need no pass 2 even for their gradient. The hard term adds
hard_weight (softmax(z_s)_j - [j = y]); each model's transform multiplies its gradient by
a sech^2(a y / c) = a (1 - (z / c)^2), taken from the untransformed y (by a without a
soft-cap; _transform_slope). With ``ent`` the forward also writes the
student's entropy -sum q log q = log l_s - B / l_s, B = sum e^{x_s - m_s} (x_s - m_s) kept
online in pass 1 like the kl accumulator (no extra read).

The gradient pass runs either at the end of the forward (``kd_fwd(..., grad_s=...)``, then the
backward only scales it by grad_output: ``kd_scale_grad_``, which returns at once on the device
when grad_output is 1) or in the backward from the saved per-row statistics (``kd_bwd``, which
folds grad_output into the same pass). Bytes moved per element for kl, forward + backward, in
units of one logits tensor: recompute 2 + 3 = 5; gradient-in-forward 5 when grad_output = 1
(minus what pass 3 finds in L2, since it walks the row backwards) and 7 otherwise. The floor
is 3 (read s, read t, write the gradient).
"""
import triton
import triton.language as tl
from packaging.version import Version

DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3, "skew_kl": 4, "skew_reverse_kl": 5}
# Globals read inside @triton.jit code must be constexpr.
KL = tl.constexpr(DIVERGENCE_CODES["kl"])
REVERSE_KL = tl.constexpr(DIVERGENCE_CODES["reverse_kl"])
JSD = tl.constexpr(DIVERGENCE_CODES["jsd"])
TVD = tl.constexpr(DIVERGENCE_CODES["tvd"])
SKEW_KL = tl.constexpr(DIVERGENCE_CODES["skew_kl"])
# Per-row statistics kept for the backward: the running max and log-sum of x_s, x_t and z_s
# (each logsumexp as its two terms m + log l: log q = (x - m) - log l keeps the precision
# that folding them into one float loses when |m| is large), then D, S_q, S_p.
N_STATS = tl.constexpr(16)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp(x):
    # e^x as one ex2.approx.ftz of x log2(e) (MUFU.EX2 and the multiply). tl.exp is the same
    # ex2 without .ftz, which ptxas wraps in three more instructions to keep results below
    # 2^-126 denormal: here they flush to 0, which every probability product already treats as
    # an exact zero (the where(p != 0) masks), at a relative cost of e^-87 of the row's sum.
    return tl.exp2(x * LOG2E)


@triton.jit
def _softcap(z, cap):
    # cap * tanh(z / cap) from one exp of a non-positive argument (no overflow);
    # -inf (masked vocabulary) stays -inf.
    y = z / cap
    e = _exp(-2.0 * tl.abs(y))
    th = (1.0 - e) / (1.0 + e)
    th = tl.where(y < 0, -th, th)
    return tl.where(z == float("-inf"), z, cap * th)


@triton.jit
def _load_logits(ptr, cols, mask, scale, softcap, HAS_SOFTCAP: tl.constexpr,
                 SCALED: tl.constexpr = True):
    # one model's transformed logits cap(scale * z); scale > 0 keeps -inf at -inf.
    # SCALED=False: the scale is 1 (the usual case), known to the compiler: no multiply.
    return _transform(_load_raw(ptr, cols, mask), scale, softcap, HAS_SOFTCAP, SCALED)


@triton.jit
def _load_raw(ptr, cols, mask):
    # one model's untransformed logits in float32, -inf where masked: what _transform_slope reads
    return tl.load(ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _transform(z, scale, softcap, HAS_SOFTCAP: tl.constexpr, SCALED: tl.constexpr):
    if SCALED:
        z = z * scale
    if HAS_SOFTCAP:
        z = _softcap(z, softcap)
    return z


@triton.jit
def _load_tile(ptr, cols, V, scale, softcap, HAS_SOFTCAP: tl.constexpr, SCALED: tl.constexpr,
               MASKED: tl.constexpr):
    # _load_logits of a tile; MASKED=False: a tile wholly inside the row, loaded without a mask
    if MASKED:
        z = tl.load(ptr + cols, mask=cols < V, other=float("-inf"))
    else:
        z = tl.load(ptr + cols)
    return _transform(z.to(tl.float32), scale, softcap, HAS_SOFTCAP, SCALED)


@triton.jit
def _transform_slope(g, raw, scale, softcap, HAS_SOFTCAP: tl.constexpr,
                     SCALED: tl.constexpr = True):
    # g times d cap(scale x) / dx at the untransformed logits raw: scale sech^2(scale raw / c)
    # = scale 4 e / (1 + e)^2 with _softcap's e = exp(-2 |scale raw / c|) <= 1 (the same
    # expression: the compiler reuses the forward's exp). 1 - (z / c)^2 from the capped z
    # would cancel where the cap saturates (z / c rounds towards 1) and lose every digit there.
    # 0 at -inf (masked) entries.
    if HAS_SOFTCAP:
        y = raw
        if SCALED:
            y = raw * scale
        e = _exp(-2.0 * tl.abs(y / softcap))
        g = g * tl.where(raw == float("-inf"), 0.0, (4.0 * e) / ((1.0 + e) * (1.0 + e)))
    if SCALED:
        g = g * scale
    return g


@triton.jit
def _temper(z, inv_t, TEMPERED: tl.constexpr):
    # x = z / T as z times 1 / T; TEMPERED=False: T = 1, known to the compiler
    if TEMPERED:
        z = z * inv_t
    return z


@triton.jit
def _finite_or_zero(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _shift(m):
    # A running max as the shift of e^{x - shift}: 0 where it is infinite. At -inf (nothing
    # but masked entries so far) the sum stays 0; at +inf the +inf entry adds e^{+inf}, so the
    # sum and its log are +inf and the logsumexp m + log l is +inf, as torch.logsumexp's is
    # (e^{x - inf} would make the sum NaN).
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def _carry(acc, l_a, m_a, m_a_new, m_b, m_b_new):
    # acc = sum e^{a - m_a} ((a - m_a) - (b - m_b)) (l_a = sum e^{a - m_a}) moved to the maxima
    # m_a_new >= m_a, m_b_new >= m_b. Maxima are used as shifts (_shift: infinite -> 0), which
    # keeps a student row that is -inf so far at +inf instead of NaN. The carried sum is 0 when
    # its rescale factor underflows (logits 1e38 apart), as torch's p = 0 is.
    ma, ma_new = _shift(m_a), _shift(m_a_new)
    mb, mb_new = _shift(m_b), _shift(m_b_new)
    f = _exp(ma - ma_new)
    # (f applied to each part first: l_a times a log-ratio of 1e38 may overflow, f l_a times it not)
    return tl.where((l_a > 0) & (f != 0), f * acc + (f * l_a) * ((ma - ma_new) - (mb - mb_new)), 0.0)


@triton.jit
def _online_kl_update(acc, l_a, m_a, m_a_new, m_b, m_b_new, e_a, d_a, d_b):
    # _carry's acc per lane (a row of the (LANES, LANE) tile), moved to the new lane maxima,
    # plus this tile's terms, d = x - shift(m_new) and e_a = e^{d_a}. A term whose weight e_a is
    # 0 (a masked entry, or one that underflows) is 0, as torch's p = 0 is, even where the
    # log-ratio beside it overflows to infinity.
    terms = tl.where(e_a != 0, e_a * (d_a - d_b), 0.0)
    return _carry(acc, l_a, m_a, m_a_new, m_b, m_b_new) + tl.sum(terms, axis=1)


@triton.jit
def _online_lse_lanes(m, l, z, inv_t, TEMPERED: tl.constexpr):
    # the lanes' running max m and sum l of e^{x - m}, x = z / T, with tile z folded in; also
    # d = x - shift(m) and e^d (the kl accumulators reuse them). The max is taken of z and then
    # tempered (the same float: rounding is monotonic), so that x is never rounded on its own:
    # d is one FFMA z (1 / T) - shift(m).
    m_new = tl.maximum(m, _temper(tl.max(z, axis=1), inv_t, TEMPERED))
    d = _temper(z, inv_t, TEMPERED) - _shift(m_new)[:, None]
    e = _exp(d)
    return m_new, l * _exp(m - _shift(m_new)) + tl.sum(e, axis=1), d, e


@triton.jit
def _fold_lse(m, l):
    # the row's max and sum of e^{x - max} from its lanes'
    m_row = tl.max(m, axis=0)
    return m_row, tl.sum(l * _exp(m - _shift(m_row)), axis=0)


@triton.jit
def _pointwise(log_p, log_q, beta, DIV: tl.constexpr):
    return _pointwise_b(log_p, log_q, beta, 1.0 - beta, DIV)


@triton.jit
def _pointwise_b(log_p, log_q, beta, beta_c, DIV: tl.constexpr):
    # Per element: p, q, the divergence term d, q h and p u (table in the module docstring).
    # beta_c = 1 - beta, computed in float64 by the launcher: beta within 6e-8 of 1 rounds to
    # 1 in float32, where 1 - beta would be 0.
    # Every product with a probability is masked where that probability is exactly 0, so
    # entries that are -inf in the logits contribute 0 and never NaN, while a NaN probability
    # (a NaN logit in the row) is kept and propagates.
    p = _exp(log_p)
    q = _exp(log_q)
    if DIV == KL:
        d = tl.where(p != 0, p * (log_p - log_q), 0.0)
        qh = -p
        pu = tl.where(p != 0, p * (log_p - log_q + 1.0), 0.0)
    elif DIV == REVERSE_KL:
        d = tl.where(q != 0, q * (log_q - log_p), 0.0)
        qh = tl.where(q != 0, q * (log_q - log_p + 1.0), 0.0)
        pu = -q
    elif DIV == JSD:
        # m underflows to 0 only where p and q are both below ~1e-38 (a denormal p or q times
        # beta rounds to 0 without FTZ): their terms are then negligible, not infinite
        m = beta * p + beta_c * q
        log_m = tl.log(m)
        pu = beta * tl.where((p != 0) & (m != 0), p * (log_p - log_m), 0.0)
        qh = beta_c * tl.where((q != 0) & (m != 0), q * (log_q - log_m), 0.0)
        d = pu + qh
    elif DIV == TVD:
        g = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
        d = 0.5 * tl.abs(p - q)
        qh = q * g
        pu = -p * g
    elif DIV == SKEW_KL:
        m = beta * p + beta_c * q
        r = tl.where(m != 0, p / m, 0.0)
        log_ratio = log_p - tl.log(m)
        d = tl.where((p != 0) & (m != 0), p * log_ratio, 0.0)  # m == 0: see jsd
        qh = -beta_c * q * r
        pu = tl.where((p != 0) & (m != 0), p * (log_ratio - beta * r), 0.0)
    else:  # SKEW_REVERSE_KL
        m = beta * q + beta_c * p
        r = tl.where(m != 0, q / m, 0.0)
        log_ratio = log_q - tl.log(m)
        d = tl.where((q != 0) & (m != 0), q * log_ratio, 0.0)
        qh = tl.where((q != 0) & (m != 0), q * (log_ratio - beta * r), 0.0)
        pu = -beta_c * p * r
    return p, q, d, qh, pu


@triton.jit
def _expm1_small(x):
    # e^x - 1 for |x| <= 1/4 (the series to x^7: 1e-8 relative); tl has no expm1
    return x * (1.0 + x / 2.0 * (1.0 + x / 3.0 * (1.0 + x / 4.0 * (1.0 + x / 5.0 * (
        1.0 + x / 6.0 * (1.0 + x / 7.0))))))


@triton.jit
def _log1p_small(y):
    # log(1 + y) for |y| <= 0.3 as 2 atanh(s), s = y / (2 + y) <= 0.18 (to s^9: 1e-8 relative)
    s = y / (2.0 + y)
    s2 = s * s
    return 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 / 9.0))))


@triton.jit
def _bregman(a, b, u):
    # a log(a / b) - a + b >= 0 from u = log(a / b) (reference: bregman): the series of
    # phi(u) = u - 1 + e^{-u} where |u| < 1/2, a u - a + b elsewhere, b where a = 0
    small = tl.abs(u) < 0.5
    v = tl.where(small, u, 0.0)
    phi = v * v * (1.0 / 2.0 + v * (-1.0 / 6.0 + v * (1.0 / 24.0 + v * (-1.0 / 120.0 + v * (
        1.0 / 720.0 + v * (-1.0 / 5040.0 + v / 40320.0))))))
    out = tl.where(small, a * phi, a * u - a + b)
    return tl.where(a == 0, b, out)


@triton.jit
def _log_ratio_to_mixture(log_a, log_m, w, weight_other):
    # log(a / m), m = (1 - weight_other) a + weight_other b, from w = log(a / b): -log1p(y),
    # y = weight_other expm1(-w), where |w| or |y| is small (reference: _log_ratio_to_mixture)
    small_w = tl.abs(w) < 0.25
    y = weight_other * tl.where(small_w, _expm1_small(-tl.where(small_w, w, 0.0)), _exp(-w) - 1.0)
    small = small_w | (tl.abs(y) < 0.25)
    return tl.where(small, -_log1p_small(tl.where(small, y, 0.0)), log_a - log_m)


@triton.jit
def _div_term(log_p, log_q, p, q, w, beta, beta_c, DIV: tl.constexpr):
    # The divergence's per-element term as the reference's divergence_value sums it: Bregman
    # terms whose rounding does not grow with T (w = log p - log q from _log_ratio).
    if DIV == KL:
        d = _bregman(p, q, w)
    elif DIV == REVERSE_KL:
        d = _bregman(q, p, -w)
    elif DIV == JSD:
        m = beta * p + beta_c * q
        log_m = tl.log(m)
        d = beta * _bregman(p, m, _log_ratio_to_mixture(log_p, log_m, w, beta_c)) + beta_c * _bregman(
            q, m, _log_ratio_to_mixture(log_q, log_m, -w, beta))
        d = tl.where(m != 0, d, 0.0)
    elif DIV == TVD:
        small = tl.abs(w) < 0.25
        d = 0.5 * tl.where(small, p * tl.abs(_expm1_small(-tl.where(small, w, 0.0))), tl.abs(p - q))
    elif DIV == SKEW_KL:
        m = beta * p + beta_c * q
        d = tl.where(m != 0, _bregman(p, m, _log_ratio_to_mixture(log_p, tl.log(m), w, beta_c)), 0.0)
    else:  # SKEW_REVERSE_KL
        m = beta * q + beta_c * p
        d = tl.where(m != 0, _bregman(q, m, _log_ratio_to_mixture(log_q, tl.log(m), -w, beta_c)), 0.0)
    return d


@triton.jit
def _log_ratio(x_t, x_s, m_t, m_s, ll_t, ll_s):
    # w = log p - log q as (x_t - m_t) - (x_s - m_s) - (ll_t - ll_s): rounding relative to w
    # (the difference of the two log-probabilities is rounded at their size, ~log V)
    return ((x_t - _shift(m_t)) - (x_s - _shift(m_s))) - (ll_t - ll_s)


@triton.jit
def _grad_pass(
    s_row, t_row, gs_row, gt_row, label, active, V, n_tiles,
    inv_t, s_scale, s_cap, t_scale, t_cap, beta, beta_c, hard_weight, soft_coef, row_scale,
    m_s, ll_s, m_t, ll_t, m_1, ll_1, s_q, s_p,
    DIV: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr, HAS_HARD: tl.constexpr,
    HAS_SOFT: tl.constexpr, CE_SEPARATE: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK_V: tl.constexpr,
    S_SCALED: tl.constexpr = True, T_SCALED: tl.constexpr = True, TEMPERED: tl.constexpr = True,
):
    # Writes every element of the gradient rows (zeros for an ignored row, whose loads are
    # masked off so they move no bytes). Tiles in reverse order: see the module docstring.
    offs = tl.arange(0, BLOCK_V)
    for k in range(0, n_tiles):
        cols = (n_tiles - 1 - k) * BLOCK_V + offs
        in_row = cols < V
        mask = in_row & active
        raw_s = _load_raw(s_row, cols, mask)
        z_s = _transform(raw_s, s_scale, s_cap, S_CAP, S_SCALED)
        x_s = _temper(z_s, inv_t, TEMPERED)
        g_s = tl.zeros([BLOCK_V], dtype=tl.float32)
        g_t = tl.zeros([BLOCK_V], dtype=tl.float32)
        raw_t = raw_s
        if HAS_SOFT:
            raw_t = _load_raw(t_row, cols, mask)
            z_t = _transform(raw_t, t_scale, t_cap, T_CAP, T_SCALED)
            p, q, d, qh, pu = _pointwise_b(_temper(z_t, inv_t, TEMPERED) - m_t - ll_t, x_s - m_s - ll_s, beta, beta_c, DIV)
            g_s = soft_coef * (qh - q * s_q)
            g_t = soft_coef * (pu - p * s_p)
        if HAS_HARD:
            if CE_SEPARATE:
                soft1 = _exp(z_s - m_1 - ll_1)
            else:
                soft1 = _exp(x_s - m_s - ll_s)
            g_s += hard_weight * (soft1 - tl.where(cols == label, 1.0, 0.0))
        if GRAD_S:
            g_s = _transform_slope(g_s, raw_s, s_scale, s_cap, S_CAP, S_SCALED)
            g_s = tl.where(active, g_s * row_scale, 0.0)
            tl.store(gs_row + cols, g_s.to(gs_row.dtype.element_ty), mask=in_row)
        if GRAD_T:
            g_t = _transform_slope(g_t, raw_t, t_scale, t_cap, T_CAP, T_SCALED)
            g_t = tl.where(active, g_t * row_scale, 0.0)
            tl.store(gt_row + cols, g_t.to(gt_row.dtype.element_ty), mask=in_row)


@triton.jit
def _hard_ce(s_row, label, active, V, scale, softcap, m_1, ll_1, HAS_SOFTCAP: tl.constexpr):
    # lse(z) - z_y from the logsumexp's two terms; NaN for a label outside [0, V) (not loaded)
    valid = (label >= 0) & (label < V)
    z_y = tl.load(s_row + label, mask=valid & active, other=float("nan")).to(tl.float32) * scale
    if HAS_SOFTCAP:
        z_y = _softcap(z_y, softcap)
    return (m_1 - z_y) + ll_1


@triton.jit
def _row_scale(grad_scale, scale_ptr, row, scale_stride, HAS_SCALE_PTR: tl.constexpr):
    # the row's gradient factor: grad_scale, times scale[row] when a scale tensor is given
    scale = grad_scale
    if HAS_SCALE_PTR:
        scale = scale * tl.load(scale_ptr + row * scale_stride).to(tl.float32)
    return scale


@triton.jit
def _row_offset(row, n_inner, stride_outer, stride_inner):
    # Rows of a (..., V) tensor whose leading dims collapse to (outer, inner): covers the
    # contiguous case (outer = 1) and slices such as logits[:, :-1] without a copy.
    return (row // n_inner) * stride_outer + (row % n_inner) * stride_inner


@triton.jit
def _flag(cond):
    # A scalar condition to combine with blocks (``in_row & active``) as a load / store mask.
    # The same value; the form is for Triton 3.9's interpreter, whose comparison of scalars
    # keeps the operands' dtype, so that broadcasting it gives an int64 array, which
    # tl.load / tl.store refuse as a mask. ``true & cond`` is an int1 the compiler folds away.
    return tl.full([], 1, tl.int1) & cond


@triton.jit
def _row_start(row, s_ptr, t_ptr, labels_ptr, n_inner, s_stride_outer, s_stride_inner,
               t_stride_outer, t_stride_inner, ignore_index, HAS_LABELS: tl.constexpr):
    # The row's student and teacher pointers, its label and whether it counts.
    s_row = s_ptr + _row_offset(row, n_inner, s_stride_outer, s_stride_inner)
    t_row = t_ptr + _row_offset(row, n_inner, t_stride_outer, t_stride_inner)
    label = tl.full([], -1, tl.int64)
    active = tl.full([], 1, tl.int1)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        active = _flag(label != ignore_index)
    return s_row, t_row, label, active


@triton.jit
def _pass1_tile(
    s_row, t_row, cols, V, inv_t, s_scale, s_cap, t_scale, t_cap,
    m_s, l_s, m_t, l_t, m_1, l_1, acc, h_acc,
    DIV: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr, S_SCALED: tl.constexpr,
    T_SCALED: tl.constexpr, TEMPERED: tl.constexpr, HAS_SOFT: tl.constexpr,
    CE_SEPARATE: tl.constexpr, ENTROPY: tl.constexpr, MASKED: tl.constexpr,
):
    # One (LANES, LANE) tile of the forward's pass 1 folded into the lanes' state. MASKED: the
    # row's ragged last tile (columns past V read as -inf); the others load without a mask.
    z_s = _load_tile(s_row, cols, V, s_scale, s_cap, S_CAP, S_SCALED, MASKED)
    m_s_new, l_s_new, d_s, e_s = _online_lse_lanes(m_s, l_s, z_s, inv_t, TEMPERED)
    if ENTROPY:  # B against a zero "b" side: the same online update as kl's
        zero = tl.zeros_like(m_s)
        h_acc = _online_kl_update(h_acc, l_s, m_s, m_s_new, zero, zero, e_s, d_s, 0.0)
    if HAS_SOFT:
        z_t = _load_tile(t_row, cols, V, t_scale, t_cap, T_CAP, T_SCALED, MASKED)
        m_t_new, l_t_new, d_t, e_t = _online_lse_lanes(m_t, l_t, z_t, inv_t, TEMPERED)
        if DIV == KL:
            acc = _online_kl_update(acc, l_t, m_t, m_t_new, m_s, m_s_new, e_t, d_t, d_s)
        if DIV == REVERSE_KL:
            acc = _online_kl_update(acc, l_s, m_s, m_s_new, m_t, m_t_new, e_s, d_s, d_t)
        m_t = m_t_new
        l_t = l_t_new
    if CE_SEPARATE:
        m_1, l_1, _d, _e = _online_lse_lanes(m_1, l_1, z_s, 1.0, False)
    return m_s_new, l_s_new, m_t, l_t, m_1, l_1, acc, h_acc


@triton.jit
def _kd_fwd_kernel(
    s_ptr, t_ptr, labels_ptr, loss_ptr, stats_ptr, gs_ptr, gt_ptr, scale_ptr, ent_ptr,
    n_inner, s_stride_outer, s_stride_inner, t_stride_outer, t_stride_inner, scale_stride,
    V, inv_t, s_scale, s_cap, t_scale, t_cap, beta, beta_c, hard_weight, soft_scale, grad_scale,
    ignore_index,
    DIV: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr, S_SCALED: tl.constexpr,
    T_SCALED: tl.constexpr, TEMPERED: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr, HAS_SOFT: tl.constexpr, CE_SEPARATE: tl.constexpr,
    NEEDS_PASS2: tl.constexpr, BREGMAN: tl.constexpr, HAS_SCALE_PTR: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, STORE_STATS: tl.constexpr,
    ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, LANE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row, label, active = _row_start(
        row, s_ptr, t_ptr, labels_ptr, n_inner, s_stride_outer, s_stride_inner,
        t_stride_outer, t_stride_inner, ignore_index, HAS_LABELS,
    )
    n_tiles = tl.cdiv(V, BLOCK_V)
    n_live = tl.where(active, n_tiles, 0)
    offs = tl.arange(0, BLOCK_V)

    # ---- pass 1: online logsumexps (+ online kl / reverse_kl) ------------------------------
    # The tile as (LANES, LANE): LANE columns a thread loads as one 16-byte vector. Each lane
    # keeps its own running maxima, sums and kl accumulator, so the loop has no reduction
    # across threads (no shared memory, no barrier); the lanes fold into the row's after it.
    LANES: tl.constexpr = BLOCK_V // LANE
    lane_offs = tl.arange(0, LANES)[:, None] * LANE + tl.arange(0, LANE)[None, :]
    zero = tl.zeros([LANES], dtype=tl.float32)
    m_s = zero + float("-inf")
    l_s = zero
    m_t = zero + float("-inf")
    l_t = zero
    m_1 = zero + float("-inf")
    l_1 = zero
    acc = zero
    h_acc = zero
    # full tiles unmasked, then the ragged last one (an inactive row reads none)
    n_full = tl.where(active, V // BLOCK_V, 0)
    for k in range(0, n_full):
        m_s, l_s, m_t, l_t, m_1, l_1, acc, h_acc = _pass1_tile(
            s_row, t_row, k * BLOCK_V + lane_offs, V, inv_t, s_scale, s_cap, t_scale, t_cap,
            m_s, l_s, m_t, l_t, m_1, l_1, acc, h_acc,
            DIV, S_CAP, T_CAP, S_SCALED, T_SCALED, TEMPERED, HAS_SOFT, CE_SEPARATE, ENTROPY, False,
        )
    for k in range(n_full, n_live):
        m_s, l_s, m_t, l_t, m_1, l_1, acc, h_acc = _pass1_tile(
            s_row, t_row, k * BLOCK_V + lane_offs, V, inv_t, s_scale, s_cap, t_scale, t_cap,
            m_s, l_s, m_t, l_t, m_1, l_1, acc, h_acc,
            DIV, S_CAP, T_CAP, S_SCALED, T_SCALED, TEMPERED, HAS_SOFT, CE_SEPARATE, ENTROPY, True,
        )
    # fold the lanes: the accumulators first (they move from the lanes' maxima to the row's)
    m_s_row = tl.max(m_s, axis=0)
    m_t_row = tl.max(m_t, axis=0)
    if ENTROPY:
        h_acc = tl.sum(_carry(h_acc, l_s, m_s, m_s_row, zero, zero), axis=0)
    if DIV == KL:
        acc = tl.sum(_carry(acc, l_t, m_t, m_t_row, m_s, m_s_row), axis=0)
    if DIV == REVERSE_KL:
        acc = tl.sum(_carry(acc, l_s, m_s, m_s_row, m_t, m_t_row), axis=0)
    m_s, l_s = _fold_lse(m_s, l_s)
    m_t, l_t = _fold_lse(m_t, l_t)
    m_1, l_1 = _fold_lse(m_1, l_1)
    ll_s = tl.log(l_s)
    ll_t = tl.log(l_t)
    if HAS_SOFT:
        # a +inf logit makes the row's log-softmax NaN (torch.log_softmax's inf - inf): the
        # soft term's value and gradients are NaN; the hard term alone keeps the logsumexp +inf
        ll_s = tl.where(m_s == float("inf"), float("nan"), ll_s)
        ll_t = tl.where(m_t == float("inf"), float("nan"), ll_t)
    if CE_SEPARATE:
        ll_1 = tl.log(l_1)
    else:
        m_1 = m_s
        ll_1 = ll_s

    # ---- divergence and the sums its gradient needs -----------------------------------------
    div = 0.0
    s_q = 0.0
    s_p = 0.0
    if HAS_SOFT:
        if DIV == KL:
            div = acc / l_t - ll_t + ll_s
        elif DIV == REVERSE_KL:
            div = acc / l_s - ll_s + ll_t
        if NEEDS_PASS2:
            # every divergence but kl / reverse_kl at T <= ONE_PASS_MAX_T; D from the Bregman
            # terms of _div_term where the plain terms would lose precision (BREGMAN: large T,
            # beta near 0 or 1; bregman_sum), else the plain terms d. The sums are kept per lane
            # (each thread adds its LANE columns into one float per sum: 3 x 2 registers where
            # BLOCK_V-wide accumulators took 3 x 16, at the same adds per element)
            d_acc = zero
            q_acc = zero
            p_acc = zero
            for k in range(0, n_live):
                cols = (n_live - 1 - k) * BLOCK_V + lane_offs
                mask = cols < V
                x_s = _temper(_load_logits(s_row, cols, mask, s_scale, s_cap, S_CAP, S_SCALED),
                              inv_t, TEMPERED)
                x_t = _temper(_load_logits(t_row, cols, mask, t_scale, t_cap, T_CAP, T_SCALED),
                              inv_t, TEMPERED)
                log_p = x_t - m_t - ll_t
                log_q = x_s - m_s - ll_s
                p, q, d, qh, pu = _pointwise_b(log_p, log_q, beta, beta_c, DIV)
                if BREGMAN:
                    d = _div_term(log_p, log_q, p, q, _log_ratio(x_t, x_s, m_t, m_s, ll_t, ll_s),
                                  beta, beta_c, DIV)
                d_acc += tl.sum(d, axis=1)
                if DIV != KL and DIV != REVERSE_KL:
                    q_acc += tl.sum(qh, axis=1)
                    p_acc += tl.sum(pu, axis=1)
            div = tl.sum(d_acc, axis=0)
            s_q = tl.sum(q_acc, axis=0)
            s_p = tl.sum(p_acc, axis=0)
        if DIV == KL:
            s_q = -1.0
            s_p = div + 1.0
        elif DIV == REVERSE_KL:
            s_q = div + 1.0
            s_p = -1.0

    # every divergence is >= 0: a negative value is rounding of the plain sums (student ~
    # teacher); NaN is kept (NaN < 0 is false)
    loss = soft_scale * tl.where(div < 0.0, 0.0, div)
    if HAS_HARD:
        loss += hard_weight * _hard_ce(s_row, label, active, V, s_scale, s_cap, m_1, ll_1, S_CAP)
    tl.store(loss_ptr + row, tl.where(active, loss, 0.0))
    if ENTROPY:
        tl.store(ent_ptr + row, tl.where(active, ll_s - h_acc / l_s, 0.0))

    if STORE_STATS:
        st = stats_ptr + row * N_STATS
        tl.store(st + 0, m_s)
        tl.store(st + 1, ll_s)
        tl.store(st + 2, m_t)
        tl.store(st + 3, ll_t)
        tl.store(st + 4, m_1)
        tl.store(st + 5, ll_1)
        tl.store(st + 6, div)
        tl.store(st + 7, s_q)
        tl.store(st + 8, s_p)

    if GRAD_S or GRAD_T:
        row_scale = _row_scale(grad_scale, scale_ptr, row, scale_stride, HAS_SCALE_PTR)
        _grad_pass(
            s_row, t_row, gs_ptr + row * V, gt_ptr + row * V, label, active, V, n_tiles,
            inv_t, s_scale, s_cap, t_scale, t_cap, beta, beta_c, hard_weight, soft_scale * inv_t,
            row_scale,
            m_s, ll_s, m_t, ll_t, m_1, ll_1, s_q, s_p,
            DIV, S_CAP, T_CAP, HAS_HARD, HAS_SOFT, CE_SEPARATE, GRAD_S, GRAD_T, BLOCK_V,
            S_SCALED, T_SCALED, TEMPERED,
        )


@triton.jit
def _kd_bwd_kernel(
    s_ptr, t_ptr, labels_ptr, stats_ptr, gs_ptr, gt_ptr, scale_ptr,
    n_inner, s_stride_outer, s_stride_inner, t_stride_outer, t_stride_inner, scale_stride,
    V, inv_t, s_scale, s_cap, t_scale, t_cap, beta, beta_c, hard_weight, soft_scale, grad_scale,
    ignore_index,
    DIV: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr, S_SCALED: tl.constexpr,
    T_SCALED: tl.constexpr, TEMPERED: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr, HAS_SOFT: tl.constexpr, CE_SEPARATE: tl.constexpr,
    HAS_SCALE_PTR: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row, label, active = _row_start(
        row, s_ptr, t_ptr, labels_ptr, n_inner, s_stride_outer, s_stride_inner,
        t_stride_outer, t_stride_inner, ignore_index, HAS_LABELS,
    )
    st = stats_ptr + row * N_STATS
    row_scale = _row_scale(grad_scale, scale_ptr, row, scale_stride, HAS_SCALE_PTR)
    _grad_pass(
        s_row, t_row, gs_ptr + row * V, gt_ptr + row * V, label, active, V, tl.cdiv(V, BLOCK_V),
        inv_t, s_scale, s_cap, t_scale, t_cap, beta, beta_c, hard_weight, soft_scale * inv_t,
            row_scale,
        tl.load(st + 0), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3), tl.load(st + 4),
        tl.load(st + 5), tl.load(st + 7), tl.load(st + 8),
        DIV, S_CAP, T_CAP, HAS_HARD, HAS_SOFT, CE_SEPARATE, GRAD_S, GRAD_T, BLOCK_V,
        S_SCALED, T_SCALED, TEMPERED,
    )


@triton.jit
def _kd_scale_grad_kernel(grad_ptr, scale_ptr, scale_stride, n_rows, V, BLOCK_V: tl.constexpr):
    # grad[row] *= scale[row], each program striding over the rows; a row is skipped on the
    # device where its scale is exactly 1 (the usual loss.backward()), so that the backward of
    # the gradient-in-forward mode then moves no gradient bytes, and its few programs
    # (SCALE_GRAD_PROGRAMS) cost microseconds.
    offs = tl.arange(0, BLOCK_V)
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)  # row * V passes 2^31 at N = 16384, V = 128256
        scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        if scale != 1.0:
            for k in range(0, tl.cdiv(V, BLOCK_V)):
                cols = k * BLOCK_V + offs
                mask = cols < V
                ptr = grad_ptr + row * V + cols
                g = tl.load(ptr, mask=mask).to(tl.float32)
                tl.store(ptr, (g * scale).to(grad_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# Launchers: validate, allocate, compute the grid. Inputs arrive validated by the API.
# ------------------------------------------------------------------------------------------
import torch  # noqa: E402  (kept below the kernels: this file reads kernel-first)

from pydistill._utils import empty  # noqa: E402

# Tile size override for tests (small tiles exercise the multi-tile paths at small V).
BLOCK_V_OVERRIDE = None


# Compile options of every launch in kernels/. FMA contraction is stated rather than left to
# Triton's default: Triton 3.9 warns that the default becomes "off" in 3.10, which would change
# these kernels' rounding and speed from one Triton release to the next.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)


def _block_v(vocab: int) -> int:
    if BLOCK_V_OVERRIDE is not None:
        return BLOCK_V_OVERRIDE
    return min(4096, triton.next_power_of_2(vocab))


def _lane(block_v: int, *inputs) -> int:
    """Columns per lane of the forward's first pass: one 16-byte load of the widest input."""
    return max(1, min(block_v, 16 // max(x.element_size() for x in inputs)))


def _num_warps(block_v: int) -> int:
    return 4 if block_v <= 1024 else 8 if block_v <= 4096 else 16


def _leading_dims(x: torch.Tensor):
    """x with unit stride along V, and its leading dims merged into at most two
    (size, stride) pairs; None when they do not merge that far."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    dims = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return x, (dims if len(dims) <= 2 else None)


def _row_layouts(student: torch.Tensor, teacher: torch.Tensor):
    """Address the rows of student and teacher (..., V) as
    base + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner, with one n_inner
    for both. Covers contiguous inputs and slices such as logits[:, :-1] without a copy;
    anything else is copied to contiguous rows."""
    s, ds = _leading_dims(student)
    t, dt = _leading_dims(teacher)
    if ds is None or dt is None or (len(ds) == 2 and len(dt) == 2 and ds[1][0] != dt[1][0]):
        s, t = student.contiguous(), teacher.contiguous()
        ds = dt = [(s.numel() // s.shape[-1], s.shape[-1])]
    two = ds if len(ds) == 2 else dt if len(dt) == 2 else None
    n_inner = two[1][0] if two is not None else 1

    def strides(dims):
        if len(dims) == 2:
            return dims[0][1], dims[1][1]
        row_stride = dims[0][1] if dims else 0
        return n_inner * row_stride, row_stride

    return s, t, n_inner, strides(ds), strides(dt)


def transform_args(cfg, teacher: bool = True):
    """The kernels' arguments of the per-model logit transforms (a soft-cap's placeholder is
    1.0, never read when its flag is off). ``teacher=False``: the student's only."""
    out = dict(s_scale=float(cfg.student_logit_scale),
               s_cap=float(cfg.student_softcap) if cfg.student_softcap is not None else 1.0,
               S_CAP=cfg.student_softcap is not None)
    if teacher:
        out.update(t_scale=float(cfg.teacher_logit_scale),
                   t_cap=float(cfg.teacher_softcap) if cfg.teacher_softcap is not None else 1.0,
                   T_CAP=cfg.teacher_softcap is not None)
    return out


def _launch_args(student, teacher, labels, cfg, divergence, grad_s, grad_t, grad_scale, scale,
                 placeholder):
    """Keyword arguments shared by the forward and backward kernels. ``placeholder`` stands
    in for pointers a variant never dereferences (absent labels, gradients, scales)."""
    vocab = student.shape[-1]
    s, t, n_inner, (so_s, si_s), (so_t, si_t) = _row_layouts(student, teacher)
    hard = cfg.hard_weight != 0.0
    block = _block_v(vocab)
    return dict(
        s_ptr=s, t_ptr=t,
        labels_ptr=labels.reshape(-1).contiguous() if labels is not None else placeholder,
        gs_ptr=grad_s if grad_s is not None else placeholder,
        gt_ptr=grad_t if grad_t is not None else placeholder,
        scale_ptr=scale if scale is not None else placeholder,
        n_inner=n_inner, s_stride_outer=so_s, s_stride_inner=si_s,
        t_stride_outer=so_t, t_stride_inner=si_t,
        scale_stride=scale.stride(0) if scale is not None and scale.numel() > 1 else 0,
        V=vocab, inv_t=1.0 / cfg.temperature, **transform_args(cfg),
        # the identity scales and T = 1 as compile-time facts: no multiply per element
        S_SCALED=float(cfg.student_logit_scale) != 1.0,
        T_SCALED=float(cfg.teacher_logit_scale) != 1.0,
        TEMPERED=float(cfg.temperature) != 1.0,
        beta=float(cfg.beta), beta_c=1.0 - float(cfg.beta),  # 1 - beta before rounding to float32
        hard_weight=float(cfg.hard_weight), soft_scale=float(cfg.soft_scale),
        grad_scale=float(grad_scale), ignore_index=int(cfg.ignore_index),
        DIV=DIVERGENCE_CODES[divergence],
        HAS_LABELS=labels is not None, HAS_HARD=hard, HAS_SOFT=cfg.has_soft,
        CE_SEPARATE=hard and cfg.temperature != 1.0, HAS_SCALE_PTR=scale is not None,
        GRAD_S=grad_s is not None, GRAD_T=grad_t is not None,
        BLOCK_V=block, num_warps=_num_warps(block), **LAUNCH_OPTIONS,
    )


# kl and reverse_kl get their value online in pass 1, whose rounding is ~T^2 eps log V relative
# to the loss (the difference of O(1/T) sums): 1e-6 up to T = 4. Above it a second pass sums
# the Bregman terms (_div_term), whose rounding does not grow with T (module docstring).
ONE_PASS_MAX_T = 4.0


def needs_pass2(divergence: str, temperature: float) -> bool:
    return divergence not in ("kl", "reverse_kl") or temperature > ONE_PASS_MAX_T


# The plain terms of pass 2 (_pointwise_b's d) round like float32 PyTorch's own sum: an absolute
# ~eps log V per row, which grows as T^2 eps relative to the loss at large T and is large
# relative to the small values of the mixed divergences at beta near 0 or 1. There the Bregman
# terms (_div_term, about twice the instructions per element) keep the relative error ~1e-6;
# elsewhere the plain terms keep pass 2 as cheap as it was.
BREGMAN_BETA_EDGE = 0.01


# Triton 3.9's compiler crashes (SIGSEGV) on the forward's pass 2 with the plain terms (jsd with
# the stats stored, sm_90); the Bregman terms are exact at every T, so from 3.9 pass 2 takes them
PLAIN_PASS2_CRASHES = Version(triton.__version__).release[:2] >= (3, 9)


def bregman_sum(divergence: str, temperature: float, beta: float) -> bool:
    mixed = divergence in ("jsd", "skew_kl", "skew_reverse_kl")
    edge = mixed and min(beta, 1.0 - beta) < BREGMAN_BETA_EDGE
    return PLAIN_PASS2_CRASHES or temperature > ONE_PASS_MAX_T or edge


def kd_fwd(student, teacher, labels, cfg, divergence, *, grad_s=None, grad_t=None,
           grad_scale=1.0, scale=None, store_stats=False, entropy=None):
    """Per-row losses (float32, N) and, with ``store_stats``, the per-row stats (N, 8) that
    ``kd_bwd`` needs. With ``grad_s`` / ``grad_t`` (contiguous (N, V) buffers) the gradients are
    written too, scaled by ``grad_scale * scale[row]`` (``scale``: 1 or N float32 values).
    ``entropy``: an (N,) float32 buffer for the student's entropy of softmax(z_s / T) per row
    (0 on ignored rows)."""
    n_rows = student.numel() // student.shape[-1]
    loss = empty(n_rows, dtype=torch.float32, device=student.device)
    stats = empty((n_rows, N_STATS.value), dtype=torch.float32, device=student.device) if store_stats else loss
    if n_rows > 0:
        args = _launch_args(student, teacher, labels, cfg, divergence, grad_s, grad_t,
                            grad_scale, scale, placeholder=loss)
        _kd_fwd_kernel[(n_rows,)](
            loss_ptr=loss, stats_ptr=stats, STORE_STATS=store_stats,
            ent_ptr=entropy if entropy is not None else loss, ENTROPY=entropy is not None,
            NEEDS_PASS2=needs_pass2(divergence, cfg.temperature),
            BREGMAN=bregman_sum(divergence, cfg.temperature, cfg.beta),
            LANE=_lane(args["BLOCK_V"], student, teacher), **args,
        )
    return loss, stats


def kd_bwd(student, teacher, labels, stats, cfg, divergence, *, grad_s=None, grad_t=None,
           grad_scale=1.0, scale=None):
    """The gradient pass alone, from the stats saved by ``kd_fwd(store_stats=True)``."""
    n_rows = student.numel() // student.shape[-1]
    if n_rows > 0:
        args = _launch_args(student, teacher, labels, cfg, divergence, grad_s, grad_t,
                            grad_scale, scale, placeholder=stats)
        _kd_bwd_kernel[(n_rows,)](stats_ptr=stats, **args)


# Programs of the in-place gradient scaling: enough to stream a gradient that does need scaling
# (a few waves of CTAs on any GPU), few enough that the usual no-op costs microseconds (one
# program per (row, tile) was 524,288 programs at N = 16384, V = 128256).
SCALE_GRAD_PROGRAMS = 1024


def kd_scale_grad_(grad: torch.Tensor, scale: torch.Tensor):
    """grad (N, V, contiguous) *= scale (1 or N float32 values), skipped on the device where
    the scale is exactly 1."""
    n_rows, vocab = grad.shape
    if n_rows == 0:
        return grad
    block = min(4096, triton.next_power_of_2(vocab))
    stride = scale.stride(0) if scale.numel() > 1 else 0
    _kd_scale_grad_kernel[(min(n_rows, SCALE_GRAD_PROGRAMS),)](
        grad, scale, stride, n_rows, vocab, BLOCK_V=block, num_warps=_num_warps(block),
        **LAUNCH_OPTIONS,
    )
    return grad
