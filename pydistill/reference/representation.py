"""Representation distillation (attention transfer, FitNets hints, relational KD): the math,
written once. It is the only implementation of this family (a few GEMMs and elementwise
ops: no kernel would pay for itself yet), so it is at once the API's backend and the oracle.

Attention transfer (Zagoruyko & Komodakis, ICLR 2017), features (B, C, *spatial)::

    at(x)  = normalize(mean_c |x|^p, flattened per sample)      (L2, eps 1e-12)
    code:  mean over (b, position) of (at(s) - at(t))^2          (the authors' utils.py)
    paper: mean over b of || at(s)_b - at(t)_b ||_2  (not squared; paper's Eq. 2 without beta/2)

FitNets hint (Romero et al., ICLR 2015)::

    mean over elements of (r(s) - t)^2,   r = regressor (identity when None)

Relational KD (Park et al., CVPR 2019), embeddings flattened to (B, D)::

    d_ij   = ||x_i - x_j|| (0 on the diagonal),  psi_D = d / mean_{i != j} d_ij
    L_dist = mean over the B^2 pairs of smooth_l1(psi_D(s) - psi_D(t))
    e_ab   = (x_b - x_a) / ||x_b - x_a||  (0 when x_b = x_a),  psi_A(a, b, c) = <e_ab, e_ac>
    L_ang  = mean over the B^3 triplets of smooth_l1(psi_A(s) - psi_A(t))

smooth_l1 with beta = 1: x^2 / 2 if |x| < 1 else |x| - 1/2. These follow torchdistill's
``ATLoss`` / ``RKDLoss`` and its FitNets configurations (``nn.MSELoss``) value for value;
the docstrings of pydistill.functional list where they and the papers differ.

Memory. torchdistill forms the (B, B, D) difference tensor of each model and a (B, B, B)
angle tensor, O(B^2 D + B^3), and a B^3 D-flop batched matmul. Here the angle comes from
the squared distances alone: with D_ab = ||x_a - x_b||^2,

    <x_b - x_a, x_c - x_a> = (D_ab + D_ac - D_bc) / 2
    psi_A(a, b, c)         = (D_ab + D_ac - D_bc) / 2 * u_ab * u_ac,   u_ab = D_ab^(-1/2)

so after one (B, D) x (D, B) Gram matrix only B x B quantities are needed. The B^3 triplet
values are produced ``ANGLE_BLOCK_ELEMENTS`` at a time (a block of anchors a), in the forward
and again in the backward (``RKDAngleLoss``): extra memory O(B^2), compute O(B^2 D + B^3).

Precision of the Gram form: D_ab carries an absolute rounding error of a few
eps * (||x_a||^2 + ||x_b||^2) (where the direct difference has eps * ||x||), so the embeddings
are centred first (every RKD term is translation-invariant) and a pair whose squared
distance is within ``COINCIDENT_ULPS`` such roundings of 0 counts as coincident: its
direction is 0, and so are the triplets using it and their gradient. In float32 that is a
pair closer than about 2e-3 times the (centred) embedding norm; in float64, 1e-7.
torchdistill instead gives such a pair its rounded direction (and for an exact duplicate,
direction 0 with a gradient scaled by 1 / 1e-12 through ``F.normalize``'s eps).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pydistill._utils import autocast_off, float32_backward

AT_MODES = ("code", "paper")
# F.normalize's eps, as in torchdistill's at(); and the squared-distance floor of its pdist.
NORMALIZE_EPS = 1e-12
DISTANCE_EPS = 1e-12
# (anchors in a block) x B x B triplet values per block of the angle term; about six such
# temporaries live at once.
ANGLE_BLOCK_ELEMENTS = 1 << 18
# A pair is coincident when D_ab <= COINCIDENT_ULPS * eps(dtype) * (|x_a|^2 + |x_b|^2).
COINCIDENT_ULPS = 16


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _smooth_l1(x: torch.Tensor) -> torch.Tensor:
    """Huber with beta = 1 (torch's smooth_l1_loss, reduction 'none'); NaN propagates."""
    ax = x.abs()
    return torch.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


# ---------------------------------------------------------------------------------------------
# attention transfer
# ---------------------------------------------------------------------------------------------


def attention_map(features: torch.Tensor, p: float = 2.0, dtype=None) -> torch.Tensor:
    """at(x): (B, C, *spatial) -> (B, prod(spatial)), the channel mean of |x|^p, L2-normalised
    per sample (eps 1e-12: an all-zero map stays 0). p = 2 is x^2 (torchdistill's pow(2)).

    Scale-safe: with c_b the largest |x| of sample b (a constant for autograd; 1 where it is 0
    or not finite) and v = c^p w, w the map of x / c,

        at = v / max(|v|, eps) = w / max(|w|, eps / c^p)

    so |x|^p neither overflows (features of 1e20 in float32) nor underflows, and the value
    and gradient are those of the formula (both sides are identities in c)."""
    x = features.to(dtype or compute_dtype(features.dtype))
    if x.numel() == 0:  # nothing to scale (and no maximum to take)
        return F.normalize(x.abs().pow(p).mean(1).flatten(1), p=2.0, dim=1, eps=NORMALIZE_EPS)
    c = x.detach().abs().flatten(1).amax(1)
    c = torch.where(torch.isfinite(c) & (c > 0), c, 1.0)
    y = x / c.view(-1, *([1] * (x.dim() - 1)))
    a = y.pow(2) if p == 2 else y.abs().pow(p)
    w = a.mean(1).flatten(1)
    floor = (NORMALIZE_EPS ** (1.0 / p) / c).pow(p).clamp(max=torch.finfo(w.dtype).max)
    return w / torch.maximum(torch.linalg.vector_norm(w, dim=1, keepdim=True), floor[:, None])


def attention_transfer_pair(student: torch.Tensor, teacher: torch.Tensor, p: float, mode: str):
    """The loss of one (student, teacher) feature pair; 0 for an empty batch."""
    dtype = compute_dtype(student.dtype, teacher.dtype)
    diff = attention_map(student, p, dtype) - attention_map(teacher, p, dtype)
    if mode == "code":
        return diff.pow(2).sum() / max(diff.numel(), 1)
    if mode == "paper":
        return torch.linalg.vector_norm(diff, dim=1).sum() / max(diff.shape[0], 1)
    raise ValueError(f"mode: expected one of {AT_MODES}, got {mode!r}")


def attention_transfer_loss(student_features, teacher_features, p: float = 2.0, mode: str = "code"):
    """One pair (tensors), or the sum over pairs (sequences of tensors, one per layer)."""
    if isinstance(student_features, torch.Tensor):
        with autocast_off(student_features.device):
            return attention_transfer_pair(student_features, teacher_features, p, mode)
    with autocast_off(student_features[0].device):
        losses = [attention_transfer_pair(s, t, p, mode)
                  for s, t in zip(student_features, teacher_features)]
        return torch.stack(losses).sum()


# ---------------------------------------------------------------------------------------------
# FitNets hint
# ---------------------------------------------------------------------------------------------


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
              regressor: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """mean((regressor(s) - t)^2); 0 when there are no elements. The regressor runs under the
    caller's autocast (it is a layer of the student), the loss in float32."""
    s = student_features if regressor is None else regressor(student_features)
    dtype = compute_dtype(s.dtype, teacher_features.dtype)
    with autocast_off(s.device):
        diff = s.to(dtype) - teacher_features.to(dtype)
        return diff.pow(2).sum() / max(diff.numel(), 1)


# ---------------------------------------------------------------------------------------------
# relational KD
# ---------------------------------------------------------------------------------------------


def centred(embeddings: torch.Tensor, dtype) -> torch.Tensor:
    """(B, ...) -> (B, D) in ``dtype``, minus its batch mean (RKD is translation-invariant;
    centring keeps the Gram form's rounding relative to the spread, not the offset)."""
    x = embeddings.flatten(1).to(dtype)
    return x - x.mean(0, keepdim=True)


def squared_distances(x: torch.Tensor):
    """D_ij = |x_i|^2 + |x_j|^2 - 2 <x_i, x_j> (exactly 0 on the diagonal, may round below 0
    elsewhere), and the squared norms |x_i|^2."""
    sq = x.pow(2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d2.masked_fill(eye, 0.0), sq


def unit_scale(x: torch.Tensor):
    """(x / c, c) with c the largest |entry| of the centred (B, D) ``x`` (a constant for
    autograd; 1 where it is 0 or not finite, so NaN and inf still propagate). Every RKD
    relation is scale-invariant (the distance floor aside, which ``distances`` rescales), so
    the terms are computed on x / c: embeddings of any scale, 1e-20 or 1e20, neither underflow
    D^(-3/2) to NaN gradients nor overflow the Gram matrix."""
    c = x.detach().abs().amax()
    c = torch.where(torch.isfinite(c) & (c > 0), c, 1.0)
    return x / c, c


def distances(x: torch.Tensor, scale=None) -> torch.Tensor:
    """torchdistill's pdist: sqrt(max(D_ij, 1e-12)), 0 on the diagonal (no gradient there).
    With ``scale`` c, ``x`` is y / c of embeddings y and the result is pdist(y) / c: the floor
    becomes 1e-12 / c^2 (capped at the dtype's largest value: at a scale that small every
    distance is floored, and all of them are equal)."""
    d2, _ = squared_distances(x)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    if scale is None:
        return d2.clamp(min=DISTANCE_EPS).sqrt().masked_fill(eye, 0.0)
    floor = (DISTANCE_EPS ** 0.5 / scale).square().clamp(max=torch.finfo(x.dtype).max)
    return torch.maximum(d2, floor).sqrt().masked_fill(eye, 0.0)


def rkd_distance_loss(student_x: torch.Tensor, teacher_x: torch.Tensor, student_scale=None,
                      teacher_scale=None) -> torch.Tensor:
    """Distance term on centred (B, D) inputs, B >= 2 (divided by ``*_scale``, if given, by
    ``unit_scale``: psi_D does not change). The mean of the positive distances is the mean
    over the B (B - 1) off-diagonal pairs: the 1e-12 floor keeps each of them > 0."""
    b = student_x.shape[0]
    ds, dt = distances(student_x, student_scale), distances(teacher_x, teacher_scale)
    pairs = b * (b - 1)
    ds = ds / (ds.sum() / pairs)
    dt = dt / (dt.sum() / pairs)
    return _smooth_l1(ds - dt).sum() / (b * b)


def _inverse_distances(d2: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """u_ab = D_ab^(-1/2), and 0 for coincident pairs (the diagonal, and pairs within the Gram
    form's rounding of 0). NaN stays NaN (a comparison with NaN is False)."""
    eps = torch.finfo(d2.dtype).eps
    tol = (COINCIDENT_ULPS * eps) * (sq[:, None] + sq[None, :])
    coincident = d2 <= tol
    coincident.fill_diagonal_(True)
    return torch.where(coincident, 0.0, d2.clamp(min=torch.finfo(d2.dtype).tiny).rsqrt())


def _collinear(psi: torch.Tensor, sq: torch.Tensor, u: torch.Tensor, lo: int, hi: int):
    """Triplets of the block (anchors [lo, hi)) whose |psi_A| is within the Gram form's
    rounding of 1: x_a, x_b, x_c on a line, where the true gradient of psi_A is 0 (cos is
    extremal there; its size is sqrt(1 - psi^2) / distance) but the chain through D and u
    leaves rounding noise. The rounding of N = D_ab + D_ac - D_bc is a few
    eps (|x_a|^2 + |x_b|^2 + |x_c|^2), so that of psi_A is that times u_ab u_ac / 2."""
    eps = torch.finfo(psi.dtype).eps
    rows_u = u[lo:hi]
    norms = sq[lo:hi, None, None] + sq[None, :, None] + sq[None, None, :]
    tol = (COINCIDENT_ULPS * eps) * norms * rows_u[:, :, None] * rows_u[:, None, :]
    return (1.0 - psi.abs()) <= tol


def _angle_block(d2: torch.Tensor, u: torch.Tensor, lo: int, hi: int):
    """For anchors a in [lo, hi): N[a, b, c] = D_ab + D_ac - D_bc and
    psi_A[a, b, c] = N / 2 * u_ab * u_ac, each (hi - lo, B, B)."""
    rows_d, rows_u = d2[lo:hi], u[lo:hi]
    n = rows_d[:, :, None] + rows_d[:, None, :] - d2[None, :, :]
    return n, 0.5 * n * rows_u[:, :, None] * rows_u[:, None, :]


def angle_block_rows(batch: int) -> int:
    return max(1, ANGLE_BLOCK_ELEMENTS // (batch * batch))


def _angle_grad_block(g, n, d2, u, lo, hi, grad_d2, grad_u):
    """Accumulate d loss / d D and d loss / d u of one model from g = d loss / d psi_A of the
    block (anchors [lo, hi)). psi = N / 2 * u_ab * u_ac, N = D_ab + D_ac - D_bc."""
    rows_u = u[lo:hi]
    h = 0.5 * g * rows_u[:, :, None] * rows_u[:, None, :]  # d loss / d N
    grad_d2[lo:hi] += h.sum(2) + h.sum(1)
    grad_d2 -= h.sum(0)
    m = 0.5 * g * n  # d loss / d (u_ab u_ac)
    grad_u[lo:hi] += torch.bmm(m, rows_u[:, :, None]).squeeze(2)
    grad_u[lo:hi] += torch.bmm(rows_u[:, None, :], m).squeeze(1)


def _grad_embeddings(x, d2, u, grad_d2, grad_u):
    """Chain d loss / d u (u = D^(-1/2) off the coincident pairs) and d loss / d D back to x
    through D_ij = |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>."""
    w = grad_d2 - 0.5 * grad_u * u.pow(3)  # du/dD = -u^3 / 2, and u = 0 where coincident
    w = w + w.T
    return 2.0 * (w.sum(1, keepdim=True) * x - w @ x)


class RKDAngleLoss(torch.autograd.Function):
    """The RKD angle term of centred (B, D_s) and (B, D_t) embeddings (same dtype), computed
    from their squared distances in blocks of anchors; the backward recomputes each block.
    Extra memory O(B^2) besides the inputs; no (B, B, D) or (B, B, B) tensor."""

    @staticmethod
    def forward(ctx, student_x, teacher_x):
        b = student_x.shape[0]
        ds2, sq_s = squared_distances(student_x)
        dt2, sq_t = squared_distances(teacher_x)
        us, ut = _inverse_distances(ds2, sq_s), _inverse_distances(dt2, sq_t)
        total = student_x.new_zeros(())
        step = angle_block_rows(b)
        for lo in range(0, b, step):
            hi = min(lo + step, b)
            _, psi_s = _angle_block(ds2, us, lo, hi)
            _, psi_t = _angle_block(dt2, ut, lo, hi)
            total = total + _smooth_l1(psi_s - psi_t).sum()
        ctx.save_for_backward(student_x, teacher_x, ds2, us, dt2, ut, sq_s, sq_t)
        return total / (b ** 3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with autocast_off(grad_out.device):  # a backward run under autocast: float32 GEMMs
            return RKDAngleLoss._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        student_x, teacher_x, ds2, us, dt2, ut, sq_s, sq_t = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[:2]
        b = student_x.shape[0]
        scale = grad_out / (b ** 3)
        gd_s, gu_s = torch.zeros_like(ds2), torch.zeros_like(us)
        gd_t, gu_t = torch.zeros_like(dt2), torch.zeros_like(ut)
        step = angle_block_rows(b)
        for lo in range(0, b, step):
            hi = min(lo + step, b)
            n_s, psi_s = _angle_block(ds2, us, lo, hi)
            n_t, psi_t = _angle_block(dt2, ut, lo, hi)
            # smooth_l1'(x) = clamp(x, -1, 1); NaN stays NaN
            g = (psi_s - psi_t).clamp(-1.0, 1.0) * scale
            # collinear triplets: no gradient (exactly, not rounding noise)
            if need_s:
                g_s = g.masked_fill(_collinear(psi_s, sq_s, us, lo, hi), 0.0)
                _angle_grad_block(g_s, n_s, ds2, us, lo, hi, gd_s, gu_s)
            if need_t:
                g_t = (-g).masked_fill(_collinear(psi_t, sq_t, ut, lo, hi), 0.0)
                _angle_grad_block(g_t, n_t, dt2, ut, lo, hi, gd_t, gu_t)
        grad_s = _grad_embeddings(student_x, ds2, us, gd_s, gu_s) if need_s else None
        grad_t = _grad_embeddings(teacher_x, dt2, ut, gd_t, gu_t) if need_t else None
        return grad_s, grad_t


def rkd_angle_loss(student_x: torch.Tensor, teacher_x: torch.Tensor) -> torch.Tensor:
    """Angle term on centred (B, D) inputs of one dtype."""
    return RKDAngleLoss.apply(student_x, teacher_x)


def rkd_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor,
             distance_weight: float = 1.0, angle_weight: float = 2.0) -> torch.Tensor:
    """distance_weight * L_dist + angle_weight * L_ang of (B, ...) embeddings, B >= 2. A term
    whose weight is 0 is not computed (as in torchdistill)."""
    dtype = compute_dtype(student_embeddings.dtype, teacher_embeddings.dtype)
    with autocast_off(student_embeddings.device):  # the Gram matrices stay float32
        s, scale_s = unit_scale(centred(student_embeddings, dtype))
        t, scale_t = unit_scale(centred(teacher_embeddings, dtype))
        loss = s.new_zeros(())
        if distance_weight != 0.0:
            # plain autograd, whose backward runs with autocast off too (float32 Gram GEMMs)
            loss = loss + distance_weight * float32_backward(
                lambda a, b: rkd_distance_loss(a, b, scale_s, scale_t), s, t)
        if angle_weight != 0.0:
            loss = loss + angle_weight * rkd_angle_loss(s, t)
        return loss
