"""Universal Logit Distillation: the Triton kernels behind ``uld_loss`` (pydistill/reference/uld.py
is the oracle).

Per row and per model (student and teacher run the same kernels, each on its own vocabulary),
z = cap(a * logits) (-inf stays -inf), x = z / T, q = softmax(x), and the K ranks kept::

    loss = sum_{j < K} |q_(j) - p_(j)|                (q_(j): the j-th largest probability)

Forward, ``_uld_select_kernel``, one program per row streaming the vocabulary in tiles of
BLOCK_V (>= K_PAD = the power of two >= max(K, 2)), float32 math:

    online logsumexp     per lane (BLOCK_V / 8 running (max, sum) pairs, each over 8
                         contiguous columns: no cross-thread reduction in the loop), the lanes
                         combined once at the end
    running top-K        K_PAD candidates (raw logit, column), sorted, and the running
                         threshold thr = the K-th candidate's raw logit. The transform is
                         increasing, so raw logits rank as z, x and q do; order: the larger
                         raw logit first, on a tie the later column. A tile whose largest raw
                         logit is below thr (most tiles of a large vocabulary once the
                         candidates are good) only feeds the logsumexp. Otherwise its
                         survivors (raw >= thr; NaN never survives, its row's loss is NaN
                         anyway) are appended to a per-row buffer of K_PAD entries (L2) in
                         column order; when the buffer would overflow it is merged into the
                         candidates and thr rises. The merge ranks the 2 K_PAD entries by
                         float comparisons (rank of a candidate = its slot + the entries that
                         beat it) and stores each entry of rank < K_PAD to that slot: no sort.
                         A tile with more than K_PAD survivors (the first tile) keeps only its
                         own top K: the K-th largest surviving value t from a top-k of int32
                         values (tl.topk, bitonic), then those above t and the latest columns
                         equal to it.
    Read: the row once. Write: K values z_(j) = cap(a raw_(j)), their raw logits, K ids,
    2 floats.

The loss itself is K-sized arithmetic done in PyTorch on the outputs
(q_(j) = exp((z_(j) / T - m) - log l)). ``tl.topk(x, k)`` (values only, k a power of two, the
largest first) is in triton.language since Triton 3.4 (bitonic top-k, triton-lang/triton#6461)
and unchanged in 3.6 - 3.9. The backward takes the soft-cap's slope from the raw logits,
sech^2(a raw / c) = 4 e / (1 + e)^2 with e = exp(-2 |a raw| / c): 1 - (z / c)^2 from the capped
z cancels where the cap saturates (z / c rounds towards 1) and loses every digit there.

Gradient. With g_j the weighted signs dloss/dq_(j) (sign(q_(j) - p_(j)) times the row's
grad_output factor; the teacher's with the opposite sign) and S = sum_j q_(j) g_j::

    dloss/dlogit_v = (1/T) q_v (G_v - S) * a sech^2(a raw_v / c),    G_v = g_{rank(v)} or 0

    ``_uld_bwd_dense_kernel``   every entry: -(1/T) S q_v * slope        (grid rows x tiles)
    ``_uld_bwd_ranked_kernel``  the K ranked entries overwritten with (1/T) (g_j - S) q_(j) *
                                slope, computed from the saved z_(j) and raw_(j) (not re-read
                                from the logits, so the gradient may overwrite them in place)

Two launches, so the second kernel's stores are ordered after the first's without a barrier.
When K = V (top_k None: the full sort is torch.sort's) the ranked kernel writes every entry and
the dense one is skipped. Bytes per logit, forward + backward: read 1 + read 1 + write 1.
"""
import triton
import triton.language as tl

from pydistill.kernels.softmax_divergence import LAUNCH_OPTIONS, _finite_or_zero, _flag, _softcap

# Below the ordered bits of -inf (0x807FFFFF): a tile's non-surviving columns in its top-k
_NO_KEY32 = tl.constexpr(-2147483648)
_EMPTY_KEY = tl.constexpr(-(2**63))
# The largest K_PAD merged by ranks ((2 K_PAD)^2 comparisons in registers); above it, a
# bitonic top-k of packed keys
RANKED_MERGE_MAX = tl.constexpr(128)


@triton.jit
def _ordered_bits(x):
    # float32 -> int32 with the same order (an involution: it also maps back)
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _transform(raw, scale, cap, HAS_CAP: tl.constexpr):
    z = raw * scale
    if HAS_CAP:
        z = _softcap(z, cap)
    return z


@triton.jit
def _slope(raw, scale, cap, HAS_CAP: tl.constexpr):
    # d cap(a y) / dy at the untransformed logit raw: a sech^2(a raw / c) = a 4 e / (1 + e)^2,
    # e = exp(-2 |a raw| / c) <= 1, which keeps its digits where the cap saturates (1 - (z / c)^2
    # from the capped z loses them all); 0 at -inf (masked) entries, where q = 0
    slope = scale + tl.zeros_like(raw)
    if HAS_CAP:
        e = tl.exp(-2.0 * tl.abs(raw * scale) / cap)
        slope = slope * (4.0 * e / ((1.0 + e) * (1.0 + e)))
    return tl.where(raw == float("-inf"), 0.0, slope)


@triton.jit
def _row_active(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    active = tl.full([], 1, tl.int1)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        active = _flag(label != ignore_index)
    return active


@triton.jit
def _pack(raw, col):
    # a buffer entry: the raw logit's bits and the column in one int64 (one store)
    return (raw.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (col.to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _unpack(entry):
    return (entry >> 32).to(tl.int32).to(tl.float32, bitcast=True), entry.to(tl.int32)


@triton.jit
def _sort_key(raw, col):
    # an int64 whose order is the candidates' (raw logit, then column); an empty slot
    # (-inf, -1) gets _EMPTY_KEY, below every real entry's
    key = (_ordered_bits(raw).to(tl.int64) << 32) | col.to(tl.int64)
    return tl.where(col < 0, _EMPTY_KEY, key)


@triton.jit
def _merge(best_raw, best_col, c_raw, c_col, pending, buf, K_PAD: tl.constexpr):
    # The K_PAD largest of the candidates (sorted, largest first) and of the ``pending``
    # buffered entries c (columns later than every candidate's, in column order), sorted.
    # Order: the larger raw logit first, on a tie the later column (so an entry beats a
    # candidate iff its raw logit is >=). An empty slot is (-inf, -1): every real entry beats
    # it. The row's buffer holds the entries in [0, K_PAD) and a copy of the candidates in
    # [K_PAD, 2 K_PAD).
    slots = tl.arange(0, K_PAD)
    c_valid = slots < pending
    if K_PAD > RANKED_MERGE_MAX:  # a bitonic top-k of keys
        tl.debug_barrier()  # the entries are read before the next appends
        keys = tl.where(c_valid, _sort_key(c_raw, c_col), tl.full([K_PAD], _EMPTY_KEY, tl.int64))
        top = tl.topk(tl.reshape(tl.join(_sort_key(best_raw, best_col), keys), [2 * K_PAD]), K_PAD)
        raw = _ordered_bits((top >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
        return tl.where(top == _EMPTY_KEY, float("-inf"), raw), tl.where(top == _EMPTY_KEY, -1, top.to(tl.int32))
    # By rank, with no sort: a candidate's rank is its slot plus the entries that beat it, an
    # entry's the candidates and entries that beat it; (2 K_PAD) K_PAD float comparisons, the
    # other side read from the buffer CH at a time (few registers). Each of rank r < K_PAD is
    # stored to slot r of the candidates' copy, which is then read back.
    CH: tl.constexpr = 16 if K_PAD > 16 else K_PAD
    rank_a = slots
    rank_c = tl.zeros([K_PAD], tl.int32)
    for j in tl.static_range(0, K_PAD, CH):
        at = j + tl.arange(0, CH)
        o_raw, o_col = _unpack(tl.load(buf + at, cache_modifier=".cg"))
        o_valid = at < pending
        b_raw, _ = _unpack(tl.load(buf + K_PAD + at, cache_modifier=".cg"))
        rank_a += tl.sum((o_valid[None, :] & (o_raw[None, :] >= best_raw[:, None])).to(tl.int32), axis=1)
        ahead = (o_raw[None, :] > c_raw[:, None]) | ((o_raw[None, :] == c_raw[:, None]) & (o_col[None, :] > c_col[:, None]))
        rank_c += (tl.sum((b_raw[None, :] > c_raw[:, None]).to(tl.int32), axis=1)
                   + tl.sum((o_valid[None, :] & ahead).to(tl.int32), axis=1))
    keep_c = c_valid & (rank_c < K_PAD)
    tl.debug_barrier()  # every thread has read the buffer
    tl.store(buf + K_PAD + rank_a, _pack(best_raw, best_col), mask=rank_a < K_PAD)
    tl.store(buf + K_PAD + rank_c, _pack(c_raw, c_col), mask=keep_c)
    tl.debug_barrier()
    packed = tl.load(buf + K_PAD + slots, cache_modifier=".cg")
    return _unpack(packed)


@triton.jit
def _threshold(best_raw, K):
    # the raw logit a later column must reach to enter the candidates: that of the K-th (a
    # later column that ties it is the later one, so it wins); -inf while that slot is empty
    return tl.max(tl.where(tl.arange(0, best_raw.shape[0]) == K - 1, best_raw, float("-inf")), axis=0)


@triton.jit
def _flush(best_raw, best_col, pending, buf, K_PAD: tl.constexpr):
    # merge the buffered entries into the candidates (the barrier orders this CTA's stores to
    # the buffer before the loads)
    slots = tl.arange(0, K_PAD)
    tl.debug_barrier()
    raw, col = _unpack(tl.load(buf + slots, mask=slots < pending, other=0, cache_modifier=".cg"))
    return _merge(best_raw, best_col, raw, col, pending, buf, K_PAD)


@triton.jit
def _uld_select_kernel(
    z_ptr, labels_ptr, stats_ptr, val_ptr, raw_ptr, idx_ptr, buf_ptr,
    z_stride, V, K, inv_t, scale, cap, ignore_index,
    HAS_CAP: tl.constexpr, HAS_LABELS: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    buf = buf_ptr + row * (2 * K_PAD)
    active = _row_active(labels_ptr, row, ignore_index, HAS_LABELS)
    n_live = tl.where(active, tl.cdiv(V, BLOCK_V), 0)
    offs = tl.arange(0, BLOCK_V)

    # the online logsumexp runs per lane (LANES running (max, sum) pairs, each over a
    # contiguous run of BLOCK_V // LANES columns: no cross-thread reduction in the loop);
    # the lanes are combined once at the end
    LANES: tl.constexpr = BLOCK_V // 8
    m = tl.full([LANES], float("-inf"), tl.float32)
    l = tl.zeros([LANES], tl.float32)
    best_raw = tl.full([K_PAD], float("-inf"), tl.float32)  # the candidates, largest first
    best_col = tl.full([K_PAD], -1, tl.int32)
    if K_PAD <= RANKED_MERGE_MAX:  # the candidates' copy in the buffer
        tl.store(buf + K_PAD + tl.arange(0, K_PAD), _pack(best_raw, best_col))
    thr = float("-inf")  # the running K-th raw logit (below it, a column cannot enter)
    pending = 0  # survivors held in the row's buffer, not yet merged
    for k in range(0, n_live):
        cols = k * BLOCK_V + offs
        in_row = cols < V
        raw = tl.load(z_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        x = tl.reshape(_transform(raw, scale, cap, HAS_CAP) * inv_t, [LANES, BLOCK_V // LANES])
        m_new = tl.maximum(m, tl.max(x, axis=1))
        shift = _finite_or_zero(m_new)
        l = l * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        m = m_new
        # survivors: raw logits at or above the threshold (the transform is increasing, so
        # the order of raw logits is that of z; NaN never survives, its row's loss is NaN)
        if tl.max(raw, axis=0) >= thr:  # (the padded columns read -inf)
            surv = in_row & (raw >= thr)
            n_new = tl.sum(surv.to(tl.int32), axis=0)
            if pending + n_new > K_PAD:
                best_raw, best_col = _flush(best_raw, best_col, pending, buf, K_PAD)
                thr = _threshold(best_raw, K)
                pending = 0
            if n_new > K_PAD:
                # many survivors (the first tile): keep the tile's own top K, found from the
                # K-th largest surviving value t (a top-k of int32 values): those above t and,
                # of those equal to it, the latest columns
                bits = tl.where(surv, _ordered_bits(raw), _NO_KEY32)
                top = tl.topk(bits, K_PAD)
                t = tl.max(tl.where(tl.arange(0, K_PAD) == K - 1, top, _NO_KEY32), axis=0)
                tie = (bits == t).to(tl.int32)
                later = tl.sum(tie, axis=0) - tl.cumsum(tie, axis=0)  # ties after the column
                surv = (bits > t) | ((tie != 0) & (later < K - tl.sum((bits > t).to(tl.int32), axis=0)))
                n_new = K
            # appended to the buffer in column order
            # slots by a two-level prefix sum: within each lane's contiguous columns (a
            # thread's own), then over the lanes
            hit = tl.reshape(surv.to(tl.int32), [LANES, BLOCK_V // LANES])
            lane = tl.sum(hit, axis=1)
            slot = tl.reshape(tl.cumsum(hit, axis=1) + (tl.cumsum(lane, axis=0) - lane)[:, None], [BLOCK_V])
            slot = pending + slot - 1
            tl.store(buf + slot, _pack(raw, cols), mask=surv)
            pending += n_new
    best_raw, best_col = _flush(best_raw, best_col, pending, buf, K_PAD)
    m_row = tl.max(m, axis=0)
    l_row = tl.sum(l * tl.exp(m - _finite_or_zero(m_row)), axis=0)
    m = m_row
    l = l_row

    ranks = tl.arange(0, K_PAD)
    keep = ranks < K
    ids = best_col.to(tl.int64)
    vals = _transform(best_raw, scale, cap, HAS_CAP)
    # an ignored row (not read): values -inf, so its probabilities are 0, not NaN, and ids
    # 0..K-1, so that with K = V the ranked backward still writes every entry of the row
    vals = tl.where(active, vals, float("-inf"))
    ids = tl.where(active, ids, ranks.to(tl.int64))
    tl.store(val_ptr + row * K + ranks, vals, mask=keep)
    tl.store(raw_ptr + row * K + ranks, tl.where(active, best_raw, float("-inf")), mask=keep)
    tl.store(idx_ptr + row * K + ranks, ids, mask=keep)
    tl.store(stats_ptr + row * 2, tl.where(active, m, 0.0))
    tl.store(stats_ptr + row * 2 + 1, tl.log(tl.where(active, l, 1.0)))


@triton.jit
def _uld_bwd_dense_kernel(
    z_ptr, labels_ptr, stats_ptr, ssum_ptr, grad_ptr,
    z_stride, V, inv_t, scale, cap, ignore_index,
    HAS_CAP: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    active = _row_active(labels_ptr, row, ignore_index, HAS_LABELS)
    raw = tl.load(z_ptr + row * z_stride + cols, mask=in_row & active, other=float("-inf")).to(tl.float32)
    z = _transform(raw, scale, cap, HAS_CAP)
    m = tl.load(stats_ptr + row * 2)
    log_l = tl.load(stats_ptr + row * 2 + 1)
    s_sum = tl.load(ssum_ptr + row)
    q = tl.exp((z * inv_t - m) - log_l)
    g = (-s_sum * inv_t) * q * _slope(raw, scale, cap, HAS_CAP)
    g = tl.where(active, g, 0.0)
    tl.store(grad_ptr + row * V + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _uld_bwd_ranked_kernel(
    val_ptr, raw_ptr, idx_ptr, gsign_ptr, labels_ptr, stats_ptr, ssum_ptr, grad_ptr,
    V, K, inv_t, scale, cap, ignore_index,
    HAS_CAP: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ranks = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = ranks < K
    active = _row_active(labels_ptr, row, ignore_index, HAS_LABELS)
    z = tl.load(val_ptr + row * K + ranks, mask=keep, other=float("-inf"))
    raw = tl.load(raw_ptr + row * K + ranks, mask=keep, other=float("-inf"))
    ids = tl.load(idx_ptr + row * K + ranks, mask=keep, other=0)
    g = tl.load(gsign_ptr + row * K + ranks, mask=keep, other=0.0)
    m = tl.load(stats_ptr + row * 2)
    log_l = tl.load(stats_ptr + row * 2 + 1)
    s_sum = tl.load(ssum_ptr + row)
    q = tl.exp((z * inv_t - m) - log_l)
    grad = ((g - s_sum) * inv_t) * q * _slope(raw, scale, cap, HAS_CAP)
    grad = tl.where(active & (q != 0), grad, 0.0)
    tl.store(grad_ptr + row * V + ids, grad.to(grad_ptr.dtype.element_ty), mask=keep)


# ------------------------------------------------------------------------------------------
# Launchers: validate, allocate, compute the grid. Inputs arrive validated by the API.
# ------------------------------------------------------------------------------------------
import torch  # noqa: E402  (kept below the kernels: this file reads kernel-first)

from pydistill._utils import empty  # noqa: E402

# The largest K the fused selection keeps in registers (K_PAD int64 candidates plus a tile of
# at least as many); a larger top_k selects with torch.topk instead (the backward kernels are
# the same).
MAX_FUSED_TOPK = 1024
# The selection's widest tile and its warps (8 columns a thread; registers allow 3 CTAs an SM)
SELECT_BLOCK_V = 1024
SELECT_NUM_WARPS = 4
# Tile size override for tests (small tiles exercise the multi-tile paths at small V).
BLOCK_V_OVERRIDE = None


def _block_v(vocab: int, k_pad: int = 1, widest: int = 1024) -> int:
    block = BLOCK_V_OVERRIDE if BLOCK_V_OVERRIDE is not None else min(widest, triton.next_power_of_2(vocab))
    return max(block, k_pad, 8)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def _rows(z: torch.Tensor):
    """z (..., V) as (N, V) rows with unit stride along V, and the row stride."""
    z2 = z.reshape(-1, z.shape[-1])
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    return z2, z2.stride(0)


def _transform_args(scale: float, cap):
    return dict(scale=float(scale), cap=float(cap) if cap is not None else 1.0, HAS_CAP=cap is not None)


def uld_select(logits: torch.Tensor, labels, k: int, temperature: float, scale: float, cap,
               ignore_index: int):
    """The fused forward of one model: (stats (N, 2) float32 = (m, log l) of the tempered
    logsumexp, values (N, k) float32 = the k largest transformed logits z (untempered) in
    decreasing order, raws (N, k) float32 = their untransformed logits, ids (N, k) int64).
    k <= MAX_FUSED_TOPK. Ignored rows (label == ignore_index) are not read: stats 0, values
    and raws -inf, ids 0..k-1."""
    z2, stride = _rows(logits)
    n_rows, vocab = z2.shape
    if not 1 <= k <= min(vocab, MAX_FUSED_TOPK):
        raise ValueError(f"top_k: the fused selection takes 1 <= k <= min(V, {MAX_FUSED_TOPK}), got k = {k} (V = {vocab})")
    device = z2.device
    stats = empty((n_rows, 2), dtype=torch.float32, device=device)
    vals = empty((n_rows, k), dtype=torch.float32, device=device)
    raws = empty((n_rows, k), dtype=torch.float32, device=device)
    ids = torch.empty((n_rows, k), dtype=torch.int64, device=device)
    if n_rows == 0:
        return stats, vals, raws, ids
    k_pad = max(2, triton.next_power_of_2(k))  # tl.topk of a 1-element block does not reduce
    block = _block_v(vocab, k_pad, SELECT_BLOCK_V)
    # per row, K_PAD buffered (raw logit, column) pairs and a copy of the K_PAD candidates
    # (L2-resident)
    buf = torch.empty((n_rows, 2 * k_pad), dtype=torch.int64, device=device)
    _uld_select_kernel[(n_rows,)](
        z2, labels.reshape(-1) if labels is not None else stats, stats, vals, raws, ids, buf,
        stride, vocab, k, 1.0 / temperature, ignore_index=int(ignore_index),
        HAS_LABELS=labels is not None, K_PAD=k_pad, BLOCK_V=block, num_warps=SELECT_NUM_WARPS,
        **_transform_args(scale, cap), **LAUNCH_OPTIONS,
    )
    return stats, vals, raws, ids


def uld_grad(logits: torch.Tensor, labels, stats, vals, raws, ids, gsign, s_sum, grad, temperature: float,
             scale: float, cap, ignore_index: int):
    """Write d loss / d logits of one model into ``grad`` (contiguous (N, V), the logits'
    dtype; it may be the logits themselves when they are contiguous float32): from the forward's
    ``stats`` / ``vals`` / ``raws`` / ``ids``, the weighted per-rank signs ``gsign`` (N, K) float32 and
    S = sum_j q_(j) gsign_j, ``s_sum`` (N,) float32. Every element is written."""
    z2, stride = _rows(logits)
    n_rows, vocab = z2.shape
    k = ids.shape[-1]
    if n_rows == 0:
        return grad
    common = dict(labels_ptr=labels.reshape(-1) if labels is not None else stats, stats_ptr=stats,
                  ssum_ptr=s_sum, grad_ptr=grad, inv_t=1.0 / temperature, ignore_index=int(ignore_index),
                  HAS_LABELS=labels is not None, **_transform_args(scale, cap), **LAUNCH_OPTIONS)
    if k < vocab:  # else the ranked entries are the whole row
        block = _block_v(vocab)
        _uld_bwd_dense_kernel[(n_rows, triton.cdiv(vocab, block))](
            z_ptr=z2, z_stride=stride, V=vocab, BLOCK_V=block, num_warps=_num_warps(block), **common)
    block_k = min(1024, triton.next_power_of_2(k))
    _uld_bwd_ranked_kernel[(n_rows, triton.cdiv(k, block_k))](
        val_ptr=vals, raw_ptr=raws, idx_ptr=ids, gsign_ptr=gsign, V=vocab, K=k,
        BLOCK_K=block_k, num_warps=_num_warps(block_k), **common)
    return grad
