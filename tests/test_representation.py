"""Representation distillation (attention transfer, FitNets hints, RKD) against torchdistill.

Two oracles, both in float64: an independent transcription of torchdistill's formulas in
their direct form (below; always run, so a checkout without torchdistill still checks the
conventions), and torchdistill's own ``ATLoss`` / ``RKDLoss`` / ``nn.MSELoss`` when it is
installed. The transcription forms the (B, B, D) differences and (B, B, B) angles that the
implementation avoids, so the two share no code path for the angle term.
"""
import pytest
import torch
import torch.nn.functional as F

import pydistill as pdl
from pydistill.reference import representation as R

from conftest import DEVICE, peer

F64 = torch.float64


def randn(*shape, dtype=F64, seed=0, scale=1.0):
    """Fresh random values (never zeros), made in float64 on the CPU, then cast and moved."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype=dtype, device=DEVICE)


def leaf(x):
    return x.detach().clone().requires_grad_()


def value_and_grads(fn, *inputs):
    """fn's value and its gradient with respect to every input (fresh leaves, float64 copies
    when ``inputs`` are float64)."""
    xs = [leaf(x) for x in inputs]
    out = fn(*xs)
    return out.detach(), torch.autograd.grad(out, xs)


# ---------------------------------------------------------------------------------------------
# torchdistill's formulas, transcribed in their direct form
# ---------------------------------------------------------------------------------------------


def td_at_code(s, t):
    at = lambda x: F.normalize(x.pow(2).mean(1).flatten(1))  # noqa: E731
    return (at(s) - at(t)).pow(2).mean()


def td_at_paper(s, t):
    at = lambda x: F.normalize(x.pow(2).sum(1).flatten(1))  # noqa: E731
    return torch.norm(at(s) - at(t), dim=1).sum() / s.shape[0]


def td_pdist(e):
    d = (e[:, None, :] - e[None, :, :]).pow(2).sum(2).clamp(min=1e-12).sqrt()
    return d * (1 - torch.eye(len(e), dtype=e.dtype, device=e.device))


def td_rkd(s, t, dist_factor=1.0, angle_factor=2.0, teacher_const=True):
    """RKD as torchdistill computes it (teacher under no_grad unless ``teacher_const`` is
    False), distances and angles from explicit differences."""
    s, t = s.flatten(1), t.flatten(1)

    def dist_rel(e):
        d = td_pdist(e)
        return d / d[d > 0].mean()

    def angles(e):
        n = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
        return torch.bmm(n, n.transpose(1, 2)).reshape(-1)

    with torch.set_grad_enabled(not teacher_const and torch.is_grad_enabled()):
        t_d, t_a = dist_rel(t), angles(t)
    return (dist_factor * F.smooth_l1_loss(dist_rel(s), t_d)
            + angle_factor * F.smooth_l1_loss(angles(s), t_a))


# ---------------------------------------------------------------------------------------------
# agreement with the transcription (float64)
# ---------------------------------------------------------------------------------------------

AT_SHAPES = [((4, 8, 7, 9), (4, 16, 7, 9)), ((3, 5, 11), (3, 2, 11)), ((2, 3, 4, 5, 6), (2, 7, 4, 5, 6)),
             ((1, 1, 1, 1), (1, 3, 1, 1))]


@pytest.mark.parametrize("mode, oracle", [("code", td_at_code), ("paper", td_at_paper)])
@pytest.mark.parametrize("shapes", AT_SHAPES, ids=str)
def test_attention_transfer_matches_torchdistill_formulas(mode, oracle, shapes):
    s, t = randn(*shapes[0], seed=1), randn(*shapes[1], seed=2)
    out, grads = value_and_grads(lambda a, b: pdl.attention_transfer_loss(a, b, mode=mode), s, t)
    ref, ref_grads = value_and_grads(oracle, s, t)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-14)


def test_attention_transfer_layers_sum_and_p():
    pairs = [(randn(3, 4, 6, 6, seed=1), randn(3, 8, 6, 6, seed=2)),
             (randn(3, 8, 3, 3, seed=3), randn(3, 16, 3, 3, seed=4))]
    for mode, oracle in (("code", td_at_code), ("paper", td_at_paper)):
        out = pdl.attention_transfer_loss([s for s, _ in pairs], [t for _, t in pairs], mode=mode)
        torch.testing.assert_close(out, sum(oracle(s, t) for s, t in pairs), rtol=1e-12, atol=0)
    # p = 4: the channel mean of x^4
    s, t = pairs[0]
    at = lambda x: F.normalize(x.pow(4).mean(1).flatten(1))  # noqa: E731
    torch.testing.assert_close(pdl.attention_transfer_loss(s, t, p=4),
                               (at(s) - at(t)).pow(2).mean(), rtol=1e-12, atol=0)
    assert pdl.AttentionTransferLoss(p=4, mode="paper")(s, t) == pdl.attention_transfer_loss(
        s, t, p=4, mode="paper")


@pytest.mark.parametrize("batch, ds, dt", [(2, 3, 5), (3, 1, 1), (7, 16, 9), (33, 8, 24)])
@pytest.mark.parametrize("weights", [(1.0, 2.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd_matches_torchdistill_formulas(batch, ds, dt, weights):
    s, t = randn(batch, ds, seed=batch, scale=2.0), randn(batch, dt, seed=batch + 1) + 3.0
    out, (gs,) = value_and_grads(
        lambda a: pdl.rkd_loss(a, t, distance_weight=weights[0], angle_weight=weights[1]), s)
    ref, (rgs,) = value_and_grads(lambda a: td_rkd(a, t, *weights), s)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gs, rgs, rtol=1e-8, atol=1e-13)


def test_rkd_blocks_of_anchors(monkeypatch):
    """Blocks of 2 anchors over B = 9 (four full blocks and a remainder) give what one block
    does, forward and backward, student and teacher."""
    s, t = randn(9, 5, seed=3), randn(9, 4, 2, seed=4)
    one, g_one = value_and_grads(pdl.rkd_loss, s, t)
    monkeypatch.setattr(R, "ANGLE_BLOCK_ELEMENTS", 2 * 81)
    assert R.angle_block_rows(9) == 2
    blocked, g_blocked = value_and_grads(pdl.rkd_loss, s, t)
    torch.testing.assert_close(blocked, one, rtol=1e-13, atol=0)
    for a, b in zip(g_blocked, g_one):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-15)


def test_rkd_teacher_gradient_when_it_requires_grad():
    s, t = randn(6, 5, seed=5), randn(6, 3, seed=6)
    _, grads = value_and_grads(pdl.rkd_loss, s, t)
    _, ref = value_and_grads(lambda a, b: td_rkd(a, b, teacher_const=False), s, t)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-13)


def test_rkd_embeddings_are_flattened():
    s, t = randn(5, 2, 3, 4, seed=7), randn(5, 10, seed=8)
    torch.testing.assert_close(pdl.rkd_loss(s, t), pdl.rkd_loss(s.reshape(5, -1), t), rtol=0, atol=0)
    torch.testing.assert_close(pdl.rkd_loss(s, t), td_rkd(s, t), rtol=1e-10, atol=0)


def test_rkd_duplicates_and_coincident_points():
    """Duplicate embeddings: their triplets are 0 in both implementations (equal values); the
    gradient stays finite here (torchdistill's goes through normalize's 1e-12 eps)."""
    s, t = randn(6, 4, seed=9), randn(6, 3, seed=10)
    s[3] = s[1]
    t[5] = t[0]
    out, (gs, gt) = value_and_grads(pdl.rkd_loss, s, t)
    torch.testing.assert_close(out, td_rkd(s, t), rtol=1e-10, atol=0)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    # every point the same: relations are all 0 (directions) or 1 (distances / their mean)
    same = randn(1, 4, seed=11).expand(5, 4)
    out, (g_same, _) = value_and_grads(pdl.rkd_loss, same, randn(5, 3, seed=12))
    assert torch.isfinite(out) and torch.isfinite(g_same).all()
    torch.testing.assert_close(out, td_rkd(same, randn(5, 3, seed=12)), rtol=1e-10, atol=0)


def test_rkd_coincidence_threshold_is_relative_to_the_spread():
    """A pair 1e-4 apart among points ~1 apart is not coincident in float64: its angles count
    and agree with the direct form; in float32 it is below the Gram form's precision and its
    triplets count as 0 (the documented difference)."""
    s, t = randn(5, 3, seed=13), randn(5, 3, seed=14)
    s[4] = s[2] + 1e-4 * randn(3, seed=15)
    torch.testing.assert_close(pdl.rkd_loss(s, t, distance_weight=0.0),
                               td_rkd(s, t, 0.0, 2.0), rtol=1e-6, atol=0)
    x = R.centred(s.float(), torch.float32)
    d2, sq = R.squared_distances(x)
    u = R._inverse_distances(d2, sq)
    assert u[2, 4] == 0 and u[4, 2] == 0 and (u.count_nonzero() == 5 * 4 - 2)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("dim", [1, 3])
def test_rkd_collinear_embeddings_have_no_angle_gradient(dtype, dim):
    """Embeddings on a line: every angle is +-1, an extremum of the cosine, so the angle
    term's gradient is 0 (the float64 direct form gives ~1e-17); the Gram form's chain left
    rounding noise (4e-5 in float32) where it must give 0."""
    line = randn(8, 1, seed=16, scale=3.0) * randn(1, dim, seed=17) + randn(1, dim, seed=18)
    s, t = line.to(dtype), randn(8, 4, seed=19).to(dtype)
    line = s.to(F64)  # the reference on the rounded inputs (no longer exactly on a line)
    _, (g,) = value_and_grads(lambda a: pdl.rkd_loss(a, t, distance_weight=0.0), s)
    _, (ref,) = value_and_grads(lambda a: td_rkd(a, t.to(F64), 0.0, 2.0), line)
    assert g.abs().max() < 1e-15 and ref.abs().max() < (1e-15 if dim == 1 else 1e-5)
    # with the distance term: the float64 direct form's gradient, to the dtype's rounding
    _, (g,) = value_and_grads(lambda a: pdl.rkd_loss(a, t), s)
    _, (ref,) = value_and_grads(lambda a: td_rkd(a, t.to(F64)), line)
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(g.to(F64), ref, rtol=tol, atol=tol * ref.abs().max())


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-20), (torch.float32, 1e-14),
                                          (torch.float32, 1e20), (F64, 1e-160), (F64, 1e160)])
def test_rkd_at_any_scale(dtype, scale):
    """Every RKD relation is scale-invariant: the angle term of x * scale is that of x (float64
    direct form at scale 1; its gradient divided by the scale), where embeddings of 1e-14 had
    NaN gradients and 1e20 a NaN loss in float32. The distance term keeps torchdistill's
    absolute floor (squared distances >= 1e-12): against the float64 direct form at the same
    scale wherever float64 holds it."""
    s, t = randn(6, 5, seed=20), randn(6, 3, seed=21)
    tol = dict(rtol=1e-4, atol=0) if dtype == torch.float32 else dict(rtol=1e-10, atol=0)
    out, (g,) = value_and_grads(lambda a: pdl.rkd_loss(a, t.to(dtype), distance_weight=0.0),
                                (s * scale).to(dtype))
    ref, (ref_g,) = value_and_grads(lambda a: td_rkd(a, t, 0.0, 2.0), s)
    torch.testing.assert_close(out.to(F64), ref, **tol)
    torch.testing.assert_close((g.to(F64) * scale), ref_g, rtol=tol["rtol"],
                               atol=tol["rtol"] * ref_g.abs().max())
    if dtype == torch.float32:
        out, (g,) = value_and_grads(lambda a: pdl.rkd_loss(a, t.to(dtype), angle_weight=0.0),
                                    (s * scale).to(dtype))
        ref, (ref_g,) = value_and_grads(lambda a: td_rkd(a, t, 1.0, 0.0), s * scale)
        torch.testing.assert_close(out.to(F64), ref, **tol)
        torch.testing.assert_close(g.to(F64), ref_g, rtol=1e-4, atol=1e-4 * ref_g.abs().max())


@pytest.mark.parametrize("mode, oracle", [("code", td_at_code), ("paper", td_at_paper)])
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e20), (torch.float32, 1e-5),
                                          (F64, 1e160)])
def test_attention_transfer_at_any_scale(mode, oracle, dtype, scale):
    """|x|^p of features of 1e20 overflows float32 (1e160: float64) where the normalised map
    is finite: the maps are computed from x / max |x| per sample. Against the float64 direct
    form on the same features (at 1e160 that overflows too: then at scale 1, the map being
    scale-invariant, gradient divided by the scale)."""
    s, t = randn(3, 4, 5, 6, seed=22), randn(3, 2, 5, 6, seed=23, scale=2.0)
    ref_scale = scale if dtype == torch.float32 else 1.0
    out, grads = value_and_grads(lambda a, b: pdl.attention_transfer_loss(a, b, mode=mode),
                                 (s * scale).to(dtype), (t * scale).to(dtype))
    ref, ref_grads = value_and_grads(oracle, s * ref_scale, t * ref_scale)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.to(F64), ref, rtol=rtol, atol=0)
    for g, r in zip(grads, ref_grads):
        r = r * (ref_scale / scale)
        torch.testing.assert_close(g.to(F64), r, rtol=rtol, atol=rtol * r.abs().max())


def test_hint_loss_is_mse():
    s, t = randn(3, 5, 4, 4, seed=16), randn(3, 5, 4, 4, seed=17)
    out, grads = value_and_grads(pdl.hint_loss, s, t)
    ref, ref_grads = value_and_grads(lambda a, b: F.mse_loss(a, b), s, t)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-13, atol=0)


def test_hint_regressor_conv_and_linear():
    """The built-in regressor is a 1x1 conv on (B, C, H, W) and a linear map on the last dim
    otherwise, with one weight; HintLoss owns it (it shows up in .parameters())."""
    loss_fn = pdl.HintLoss(6, 10).to(device=DEVICE, dtype=F64)
    reg = loss_fn.regressor
    assert {id(p) for p in loss_fn.parameters()} == {id(reg.weight), id(reg.bias)}
    conv = torch.nn.Conv2d(6, 10, 1).to(device=DEVICE, dtype=F64)
    with torch.no_grad():
        conv.weight.copy_(reg.weight[:, :, None, None])
        conv.bias.copy_(reg.bias)
    s, t = randn(2, 6, 3, 5, seed=18), randn(2, 10, 3, 5, seed=19)
    torch.testing.assert_close(loss_fn(s, t), F.mse_loss(conv(s), t), rtol=1e-13, atol=0)
    s, t = randn(2, 7, 6, seed=20), randn(2, 7, 10, seed=21)
    torch.testing.assert_close(loss_fn(s, t), F.mse_loss(s @ reg.weight.T + reg.bias, t), rtol=1e-13, atol=0)
    loss_fn(s, t).backward()
    assert reg.weight.grad is not None and reg.weight.grad.abs().sum() > 0
    # the function form with a callable; and HintLoss owning a user module
    lin = torch.nn.Linear(6, 10).to(device=DEVICE, dtype=F64)
    torch.testing.assert_close(pdl.hint_loss(s, t, regressor=lin), F.mse_loss(lin(s), t), rtol=1e-13, atol=0)
    assert pdl.HintLoss(regressor=lin).regressor is lin


def test_modules_match_functions():
    s, t = randn(4, 3, 5, 5, seed=22), randn(4, 6, 5, 5, seed=23)
    assert pdl.AttentionTransferLoss()(s, t) == pdl.attention_transfer_loss(s, t)
    e_s, e_t = randn(8, 5, seed=24), randn(8, 7, seed=25)
    assert pdl.RKDLoss(distance_weight=0.5, angle_weight=3.0)(e_s, e_t) == pdl.rkd_loss(
        e_s, e_t, distance_weight=0.5, angle_weight=3.0)
    assert "angle_weight=3.0" in repr(pdl.RKDLoss(angle_weight=3.0))


# ---------------------------------------------------------------------------------------------
# torchdistill itself, when installed
# ---------------------------------------------------------------------------------------------


def test_against_installed_torchdistill():
    mid = peer("torchdistill.losses.mid_level")
    s1, t1 = randn(4, 8, 6, 6, seed=26), randn(4, 16, 6, 6, seed=27)
    s2, t2 = randn(4, 16, 3, 3, seed=28), randn(4, 32, 3, 3, seed=29)
    pairs = {"p1": {"student": {"io": "output", "path": "a"}, "teacher": {"io": "output", "path": "a"}},
             "p2": {"student": {"io": "output", "path": "b"}, "teacher": {"io": "output", "path": "b"}}}
    for mode in ("code", "paper"):
        at = mid.ATLoss(pairs, mode=mode)
        ref, ref_grads = value_and_grads(
            lambda a, b, c, d: at({"a": {"output": a}, "b": {"output": c}},
                                  {"a": {"output": b}, "b": {"output": d}}), s1, t1, s2, t2)
        out, grads = value_and_grads(
            lambda a, b, c, d: pdl.attention_transfer_loss([a, c], [b, d], mode=mode), s1, t1, s2, t2)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-15)

    s, t = randn(12, 2, 3, 3, seed=30, scale=3.0), randn(12, 40, seed=31)
    for weights in ((1.0, 2.0), (25.0, 50.0)):
        rkd = mid.RKDLoss("s", "t", weights[0], weights[1], "mean")
        ref, (ref_g,) = value_and_grads(lambda a: rkd({"s": {"output": a}}, {"t": {"output": t}}), s)
        out, (g,) = value_and_grads(
            lambda a: pdl.rkd_loss(a, t, distance_weight=weights[0], angle_weight=weights[1]), s)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=0)
        torch.testing.assert_close(g, ref_g, rtol=1e-8, atol=1e-14)

    # FitNets: torchdistill wraps nn.MSELoss around the regressor output and the hint layer
    wrapper = mid.SimpleLossWrapper(torch.nn.MSELoss(), input={"is_from_teacher": False, "module_path": "r", "io": "output"},
                                    target={"is_from_teacher": True, "module_path": "h", "io": "output"})
    reg = torch.nn.Conv2d(8, 16, 1).to(device=DEVICE, dtype=F64)
    ref, ref_g = value_and_grads(lambda a: wrapper({"r": {"output": reg(a)}}, {"h": {"output": t1}}, None), s1)
    out, g = value_and_grads(lambda a: pdl.hint_loss(a, t1, regressor=reg), s1)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(g[0], ref_g[0], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# gradcheck, precision, memory
# ---------------------------------------------------------------------------------------------


def test_gradcheck():
    gc = torch.autograd.gradcheck
    s, t = leaf(randn(2, 3, 4, 3, seed=32)), leaf(randn(2, 5, 4, 3, seed=33))
    for mode in R.AT_MODES:
        for p in (2, 3.5):
            assert gc(lambda a, b: pdl.attention_transfer_loss(a, b, p=p, mode=mode), (s, t))
    reg = torch.nn.Linear(4, 6).to(device=DEVICE, dtype=F64)
    h_s, h_t = leaf(randn(3, 2, 4, seed=34)), leaf(randn(3, 2, 6, seed=35))
    assert gc(lambda a, b: pdl.hint_loss(a, b, regressor=reg), (h_s, h_t))
    e_s, e_t = leaf(randn(7, 4, seed=36)), leaf(randn(7, 6, seed=37))
    assert gc(pdl.rkd_loss, (e_s, e_t))
    assert gc(lambda a, b: pdl.rkd_loss(a, b, distance_weight=0.0), (e_s, e_t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_float64(dtype):
    """Half inputs are computed in float32: the loss is float32, gradients come back in the
    input dtype, and both are within float32 error (plus one rounding of the gradient's dtype)
    of the float64 result on the same rounded inputs (float16: plus its subnormal step)."""
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    subnormal = 2.0**-24 if dtype == torch.float16 else 0.0  # float16 gradients this small round to it
    cases = [
        (lambda a, b: pdl.attention_transfer_loss(a, b), (5, 6, 9, 7), (5, 12, 9, 7)),
        (lambda a, b: pdl.attention_transfer_loss(a, b, mode="paper"), (5, 6, 9, 7), (5, 12, 9, 7)),
        (pdl.hint_loss, (4, 5, 3), (4, 5, 3)),
        (pdl.rkd_loss, (24, 32), (24, 48)),
    ]
    for i, (fn, s_shape, t_shape) in enumerate(cases):
        s, t = randn(*s_shape, dtype=dtype, seed=40 + i), randn(*t_shape, dtype=dtype, seed=60 + i)
        out, grads = value_and_grads(fn, s, t)
        gt, gt_grads = value_and_grads(fn, s.to(F64), t.to(F64))
        assert out.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
        torch.testing.assert_close(out.to(F64), gt, rtol=2e-5, atol=0)
        for g, r in zip(grads, gt_grads):
            scale = r.abs().max()
            assert ((g.to(F64) - r).abs() <= 1e-4 * scale + eps * r.abs() + subnormal).all(), (i, (g.to(F64) - r).abs().max() / scale)


def test_rkd_has_no_cubic_or_b_b_d_intermediate(monkeypatch):
    """No tensor made in the forward or backward is as large as B x B x D or B^3 elements:
    the largest is a block of anchors (here 4 x B x B), the inputs, or B x B."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(x, torch.Tensor):
                    Largest.numel = max(Largest.numel, x.numel())
            return out

    b, d = 48, 64
    monkeypatch.setattr(R, "ANGLE_BLOCK_ELEMENTS", 4 * b * b)
    s, t = leaf(randn(b, d, dtype=torch.float32, seed=70)), randn(b, d, dtype=torch.float32, seed=71)
    with Largest():
        pdl.rkd_loss(s, t).backward()
    assert Largest.numel <= max(4 * b * b, b * d), Largest.numel
    # and the transcription does form them (the check can fail)
    Largest.numel = 0
    with Largest():
        td_rkd(s, t).backward()
    assert Largest.numel >= b * b * d


# ---------------------------------------------------------------------------------------------
# edge cases and bad inputs
# ---------------------------------------------------------------------------------------------


def test_empty_batch_is_zero_with_zero_gradient():
    s, t = leaf(randn(0, 3, 4, 4)), randn(0, 5, 4, 4)
    for fn in (lambda a: pdl.attention_transfer_loss(a, t), lambda a: pdl.attention_transfer_loss(a, t, mode="paper"),
               lambda a: pdl.hint_loss(a, torch.zeros_like(a))):
        out = fn(s)
        (g,) = torch.autograd.grad(out, s)
        assert out.item() == 0.0 and g.shape == s.shape


def test_nan_propagates():
    s, t = randn(4, 3, 5, 5, seed=72), randn(4, 6, 5, 5, seed=73)
    s[1, 2, 3, 3] = float("nan")
    for mode in R.AT_MODES:
        assert pdl.attention_transfer_loss(s, t, mode=mode).isnan()
    assert pdl.hint_loss(s, s.detach().clone().nan_to_num()).isnan()
    e_s, e_t = randn(6, 4, seed=74), randn(6, 3, seed=75)
    e_t[2, 1] = float("nan")
    for w in ((1.0, 0.0), (0.0, 1.0), (1.0, 2.0)):
        out = pdl.rkd_loss(leaf(e_s), e_t, distance_weight=w[0], angle_weight=w[1])
        assert out.isnan()


@pytest.mark.parametrize("call, error, pattern", [
    # attention transfer
    (lambda: pdl.attention_transfer_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5)), ValueError,
     r"teacher_features: expected shape \(2, 'C', 4\) .*got \(2, 3, 5\)"),
    (lambda: pdl.attention_transfer_loss(torch.randn(2, 3, 4), torch.randn(3, 3, 4)), ValueError,
     r"teacher_features: expected shape \(2, 'C', 4\)"),
    (lambda: pdl.attention_transfer_loss(torch.randn(2, 3), torch.randn(2, 3)), ValueError,
     r"student_features: expected shape \(B, C, \*spatial\) with at least 3 dims, got \(2, 3\)"),
    (lambda: pdl.attention_transfer_loss(torch.randn(2, 0, 4), torch.randn(2, 3, 4)), ValueError,
     r"student_features: expected C >= 1"),
    (lambda: pdl.attention_transfer_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), p=0), ValueError,
     r"p: expected a number > 0.0, got 0.0"),
    (lambda: pdl.attention_transfer_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), p=-1.5), ValueError,
     r"p: expected a number > 0.0, got -1.5"),
    (lambda: pdl.attention_transfer_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), mode="sum"), ValueError,
     r"mode: expected one of \('code', 'paper'\), got 'sum'"),
    (lambda: pdl.AttentionTransferLoss(mode="Paper"), ValueError, r"mode: expected one of"),
    (lambda: pdl.attention_transfer_loss(torch.randn(2, 3, 4).long(), torch.randn(2, 3, 4)), TypeError,
     r"student_features: expected a floating tensor .* got torch.int64"),
    (lambda: pdl.attention_transfer_loss([torch.randn(2, 3, 4)], torch.randn(2, 3, 4)), TypeError,
     r"teacher_features: expected a list / tuple of tensors"),
    (lambda: pdl.attention_transfer_loss([torch.randn(2, 3, 4)], []), ValueError,
     r"teacher_features: expected 1 feature maps .* got 0"),
    (lambda: pdl.attention_transfer_loss([torch.randn(2, 3, 4)], [torch.randn(2, 3, 5)]), ValueError,
     r"teacher_features\[0\]: expected shape"),
    (lambda: pdl.attention_transfer_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4, device="meta")), ValueError,
     r"teacher_features: expected a tensor on cpu .*got meta"),
    # hint
    (lambda: pdl.hint_loss(torch.randn(2, 3), torch.randn(2, 4)), ValueError,
     r"teacher_features: expected shape \(2, 3\) .*pass regressor=.*HintLoss.*got \(2, 4\)"),
    (lambda: pdl.hint_loss(torch.randn(2, 3), torch.randn(2, 4), regressor=torch.nn.Linear(3, 5)), ValueError,
     r"teacher_features: expected shape \(2, 5\) \(that of regressor\(student_features\)\), got \(2, 4\)"),
    (lambda: pdl.hint_loss(torch.randn(2, 3), torch.randn(2, 4), regressor="conv"), TypeError,
     r"regressor: expected None or a callable.*got str"),
    (lambda: pdl.hint_loss(torch.randn(2, 3), [1.0, 2.0]), TypeError,
     r"teacher_features: expected a torch.Tensor, got list"),
    (lambda: pdl.hint_loss(torch.randn(2, 3), torch.randn(2, 3, device="meta")), ValueError,
     r"teacher_features: expected a tensor on cpu"),
    (lambda: pdl.HintLoss(3, 4)(torch.randn(2, 5, 6, 6), torch.randn(2, 4, 6, 6)), ValueError,
     r"student_features: expected 3 channels in dim 1 .*got shape \(2, 5, 6, 6\)"),
    (lambda: pdl.HintLoss(3), ValueError, r"teacher_channels: required"),
    (lambda: pdl.HintLoss(0, 4), ValueError, r"student_channels: expected a positive int, got 0"),
    (lambda: pdl.HintLoss(3, 4, regressor=torch.nn.Identity()), ValueError, r"regressor: expected either"),
    # rkd
    (lambda: pdl.rkd_loss(torch.randn(4, 3), torch.randn(5, 3)), ValueError,
     r"teacher_embeddings: expected batch size 4 \(that of student_embeddings\), got shape \(5, 3\)"),
    (lambda: pdl.rkd_loss(torch.randn(1, 3), torch.randn(1, 3)), ValueError,
     r"student_embeddings: expected a batch of B >= 2 samples, got shape \(1, 3\)"),
    (lambda: pdl.rkd_loss(torch.randn(0, 3), torch.randn(0, 3)), ValueError,
     r"student_embeddings: expected a batch of B >= 2"),
    (lambda: pdl.rkd_loss(torch.randn(4), torch.randn(4)), ValueError,
     r"student_embeddings: expected shape \(B, D\) or \(B, ...\) with at least 2 dims, got \(4,\)"),
    (lambda: pdl.rkd_loss(torch.randn(4, 0), torch.randn(4, 3)), ValueError,
     r"student_embeddings: expected at least one feature per sample, got shape \(4, 0\)"),
    (lambda: pdl.rkd_loss(torch.randn(4, 3), torch.randn(4, 3), angle_weight=-1), ValueError,
     r"angle_weight: expected a number >= 0.0, got -1.0"),
    (lambda: pdl.rkd_loss(torch.randn(4, 3), torch.randn(4, 3), distance_weight=float("nan")), ValueError,
     r"distance_weight: expected a finite number, got nan"),
    (lambda: pdl.rkd_loss(torch.randn(4, 3), torch.randn(4, 3, device="meta")), ValueError,
     r"teacher_embeddings: expected a tensor on cpu .*got meta"),
    (lambda: pdl.RKDLoss(distance_weight="1"), TypeError, r"distance_weight: expected a Python float, got str"),
])
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
