"""Universal Logit Distillation: the Triton kernels behind ``uld_loss`` (pydistill/reference/uld.py
is the oracle).

Per row and per model (student and teacher run the same kernels, each on its own vocabulary),
z = cap(a * logits) (-inf stays -inf), x = z / T, q = softmax(x), and the K ranks kept::

    loss = sum_{j < K} |q_(j) - p_(j)|                (q_(j): the j-th largest probability)

Forward, ``_uld_select_kernel``, one program per row streaming the vocabulary in tiles of
BLOCK_V (>= K_PAD = the power of two >= max(K, 2)), float32 math:

    online logsumexp     m, l updated per tile (stored as the two terms m and log l)
    running top-K        the candidates are K_PAD int64 keys, each a transformed logit z (the
                         order of z is that of x and q) and its token id packed into one
                         sortable integer:
                             key = (ordered_bits(z) << 32) | id
                         ordered_bits maps float32 bits to int32 so that integer order is
                         float order (negative floats get their 31 low bits flipped); ids are
                         below 2^31, so keys are distinct and a tie in z prefers the larger id.
                         Columns past V get the smallest key (below -inf) and never win while
                         V >= K real columns exist. Per tile: if the tile's largest key beats
                         the smallest candidate, tl.topk(tile keys, K_PAD) is joined with the
                         candidates and tl.topk of the 2 K_PAD keys is kept (bitonic top-k,
                         in registers); otherwise the tile only feeds the logsumexp, which is
                         what most tiles do once the candidates are good.
    Read: the row once. Write: K values z_(j), K ids, 2 floats.

The loss itself is K-sized arithmetic done in PyTorch on the outputs
(q_(j) = exp((z_(j) / T - m) - log l)). ``tl.topk(x, k)`` (values only, k a power of two, the
largest first) is in triton.language since Triton 3.4 (bitonic top-k, triton-lang/triton#6461)
and unchanged in 3.6 - 3.9; sorting packed keys is how it yields the ids as well. The values
are kept untempered so that the backward takes the soft-cap's slope 1 - (z / c)^2 from the
very z the dense entries use: recovering z from x = z / T would add roundings to th = z / c,
which the slope amplifies by 1 / (1 - th^2) where the cap saturates.

Gradient. With g_j the weighted signs dloss/dq_(j) (sign(q_(j) - p_(j)) times the row's
grad_output factor; the teacher's with the opposite sign) and S = sum_j q_(j) g_j::

    dloss/dlogit_v = (1/T) q_v (G_v - S) * a (1 - (z_v / c)^2),    G_v = g_{rank(v)} or 0

    ``_uld_bwd_dense_kernel``   every entry: -(1/T) S q_v * slope        (grid rows x tiles)
    ``_uld_bwd_ranked_kernel``  the K ranked entries overwritten with (1/T) (g_j - S) q_(j) *
                                slope, computed from the saved z_(j) (not re-read from the
                                logits, so the gradient may overwrite the logits in place)

Two launches, so the second kernel's stores are ordered after the first's without a barrier.
When K = V (top_k None: the full sort is torch.sort's) the ranked kernel writes every entry and
the dense one is skipped. Bytes per logit, forward + backward: read 1 + read 1 + write 1.
"""
import triton
import triton.language as tl

from pydistill.kernels.softmax_divergence import LAUNCH_OPTIONS, _finite_or_zero, _flag, _softcap

# Below the key of -inf (ordered_bits(-inf) = 0x807FFFFF): the padded columns and the empty
# candidate slots.
_NO_KEY32 = tl.constexpr(-2147483648)


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
def _slope(z, scale, cap, HAS_CAP: tl.constexpr):
    # d cap(a y) / dy at the transformed logit z; 0 at -inf (masked) entries, where the cap's
    # 1 - (z / c)^2 would be -inf and its product with q = 0 NaN
    slope = scale + tl.zeros_like(z)
    if HAS_CAP:
        th = z / cap
        slope = slope * (1.0 - th * th)
    return tl.where(z == float("-inf"), 0.0, slope)


@triton.jit
def _row_active(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    active = tl.full([], 1, tl.int1)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        active = _flag(label != ignore_index)
    return active


@triton.jit
def _uld_select_kernel(
    z_ptr, labels_ptr, stats_ptr, val_ptr, idx_ptr,
    z_stride, V, K, inv_t, scale, cap, ignore_index,
    HAS_CAP: tl.constexpr, HAS_LABELS: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    active = _row_active(labels_ptr, row, ignore_index, HAS_LABELS)
    n_live = tl.where(active, tl.cdiv(V, BLOCK_V), 0)
    offs = tl.arange(0, BLOCK_V)

    m = float("-inf")
    l = 0.0
    best = tl.full([K_PAD], _NO_KEY32, tl.int64) << 32
    for k in range(0, n_live):
        cols = k * BLOCK_V + offs
        in_row = cols < V
        raw = tl.load(z_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        z = _transform(raw, scale, cap, HAS_CAP)
        x = z * inv_t
        m_new = tl.maximum(m, tl.max(x, axis=0))
        l = l * tl.exp(m - _finite_or_zero(m_new)) + tl.sum(tl.exp(x - _finite_or_zero(m_new)), axis=0)
        m = m_new
        key32 = tl.where(in_row, _ordered_bits(z), _NO_KEY32)
        key = (key32.to(tl.int64) << 32) | cols.to(tl.int64)
        if tl.max(key, axis=0) > tl.min(best, axis=0):
            if BLOCK_V > K_PAD:
                top = tl.topk(key, K_PAD)
            else:
                top = key
            best = tl.topk(tl.reshape(tl.join(best, top), [2 * K_PAD]), K_PAD)

    ranks = tl.arange(0, K_PAD)
    keep = ranks < K
    ids = best.to(tl.int32).to(tl.int64)  # the low 32 bits
    vals = _ordered_bits((best >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
    # an ignored row (not read): values -inf, so its probabilities are 0, not NaN, and ids
    # 0..K-1, so that with K = V the ranked backward still writes every entry of the row
    vals = tl.where(active, vals, float("-inf"))
    ids = tl.where(active, ids, ranks.to(tl.int64))
    tl.store(val_ptr + row * K + ranks, vals, mask=keep)
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
    g = (-s_sum * inv_t) * q * _slope(z, scale, cap, HAS_CAP)
    g = tl.where(active, g, 0.0)
    tl.store(grad_ptr + row * V + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _uld_bwd_ranked_kernel(
    val_ptr, idx_ptr, gsign_ptr, labels_ptr, stats_ptr, ssum_ptr, grad_ptr,
    V, K, inv_t, scale, cap, ignore_index,
    HAS_CAP: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ranks = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = ranks < K
    active = _row_active(labels_ptr, row, ignore_index, HAS_LABELS)
    z = tl.load(val_ptr + row * K + ranks, mask=keep, other=float("-inf"))
    ids = tl.load(idx_ptr + row * K + ranks, mask=keep, other=0)
    g = tl.load(gsign_ptr + row * K + ranks, mask=keep, other=0.0)
    m = tl.load(stats_ptr + row * 2)
    log_l = tl.load(stats_ptr + row * 2 + 1)
    s_sum = tl.load(ssum_ptr + row)
    q = tl.exp((z * inv_t - m) - log_l)
    grad = ((g - s_sum) * inv_t) * q * _slope(z, scale, cap, HAS_CAP)
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
# Tile size override for tests (small tiles exercise the multi-tile paths at small V).
BLOCK_V_OVERRIDE = None


def _block_v(vocab: int, k_pad: int = 1) -> int:
    block = BLOCK_V_OVERRIDE if BLOCK_V_OVERRIDE is not None else min(1024, triton.next_power_of_2(vocab))
    return max(block, k_pad)


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
    decreasing order,
    ids (N, k) int64). k <= MAX_FUSED_TOPK. Ignored rows (label == ignore_index) are not
    read: stats 0, values -inf, ids 0..k-1."""
    z2, stride = _rows(logits)
    n_rows, vocab = z2.shape
    if not 1 <= k <= min(vocab, MAX_FUSED_TOPK):
        raise ValueError(f"top_k: the fused selection takes 1 <= k <= min(V, {MAX_FUSED_TOPK}), got k = {k} (V = {vocab})")
    device = z2.device
    stats = empty((n_rows, 2), dtype=torch.float32, device=device)
    vals = empty((n_rows, k), dtype=torch.float32, device=device)
    ids = torch.empty((n_rows, k), dtype=torch.int64, device=device)
    if n_rows == 0:
        return stats, vals, ids
    k_pad = max(2, triton.next_power_of_2(k))  # tl.topk of a 1-element block does not reduce
    block = _block_v(vocab, k_pad)
    _uld_select_kernel[(n_rows,)](
        z2, labels.reshape(-1) if labels is not None else stats, stats, vals, ids,
        stride, vocab, k, 1.0 / temperature, ignore_index=int(ignore_index),
        HAS_LABELS=labels is not None, K_PAD=k_pad, BLOCK_V=block, num_warps=_num_warps(2 * block),
        **_transform_args(scale, cap), **LAUNCH_OPTIONS,
    )
    return stats, vals, ids


def uld_grad(logits: torch.Tensor, labels, stats, vals, ids, gsign, s_sum, grad, temperature: float,
             scale: float, cap, ignore_index: int):
    """Write d loss / d logits of one model into ``grad`` (contiguous (N, V), the logits'
    dtype; it may be the logits themselves when they are contiguous float32): from the forward's
    ``stats`` / ``vals`` / ``ids``, the weighted per-rank signs ``gsign`` (N, K) float32 and
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
        val_ptr=vals, idx_ptr=ids, gsign_ptr=gsign, V=vocab, K=k,
        BLOCK_K=block_k, num_warps=_num_warps(block_k), **common)
    return grad
