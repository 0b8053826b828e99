"""Attention-map KL distillation in O(L) memory: the Triton kernels behind
``attention_kd_loss(loss="kl")``.

Math (pydistill/reference/attention_kd.py is the oracle). Per batch b, query head h and
query row i, over the allowed keys j (key-padding mask, causal)::

    s_ij = c_s <Q_s,i, K_s,j>,  t_ij = c_t <Q_t,i, K_t,j>,  p = softmax_j(t), q = softmax_j(s)
    KL_i = sum_j p_ij (log p_ij - log q_ij)
    dKL_i / ds_ij = q_ij - p_ij
    dQ_s,i = c_s sum_j w_i (q_ij - p_ij) K_s,j,   dK_s,j = c_s sum_i w_i (q_ij - p_ij) Q_s,i

with w_i = d loss / d KL_i. Neither L x L map is ever stored.

Forward, one program per (query block, b, h), key tiles streamed (FlashAttention's loop with
two models): both score tiles by tl.dot, online max / sum of both, and the divergence
accumulator, max-stabilised (base 2: x = score * log2(e), m = running max, l = sum 2^(x - m))

    A = sum_j 2^(t_j - m_t) ((t_j - m_t) - (s_j - m_s)),   KL = ln 2 (A / l_t - log2 l_t + log2 l_s)

where A becomes 2^(m_t - m_t') (A + l_t ((m_t - m_t') - (m_s - m_s'))) when the maxima move
to m_t', m_s'. Kept per row: KL and (m_s, log2 l_s, m_t, log2 l_t) (each logsumexp as its
two terms, as in kernels/softmax_divergence.py: folding them into one float loses precision
when |m| is large). Reads: Q once, K once per query block.

Backward, one program per (key block, b, student key head): it recomputes both score tiles
for every query block of every query head that reads this key head (grouped-query attention:
the group's sum is dK_s's sum, kept in registers, deterministic), and adds each tile's
dQ_s contribution into a float32 buffer with atomic adds. The alternative, a second pass
over query blocks for dQ_s, would recompute both score tiles and both exponentials again:
+2 matrix products and +2 exp per score element on top of 3 + 2, where the exponentials
already bound the time at head dims <= 128 on current GPUs. The price of the atomics:
dQ_s's float32 additions happen in a varying order (bitwise non-deterministic) and a
float32 (B, H, L, d_s) buffer. The teacher is a constant: its gradient would need a second
accumulation scheme (its key heads group the query heads differently), and distillation
does not train the teacher.

The gradient of a half-precision input is formed as FlashAttention does: the (q - p) tile
is rounded to the input dtype before its two products. The row weights are passed
normalised to |w| <= 1 with the common factor applied after the products, so that float16
never sees 1 / (B H L)-sized weights (which it would flush to zero).
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
N_STATS = tl.constexpr(4)


@triton.jit
def _finite_or_zero(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    # DOT_IN_FP32: the Triton interpreter's tl.dot multiplies bfloat16 operands as their
    # integer bit patterns, so under it (only) the operands are widened first: exact, like
    # the GPU's bfloat16 products with float32 accumulation
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_rows(ptr, rows, cols, stride_l, keep, n_dim):
    # a (len(rows), D) tile of one head; rows not kept and columns past the head dim read as 0
    mask = keep[:, None] & (cols[None, :] < n_dim)
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _allowed(rows, cols, key_ok, CAUSAL: tl.constexpr):
    # (1 or BLOCK_M, BLOCK_N): the keys each query row attends
    ok = key_ok[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    return ok


@triton.jit
def _key_ok(mask_row, cols, n_ctx, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return tl.load(mask_row + cols, mask=cols < n_ctx, other=0) != 0
    return cols < n_ctx


@triton.jit
def _attention_kl_fwd_kernel(
    sq_ptr, sk_ptr, tq_ptr, tk_ptr, mask_ptr, rows_ptr, stats_ptr,
    sq_stride_b, sq_stride_h, sq_stride_l, sk_stride_b, sk_stride_h, sk_stride_l,
    tq_stride_b, tq_stride_h, tq_stride_l, tk_stride_b, tk_stride_h, tk_stride_l,
    mask_stride_b, n_heads, n_ctx, n_group_s, n_group_t, n_dim_s, n_dim_t,
    scale_s, scale_t,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D_S: tl.constexpr, D_T: tl.constexpr,
    PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    rows = start_m + tl.arange(0, BLOCK_M)
    cols_n = tl.arange(0, BLOCK_N)
    dim_s = tl.arange(0, D_S)
    dim_t = tl.arange(0, D_T)
    mask_row = mask_ptr + b * mask_stride_b
    row_ok = _key_ok(mask_row, rows, n_ctx, HAS_MASK)
    # padded rows are not read (they may hold anything) and not counted
    q_s = _load_rows(sq_ptr + b * sq_stride_b + h * sq_stride_h, rows, dim_s, sq_stride_l, row_ok, n_dim_s)
    q_t = _load_rows(tq_ptr + b * tq_stride_b + h * tq_stride_h, rows, dim_t, tq_stride_l, row_ok, n_dim_t)
    k_s_ptr = sk_ptr + b * sk_stride_b + (h // n_group_s) * sk_stride_h
    k_t_ptr = tk_ptr + b * tk_stride_b + (h // n_group_t) * tk_stride_h
    qk_s = scale_s * LOG2E
    qk_t = scale_t * LOG2E

    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    hi = n_ctx
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, n_ctx)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + cols_n
        key_ok = _key_ok(mask_row, cols, n_ctx, HAS_MASK)
        k_s = _load_rows(k_s_ptr, cols, dim_s, sk_stride_l, key_ok, n_dim_s)
        k_t = _load_rows(k_t_ptr, cols, dim_t, tk_stride_l, key_ok, n_dim_t)
        ok = _allowed(rows, cols, key_ok, CAUSAL)
        s = tl.where(ok, _dot(q_s, tl.trans(k_s), PRECISION, DOT_IN_FP32) * qk_s, float("-inf"))
        t = tl.where(ok, _dot(q_t, tl.trans(k_t), PRECISION, DOT_IN_FP32) * qk_t, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
        m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
        ms, ms_new = _finite_or_zero(m_s), _finite_or_zero(m_s_new)
        mt, mt_new = _finite_or_zero(m_t), _finite_or_zero(m_t_new)
        e_s = tl.exp2(s - ms_new[:, None])
        e_t = tl.exp2(t - mt_new[:, None])
        # A moved to the new maxima, then this tile's terms; the maxima in their finite form
        # (-inf -> 0) keep rows that have seen no allowed key yet free of NaN
        carried = tl.where(l_t > 0, tl.exp2(mt - mt_new) * (acc + l_t * ((mt - mt_new) - (ms - ms_new))), 0.0)
        terms = tl.where(ok, e_t * ((t - mt_new[:, None]) - (s - ms_new[:, None])), 0.0)
        acc = carried + tl.sum(terms, axis=1)
        l_s = l_s * tl.exp2(m_s - ms_new) + tl.sum(e_s, axis=1)
        l_t = l_t * tl.exp2(m_t - mt_new) + tl.sum(e_t, axis=1)
        m_s = m_s_new
        m_t = m_t_new

    ll_s = tl.log2(l_s)
    ll_t = tl.log2(l_t)
    kl = LN2 * (acc / l_t - ll_t + ll_s)
    in_ctx = rows < n_ctx
    out = bh * n_ctx + rows
    tl.store(rows_ptr + out, tl.where(row_ok, kl, 0.0), mask=in_ctx)
    st = stats_ptr + out * N_STATS
    tl.store(st + 0, m_s, mask=in_ctx)
    tl.store(st + 1, ll_s, mask=in_ctx)
    tl.store(st + 2, m_t, mask=in_ctx)
    tl.store(st + 3, ll_t, mask=in_ctx)


@triton.jit
def _attention_kl_bwd_kernel(
    sq_ptr, sk_ptr, tq_ptr, tk_ptr, mask_ptr, stats_ptr, w_ptr, wscale_ptr, dq_ptr, dk_ptr,
    sq_stride_b, sq_stride_h, sq_stride_l, sk_stride_b, sk_stride_h, sk_stride_l,
    tq_stride_b, tq_stride_h, tq_stride_l, tk_stride_b, tk_stride_h, tk_stride_l,
    mask_stride_b, n_heads, n_kv_heads, n_ctx, n_group_s, n_group_t, n_dim_s, n_dim_t,
    scale_s, scale_t,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, D_S: tl.constexpr, D_T: tl.constexpr,
    PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # dq: float32 (B, H, L, n_dim_s) contiguous, accumulated atomically; dk: (B, H_k, L,
    # n_dim_s) contiguous in the input dtype, written once per key block.
    start_n = tl.program_id(0) * BLOCK_N
    bg = tl.program_id(1).to(tl.int64)
    b = bg // n_kv_heads
    g = bg % n_kv_heads
    cols = start_n + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    dim_s = tl.arange(0, D_S)
    dim_t = tl.arange(0, D_T)
    mask_row = mask_ptr + b * mask_stride_b
    key_ok = _key_ok(mask_row, cols, n_ctx, HAS_MASK)
    k_s = _load_rows(sk_ptr + b * sk_stride_b + g * sk_stride_h, cols, dim_s, sk_stride_l, key_ok, n_dim_s)
    qk_s = scale_s * LOG2E
    qk_t = scale_t * LOG2E
    # the common factor of the row weights, times the score scale
    grad_scale = tl.load(wscale_ptr) * scale_s
    dk = tl.zeros([BLOCK_N, D_S], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # earlier query rows see none of these keys
    for j in range(0, n_group_s):
        h = g * n_group_s + j
        bh = b * n_heads + h
        k_t = _load_rows(tk_ptr + b * tk_stride_b + (h // n_group_t) * tk_stride_h, cols, dim_t,
                         tk_stride_l, key_ok, n_dim_t)
        q_s_ptr = sq_ptr + b * sq_stride_b + h * sq_stride_h
        q_t_ptr = tq_ptr + b * tq_stride_b + h * tq_stride_h
        for start_m in range(lo, n_ctx, BLOCK_M):
            rows = start_m + rows_m
            row = bh * n_ctx + rows
            w = tl.load(w_ptr + row, mask=rows < n_ctx, other=0.0)
            live = w != 0  # padded rows have weight 0 and are not read
            q_s = _load_rows(q_s_ptr, rows, dim_s, sq_stride_l, live, n_dim_s)
            q_t = _load_rows(q_t_ptr, rows, dim_t, tq_stride_l, live, n_dim_t)
            st = stats_ptr + row * N_STATS
            m_s = tl.load(st + 0, mask=live, other=0.0)
            ll_s = tl.load(st + 1, mask=live, other=0.0)
            m_t = tl.load(st + 2, mask=live, other=0.0)
            ll_t = tl.load(st + 3, mask=live, other=0.0)
            ok = _allowed(rows, cols, key_ok, CAUSAL) & live[:, None]
            s = _dot(q_s, tl.trans(k_s), PRECISION, DOT_IN_FP32) * qk_s
            t = _dot(q_t, tl.trans(k_t), PRECISION, DOT_IN_FP32) * qk_t
            q = tl.exp2(s - m_s[:, None] - ll_s[:, None])
            p = tl.exp2(t - m_t[:, None] - ll_t[:, None])
            d = tl.where(ok, (q - p) * w[:, None], 0.0).to(k_s.dtype)
            dk += _dot(tl.trans(d), q_s, PRECISION, DOT_IN_FP32)
            dq = _dot(d, k_s, PRECISION, DOT_IN_FP32) * grad_scale
            dq_mask = (rows[:, None] < n_ctx) & (dim_s[None, :] < n_dim_s)
            # relaxed: a sum with no ordering to enforce (acq_rel, the default, fences every one)
            tl.atomic_add(dq_ptr + row[:, None] * n_dim_s + dim_s[None, :], dq, mask=dq_mask, sem="relaxed")
    dk_mask = (cols[:, None] < n_ctx) & (dim_s[None, :] < n_dim_s)
    dk_ptrs = dk_ptr + (bg * n_ctx + cols[:, None]) * n_dim_s + dim_s[None, :]
    tl.store(dk_ptrs, (dk * grad_scale).to(dk_ptr.dtype.element_ty), mask=dk_mask)


# ------------------------------------------------------------------------------------------
# Launchers: allocate, compute the grid. Inputs arrive validated by the API.
# ------------------------------------------------------------------------------------------
import os  # noqa: E402  (kept below the kernels: this file reads kernel-first)

import torch  # noqa: E402

from pydistill._utils import empty  # noqa: E402
from pydistill.kernels.softmax_divergence import LAUNCH_OPTIONS  # noqa: E402

# Tile sizes override for tests, (BLOCK_M, BLOCK_N) of both kernels: small tiles exercise
# the multi-tile paths at small L.
BLOCK_OVERRIDE = None


def _head_pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot needs >= 16 along the reduction


def _tiles(d_s: int, d_t: int, half: bool, backward: bool):
    """(BLOCK_M, BLOCK_N, num_warps): the largest tiles that ptxas keeps in registers for
    sm_80 / sm_90 (tests/test_kernels_compile.py). The backward holds one more (key) tile of
    each model and dK's accumulator across its loop, hence its smaller tiles. Head dims of 256,
    float32 inputs (not the tensor-core path) and the backward with 64-bit integer arguments
    (a tensor past 2^31 elements) spill a little."""
    widest = max(_head_pad(d_s), _head_pad(d_t))
    if BLOCK_OVERRIDE is not None:
        return (*BLOCK_OVERRIDE, 4 if widest <= 64 else 8)
    if widest > 128:
        return (16, 32, 8) if backward else (32, 32, 8)
    if backward:
        if not half:
            return (16, 32, 8)
        return (32, 64, 8) if widest <= 64 else (32, 32, 8)
    if not half:
        return (32, 64, 8) if widest <= 64 else (32, 32, 8)
    return (128, 64, 8) if widest <= 64 else (64, 64, 8)


def _precision(*tensors) -> str:
    # float32 inputs follow PyTorch's own matmul setting (TF32 only when the user allowed it);
    # half inputs multiply exactly with float32 accumulation either way
    if any(t.dtype == torch.float32 for t in tensors):
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _common_args(student_q, student_k, teacher_q, teacher_k, mask, placeholder, backward):
    sq, sk, tq, tk = (_unit_last(x) for x in (student_q, student_k, teacher_q, teacher_k))
    heads, length, d_s = sq.shape[1:]
    d_t = tq.shape[-1]
    half = sq.dtype != torch.float32 and tq.dtype != torch.float32
    block_m, block_n, warps = _tiles(d_s, d_t, half, backward)
    args = dict(
        sq_ptr=sq, sk_ptr=sk, tq_ptr=tq, tk_ptr=tk,
        mask_ptr=mask if mask is not None else placeholder,
        mask_stride_b=mask.stride(0) if mask is not None else 0,
        n_heads=heads, n_ctx=length, n_group_s=heads // sk.shape[1],
        n_group_t=heads // tk.shape[1], n_dim_s=d_s, n_dim_t=d_t,
        HAS_MASK=mask is not None, D_S=_head_pad(d_s), D_T=_head_pad(d_t),
        PRECISION=_precision(sq, tq), BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_IN_FP32=_interpreting() and torch.bfloat16 in (sq.dtype, tq.dtype),
        num_warps=warps, **LAUNCH_OPTIONS,
    )
    for name, x in (("sq", sq), ("sk", sk), ("tq", tq), ("tk", tk)):
        args[f"{name}_stride_b"], args[f"{name}_stride_h"], args[f"{name}_stride_l"] = x.stride()[:3]
    return args


def attention_kl_fwd(student_q, student_k, teacher_q, teacher_k, mask, causal: bool,
                     scale_s: float, scale_t: float):
    """Per-row KL (float32 (B, H, L), padded rows 0) and the per-row stats (B*H*L, 4) the
    backward needs. ``mask``: (B, L) int8 (1 = attend) or None."""
    batch, heads, length = student_q.shape[:3]
    rows = empty((batch, heads, length), dtype=torch.float32, device=student_q.device)
    stats = empty((batch * heads * length, N_STATS.value), dtype=torch.float32, device=student_q.device)
    if rows.numel() == 0:
        return rows, stats
    args = _common_args(student_q, student_k, teacher_q, teacher_k, mask, placeholder=rows, backward=False)
    grid = (triton.cdiv(length, args["BLOCK_M"]), batch * heads)
    _attention_kl_fwd_kernel[grid](rows_ptr=rows, stats_ptr=stats, scale_s=scale_s, scale_t=scale_t,
                                   CAUSAL=causal, **args)
    return rows, stats


def attention_kl_bwd(student_q, student_k, teacher_q, teacher_k, mask, causal: bool,
                     scale_s: float, scale_t: float, stats, weight, weight_scale):
    """(dQ_s, dK_s) in the input dtypes for the row weights ``weight_scale * weight``
    (``weight``: float32 (B*H*L,), |w| <= 1, 0 on padded rows; ``weight_scale``: a 1-element
    float32 device tensor)."""
    batch, heads, length, d_s = student_q.shape
    kv_heads = student_k.shape[1]
    device = student_q.device
    dq = torch.zeros((batch, heads, length, d_s), dtype=torch.float32, device=device)
    dk = empty((batch, kv_heads, length, d_s), dtype=student_k.dtype, device=device)
    if dq.numel() == 0:
        return dq.to(student_q.dtype), dk
    args = _common_args(student_q, student_k, teacher_q, teacher_k, mask, placeholder=stats, backward=True)
    grid = (triton.cdiv(length, args["BLOCK_N"]), batch * kv_heads)
    _attention_kl_bwd_kernel[grid](
        stats_ptr=stats, w_ptr=weight, wscale_ptr=weight_scale, dq_ptr=dq, dk_ptr=dk,
        n_kv_heads=kv_heads, scale_s=scale_s, scale_t=scale_t, CAUSAL=causal, **args,
    )
    return (dq if student_q.dtype == torch.float32 else dq.to(student_q.dtype)), dk
