"""Per-model logit transforms (z = cap(a z) before the temperature, each model its own a and c)
and the student entropy of ``linear_kd_loss(return_entropy=True)``.

The option matrices of test_softmax_divergence / test_topk_divergence / test_linear_kd /
test_linear_kd_tiled / test_cuda_ext run every backend against the float64 reference with
transforms too (their "scales", "caps", "scale+cap", "teacher_cap" option sets). Here: the
reference itself, checked against identities that do not go through it (a scale is a
temperature, a soft-cap is a pre-transformed input) and by gradcheck; every backend on one
mixed-family case per loss; the entropy; the errors.
"""
import math

import pytest
import torch

import pydistill as pdl
from pydistill.reference import linear_kd as RL
from pydistill.reference import softmax_divergence as R
from pydistill.reference import topk_divergence as RT

from conftest import DEVICE, available_backends
from test_softmax_divergence import DIVERGENCES, _gen, logits, make_labels

BACKENDS = available_backends()
TOPK_BACKENDS = available_backends("topk_kd_loss")
LINEAR_BACKENDS = available_backends("linear_kd_loss")

GEMMA_INTO_COHERE = dict(student_logit_scale=0.0625, teacher_softcap=30.0)
MIXED = dict(student_logit_scale=0.7, teacher_logit_scale=1.9, student_softcap=5.0,
             teacher_softcap=8.0)


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


# ---------------------------------------------------------------------------------------------
# the reference, independently
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_scale_is_a_temperature(divergence):
    """Without a soft-cap, scaling both models' logits by a is the temperature T / a (the soft
    term; t2 off so that T^2 does not differ)."""
    s, t = logits((4, 33), torch.float64, seed=1), logits((4, 33), torch.float64, seed=2)
    a, temp = 0.4, 1.3
    got = R.kd_loss(s, t, None, R.KDConfig(divergence=divergence, temperature=temp, t2=False,
                                             student_logit_scale=a, teacher_logit_scale=a))
    want = R.kd_loss(s, t, None, R.KDConfig(divergence=divergence, temperature=temp / a, t2=False))
    torch.testing.assert_close(got, want)
    # one model scaled alone is the same as handing it pre-scaled logits
    got = R.kd_loss(s, t, None, R.KDConfig(divergence=divergence, teacher_logit_scale=2.5))
    torch.testing.assert_close(got, R.kd_loss(s, 2.5 * t, None, R.KDConfig(divergence=divergence)))


def test_transform_order_and_hard_term():
    """scale first, then the cap, then T; the hard CE sees the student's transform at T = 1."""
    s, t = logits((5, 40), torch.float64, seed=3), logits((5, 40), torch.float64, seed=4)
    y = make_labels((5,), 40, ignore=(1,))
    cfg = R.KDConfig(temperature=2.0, hard_weight=0.4, **MIXED)
    z_s = 5.0 * torch.tanh(0.7 * s / 5.0)
    z_t = 8.0 * torch.tanh(1.9 * t / 8.0)
    want = R.kd_loss(z_s, z_t, y, R.KDConfig(temperature=2.0, hard_weight=0.4))
    torch.testing.assert_close(R.kd_loss(s, t, y, cfg), want)
    # the other order (cap, then scale) is a different function: the test can tell them apart
    wrong = R.kd_loss(0.7 * 5.0 * torch.tanh(s / 5.0), 1.9 * 8.0 * torch.tanh(t / 8.0), y,
                      R.KDConfig(temperature=2.0, hard_weight=0.4))
    assert not torch.allclose(wrong, want)
    # and the student's transform is not the teacher's
    swapped = R.KDConfig(temperature=2.0, hard_weight=0.4, student_logit_scale=1.9,
                         teacher_logit_scale=0.7, student_softcap=8.0, teacher_softcap=5.0)
    assert not torch.allclose(R.kd_loss(s, t, y, swapped), want)


def test_reference_gradcheck():
    s, t = logits((3, 11), torch.float64, seed=5), logits((3, 11), torch.float64, seed=6)
    y = make_labels((3,), 11)
    for div in ("kl", "jsd", "tvd"):
        cfg = R.KDConfig(divergence=div, temperature=1.5, hard_weight=0.3, **MIXED)
        assert torch.autograd.gradcheck(lambda a, b: R.kd_loss(a, b, y, cfg), _leaves(s, t))
    lp, idx = torch.log_softmax(t, -1).topk(4, dim=-1)
    cfg = RT.TopKConfig(student_logit_scale=0.6, student_softcap=2.0, hard_weight=0.5)
    assert torch.autograd.gradcheck(lambda a: RT.topk_kd_loss(a, lp, idx, y, cfg), _leaves(s))


# ---------------------------------------------------------------------------------------------
# every backend on a mixed-family case
# ---------------------------------------------------------------------------------------------


def _close(got, want, what, atol=2e-5, rtol=2e-4):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["gemma_into_cohere", "mixed", "teacher_only"])
def test_kd_loss_backends(backend, case):
    kw = {"gemma_into_cohere": GEMMA_INTO_COHERE, "mixed": MIXED,
          "teacher_only": dict(teacher_logit_scale=3.0, teacher_softcap=1.5)}[case]
    s = logits((6, 97), torch.float32, scale=8.0, seed=7)
    t = logits((6, 97), torch.float32, scale=8.0, seed=8)
    s[0, :5] = t[0, :5] = -math.inf  # masked vocabulary in both
    s[2, 3] = 80.0  # extreme logits: saturate the caps
    t[3, 9] = -60.0
    y = make_labels((6,), 97, ignore=(4,))
    y[0] = 10
    for div in ("kl", "jsd", "skew_reverse_kl"):
        opts = dict(divergence=div, temperature=1.7, hard_weight=0.25, **kw)
        a, b = _leaves(s, t)
        ref = R.kd_loss(a.double(), b.double(), y, R.KDConfig(**opts))
        ga, gb = torch.autograd.grad(ref, (a, b))
        x, z = _leaves(s, t)
        loss = pdl.kd_loss(x, z, labels=y, backend=backend, **opts)
        gx, gz = torch.autograd.grad(loss, (x, z))
        _close(loss, ref, f"{div} loss")
        _close(gx, ga, f"{div} grad student")
        _close(gz, gb, f"{div} grad teacher")


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_topk_kd_loss_backends(backend):
    s = logits((5, 80), torch.float32, scale=6.0, seed=9)
    t = logits((5, 80), torch.float32, scale=6.0, seed=10)
    lp, idx = torch.log_softmax(t.double(), -1).topk(7, dim=-1)
    y = make_labels((5,), 80, ignore=(2,))
    for tail in RT.TAILS:
        opts = dict(tail=tail, temperature=1.4, teacher_temperature=1.0, hard_weight=0.3,
                    student_logit_scale=0.5, student_softcap=4.0)
        (a,) = _leaves(s)
        ref = RT.topk_kd_loss(a.double(), lp, idx, y, RT.TopKConfig(**opts))
        (ga,) = torch.autograd.grad(ref, (a,))
        (x,) = _leaves(s)
        loss = pdl.topk_kd_loss(x, lp.float(), idx, labels=y, backend=backend, **opts)
        (gx,) = torch.autograd.grad(loss, (x,))
        _close(loss, ref, f"{tail} loss")
        _close(gx, ga, f"{tail} grad")
    # the shorthand means the student's cap here
    a = pdl.topk_kd_loss(s, lp.float(), idx, softcap=3.0, backend=backend, teacher_temperature=1.0)
    b = pdl.topk_kd_loss(s, lp.float(), idx, student_softcap=3.0, backend=backend, teacher_temperature=1.0)
    torch.testing.assert_close(a, b)


def _head(rows, hidden, vocab, seed, scale=0.5):
    g = _gen(seed)
    h = (torch.randn(rows, hidden, generator=g) * scale).to(DEVICE)
    w = (torch.randn(vocab, hidden, generator=g) * scale).to(DEVICE)
    b = (torch.randn(vocab, generator=g) * 0.3).to(DEVICE)
    return h, w, b


LINEAR_PATHS = [(b, c) for b in LINEAR_BACKENDS for c in ([7, "tiled"] if b == "triton" else [7])]


@pytest.mark.parametrize("backend,chunk_size", LINEAR_PATHS)
@pytest.mark.parametrize("teacher_kind", ["head", "logits"])
def test_linear_kd_loss_backends(backend, chunk_size, teacher_kind):
    n, v_s, v_t = 19, 45, 41
    h, w, b = _head(n, 12, v_s, seed=11, scale=1.2)
    h_t, w_t, b_t = _head(n, 9, v_t, seed=12, scale=1.5)
    t_logits = (h_t @ w_t.T + b_t)
    teacher = dict(teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t) if teacher_kind == "head" \
        else dict(teacher_logits=t_logits)
    y = make_labels((n,), min(v_s, v_t), ignore=(3, 8))
    for div, red in (("kl", "mean"), ("jsd", "sum"), ("skew_kl", "none")):
        opts = dict(divergence=div, temperature=1.3, hard_weight=0.2, reduction=red, **MIXED)
        hs, bs = _leaves(h, b)
        ref = RL.linear_kd_loss(hs.double(), w.double(), student_bias=bs.double(), labels=y,
                                cfg=R.KDConfig(**opts), **{k: x.double() for k, x in teacher.items()})
        weight = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).view(ref.shape)
        g_ref = torch.autograd.grad((ref * weight).sum(), (hs, bs))
        hx, bx = _leaves(h, b)
        loss, ent = pdl.linear_kd_loss(hx, w, student_bias=bx, labels=y, chunk_size=chunk_size,
                                       backend=backend, return_entropy=True, **teacher, **opts)
        g = torch.autograd.grad((loss * weight.to(loss.dtype)).sum(), (hx, bx))
        _close(loss, ref, f"{div} loss")
        for name, got, want in zip(("hidden", "bias"), g, g_ref):
            _close(got, want, f"{div} grad {name}")
        # the entropy of the student's transformed, tempered distribution; 0 on ignored rows
        z = R.transform_logits(h.double() @ w.double().T + b.double(), 0.7, 5.0) / 1.3
        log_q = torch.log_softmax(z, -1)
        want = -(log_q.exp() * log_q).sum(-1)
        want = torch.where(y != -100, want, 0.0)
        assert ent.shape == (n,) and not ent.requires_grad
        _close(ent, want, "entropy")


@pytest.mark.parametrize("backend,chunk_size", LINEAR_PATHS)
def test_entropy_changes_nothing_else(backend, chunk_size):
    """return_entropy returns the same loss and gradients, for a CE-only loss too (no
    divergence term: the entropy comes from the student's own statistics)."""
    h, w, _ = _head(10, 8, 30, seed=13)
    h_t, w_t, _ = _head(10, 8, 30, seed=14)
    y = make_labels((10,), 30, ignore=(0,))
    for opts in (dict(temperature=2.0), dict(soft_weight=0.0, hard_weight=1.0, temperature=0.5)):
        outs = []
        for entropy in (False, True):
            (x,) = _leaves(h)
            out = pdl.linear_kd_loss(x, w, h_t, w_t, labels=y, chunk_size=chunk_size,
                                     backend=backend, return_entropy=entropy, **opts)
            loss = out[0] if entropy else out
            outs.append((loss.detach(), torch.autograd.grad(loss, x)[0]))
            if entropy:
                z = h.double() @ w.double().T / opts["temperature"]
                log_q = torch.log_softmax(z, -1)
                want = torch.where(y != -100, -(log_q.exp() * log_q).sum(-1), 0.0)
                _close(out[1], want, "entropy")
        torch.testing.assert_close(outs[1], outs[0])


def test_modules_carry_the_transforms():
    s, t = logits((4, 20), torch.float32, seed=15), logits((4, 20), torch.float32, seed=16)
    m = pdl.KDLoss(temperature=2.0, **MIXED, backend="torch")
    torch.testing.assert_close(m(s, t), pdl.kd_loss(s, t, temperature=2.0, **MIXED, backend="torch"))
    assert "student_logit_scale=0.7" in repr(m) and "teacher_softcap=8.0" in repr(m)
    assert "logit_scale" not in repr(pdl.KDLoss())
    h, w, _ = _head(4, 6, 20, seed=17)
    lin = pdl.LinearKDLoss(chunk_size=3, backend="torch", return_entropy=True, **MIXED)
    loss, ent = lin(h, w, teacher_logits=t)
    torch.testing.assert_close(loss, pdl.linear_kd_loss(h, w, teacher_logits=t, chunk_size=3,
                                                        backend="torch", **MIXED))
    assert ent.shape == (4,)
    lp, idx = torch.log_softmax(t, -1).topk(5, dim=-1)
    topk = pdl.TopKKDLoss(student_logit_scale=0.5, softcap=3.0, backend="torch", teacher_temperature=1.0)
    torch.testing.assert_close(topk(s, lp, idx), pdl.topk_kd_loss(
        s, lp, idx, student_logit_scale=0.5, student_softcap=3.0, backend="torch", teacher_temperature=1.0))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(softcap=30.0, student_softcap=20.0), "softcap: the shorthand.*student_softcap=20.0"),
    (dict(softcap=30.0, teacher_softcap=20.0), "softcap: the shorthand.*teacher_softcap=20.0"),
    (dict(student_logit_scale=-1.0), r"student_logit_scale: expected a number > 0.0, got -1.0"),
    (dict(teacher_logit_scale=0.0), r"teacher_logit_scale: expected a number > 0.0, got 0.0"),
    (dict(teacher_logit_scale=math.inf), "teacher_logit_scale: expected a finite number"),
    (dict(student_softcap=0.0), r"student_softcap: expected a number > 0.0"),
    (dict(teacher_softcap=-3.0), r"teacher_softcap: expected a number > 0.0"),
])
def test_bad_transforms(kwargs, match):
    s, t = logits((2, 8), torch.float32, seed=18), logits((2, 8), torch.float32, seed=19)
    with pytest.raises(ValueError, match=match):
        pdl.kd_loss(s, t, **kwargs)
    with pytest.raises(ValueError, match=match):
        pdl.KDLoss(**kwargs)
    h, w, _ = _head(2, 4, 8, seed=20)
    with pytest.raises(ValueError, match=match):
        pdl.linear_kd_loss(h, w, teacher_logits=t, **kwargs)


def test_bad_transform_types_and_topk_teacher():
    s, t = logits((2, 8), torch.float32, seed=21), logits((2, 8), torch.float32, seed=22)
    with pytest.raises(TypeError, match="student_logit_scale: expected a Python float, got Tensor"):
        pdl.kd_loss(s, t, student_logit_scale=torch.tensor(2.0))
    lp, idx = torch.log_softmax(t, -1).topk(3, dim=-1)
    with pytest.raises(TypeError, match="teacher_logit_scale"):
        pdl.topk_kd_loss(s, lp, idx, teacher_logit_scale=2.0, teacher_temperature=1.0)
    with pytest.raises(ValueError, match="softcap: the shorthand for student_softcap"):
        pdl.topk_kd_loss(s, lp, idx, softcap=2.0, student_softcap=3.0, teacher_temperature=1.0)
    with pytest.raises(ValueError, match="teacher_softcap: a top-k teacher"):
        pdl.TopKKDLoss(teacher_softcap=2.0, teacher_temperature=1.0)
    h, w, _ = _head(2, 4, 8, seed=23)
    with pytest.raises(ValueError, match="teacher_logit_scale / teacher_softcap: a top-k teacher"):
        pdl.linear_kd_loss(h, w, teacher_topk=(lp, idx), teacher_softcap=5.0)
    with pytest.raises(ValueError, match="return_entropy: not supported with teacher_topk"):
        pdl.linear_kd_loss(h, w, teacher_topk=(lp, idx), return_entropy=True)
    with pytest.raises(TypeError, match="return_entropy: expected a bool"):
        pdl.linear_kd_loss(h, w, teacher_logits=t, return_entropy=1)
    with pytest.raises(ValueError, match="softcap: give it or the per-model"):
        R.KDConfig(softcap=2.0, teacher_softcap=3.0)
    with pytest.raises(AttributeError):
        R.KDConfig(softcap=2.0).softcap  # noqa: B018  (the per-model fields hold it)


# ---------------------------------------------------------------------------------------------
# the soft-cap's slope where the cap saturates
# ---------------------------------------------------------------------------------------------

SATURATED_BACKENDS = BACKENDS
SATURATED_TOPK = [b for b in BACKENDS if b in TOPK_BACKENDS]


def _entrywise_rel(got, want):
    """The largest relative error of one gradient against the float64 one, entry by entry over
    float32's normal range (with room for the products): a saturated cap's slope is tiny, so a
    norm-wise comparison cannot see it wrong."""
    normal = want.abs() > 1e-30
    return float(((got.double() - want).abs()[normal] / want.abs()[normal]).max())


def _saturating(shape, seed):
    """Logits of magnitude ~10 - 40: cap(y) / c = tanh(y / 4) rounds to 1 in float32 from
    |y| ~ 36 (and 1 - (cap(y) / c)^2 keeps few digits well before)."""
    x = logits(shape, scale=14.0, seed=seed)
    return x.sign() * (x.abs() + 8.0)


SATURATED = dict(student_softcap=4.0, student_logit_scale=1.0)


@pytest.mark.parametrize("backend", SATURATED_BACKENDS)
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_kd_loss_softcap_slope_where_the_cap_saturates(backend, temperature):
    """d cap(y) / dy = sech^2(y / c) taken from the uncapped y keeps float32's relative
    precision per entry; from the capped z as 1 - (z / c)^2 it cancels (the gradient 0 where
    z / c rounds to 1). Student and teacher gradients, against the float64 reference."""
    s, t = _saturating((4, 64), seed=70), _saturating((4, 64), seed=71)
    y = make_labels((4,), 64, ignore=(2,))
    for div in ("kl", "jsd"):
        opts = dict(divergence=div, temperature=temperature, hard_weight=0.3, teacher_softcap=6.0,
                    teacher_logit_scale=1.5, **SATURATED)
        a, b = _leaves(s, t)
        ref = R.kd_loss(a.double(), b.double(), y, R.KDConfig(**opts))
        ga, gb = torch.autograd.grad(ref, (a, b))
        x, z = _leaves(s, t)
        gx, gz = torch.autograd.grad(pdl.kd_loss(x, z, labels=y, backend=backend, **opts), (x, z))
        assert _entrywise_rel(gx, ga) < 1e-3, (div, "student", _entrywise_rel(gx, ga))
        assert _entrywise_rel(gz, gb) < 1e-3, (div, "teacher", _entrywise_rel(gz, gb))


@pytest.mark.parametrize("backend", SATURATED_TOPK)
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_topk_kd_loss_softcap_slope_where_the_cap_saturates(backend, temperature):
    s, t = _saturating((4, 64), seed=72), logits((4, 64), scale=4.0, seed=73)
    lp, idx = torch.log_softmax(t.double(), -1).topk(9, dim=-1)
    y = make_labels((4,), 64, ignore=(1,))
    for tail in RT.TAILS:
        opts = dict(tail=tail, temperature=temperature, teacher_temperature=1.0, hard_weight=0.3,
                    **SATURATED)
        (a,) = _leaves(s)
        ref = RT.topk_kd_loss(a.double(), lp, idx, y, RT.TopKConfig(**opts))
        (ga,) = torch.autograd.grad(ref, (a,))
        (x,) = _leaves(s)
        (gx,) = torch.autograd.grad(
            pdl.topk_kd_loss(x, lp.float(), idx, labels=y, backend=backend, **opts), (x,))
        assert _entrywise_rel(gx, ga) < 1e-3, (tail, _entrywise_rel(gx, ga))


@pytest.mark.parametrize("backend,chunk_size", LINEAR_PATHS)
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_linear_kd_loss_softcap_slope_where_the_cap_saturates(backend, chunk_size, temperature):
    """The student's logit gradient seen through the bias: one row, so the bias gradient is that
    row's gradient entry by entry (the hidden state's sums over the vocabulary would hide the
    saturated entries, whose slopes are tiny)."""
    h, w, _ = _head(1, 8, 48, seed=74, scale=0.3)
    b = _saturating((1, 48), seed=75)[0]
    t_logits = _saturating((1, 48), seed=76)
    y = make_labels((1,), 48)
    opts = dict(temperature=temperature, hard_weight=0.3, teacher_softcap=6.0, **SATURATED)
    hs, bs = _leaves(h, b)
    ref = RL.linear_kd_loss(hs.double(), w.double(), student_bias=bs.double(), labels=y,
                            cfg=R.KDConfig(**opts), teacher_logits=t_logits.double())
    (g_ref,) = torch.autograd.grad(ref, (bs,))
    hx, bx = _leaves(h, b)
    loss = pdl.linear_kd_loss(hx, w, student_bias=bx, labels=y, chunk_size=chunk_size,
                              teacher_logits=t_logits, backend=backend, **opts)
    (g,) = torch.autograd.grad(loss, (bx,))
    assert _entrywise_rel(g, g_ref) < 1e-3, _entrywise_rel(g, g_ref)
