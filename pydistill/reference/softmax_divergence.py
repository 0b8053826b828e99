"""Temperature-softmax divergence loss (``kd_loss``): the reference math, written once.

Per row i (student logits s, teacher logits t, both of size V)::

    z_s    = cap_s(a_s s),  z_t = cap_t(a_t t)  (each model's own logit transform, below)
    log p  = log_softmax(z_t / T)             (teacher)
    log q  = log_softmax(z_s / T)             (student)
    loss_i = hard_weight * CE(z_s, y_i) + soft_weight * T^2 * D(p, q)   (T^2 only if t2)

The transform is TRL's (``DistillationTrainer``): the logit scale a > 0 first (Cohere's
``logit_scale``, Granite's 1 / ``logits_scaling``; default 1), then the optional soft-cap
cap(x) = c tanh(x / c) (Gemma-2's ``final_logit_softcapping``; -inf stays -inf), then the
temperature. Its derivative, a (1 - (z / c)^2), multiplies each side's gradient; the closed
forms compute it from the untransformed y as a sech^2(a y / c) (``softcap_slope``), which keeps
its digits where the cap saturates (z / c rounds towards 1).

with ``D`` one of ``DIVERGENCES`` (mixture weight ``beta``)::

    kl               sum p (log p - log q)
    reverse_kl       sum q (log q - log p)
    jsd              beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q;
                     beta = 0 is kl and beta = 1 is reverse_kl (TRL's generalized_jsd_loss)
    tvd              1/2 sum |p - q|
    skew_kl          KL(p || beta p + (1 - beta) q)          (DistiLLM, beta = alpha)
    skew_reverse_kl  KL(q || beta q + (1 - beta) p)

``CE`` is the cross-entropy of the transformed student logits at temperature 1. Rows whose
label equals ``ignore_index`` contribute 0 and are not counted; ``mean`` (= ``batchmean``)
divides by the number of counted rows (0, not NaN, when none count).

Everything is computed in float32 (float64 for float64 inputs) with plain autograd-able
PyTorch ops. The module is three things at once: the oracle every backend is tested
against (in float64), the baseline of the benchmarks, and, through ``ChunkedKDLoss``, the
``torch`` backend that runs anywhere.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass
from typing import Optional

import torch

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")
REDUCTIONS = ("mean", "batchmean", "sum", "none")

# Elements of one (rows, V) float32 intermediate per chunk of the torch backend (at least
# one row). About five such intermediates live at once, so the working set is ~5 MB: small
# enough to stay in a CPU's cache and far below one (N, V) float32 copy once the logits are
# tens of MB, large enough that the ~20 small ops per chunk cost little. Measured on two
# CPU cores at N x V from 256 x 4096 to 1024 x 32000: 2^16 is slower (per-chunk overhead),
# 2^20 slower too (cache), 2^18 0.5-0.75x eager PyTorch's time.
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class KDConfig:
    """The hyper-parameters of ``kd_loss``; already validated when built by the API."""

    divergence: str = "kl"
    temperature: float = 1.0
    beta: float = 0.5
    ignore_index: int = -100
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    t2: bool = True
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: Optional[float] = None
    teacher_softcap: Optional[float] = None
    reduction: str = "mean"
    # KDConfig(softcap=c): the shorthand for student_softcap = teacher_softcap = c (as in the
    # API); not stored (``cfg.softcap`` does not exist: read the per-model fields)
    softcap: InitVar[Optional[float]] = None

    def __post_init__(self, softcap):
        if softcap is not None:
            if self.student_softcap is not None or self.teacher_softcap is not None:
                raise ValueError("softcap: give it or the per-model soft-caps, not both")
            object.__setattr__(self, "student_softcap", softcap)
            object.__setattr__(self, "teacher_softcap", softcap)

    def student_transform(self, z: torch.Tensor) -> torch.Tensor:
        return transform_logits(z, self.student_logit_scale, self.student_softcap)

    def teacher_transform(self, z: torch.Tensor) -> torch.Tensor:
        return transform_logits(z, self.teacher_logit_scale, self.teacher_softcap)

    @property
    def soft_scale(self) -> float:
        """Factor in front of D: soft_weight * T^2 (or soft_weight when t2 is off)."""
        return self.soft_weight * (self.temperature**2 if self.t2 else 1.0)

    @property
    def has_soft(self) -> bool:
        """Whether the divergence term is present: soft_weight != 0 and D not identically 0
        (skew_kl / skew_reverse_kl at beta = 1 compare a distribution with itself)."""
        degenerate = self.divergence in ("skew_kl", "skew_reverse_kl") and self.beta == 1.0
        return self.soft_weight != 0.0 and not degenerate

    def canonical_divergence(self) -> str:
        """The divergence actually computed: endpoints of the mixed ones collapse onto kl /
        reverse_kl (TRL's convention for jsd; exact identities for the skewed ones)."""
        d, b = self.divergence, self.beta
        if d == "jsd" and b == 0.0:
            return "kl"
        if d == "jsd" and b == 1.0:
            return "reverse_kl"
        if d == "skew_kl" and b == 0.0:
            return "kl"
        if d == "skew_reverse_kl" and b == 0.0:
            return "reverse_kl"
        return d


del KDConfig.softcap  # the InitVar's class attribute: cfg.softcap raises instead of reading None


def config_fields(cfg) -> dict:
    """A config's stored fields as keyword arguments (the InitVar shorthand left out)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def softcap_logits(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """``c * tanh(z / c)``; entries equal to -inf (masked vocabulary) stay -inf."""
    if softcap is None:
        return z
    return torch.where(z == -math.inf, z, softcap * torch.tanh(z / softcap))


def transform_logits(z: torch.Tensor, scale: float = 1.0, softcap: Optional[float] = None):
    """One model's logit transform ``cap(scale * z)`` (the identity at scale 1, no cap)."""
    if scale != 1.0:
        z = z * scale
    return softcap_logits(z, softcap)


def tempered_log_softmax(logits: torch.Tensor, temperature: float, softcap=None, dtype=None,
                         scale: float = 1.0):
    """``log_softmax(cap(scale * logits) / T)`` in ``dtype`` (default: float32 / float64)."""
    z = logits.to(dtype or compute_dtype(logits.dtype))
    return torch.log_softmax(transform_logits(z, scale, softcap) / temperature, dim=-1)


def _weighted_log_ratio(w, log_w, log_v):
    """sum_j w_j (log w_j - log v_j) with 0 log 0 = 0, and gradients free of NaN where
    w_j = 0 (an entry masked with -inf carries no probability and no gradient). Only exact
    zeros are dropped: a NaN weight (a NaN logit) propagates."""
    keep = w != 0
    diff = torch.where(keep, log_w, 0.0) - torch.where(keep, log_v, 0.0)
    return torch.where(keep, w * diff, 0.0).sum(-1)


def _log_mixture(log_a, log_b, weight_a: float):
    """log(weight_a * a + (1 - weight_a) * b), -inf where a = b = 0, NaN-free gradients."""
    if weight_a == 1.0:
        return log_a
    if weight_a == 0.0:
        return log_b
    la = log_a + math.log(weight_a)
    lb = log_b + math.log1p(-weight_a)
    both = (la == -math.inf) & (lb == -math.inf)
    mixed = torch.logaddexp(torch.where(both, 0.0, la), torch.where(both, 0.0, lb))
    return torch.where(both, -math.inf, mixed)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, name: str, beta: float = 0.5):
    """Per-row D(p, q) from teacher log-probs ``log_p`` and student log-probs ``log_q``."""
    p, q = log_p.exp(), log_q.exp()
    if name == "kl" or (name == "jsd" and beta == 0.0):
        return _weighted_log_ratio(p, log_p, log_q)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return _weighted_log_ratio(q, log_q, log_p)
    if name == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * _weighted_log_ratio(p, log_p, log_m) + (1.0 - beta) * _weighted_log_ratio(
            q, log_q, log_m
        )
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_kl":
        return _weighted_log_ratio(p, log_p, _log_mixture(log_p, log_q, beta))
    if name == "skew_reverse_kl":
        return _weighted_log_ratio(q, log_q, _log_mixture(log_q, log_p, beta))
    raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {name!r}")


def counted_rows(student_logits, teacher_logits, labels, ignore_index: int):
    """Both logits in the compute dtype with the ignored rows zeroed, the mask of counted rows
    (None without labels) and their count (a 0-dim tensor on the device)."""
    dtype = compute_dtype(student_logits.dtype, teacher_logits.dtype)
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    if labels is None:
        return s, t, None, torch.tensor(s.shape[:-1].numel(), device=s.device)
    counted = labels != ignore_index
    # Ignored rows may hold anything (NaN included): they must not leak into the gradient
    # through 0 * NaN, so they are replaced before any arithmetic.
    s = torch.where(counted[..., None], s, 0.0)
    t = torch.where(counted[..., None], t, 0.0)
    return s, t, counted, counted.sum()


def per_row_loss(student_logits, teacher_logits, labels, cfg: KDConfig):
    """Per-row losses (shape of the leading dims, ignored rows 0) and the count of counted
    rows (a 0-dim tensor on the device)."""
    s, t, counted, count = counted_rows(student_logits, teacher_logits, labels, cfg.ignore_index)
    dtype, lead = s.dtype, s.shape[:-1]
    loss = torch.zeros(lead, dtype=dtype, device=s.device)
    if cfg.soft_weight != 0.0:
        log_q = torch.log_softmax(cfg.student_transform(s) / cfg.temperature, dim=-1)
        log_p = torch.log_softmax(cfg.teacher_transform(t) / cfg.temperature, dim=-1)
        loss = loss + cfg.soft_scale * divergence(log_p, log_q, cfg.divergence, cfg.beta)
    if cfg.hard_weight != 0.0:
        ce, _ = hard_cross_entropy(cfg.student_transform(s), labels, counted)
        loss = loss + cfg.hard_weight * ce
    if counted is not None:
        loss = torch.where(counted, loss, 0.0)
    return loss, count


def hard_cross_entropy(z, labels, counted, grad: bool = False):
    """Per-row CE(z, y) at temperature 1 over the last dim, and with ``grad`` its gradient
    softmax(z) - onehot(y) (else None). An out-of-range label gives NaN, as in the kernels,
    rather than a device assert; ignored rows read column 0 (the caller masks them).

    The logsumexp is kept as its two terms m + log l (m the row's max), as the kernels keep
    it: CE = (m - z_y) + log l and softmax = e^{(z - m) - log l}. Folding them into one
    float first loses log l next to logits of 1e30 (a CE of log 2 between two equal
    maxima came out 0). An infinite max is used as a shift of 0: a +inf logit makes l and
    the CE +inf (NaN when z_y is that +inf), as torch.logsumexp does."""
    m = z.detach().amax(dim=-1, keepdim=True)  # a shift: CE does not depend on it
    m = torch.where(m.abs() == math.inf, 0.0, m)
    log_l = (z - m).exp().sum(-1).log()
    in_range = (labels >= 0) & (labels < z.shape[-1])
    target = torch.where(counted & in_range, labels, 0).long()[..., None]
    ce = torch.where(in_range, (m.squeeze(-1) - z.gather(-1, target).squeeze(-1)) + log_l, math.nan)
    if not grad:
        return ce, None
    soft1 = (z - m).sub_(log_l[..., None]).exp_()
    soft1.scatter_add_(-1, target, torch.full(target.shape, -1.0, dtype=z.dtype, device=z.device))
    return ce, soft1


def reduce_rows(rows: torch.Tensor, count, reduction: str):
    """``count``: the number of counted rows, a 0-dim device tensor or a Python int."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if isinstance(count, int):
        return total / max(count, 1)
    return total / count.clamp(min=1).to(total.dtype)


def kd_loss(student_logits, teacher_logits, labels=None, cfg: KDConfig = KDConfig()):
    """The reference ``kd_loss``: plain autograd, any dtype (float64 in the tests)."""
    rows, count = per_row_loss(student_logits, teacher_logits, labels, cfg)
    return reduce_rows(rows, count, cfg.reduction)


# --------------------------------------------------------------------------------------
# The torch backend: the same math in closed form, row chunk by row chunk, gradient in the
# forward pass. Its gradients are the table of kernels/softmax_divergence.py; the tests check
# them against autograd of the functions above.
# --------------------------------------------------------------------------------------


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, elements // max(vocab, 1))


def _weighted(w, x, m=None):
    """w * x, and 0 wherever w == 0 (x may be infinite or NaN there), or the mixture m is."""
    keep = w != 0 if m is None else (w != 0) & (m != 0)
    return torch.where(keep, w * x, 0.0)


# ---- the divergence's value, summed so that its rounding does not grow with T^2 --------------
# At a large temperature p and q are both near uniform: log p_j - log q_j is O(1/T) and D is
# O(1/T^2), the difference of sums of O(1/T) terms. Summed as sum p (log p - log q), the
# rounding of each log-probability (eps log V, absolute) survives the cancellation: the loss
# T^2 D was off by 0.1 % at T = 100 and by its own size at T = 1e3. Instead:
#   * w = log p - log q is taken from the max-shifted logits and the difference of the two
#     log-sums, (x_t - m_t) - (x_s - m_s) - (ll_t - ll_s): relative rounding on w itself;
#   * every divergence is a sum of Bregman terms a phi(log(a / b)) >= 0, phi(u) = u - 1 + e^{-u}
#     = a log(a / b) - a + b, whose extra - a + b sums to 0 (both a and b sum to 1), so that
#     each term is O(w^2) and an error in the shared ll_t - ll_s enters only at second order;
#   * phi by its series where |u| < 1/2 (9 digits), a u - a + b elsewhere (no e^{-u} overflow):
#         kl          p phi(w)
#         reverse_kl  q phi(-w)
#         skew_kl     p phi(u_p),   u_p = log(p / m) = -log1p((1 - a) expm1(-w))
#         skew_rkl    q phi(u_q),   u_q = log(q / m) = -log1p((1 - a) expm1(w))
#         jsd         b p phi(u_p) + (1 - b) q phi(u_q),  u_p = -log1p((1 - b) expm1(-w)),
#                     u_q = -log1p(b expm1(w))
#     (the log1p forms where |w| < 1/4; log a - log m from the probabilities elsewhere).
#   * tvd: |p - q| = p |expm1(-w)| where |w| < 1/4. It has no Bregman form: the rounding of
#     ll_t - ll_s stays first order, a relative error ~ eps T (its value T^2 D grows like T).
# The gradients keep the table's formulas.
# The kernels (kernels/softmax_divergence.py, csrc/common.cuh) compute the same terms.

BREGMAN_SERIES_MAX = 0.5  # |u| below which phi(u) is summed from its series
LOG1P_FORM_MAX = 0.25  # |w| below which log(a / m) (and tvd's |p - q|) is taken from w


def _phi_series(u):
    """u - 1 + e^{-u} for |u| <= 1/2, to the precision of u's dtype: the terms (-u)^k / k! from
    k = 2, up to k = 8 for float32 (the next is 4e-8 of the sum) and k = 18 for float64 (the
    next is 1e-17 of it)."""
    n = 17 if u.dtype == torch.float64 else 7
    c = tuple((-1) ** k / math.factorial(k) for k in range(2, 2 + n))
    acc = torch.full_like(u, c[-1])
    for k in reversed(c[:-1]):
        acc = acc * u + k
    return acc * u * u


def bregman(a, b, u):
    """a log(a / b) - a + b >= 0, elementwise, from u = log(a / b): b where a = 0, +inf where
    b = 0 < a; NaN propagates."""
    small = u.abs() < BREGMAN_SERIES_MAX
    direct = a * u - a + b
    out = torch.where(small, a * _phi_series(torch.where(small, u, 0.0)), direct)
    return torch.where(a == 0, b, out)


def _log_ratio_to_mixture(log_a, log_m, w, weight_other: float):
    """log(a / m) for m = (1 - weight_other) a + weight_other b, from w = log(a / b):
    -log1p(y), y = weight_other expm1(-w), where |w| or |y| is small (the latter: b's weight
    within 1e-9 of 0, where m is a and log a - log m cancels); log a - log m elsewhere."""
    y = weight_other * torch.expm1(-w)
    small = (w.abs() < LOG1P_FORM_MAX) | (y.abs() < LOG1P_FORM_MAX)
    near = -torch.log1p(torch.where(small, y, 0.0))
    return torch.where(small, near, log_a - log_m)


def divergence_value(log_p, log_q, p, q, w, name: str, beta: float):
    """Per-row D(p, q) as a sum of Bregman terms (the block comment above), from the
    log-probabilities, the probabilities and w = log p - log q (accurate; see
    tempered_log_ratio). ``name`` is a canonical divergence. Only for distributions that
    each sum to 1."""
    if name == "kl":
        return bregman(p, q, w).sum(-1)
    if name == "reverse_kl":
        return bregman(q, p, -w).sum(-1)
    if name == "tvd":  # |p - q| = p |expm1(-w)| where |w| is small
        small = w.abs() < LOG1P_FORM_MAX
        near = p * torch.expm1(-torch.where(small, w, 0.0)).abs()
        return 0.5 * torch.where(small, near, (p - q).abs()).sum(-1)
    if name == "skew_kl":
        m = beta * p + (1.0 - beta) * q
        u = _log_ratio_to_mixture(log_p, torch.log(m), w, 1.0 - beta)
        return torch.where(m != 0, bregman(p, m, u), 0.0).sum(-1)
    if name == "skew_reverse_kl":
        m = beta * q + (1.0 - beta) * p
        u = _log_ratio_to_mixture(log_q, torch.log(m), -w, 1.0 - beta)
        return torch.where(m != 0, bregman(q, m, u), 0.0).sum(-1)
    if name == "jsd":
        m = beta * p + (1.0 - beta) * q
        log_m = torch.log(m)
        u_p = _log_ratio_to_mixture(log_p, log_m, w, 1.0 - beta)
        u_q = _log_ratio_to_mixture(log_q, log_m, -w, beta)
        d = beta * bregman(p, m, u_p) + (1.0 - beta) * bregman(q, m, u_q)
        return torch.where(m != 0, d, 0.0).sum(-1)
    raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {name!r}")


def tempered_log_ratio(x_t, x_s):
    """w = log softmax(x_t) - log softmax(x_s), elementwise, as
    (x_t - m_t) - (x_s - m_s) - (ll_t - ll_s) (m the row maxima, ll the log-sums): rounding
    relative to w, which the difference of the two log-softmaxes (each rounded at its own
    size, ~log V) does not have at large T. Infinite maxima shift by 0, as in the kernels."""
    def shifted(x):
        m = x.amax(dim=-1, keepdim=True)
        a = x - torch.where(m.abs() == math.inf, 0.0, m)
        return a, torch.logsumexp(a, dim=-1, keepdim=True)

    a_t, ll_t = shifted(x_t)
    a_s, ll_s = shifted(x_s)
    return (a_t - a_s) - (ll_t - ll_s)


def divergence_terms(log_p, log_q, p, q, name: str, beta: float, need_teacher: bool, w=None):
    """Per-row D and, for the softmax chain rule dD/ds_j = q_j (h_j - S_q) / T (and
    dD/dt_j = p_j (u_j - S_p) / T), the elementwise q h, p u and the per-row S_q, S_p, with
    h = dD/dq and u = dD/dp. ``name`` is a canonical divergence (see
    KDConfig.canonical_divergence). p u and S_p are None unless ``need_teacher``. With ``w``
    (log p - log q from tempered_log_ratio; only where p and q each sum to 1) D is
    divergence_value's, whose rounding does not grow with the temperature."""
    exact = divergence_value(log_p, log_q, p, q, w, name, beta) if w is not None else None
    pu = s_p = None
    if name == "kl":
        d = _weighted(p, log_p - log_q)
        div = d.sum(-1) if exact is None else exact
        qh, s_q = -p, torch.full_like(div, -1.0)
        if need_teacher:
            pu, s_p = d + p, div + 1.0
        return div, qh, s_q, pu, s_p
    if name == "reverse_kl":
        d = _weighted(q, log_q - log_p)
        div = d.sum(-1) if exact is None else exact
        qh, s_q = d + q, div + 1.0
        if need_teacher:
            pu, s_p = -q, torch.full_like(div, -1.0)
        return div, qh, s_q, pu, s_p
    # Below, a mixture m that underflows to 0 (a denormal p or q times beta rounds to 0) makes
    # the terms it divides 0, not infinite: they are below ~1e-38 there.
    if name == "jsd":
        m = beta * p + (1.0 - beta) * q
        log_m = torch.log(m)
        qh = (1.0 - beta) * _weighted(q, log_q - log_m, m)
        pu = beta * _weighted(p, log_p - log_m, m)
        div = (qh + pu).sum(-1)
    elif name == "tvd":
        g = 0.5 * torch.sign(q - p)
        div = 0.5 * (p - q).abs().sum(-1)
        qh, pu = q * g, -p * g
    elif name == "skew_kl":
        m = beta * p + (1.0 - beta) * q
        r = torch.where(m != 0, p / m, 0.0)
        log_ratio = log_p - torch.log(m)
        div = _weighted(p, log_ratio, m).sum(-1)
        qh = -(1.0 - beta) * q * r
        if w is not None:
            # The gradient is -(1 - beta) q (r - S), S = sum q r. Near convergence r ~ 1 and
            # r - S lost the digits of r - 1: there it is (r - 1) - (S - 1), r - 1 =
            # -(1 - beta) r expm1(-w) and S - 1 = sum q (r - 1) (q sums to 1). Elsewhere (r far
            # from 1, where S - 1 would cancel instead) r - S as it is. Returned whole, with S_q = 0.
            small = w.abs() < LOG1P_FORM_MAX
            rho = torch.where(small, -(1.0 - beta) * r * torch.expm1(-torch.where(small, w, 0.0)), r - 1.0)
            diff = torch.where(small, rho - (q * rho).sum(-1, keepdim=True), r - (q * r).sum(-1, keepdim=True))
            qh_whole = -(1.0 - beta) * q * diff
        pu = _weighted(p, log_ratio - beta * r, m) if need_teacher else None
    elif name == "skew_reverse_kl":
        m = beta * q + (1.0 - beta) * p
        r = torch.where(m != 0, q / m, 0.0)
        log_ratio = log_q - torch.log(m)
        div = _weighted(q, log_ratio, m).sum(-1)
        qh = _weighted(q, log_ratio - beta * r, m)
        pu = -(1.0 - beta) * p * r if need_teacher else None
    else:
        raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {name!r}")
    s_q = qh.sum(-1)
    if name == "skew_kl" and w is not None:
        qh, s_q = qh_whole, torch.zeros_like(s_q)
    if need_teacher:
        s_p = pu.sum(-1)
    else:
        pu = None
    return (div if exact is None else exact), qh, s_q, pu, s_p


def _softcap_slope(z, softcap):
    """d cap(x) / dx at cap(x) = z: 1 - (z / c)^2, and 0 at masked (-inf) entries."""
    th = z / softcap
    return torch.where(z == -math.inf, 0.0, 1.0 - th * th)


def softcap_slope(y: torch.Tensor, softcap: float) -> torch.Tensor:
    """d cap(y) / dy = sech^2(y / c) from the uncapped y, as 4 e / (1 + e)^2 with
    e = exp(-2 |y| / c) <= 1: no cancellation where the cap saturates, where 1 - (cap(y) / c)^2
    loses every digit (cap(y) / c rounds towards 1). 0 at masked (-inf) entries."""
    e = torch.exp(-2.0 * y.abs() / softcap)
    return torch.where(y == -math.inf, 0.0, 4.0 * e / (1.0 + e) ** 2)


def zero_ignored_rows(x: torch.Tensor, counted: Optional[torch.Tensor]) -> torch.Tensor:
    """x (rows, V) with its ignored rows (``counted`` False) zeroed: they may hold anything, NaN
    included, and must reach neither the loss nor a gradient (0 * NaN). x itself without
    labels."""
    return x if counted is None else x.masked_fill(~counted[:, None], 0.0)


def transform_grad_(g: torch.Tensor, z: torch.Tensor, scale: float, softcap: Optional[float],
                    raw: Optional[torch.Tensor] = None):
    """g *= d cap(scale x) / dx at the transformed logits z (in place): the chain rule of one
    model's logit transform. Given the untransformed logits ``raw``, the soft-cap's slope is
    taken from them (``softcap_slope``, precise where the cap saturates), else from z."""
    if softcap is not None:
        g.mul_(_softcap_slope(z, softcap) if raw is None else softcap_slope(raw * scale, softcap))
    if scale != 1.0:
        g.mul_(scale)
    return g


def chunk_loss_and_grads(s, t, labels, cfg: KDConfig, row_scale, out_s=None, out_t=None,
                         entropy=None):
    """Per-row losses of one chunk of rows (s, t: (rows, V); labels: (rows,) or None), and
    the gradients of sum(row_scale * loss) w.r.t. s and t in closed form, written into
    ``out_s`` / ``out_t`` (contiguous (rows, V) buffers of the inputs' dtypes) when given.
    ``entropy``: a (rows,) buffer for the student's entropy -sum q log q (0 on ignored rows).
    Float32 math (float64 for float64 inputs); in-place wherever a temporary is dead, since
    on the CPU the allocations cost as much as the arithmetic."""
    dtype = compute_dtype(s.dtype, t.dtype)
    counted = labels != cfg.ignore_index if labels is not None else None
    s = zero_ignored_rows(s.to(dtype), counted)  # ignored rows may hold anything, NaN included
    z_s = cfg.student_transform(s)
    rows = torch.zeros(s.shape[0], dtype=dtype, device=s.device)
    g_s = None
    coef = cfg.soft_scale / cfg.temperature  # the soft gradient is carried without it
    need_t = out_t is not None and cfg.has_soft
    if cfg.has_soft:
        t = zero_ignored_rows(t.to(dtype), counted)
        z_t = cfg.teacher_transform(t)
        scaled = (lambda z: z) if cfg.temperature == 1.0 else (lambda z: z * (1.0 / cfg.temperature))
        log_q = torch.log_softmax(scaled(z_s), dim=-1)
        log_p = torch.log_softmax(scaled(z_t), dim=-1)
        q, p = log_q.exp(), log_p.exp()
        if entropy is not None:
            entropy.copy_(_weighted(q, log_q).sum(-1).neg_())
        name = cfg.canonical_divergence()
        w = tempered_log_ratio(scaled(z_t), scaled(z_s))
        if name == "kl" and not need_t:  # the common case, with fewer passes: q h - q S_q = q - p
            div = divergence_value(log_p, log_q, p, q, w, name, cfg.beta)
            del w, log_p, log_q
            if out_s is not None:
                g_s = q.sub_(p)
        else:
            div, qh, s_q, pu, s_p = divergence_terms(log_p, log_q, p, q, name, cfg.beta, need_t, w)
            del w
            if out_s is not None:
                g_s = qh.sub_(q * s_q[:, None])
            if need_t:
                g_t = pu.sub_(p.mul_(s_p[:, None]))
                transform_grad_(g_t, z_t, cfg.teacher_logit_scale, cfg.teacher_softcap, raw=t)
        rows.add_(div, alpha=cfg.soft_scale)
    if entropy is not None:
        if not cfg.has_soft:
            log_q = torch.log_softmax(z_s * (1.0 / cfg.temperature), dim=-1)
            entropy.copy_(_weighted(log_q.exp(), log_q).sum(-1).neg_())
        if counted is not None:
            entropy.masked_fill_(~counted, 0.0)
    rows = finish_student_chunk(rows, g_s, coef, z_s, labels, counted, cfg, row_scale, out_s,
                                raw=s)
    if out_t is not None:
        if need_t:
            weight = row_weights(row_scale, counted)
            torch.mul(g_t, weight * (cfg.soft_scale / cfg.temperature), out=out_t)
        else:  # no divergence term: the teacher does not enter the loss
            out_t.zero_()
    return rows


def row_weights(row_scale, counted):
    """``row_scale`` (a number, or a 0-dim or (rows,) tensor) as the multiplier of a (rows, V)
    gradient: 0 on the ignored rows."""
    if counted is not None:
        row_scale = torch.where(counted, row_scale, 0.0)
    if isinstance(row_scale, torch.Tensor) and row_scale.dim():
        return row_scale[:, None]
    return row_scale


def finish_student_chunk(rows, g_s, coef, z_s, labels, counted, cfg: KDConfig, row_scale, out_s,
                         hard=None, raw=None):
    """How every chunk function ends, given the per-row losses so far and the student's soft
    gradient ``g_s`` (None if there is none) carried without its factor ``coef``: add the hard
    term (value, and gradient folded into g_s), zero the ignored rows, and write the student
    gradient times row_scale * coef (and the transform's slope at the transformed ``z_s``) into
    ``out_s``. Returns the per-row losses. ``hard``: the hard term's (per-row CE, its gradient
    or None) where the caller computes it (the vocabulary-parallel step of linear_kd, whose
    logsumexp spans the ranks); by default ``hard_cross_entropy`` of ``z_s``. ``raw``: the
    untransformed logits z_s came from (finite on ignored rows: ``zero_ignored_rows``), from
    which the soft-cap's slope is taken (``softcap_slope``); without them, from z_s."""
    if cfg.hard_weight != 0.0:
        ce, soft1 = hard if hard is not None else hard_cross_entropy(
            z_s, labels, counted, grad=out_s is not None)
        rows.add_(ce, alpha=cfg.hard_weight)
        if soft1 is not None:
            if g_s is None:
                g_s, coef = soft1, cfg.hard_weight
            else:
                g_s.add_(soft1, alpha=cfg.hard_weight / coef)
    if counted is not None:
        rows = torch.where(counted, rows, 0.0)
    if out_s is not None:
        if g_s is None:
            out_s.zero_()
        else:
            transform_grad_(g_s, z_s, cfg.student_logit_scale, cfg.student_softcap, raw=raw)
            torch.mul(g_s, row_weights(row_scale, counted) * coef, out=out_s)
    return rows


def chunk_row_scale(labels, n_rows: int, cfg: KDConfig, dtype, device):
    """(count of counted rows, d loss / d row loss) of a chunked backend: device tensors when
    labels decide them (no sync), plain Python numbers when every row counts."""
    mean = cfg.reduction in ("mean", "batchmean")
    if labels is not None:
        count = (labels != cfg.ignore_index).sum()
        row_scale = 1.0 / count.clamp(min=1).to(dtype) if mean else torch.ones((), dtype=dtype, device=device)
        return count, row_scale
    return n_rows, (1.0 / max(n_rows, 1) if mean else 1.0)


def empty_rows(like: torch.Tensor, n_rows: int) -> torch.Tensor:
    """A contiguous (n_rows, V) buffer of ``like``'s dtype and device."""
    return torch.empty((n_rows, like.shape[-1]), dtype=like.dtype, device=like.device)


def _row_blocks(x: torch.Tensor):
    """x (..., V) as (blocks, rows, V) views with unit row stride where possible: one block when
    the leading dims flatten without a copy, else one block per index of all but the last
    leading dim (a causal shift logits[:, :-1] is B blocks of L - 1 rows: no copy)."""
    vocab = x.shape[-1]
    try:
        return x.view(1, -1, vocab)
    except RuntimeError:
        rows = x.shape[-2] if x.dim() >= 2 else 1
        return x.reshape(-1, rows, vocab)  # a view unless the outer dims do not merge either


def row_chunks(tensors, step: int):
    """(slice of the flattened rows, [the chunk of each tensor]) over chunks of at most ``step``
    rows of tensors of one shape (..., V), reading each through _row_blocks (no (N, V) copy of
    a sliced input); a chunk never spans two blocks of any tensor."""
    blocks = [_row_blocks(x) for x in tensors]
    per = min(b.shape[1] for b in blocks)  # rows per block of the most fragmented layout
    n_rows = tensors[0].shape[:-1].numel()
    for block_start in range(0, n_rows, max(per, 1)):
        block_end = min(n_rows, block_start + per)
        for start in range(block_start, block_end, step):
            end = min(block_end, start + step)
            chunk = []
            for b in blocks:
                i, r = divmod(start, b.shape[1])
                chunk.append(b[i, r:r + (end - start)])
            yield slice(start, end), chunk


class ChunkedKDLoss(torch.autograd.Function):
    """``kd_loss`` over row chunks: each chunk's loss and closed-form gradient are computed
    in the forward and written into one preallocated gradient, and the chunk's intermediates
    are freed before the next. Peak extra memory is the gradient (input dtype) plus one
    chunk's working set (~10 chunk-sized float32 tensors), instead of the several (N, V)
    float32 intermediates that autograd of the naive expression keeps alive.

    The backward scales the stored gradient by ``grad_output`` in place and hands it over,
    so it can run once: backward through the loss a second time (``retain_graph=True``)
    raises. Use the reference ``kd_loss`` when that is needed.
    """

    @classmethod
    def apply(cls, student_logits, teacher_logits, labels, cfg: KDConfig):
        # Under no_grad (evaluation) a Function's forward still sees needs_input_grad set from
        # requires_grad: the value alone is computed here, with no (N, V) gradient buffer.
        if torch.is_grad_enabled():
            return super().apply(student_logits, teacher_logits, labels, cfg)
        return cls.run(student_logits, teacher_logits, labels, cfg, False, False)[0]

    @staticmethod
    def run(student_logits, teacher_logits, labels, cfg: KDConfig, need_s: bool, need_t: bool):
        """(the loss, (student gradient or None, teacher gradient or None)) for
        grad_output = 1, the gradients as contiguous (N, V) tensors."""
        vocab = student_logits.shape[-1]
        lead = student_logits.shape[:-1]
        y = labels.reshape(-1) if labels is not None else None
        n_rows = lead.numel()
        dtype = compute_dtype(student_logits.dtype, teacher_logits.dtype)
        device = student_logits.device

        count, row_scale = chunk_row_scale(y, n_rows, cfg, dtype, device)

        grad_s = empty_rows(student_logits, n_rows) if need_s else None
        grad_t = empty_rows(teacher_logits, n_rows) if need_t else None
        rows_out = torch.empty(n_rows, dtype=dtype, device=device)
        for sl, (s_c, t_c) in row_chunks((student_logits, teacher_logits), chunk_rows(vocab)):
            rows_out[sl] = chunk_loss_and_grads(
                s_c.detach(), t_c.detach(), y[sl] if y is not None else None, cfg,
                row_scale, grad_s[sl] if need_s else None, grad_t[sl] if need_t else None,
            )
        if cfg.reduction == "none":
            return rows_out.reshape(lead), (grad_s, grad_t)
        return reduce_rows(rows_out, count, cfg.reduction), (grad_s, grad_t)

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, cfg: KDConfig):
        loss, (grad_s, grad_t) = ChunkedKDLoss.run(student_logits, teacher_logits, labels, cfg,
                                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.grads = (grad_s, grad_t)
        ctx.shapes = (student_logits.shape, teacher_logits.shape)
        ctx.reduction = cfg.reduction
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return (*hand_over_grads(ctx, grad_loss, "kd_loss(backend='torch')"), None, None)


def grad_once_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name} computes its gradient in the forward pass and hands it over in the first "
        "backward; a second backward through the same loss (retain_graph=True) is not "
        "supported. Recompute the loss instead."
    )


def hand_over_grads(ctx, grad_loss, name: str):
    """The backward of a Function that computed its (student, teacher) gradients in the
    forward (``ctx.grads``, ``ctx.shapes``, ``ctx.reduction``): scaled by grad_output in
    place and handed over, once."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise grad_once_error(name)
    out = []
    for grad, shape in zip(grads, ctx.shapes):
        if grad is not None:
            _scale_rows_(grad, grad_loss, ctx.reduction)
            grad = grad.view(shape)
        out.append(grad)
    return out


def _scale_rows_(grad: torch.Tensor, grad_loss: torch.Tensor, reduction: str):
    """grad[i] *= grad_loss (scalar) or grad_loss[i] (reduction='none'), in float32, in
    place, chunk by chunk. Skipped when grad_loss is known to be 1 without a device sync."""
    g = grad_loss.reshape(-1, 1) if reduction == "none" else grad_loss.reshape(1, 1)
    if g.device.type == "cpu" and (g.item() == 1.0 if g.numel() == 1 else bool((g == 1).all())):
        return
    g = g.to(compute_dtype(grad.dtype))
    step = chunk_rows(grad.shape[-1])
    for start in range(0, grad.shape[0], step):
        sl = slice(start, min(grad.shape[0], start + step))
        g_c = g if g.shape[0] == 1 else g[sl]
        grad[sl] = grad[sl].to(g.dtype) * g_c
