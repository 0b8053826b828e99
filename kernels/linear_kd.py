"""Tiled ("flash") fused LM-head distillation: ``linear_kd_loss`` without a logits tensor.

Per row i the student logits are ``s_i = h_i W_s^T + b_s`` (V_s) and the teacher's
``t_i = g_i W_t^T + b_t`` (V_t) or given rows; the loss is kd_loss's per-row loss
(kernels/softmax_divergence.py has the math and the gradient table, which this file reuses),
the shorter vocabulary -inf beyond its end, V = max(V_s, V_t). Here a (BLOCK_N, BLOCK_V)
logits tile is computed with ``tl.dot`` over H in BLOCK_K slices, consumed in registers, and
never written to memory:

  forward, pass 1   grid (row blocks, vocabulary splits); each program walks its split's
                    tiles and keeps per row the online max / sum-exp of x_s = z_s / T,
                    x_t = z_t / T and z_s (hard CE at T != 1), the online KL sum of kl /
                    reverse_kl (the row kernel's update, one row per lane of the block), and
                    z_s[y] (and, for the student's entropy, sum e^{x_s - m_s} (x_s - m_s)).
                    Writes 8 (9) floats per (split, row); the launcher merges the splits
                    (flash-decoding's split-K: several programs per row block keep the GPU
                    busy when N / BLOCK_N is small).
  forward, pass 2   jsd / tvd / skew_*: with the merged logsumexps, the sums D, S_q, S_p per
                    (split, row); the logits tiles are computed a second time.
  backward          grid (row blocks x vocabulary tiles, grouped so that programs running
                    together share W tiles in L2); each program recomputes its tiles,
                    forms the gradient tile G = d loss / d z_s from the per-row statistics
                    (row scale and grad_output folded in), and accumulates with float32
                    atomics
                        d(hidden)[rows]  += G   W_s[tile]      (BLOCK_N, H) by BLOCK_K slices
                        d(weight)[tile]  += G^T h[rows]        (BLOCK_V, H)
                        d(bias)[tile]    += sum_rows G
                    G is rounded once to the weight's dtype for these two products, as the
                    chunked path rounds its gradient chunk.

GEMM count for teacher hidden + weight (each 2 N V H): forward 2 (kl / reverse_kl) or 4,
backward 4 (2 recomputed logits, 2 gradient products): 6 or 8 against the chunked path's 4;
the price of writing no (N, V) tile. Extra memory: per-row statistics, and float32
accumulators for the gradients of low-precision inputs (the launcher bounds d(weight)'s by
walking the vocabulary in slabs).
"""
import triton
import triton.language as tl

from pydistill.kernels.attention_kd import _dot
from pydistill.kernels.softmax_divergence import (
    KL,
    REVERSE_KL,
    _finite_or_zero,
    _pointwise,
    _softcap,
    _transform_slope,
)

# Per (split, row) partials of pass 1, and of pass 2.
N_PARTIALS = tl.constexpr(9)
N_SUMS = tl.constexpr(3)
# Per-row statistics the backward reads: finite maxima and log-sums of x_s, x_t, z_s, S_q, S_p.
N_ROW_STATS = tl.constexpr(8)


@triton.jit
def _logits_tile(h_ptr, h_stride, w_ptr, w_stride, b_ptr, rows, row_mask, cols, V, H, scale,
                 softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                 DOT_IN_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # (y, z): y = h[rows] W[cols]^T + b[cols] and z = cap(scale y) in float32, both -inf beyond
    # V (y: what _transform_slope reads). Masked rows read zeros.
    offs_k = tl.arange(0, BLOCK_K)
    col_mask = cols < V
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < H
        a = tl.load(h_ptr + rows[:, None] * h_stride + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * w_stride + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_IN_FP32:  # the interpreter's bfloat16 tl.dot (see attention_kd._dot)
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = acc * scale
    if HAS_SOFTCAP:
        z = _softcap(z, softcap)
    return (tl.where(col_mask[None, :], acc, float("-inf")),
            tl.where(col_mask[None, :], z, float("-inf")))


@triton.jit
def _teacher_tile(t_h_ptr, t_h_stride, t_w_ptr, t_w_stride, t_b_ptr, rows, row_mask, cols, V_t,
                  H_t, t_scale, t_cap, T_HEAD: tl.constexpr, T_HAS_BIAS: tl.constexpr,
                  T_CAP: tl.constexpr, T_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # The teacher's logits tile: its own head, or its given (N, V_t) rows (t_h_ptr, t_h_stride).
    if T_HEAD:
        _, z = _logits_tile(t_h_ptr, t_h_stride, t_w_ptr, t_w_stride, t_b_ptr, rows, row_mask, cols,
                         V_t, H_t, t_scale, t_cap, T_HAS_BIAS, T_CAP, T_PRECISION, DOT_IN_FP32,
                         BLOCK_N, BLOCK_V, BLOCK_K)
    else:
        col_mask = cols < V_t
        z = tl.load(t_h_ptr + rows[:, None] * t_h_stride + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=float("-inf")).to(tl.float32)
        z = z * t_scale
        if T_CAP:
            z = _softcap(z, t_cap)
        z = tl.where(col_mask[None, :], z, float("-inf"))
    return z


@triton.jit
def _tiles(h_ptr, h_stride, w_ptr, w_stride, b_ptr, t_h_ptr, t_h_stride, t_w_ptr, t_w_stride,
           t_b_ptr, rows, row_mask, cols, V_s, V_t, H, H_t, s_scale, s_cap, t_scale, t_cap,
           WITH_TEACHER: tl.constexpr, HAS_BIAS: tl.constexpr, T_HEAD: tl.constexpr,
           T_HAS_BIAS: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr,
           PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
           DOT_IN_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
           BLOCK_K: tl.constexpr):
    # The student's transformed logits tile and, WITH_TEACHER, the teacher's (else the
    # student's again); then the student's untransformed tile.
    y_s, z_s = _logits_tile(h_ptr, h_stride, w_ptr, w_stride, b_ptr, rows, row_mask, cols, V_s, H,
                       s_scale, s_cap, HAS_BIAS, S_CAP, PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_V,
                       BLOCK_K)
    z_t = z_s
    if WITH_TEACHER:
        z_t = _teacher_tile(t_h_ptr, t_h_stride, t_w_ptr, t_w_stride, t_b_ptr, rows, row_mask,
                            cols, V_t, H_t, t_scale, t_cap, T_HEAD, T_HAS_BIAS, T_CAP, T_PRECISION,
                            DOT_IN_FP32, BLOCK_N, BLOCK_V, BLOCK_K)
    return z_s, z_t, y_s


@triton.jit
def _round_to_bf16(x):
    # x rounded to the nearest bfloat16 (ties to even), kept as float32: what .to(tl.bfloat16)
    # does on a GPU. The interpreter's cast truncates toward zero instead, a bias that the
    # gradient's sums over thousands of terms would turn into an error the GPU does not make.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _online_kl_rows(acc, l_a, m_a, m_a_new, m_b, m_b_new, x_a, e_a, x_b):
    # _online_kl_update of the row kernel with one row per lane: acc = sum_j e^{a_j - m_a}
    # ((a_j - m_a) - (b_j - m_b)) moved to the new maxima, plus this tile's terms.
    ma, ma_new = _finite_or_zero(m_a), _finite_or_zero(m_a_new)
    mb, mb_new = _finite_or_zero(m_b), _finite_or_zero(m_b_new)
    shift = (ma - ma_new) - (mb - mb_new)
    carried = tl.where(l_a > 0, tl.exp(ma - ma_new) * (acc + l_a * shift), 0.0)
    terms = tl.where(x_a > float("-inf"),
                     e_a * ((x_a - ma_new[:, None]) - (x_b - mb_new[:, None])), 0.0)
    return carried + tl.sum(terms, axis=1)


@triton.jit
def _online_lse_rows(m, total, x):
    # running max and sum of exp(x - finite(max)) over the tiles so far, one row per lane
    m_new = tl.maximum(m, tl.max(x, axis=1))
    e = tl.exp(x - _finite_or_zero(m_new)[:, None])
    total = total * tl.exp(m - _finite_or_zero(m_new)) + tl.sum(e, axis=1)
    return m_new, total, e


@triton.jit
def _linear_kd_fwd_kernel(
    h_ptr, h_stride, w_ptr, w_stride, b_ptr,
    t_h_ptr, t_h_stride, t_w_ptr, t_w_stride, t_b_ptr,
    labels_ptr, stats_ptr, out_ptr,
    N, V, V_s, V_t, H, H_t, n_tiles_per_split, inv_t, s_scale, s_cap, t_scale, t_cap, beta,
    ignore_index,
    DIV: tl.constexpr, PASS2: tl.constexpr, HAS_SOFT: tl.constexpr, CE_SEPARATE: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_BIAS: tl.constexpr, T_HEAD: tl.constexpr,
    T_HAS_BIAS: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr,
    PRECISION: tl.constexpr, T_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
    row_in = rows < N
    active = row_in
    label = tl.full([BLOCK_N], -1, tl.int64)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
        active = row_in & (label != ignore_index)
    first = split * n_tiles_per_split
    last = tl.minimum(first + n_tiles_per_split, tl.cdiv(V, BLOCK_V))
    offs_v = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    out = out_ptr + (split * N + rows) * (N_SUMS if PASS2 else N_PARTIALS)

    if PASS2:
        st = stats_ptr + rows * N_ROW_STATS
        m_s = tl.load(st + 0, mask=row_in, other=0.0)
        ll_s = tl.load(st + 1, mask=row_in, other=0.0)
        m_t = tl.load(st + 2, mask=row_in, other=0.0)
        ll_t = tl.load(st + 3, mask=row_in, other=0.0)
        d_acc = zero
        q_acc = zero
        p_acc = zero
        for tile in range(first, last):
            cols = tile * BLOCK_V + offs_v
            z_s, z_t, _ = _tiles(h_ptr, h_stride, w_ptr, w_stride, b_ptr, t_h_ptr, t_h_stride,
                                 t_w_ptr, t_w_stride, t_b_ptr, rows, active, cols, V_s, V_t, H,
                                 H_t, s_scale, s_cap, t_scale, t_cap, True, HAS_BIAS, T_HEAD,
                                 T_HAS_BIAS, S_CAP, T_CAP, PRECISION, T_PRECISION, DOT_IN_FP32,
                                 BLOCK_N, BLOCK_V, BLOCK_K)
            # (x - m) - log l, as the backward forms them: x - (m + log l) rounds m + log l
            # to ~eps |m| (2e-5 at |m| ~ 300), an error of every log-probability that the
            # gradient's q h - q S_q turns into one of S_q next to q ~ 1
            p, q, d, qh, pu = _pointwise(z_t * inv_t - m_t[:, None] - ll_t[:, None],
                                         z_s * inv_t - m_s[:, None] - ll_s[:, None], beta, DIV)
            d_acc += tl.sum(d, axis=1)
            q_acc += tl.sum(qh, axis=1)
            p_acc += tl.sum(pu, axis=1)
        tl.store(out + 0, d_acc, mask=row_in)
        tl.store(out + 1, q_acc, mask=row_in)
        tl.store(out + 2, p_acc, mask=row_in)
    else:
        m_s = zero + float("-inf")
        l_s = zero
        m_t = zero + float("-inf")
        l_t = zero
        m_1 = zero + float("-inf")
        l_1 = zero
        acc = zero
        h_acc = zero
        z_y = zero
        for tile in range(first, last):
            cols = tile * BLOCK_V + offs_v
            z_s, z_t, _ = _tiles(h_ptr, h_stride, w_ptr, w_stride, b_ptr, t_h_ptr, t_h_stride,
                                 t_w_ptr, t_w_stride, t_b_ptr, rows, active, cols, V_s, V_t, H,
                                 H_t, s_scale, s_cap, t_scale, t_cap, HAS_SOFT, HAS_BIAS, T_HEAD,
                                 T_HAS_BIAS, S_CAP, T_CAP, PRECISION, T_PRECISION, DOT_IN_FP32,
                                 BLOCK_N, BLOCK_V, BLOCK_K)
            x_s = z_s * inv_t
            m_s_new, l_s_new, e_s = _online_lse_rows(m_s, l_s, x_s)
            if ENTROPY:  # sum e^{x_s - m_s} (x_s - m_s): kl's update against a zero side
                h_acc = _online_kl_rows(h_acc, l_s, m_s, m_s_new, zero, zero, x_s, e_s,
                                        tl.zeros_like(x_s))
            if HAS_SOFT:
                x_t = z_t * inv_t
                m_t_new, l_t_new, e_t = _online_lse_rows(m_t, l_t, x_t)
                if DIV == KL:
                    acc = _online_kl_rows(acc, l_t, m_t, m_t_new, m_s, m_s_new, x_t, e_t, x_s)
                if DIV == REVERSE_KL:
                    acc = _online_kl_rows(acc, l_s, m_s, m_s_new, m_t, m_t_new, x_s, e_s, x_t)
                m_t = m_t_new
                l_t = l_t_new
            m_s = m_s_new
            l_s = l_s_new
            if CE_SEPARATE:
                m_1, l_1, _e1 = _online_lse_rows(m_1, l_1, z_s)
            # z_s[y]: exactly one tile of one split holds column y; the others add 0
            z_y += tl.sum(tl.where(cols[None, :] == label[:, None], z_s, 0.0), axis=1)
        tl.store(out + 0, m_s, mask=row_in)
        tl.store(out + 1, l_s, mask=row_in)
        tl.store(out + 2, m_t, mask=row_in)
        tl.store(out + 3, l_t, mask=row_in)
        tl.store(out + 4, m_1, mask=row_in)
        tl.store(out + 5, l_1, mask=row_in)
        tl.store(out + 6, acc, mask=row_in)
        tl.store(out + 7, z_y, mask=row_in)
        if ENTROPY:
            tl.store(out + 8, h_acc, mask=row_in)


@triton.jit
def _linear_kd_bwd_kernel(
    h_ptr, h_stride, w_ptr, w_stride, b_ptr,
    t_h_ptr, t_h_stride, t_w_ptr, t_w_stride, t_b_ptr,
    labels_ptr, stats_ptr, scale_ptr, dh_ptr, dw_ptr, db_ptr,
    N, V_s, V_t, H, H_t, tile_start, n_tiles, inv_t, s_scale, s_cap, t_scale, t_cap, beta,
    hard_weight, soft_coef, ignore_index,
    DIV: tl.constexpr, HAS_SOFT: tl.constexpr, HAS_HARD: tl.constexpr,
    CE_SEPARATE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_BIAS: tl.constexpr,
    T_HEAD: tl.constexpr, T_HAS_BIAS: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    PRECISION: tl.constexpr, T_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Programs in groups of GROUP_N row blocks walk the vocabulary tiles together: a group
    # reads each W tile once from HBM while it stays in L2.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * n_tiles
    first_block = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_row_blocks - first_block, GROUP_N)
    row_block = first_block + (pid % per_group) % group_size
    tile = tile_start + (pid % per_group) // group_size

    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tile.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_in = rows < N
    active = row_in
    label = tl.full([BLOCK_N], -1, tl.int64)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
        active = row_in & (label != ignore_index)
    st = stats_ptr + rows * N_ROW_STATS
    m_s = tl.load(st + 0, mask=active, other=0.0)[:, None]
    ll_s = tl.load(st + 1, mask=active, other=0.0)[:, None]
    scale = tl.load(scale_ptr + rows, mask=active, other=0.0)[:, None]

    z_s, z_t, y_s = _tiles(h_ptr, h_stride, w_ptr, w_stride, b_ptr, t_h_ptr, t_h_stride, t_w_ptr,
                           t_w_stride, t_b_ptr, rows, active, cols, V_s, V_t, H, H_t, s_scale,
                           s_cap, t_scale, t_cap, HAS_SOFT, HAS_BIAS, T_HEAD, T_HAS_BIAS, S_CAP,
                           T_CAP, PRECISION, T_PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_V, BLOCK_K)
    x_s = z_s * inv_t
    g = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_SOFT:
        m_t = tl.load(st + 2, mask=active, other=0.0)[:, None]
        ll_t = tl.load(st + 3, mask=active, other=0.0)[:, None]
        s_q = tl.load(st + 6, mask=active, other=0.0)[:, None]
        p, q, d, qh, pu = _pointwise(z_t * inv_t - m_t - ll_t, x_s - m_s - ll_s, beta, DIV)
        g = soft_coef * (qh - q * s_q)
    if HAS_HARD:
        if CE_SEPARATE:
            m_1 = tl.load(st + 4, mask=active, other=0.0)[:, None]
            ll_1 = tl.load(st + 5, mask=active, other=0.0)[:, None]
            soft1 = tl.exp(z_s - m_1 - ll_1)
        else:
            soft1 = tl.exp(x_s - m_s - ll_s)
        g += hard_weight * (soft1 - tl.where(cols[None, :] == label[:, None], 1.0, 0.0))
    g = _transform_slope(g, y_s, s_scale, s_cap, S_CAP)
    col_in = cols < V_s
    g = tl.where(active[:, None] & col_in[None, :], g * scale, 0.0)

    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_in, sem="relaxed")
    g_lo = g.to(w_ptr.dtype.element_ty)
    if DOT_IN_FP32:  # the interpreter: round as the GPU does (the products widen g_lo anyway)
        if w_ptr.dtype.element_ty == tl.bfloat16:
            g_lo = _round_to_bf16(g)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < H
        if NEED_DH:
            w = tl.load(w_ptr + cols[:, None] * w_stride + ks[None, :],
                        mask=col_in[:, None] & k_mask[None, :], other=0.0)
            dh = _dot(g_lo, w, PRECISION, DOT_IN_FP32)
            tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], dh,
                          mask=active[:, None] & k_mask[None, :], sem="relaxed")
        if NEED_DW:
            h = tl.load(h_ptr + rows[:, None] * h_stride + ks[None, :],
                        mask=active[:, None] & k_mask[None, :], other=0.0)
            dw = _dot(tl.trans(g_lo), h, PRECISION, DOT_IN_FP32)
            tl.atomic_add(dw_ptr + (cols - tile_start * BLOCK_V)[:, None] * H + ks[None, :], dw,
                          mask=col_in[:, None] & k_mask[None, :], sem="relaxed")


@triton.jit
def _scale_grad_kernel(x_ptr, scale_ptr, N, n_programs, BLOCK: tl.constexpr,
                       ROUND_BF16: tl.constexpr):
    # x[:N] *= scale[0] in float32, in place, a persistent grid striding over x. A scale of exactly
    # 1 (grad_output of loss.backward()) is decided here on the device: each program reads one
    # float and returns, with no host sync and no pass over x.
    s = tl.load(scale_ptr)
    if s != 1.0:
        offs = tl.arange(0, BLOCK)
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, N, n_programs * BLOCK):
            idx = start + offs
            mask = idx < N
            y = tl.load(x_ptr + idx, mask=mask).to(tl.float32) * s
            if ROUND_BF16:  # the interpreter: round as the GPU does (_round_to_bf16)
                y = _round_to_bf16(y)
            tl.store(x_ptr + idx, y.to(x_ptr.dtype.element_ty), mask=mask)

# ------------------------------------------------------------------------------------------
# Launchers: allocate, pick tiles and splits, merge the splits. Inputs arrive validated by the
# API (pydistill/ops/linear_kd.py decides which calls come here).
# ------------------------------------------------------------------------------------------
import math  # noqa: E402  (kept below the kernels: this file reads kernel-first)

import torch  # noqa: E402

from pydistill.kernels.attention_kd import _interpreting, _precision, _unit_last  # noqa: E402
from pydistill.kernels.softmax_divergence import (  # noqa: E402
    DIVERGENCE_CODES, LAUNCH_OPTIONS, transform_args,
)

# (BLOCK_N, BLOCK_V, BLOCK_K, num_warps) on a GPU, forward and backward: the largest tiles
# that ptxas compiles for sm_90 without register spills (bfloat16, kl with every option; the
# forward holds two float32 logits tiles and their exponentials at once, the backward the
# gradient tile and both GEMM slices). Not yet timed on a GPU. Larger backward tiles are
# predicted faster (bench/static.py, N = 8192, V = 128256, kl without options: 128 x 128 x 32
# 66.8 ms, 128 x 64 x 32 68.4 ms against 74.6 ms; they halve an atomic stream or both) but
# spill 100 B - 3 KB per thread in the variants with options (tests/test_kernels_compile.py).
GPU_BLOCKS_FWD = (64, 128, 32, 8)
GPU_BLOCKS_BWD = (64, 64, 64, 8)
GPU_STAGES = 3
# The interpreter (tests): the smallest tiles tl.dot takes, so tiny shapes span several tiles.
INTERPRETER_BLOCKS = (16, 16, 16, 4)
# Tests set these to force tiles / splits.
BLOCKS_OVERRIDE = None
SPLITS_OVERRIDE = None
GROUP_N = 8
# Bytes of the float32 d(weight) accumulator of a low-precision weight: the backward walks the
# vocabulary in slabs of that many rows and rounds each slab once into the weight's dtype.
DW_SLAB_BYTES = 128 << 20


def _blocks(device, backward: bool):
    if BLOCKS_OVERRIDE is not None:
        return BLOCKS_OVERRIDE
    if device.type != "cuda":
        return INTERPRETER_BLOCKS
    return GPU_BLOCKS_BWD if backward else GPU_BLOCKS_FWD


def _splits(device, row_blocks: int, n_tiles: int) -> int:
    """Vocabulary splits of the forward: enough programs for ~4 waves of the GPU's SMs."""
    if SPLITS_OVERRIDE is not None:
        return max(1, min(SPLITS_OVERRIDE, n_tiles))
    if device.type != "cuda":
        return min(2, n_tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(4 * sms, row_blocks)))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) as (rows, K) with unit stride along K."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


class Heads:
    """The operands of one call: the student head, the teacher (head or given logits), labels,
    as the kernels address them, plus the kernels' switches."""

    def __init__(self, student_hidden, student_weight, student_bias, teacher_hidden,
                 teacher_weight, teacher_bias, teacher_logits, labels, cfg, divergence,
                 ce=False):
        self.h = _rows(student_hidden)
        self.w = _unit_last(student_weight)
        self.b = student_bias.contiguous() if student_bias is not None else None
        self.n, self.hs = self.h.shape
        self.vs = self.w.shape[0]
        self.t_head = teacher_weight is not None
        if self.t_head:
            self.th = _rows(teacher_hidden)
            self.tw = _unit_last(teacher_weight)
            self.tb = teacher_bias.contiguous() if teacher_bias is not None else None
            self.vt, self.ht = self.tw.shape
        else:
            self.th = _rows(teacher_logits)
            self.tw, self.tb = self.th, None
            self.vt, self.ht = self.th.shape[-1], 0
        self.vocab = max(self.vs, self.vt)
        self.labels = labels.reshape(-1).contiguous() if labels is not None else None
        self.cfg = cfg
        hard = cfg.hard_weight != 0.0
        self.flags = dict(
            DIV=DIVERGENCE_CODES[divergence], HAS_SOFT=cfg.has_soft,
            # ce: the hard CE wanted as a value (return_components) even at hard_weight = 0
            CE_SEPARATE=(hard or (ce and labels is not None)) and cfg.temperature != 1.0,
            HAS_LABELS=labels is not None,
            HAS_BIAS=student_bias is not None, T_HEAD=self.t_head,
            T_HAS_BIAS=self.t_head and teacher_bias is not None,
            S_CAP=cfg.student_softcap is not None, T_CAP=cfg.teacher_softcap is not None,
            PRECISION=_precision(self.w),
            T_PRECISION=_precision(self.tw),
            DOT_IN_FP32=_interpreting() and torch.bfloat16 in (self.w.dtype, self.tw.dtype),
        )
        self.hard = hard
        self.device = self.h.device

    def operands(self, placeholder):
        return dict(
            h_ptr=self.h, h_stride=self.h.stride(0), w_ptr=self.w, w_stride=self.w.stride(0),
            b_ptr=self.b if self.b is not None else placeholder,
            t_h_ptr=self.th, t_h_stride=self.th.stride(0), t_w_ptr=self.tw,
            t_w_stride=self.tw.stride(0), t_b_ptr=self.tb if self.tb is not None else placeholder,
            labels_ptr=self.labels if self.labels is not None else placeholder,
        )

    def scalars(self):
        cfg = self.cfg
        t = transform_args(cfg)
        del t["S_CAP"], t["T_CAP"]  # flags, in self.flags
        return dict(inv_t=1.0 / cfg.temperature, **t, beta=float(cfg.beta),
                    ignore_index=int(cfg.ignore_index))


def _merge_lse(m, total):
    """Merge per-split (max, sum of exp(x - finite(max))) pairs (S, N): the finite global max
    and the global sum relative to it."""
    top = m.amax(0)
    top = torch.where(top == -math.inf, 0.0, top)
    return top, (total * torch.exp(torch.where(m == -math.inf, -math.inf, m - top))).sum(0)


def _merge_kl(acc, l_a, m_a, m_b, top_a, top_b):
    """The splits' online KL sums moved to the global maxima and added (_online_kl_rows)."""
    ma = torch.where(m_a == -math.inf, 0.0, m_a)
    mb = torch.where(m_b == -math.inf, 0.0, m_b)
    moved = torch.exp(ma - top_a) * (acc + l_a * ((ma - top_a) - (mb - top_b)))
    return torch.where(l_a > 0, moved, 0.0).sum(0)


def linear_kd_fwd(heads: Heads, entropy=None, components=None):
    """Per-row losses (float32, N; 0 on ignored rows) and the per-row statistics (N, 8) of the
    backward. Two launches for kl / reverse_kl (or without a divergence term), three else.
    ``entropy``: an (N,) buffer for the student's entropy of softmax(z_s / T) (0 on ignored
    rows), from the same pass. ``components``: a (2, N) buffer for the per-row soft term
    (T^2 D with t2, else D) and hard CE, neither weighted (0 on ignored rows; CE 0 without
    labels); the CE at T != 1 needs ``Heads(ce=True)``."""
    cfg, n, dev = heads.cfg, heads.n, heads.device
    block_n, block_v, block_k, warps = _blocks(dev, backward=False)
    n_tiles = triton.cdiv(heads.vocab, block_v)
    row_blocks = triton.cdiv(n, block_n)
    splits = _splits(dev, row_blocks, n_tiles)
    per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per_split)
    stats = torch.zeros((n, N_ROW_STATS.value), dtype=torch.float32, device=dev)
    if components is not None:
        components.zero_()
    if n == 0:
        return stats[:, 0], stats
    parts = torch.empty((splits, n, N_PARTIALS.value), dtype=torch.float32, device=dev)
    common = dict(N=n, V=heads.vocab, V_s=heads.vs, V_t=heads.vt, H=heads.hs, H_t=heads.ht,
                  n_tiles_per_split=per_split, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k,
                  num_warps=warps, **heads.operands(parts), **heads.scalars(), **heads.flags,
                  **LAUNCH_OPTIONS)
    if dev.type == "cuda":
        common["num_stages"] = GPU_STAGES
    common["ENTROPY"] = entropy is not None
    grid = (row_blocks, splits)
    _linear_kd_fwd_kernel[grid](stats_ptr=stats, out_ptr=parts, PASS2=False, **common)

    m_s, l_s, m_t, l_t, m_1, l_1, acc, z_y, h_acc = parts.unbind(-1)
    top_s, sum_s = _merge_lse(m_s, l_s)
    ll_s = sum_s.log()
    if entropy is not None:
        zero = torch.zeros_like(top_s)
        ent = ll_s - _merge_kl(h_acc, l_s, m_s, zero, top_s, zero) / sum_s
        if heads.labels is not None:
            ent = torch.where(heads.labels != cfg.ignore_index, ent, 0.0)
        entropy.copy_(ent)
    div = torch.zeros(n, dtype=torch.float32, device=dev)
    s_q = torch.zeros_like(div)
    s_p = torch.zeros_like(div)
    if cfg.has_soft:
        top_t, sum_t = _merge_lse(m_t, l_t)
        ll_t = sum_t.log()
        stats[:, 2], stats[:, 3] = top_t, ll_t
        divergence = cfg.canonical_divergence()
        if divergence == "kl":
            div = _merge_kl(acc, l_t, m_t, m_s, top_t, top_s) / sum_t - ll_t + ll_s
            s_q.fill_(-1.0)
            s_p = div + 1.0
        elif divergence == "reverse_kl":
            div = _merge_kl(acc, l_s, m_s, m_t, top_s, top_t) / sum_s - ll_s + ll_t
            s_q = div + 1.0
            s_p.fill_(-1.0)
    stats[:, 0], stats[:, 1] = top_s, ll_s
    if heads.flags["CE_SEPARATE"]:
        top_1, sum_1 = _merge_lse(m_1, l_1)
        stats[:, 4], stats[:, 5] = top_1, sum_1.log()
    else:
        stats[:, 4], stats[:, 5] = top_s, ll_s
    if cfg.has_soft and cfg.canonical_divergence() not in ("kl", "reverse_kl"):
        sums = torch.empty((splits, n, N_SUMS.value), dtype=torch.float32, device=dev)
        _linear_kd_fwd_kernel[grid](stats_ptr=stats, out_ptr=sums, PASS2=True, **common)
        div, s_q, s_p = sums.sum(0).unbind(-1)
    stats[:, 6], stats[:, 7] = s_q, s_p

    rows = div * cfg.soft_scale
    ce = None
    if heads.labels is not None and (heads.hard or components is not None):
        label = heads.labels
        in_range = (label >= 0) & (label < heads.vocab)
        ce = torch.where(in_range, (stats[:, 4] - z_y.sum(0)) + stats[:, 5], math.nan)
    if heads.hard:
        rows = rows + cfg.hard_weight * ce
    if components is not None:
        components[0] = div * (cfg.temperature**2 if cfg.t2 else 1.0)
        if ce is not None:
            components[1] = ce
    if heads.labels is not None:
        counted = heads.labels != cfg.ignore_index
        rows = torch.where(counted, rows, 0.0)
        if components is not None:
            components.copy_(torch.where(counted, components, 0.0))
    return rows, stats


def linear_kd_bwd(heads: Heads, stats, scale, need):
    """Gradients (d hidden, d weight, d bias) of sum_i scale_i loss_i, None where ``need`` is
    False. ``scale``: float32 (N,). Float32 inputs are accumulated in place; others through a
    float32 accumulator (d weight's one vocabulary slab at a time)."""
    cfg, n, dev = heads.cfg, heads.n, heads.device
    need_dh, need_dw, need_db = need
    block_n, block_v, block_k, warps = _blocks(dev, backward=True)
    exact = heads.w.dtype == torch.float32
    dh = torch.zeros((n, heads.hs), dtype=torch.float32, device=dev) if need_dh else None
    db = torch.zeros(heads.vs, dtype=torch.float32, device=dev) if need_db else None
    dw = torch.zeros((heads.vs, heads.hs), dtype=heads.w.dtype, device=dev) if need_dw else None
    slab_tiles = triton.cdiv(heads.vs, block_v)
    if need_dw and not exact:
        slab_tiles = max(1, DW_SLAB_BYTES // (4 * heads.hs * block_v))
    acc = None
    placeholder = stats
    common = dict(N=n, V_s=heads.vs, V_t=heads.vt, H=heads.hs, H_t=heads.ht,
                  hard_weight=float(cfg.hard_weight),
                  soft_coef=float(cfg.soft_scale / cfg.temperature),
                  HAS_HARD=heads.hard, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
                  GROUP_N=GROUP_N, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k,
                  num_warps=warps, **heads.operands(placeholder), **heads.scalars(), **heads.flags,
                  **LAUNCH_OPTIONS)
    if dev.type == "cuda":
        common["num_stages"] = GPU_STAGES
    n_tiles = triton.cdiv(heads.vs, block_v)
    row_blocks = triton.cdiv(n, block_n)
    for start in range(0, n_tiles if n else 0, slab_tiles):
        tiles = min(slab_tiles, n_tiles - start)
        target = dw
        if need_dw and not exact:
            width = min(heads.vs - start * block_v, tiles * block_v)
            if acc is None:
                acc = torch.empty((min(heads.vs, slab_tiles * block_v), heads.hs),
                                  dtype=torch.float32, device=dev)
            target = acc[:width].zero_()
        elif need_dw:
            target = dw[start * block_v:]
        _linear_kd_bwd_kernel[(row_blocks * tiles,)](
            stats_ptr=stats, scale_ptr=scale, tile_start=start, n_tiles=tiles,
            dh_ptr=dh if need_dh else placeholder,
            dw_ptr=target if need_dw else placeholder,
            db_ptr=db if need_db else placeholder, **common,
        )
        if need_dw and not exact:
            dw[start * block_v:start * block_v + width].copy_(target)
    return dh, dw, db


# Elements per program and iteration of _scale_grad_kernel, and its programs per SM.
SCALE_BLOCK = 4096
SCALE_PROGRAMS_PER_SM = 4


def scale_grad_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x *= scale (one value, any float tensor) in place, in float32, for a contiguous
    float32 / bfloat16 / float16 ``x`` (the gradients of the chunked path, computed in the
    forward, scaled by grad_output in the backward). Nothing is read or written when the scale
    is exactly 1, decided on the device."""
    numel = x.numel()
    if numel == 0:
        return x
    scale = scale.reshape(1).to(device=x.device, dtype=torch.float32)
    blocks = triton.cdiv(numel, SCALE_BLOCK)
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        programs = min(blocks, SCALE_PROGRAMS_PER_SM * sms)
    else:
        programs = min(blocks, 2)
    _scale_grad_kernel[(programs,)](
        x, scale, numel, programs, BLOCK=SCALE_BLOCK,
        ROUND_BF16=_interpreting() and x.dtype == torch.bfloat16, num_warps=8, **LAUNCH_OPTIONS,
    )
    return x
