"""uld_loss / linear_uld_loss (Universal Logit Distillation): the reference, then every backend
against it.

Loss and gradients of each backend are compared with the float64 reference on the same
(rounded) inputs, allowing what float32 itself achieves on the case (the reference run in
float32, its error against float64 measured per case) plus one rounding of the output dtype:
    |out - gt| <= 4 |ref32 - gt|_max + eps(dtype) |gt| + 1e-6 |gt|_max + atol
(+ two float16 subnormal steps).
Outputs are poisoned with NaN before the kernels write them (conftest). Under the Triton
interpreter the shapes stay tiny (V <= 300, a few rows).
"""
import math
import os
from types import SimpleNamespace

import pytest
import torch

import pydistill as pdl
from pydistill.reference import uld as U

from conftest import DEVICE, available_backends, peer
from test_softmax_divergence import _gen, logits, make_labels

BACKENDS = available_backends("uld_loss")
LINEAR_BACKENDS = available_backends("linear_uld_loss")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
OUT_EPS = {torch.float64: 0.0, torch.float32: 0.0, torch.float16: 2.0**-9,
           torch.bfloat16: 2.0**-6 if INTERPRETED else 2.0**-7}
# float16's subnormal step, twice: the torch backend stores the gradient in the input dtype in
# the forward and scales it by grad_output (up to 2.25 here) in the backward, so a gradient in
# the subnormal range is rounded to that step, the rounding error scaled, and rounded again.
OUT_ATOL = {torch.float16: 2.0 * 2.0**-24}


# ---------------------------------------------------------------------------------------------
# helpers (random logits: test_softmax_divergence's)
# ---------------------------------------------------------------------------------------------


def reference(student, teacher, labels, cfg, grad_out, dtype):
    s = student.detach().to(dtype).requires_grad_()
    t = teacher.detach().to(dtype).requires_grad_()
    loss = U.uld_loss(s, t, labels, cfg)
    gs, gt = torch.autograd.grad(loss, [s, t], grad_out.to(dtype))
    return loss.detach(), gs, gt


def assert_close(what, out, gt, refs32, out_dtype, atol=0.0):
    out, gt = out.double(), gt.double()
    refs32 = [r.double() for r in refs32]
    assert out.shape == gt.shape, f"{what}: shape {tuple(out.shape)} != {tuple(gt.shape)}"
    if gt.numel() == 0:
        return
    err32 = max(float(torch.nan_to_num((r - gt).abs().max(), nan=0.0)) for r in refs32)
    tol = (4 * err32 + OUT_EPS[out_dtype] * gt.abs() + 1e-6 * gt.abs().max()
           + OUT_ATOL.get(out_dtype, 1e-30) + atol)
    bad = ~((out - gt).abs() <= tol)  # NaN counts as bad
    if bad.any():
        i = bad.nonzero()[0].tolist()
        pytest.fail(f"{what}: {int(bad.sum())}/{bad.numel()} elements off; first at {i}: got "
                    f"{out[tuple(i)].item():.8g}, want {gt[tuple(i)].item():.8g} (tol "
                    f"{tol[tuple(i)].item():.3g}, float32 reference error {err32:.3g})")


def check_against_reference(backend, student, teacher, labels=None, *, teacher_grad=True,
                            grad_out=None, **kw):
    """uld_loss on ``backend`` against the reference: loss, student and teacher gradients."""
    cfg = pdl.functional.uld_config(**kw)
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = pdl.uld_loss(s, t, labels=labels, backend=backend, **kw)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    if grad_out is None:
        grad_out = torch.rand(loss.shape, generator=_gen(99)).to(DEVICE) * 2 + 0.25
    inputs = [s, t] if teacher_grad else [s]
    grads = torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype))
    for g, x in zip(grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape
    gt = reference(student, teacher, labels, cfg, grad_out, torch.float64)
    ref32 = reference(student, teacher, labels, cfg, grad_out, torch.float32)
    assert_close("loss", loss.detach(), gt[0], [ref32[0]], loss.dtype, atol=1e-7)
    assert_close("grad student", grads[0], gt[1], [ref32[1]], student.dtype)
    if teacher_grad:
        assert_close("grad teacher", grads[1], gt[2], [ref32[2]], teacher.dtype)
    return loss, grads


def brute_force_w1(q_row, p_row, top_k=None):
    """The definition, one row at a time in Python floats: sort each, pad, sum |diff|."""
    q = sorted(q_row.tolist(), reverse=True)
    p = sorted(p_row.tolist(), reverse=True)
    if top_k is not None:
        q, p = q[:top_k], p[:top_k]
    n = max(len(q), len(p))
    q, p = q + [0.0] * (n - len(q)), p + [0.0] * (n - len(p))
    return sum(abs(a - b) for a, b in zip(q, p))


# ---------------------------------------------------------------------------------------------
# the reference itself
# ---------------------------------------------------------------------------------------------

GRADCHECK = [
    dict(vs=7, vt=11),
    dict(vs=11, vt=6, top_k=4, temperature=2.5, reduction="sum"),
    dict(vs=9, vt=9, top_k=9, temperature=0.7, student_softcap=2.0, teacher_logit_scale=0.6,
         reduction="none"),
]


@pytest.mark.parametrize("case", GRADCHECK, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_reference_gradcheck_float64(case):
    case = dict(case)
    vs, vt = case.pop("vs"), case.pop("vt")
    cfg = U.ULDConfig(**case)
    s = logits((3, vs), torch.float64, scale=1.5, seed=1).cpu().requires_grad_()
    t = logits((3, vt), torch.float64, scale=1.5, seed=2).cpu().requires_grad_()
    y = torch.tensor([2, -100, 1])
    assert torch.autograd.gradcheck(lambda a, b: U.uld_loss(a, b, y, cfg), (s, t))


@pytest.mark.parametrize("vs,vt,top_k", [(13, 13, None), (9, 17, None), (17, 9, None), (17, 9, 5)])
def test_reference_is_the_definition(vs, vt, top_k):
    s, t = logits((4, vs), torch.float64, seed=3), logits((4, vt), torch.float64, seed=4)
    T = 1.7
    cfg = U.ULDConfig(temperature=T, top_k=top_k, reduction="none")
    q, p = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    want = torch.tensor([brute_force_w1(q[i], p[i], top_k) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(U.uld_loss(s, t, None, cfg).cpu(), want, rtol=1e-12, atol=1e-15)


def test_reference_properties():
    s, t = logits((5, 23), torch.float64, seed=5), logits((5, 31), torch.float64, seed=6)
    full = U.uld_loss(s, t, None, U.ULDConfig(reduction="none"))
    # vocabulary-agnostic: relabelling either model's tokens changes nothing
    perm_s, perm_t = torch.randperm(23, generator=_gen(1)), torch.randperm(31, generator=_gen(2))
    torch.testing.assert_close(U.uld_loss(s[:, perm_s], t[:, perm_t], None, U.ULDConfig(reduction="none")), full)
    # symmetric, bounded by 2, 0 against itself
    torch.testing.assert_close(U.uld_loss(t, s, None, U.ULDConfig(reduction="none")), full)
    assert ((full >= 0) & (full <= 2)).all()
    assert U.uld_loss(s, s, None, U.ULDConfig()).item() == 0.0
    # top_k: the first k terms, no renormalisation; a lower bound that grows with k
    prev = torch.zeros(5, dtype=torch.float64, device=DEVICE)
    for k in (1, 5, 23):
        part = U.uld_loss(s, t, None, U.ULDConfig(top_k=k, reduction="none"))
        assert (part >= prev).all() and (part <= full + 1e-15).all()
        prev = part
    same = logits((5, 23), torch.float64, seed=7)
    torch.testing.assert_close(U.uld_loss(s, same, None, U.ULDConfig(top_k=23)),
                               U.uld_loss(s, same, None, U.ULDConfig()))


def test_reference_transforms_and_reductions():
    s, t = logits((2, 3, 19), torch.float64, seed=8), logits((2, 3, 12), torch.float64, seed=9)
    y = make_labels((2, 3), 5, ignore=(1, 4))
    cfg = U.ULDConfig(temperature=2.0, student_logit_scale=0.5, student_softcap=3.0,
                      teacher_softcap=4.0, reduction="none")
    rows = U.uld_loss(s, t, y, cfg)
    zs, zt = 3.0 * torch.tanh(0.5 * s / 3.0), 4.0 * torch.tanh(t / 4.0)
    want = U.uld_loss(zs, zt, y, U.ULDConfig(temperature=2.0, reduction="none"))
    torch.testing.assert_close(rows, want)
    assert (rows.reshape(-1)[[1, 4]] == 0).all()
    total = rows.sum()
    for red, value in [("sum", total), ("mean", total / 4), ("batchmean", total / 4)]:
        got = U.uld_loss(s, t, y, U.ULDConfig(temperature=2.0, student_logit_scale=0.5,
                                               student_softcap=3.0, teacher_softcap=4.0, reduction=red))
        torch.testing.assert_close(got, value)
    none_count = U.uld_loss(s, t, torch.full_like(y, -100), U.ULDConfig())
    assert none_count.item() == 0.0


def test_matches_trl_gold_uld_loss():
    """TRL GOLD's ULDLoss (positional alignment, its two temperatures, no CE) against uld_loss
    with temperature = T_s, teacher_logit_scale = T_s / T_t: loss and student gradient."""
    peer("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold.gold_trainer import ULDLoss as GoldULD

    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=2.0,
        uld_teacher_temperature=1.25, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False)
    gold = GoldULD(config)
    batch, length, vs, vt = 2, 6, 37, 53
    s = logits((batch, length, vs), seed=10).cpu().requires_grad_()
    t = logits((batch, length, vt), seed=11).cpu()
    labels_s = torch.randint(0, vs, (batch, length), generator=_gen(3))
    labels_t = torch.randint(0, vt, (batch, length), generator=_gen(4))
    want = gold(s, t, labels_s, labels_t, labels_s, labels_t)
    g_want, = torch.autograd.grad(want, s)
    got = pdl.uld_loss(s, t, temperature=2.0, teacher_logit_scale=2.0 / 1.25, backend="torch")
    g_got, = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, want.reshape(()), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# backends against the reference
# ---------------------------------------------------------------------------------------------

CASES = {
    # name: (student shape, V_t, options)
    "vs<vt,full": ((2, 3, 37), 53, dict()),
    "vs>vt,full,T": ((5, 61), 29, dict(temperature=2.5)),
    "vs>vt,topk": ((2, 3, 300), 211, dict(top_k=17)),
    "vs<vt,topk,transforms": ((7, 45), 64, dict(top_k=8, temperature=0.8, student_softcap=4.0,
                                                teacher_logit_scale=1.7, teacher_softcap=6.0)),
    "topk=1,sum": ((4, 33), 40, dict(top_k=1, reduction="sum")),
    "topk=min,none": ((3, 2, 20), 31, dict(top_k=20, reduction="none")),
    "full,none,scale": ((6, 24), 24, dict(reduction="none", student_logit_scale=0.3)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_reference(backend, case):
    shape, vt, opts = CASES[case]
    s = logits(shape, seed=len(case))
    t = logits(shape[:-1] + (vt,), seed=len(case) + 50)
    y = make_labels(shape[:-1], 5, ignore=(1,))
    check_against_reference(backend, s, t, y, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backend_half_inputs(backend, dtype):
    s = logits((4, 70), dtype, seed=20)
    t = logits((4, 90), torch.float32, seed=21)  # the teacher may have another dtype
    check_against_reference(backend, s, t, None, top_k=9, temperature=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [None, 6])
def test_backend_masked_and_extreme_logits(backend, top_k):
    s = logits((5, 40), seed=22)
    t = logits((5, 35), seed=23)
    s[:, 3:9] = -math.inf  # masked / padded vocabulary
    t[:, ::4] = -math.inf
    s[0, :] = s[0, :] * 1e3  # extreme rows: nearly one-hot, logits in the thousands
    t[1, :] = t[1, :] * 1e3 + 5e4
    s[2, 10] = 1e4
    s[3, 30:] = -math.inf  # fewer finite entries than ... still >= top_k
    loss, grads = check_against_reference(backend, s, t, None, top_k=top_k, student_softcap=None)
    assert (grads[0][:, 3:9] == 0).all() and (grads[1][:, ::4] == 0).all()
    assert torch.isfinite(grads[0]).all() and torch.isfinite(grads[1]).all()
    capped = check_against_reference(backend, s, t, None, top_k=top_k, student_softcap=30.0,
                                     teacher_softcap=50.0)[1]
    assert torch.isfinite(capped[0]).all() and (capped[0][:, 3:9] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [None, 6])
def test_backend_softcap_slope_where_the_cap_saturates(backend, top_k):
    """The soft-cap's slope sech^2(y / c) at a saturated cap (|y| >> c): taken from the capped
    z as 1 - (z / c)^2 it cancels (z / c rounds to 1: a relative error up to 1, the gradient
    0); from the uncapped y each entry keeps float32's relative precision. Checked per entry,
    relative to the float64 reference (the comparison with float32 autograd, whose tanh
    backward cancels the same way, cannot see it)."""
    s = logits((3, 40), scale=3.0, seed=60) + 6.0  # z / c = tanh(1.5 ...) up to tanh(5)
    t = logits((3, 50), scale=2.0, seed=61) + 3.0
    kw = dict(temperature=0.05, student_softcap=4.0, teacher_softcap=1.5, top_k=top_k)
    cfg = pdl.functional.uld_config(**kw)
    a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
    grads = torch.autograd.grad(pdl.uld_loss(a, b, backend=backend, **kw), [a, b])
    gt = reference(s, t, None, cfg, torch.ones((), dtype=torch.float64), torch.float64)
    for got, want in zip(grads, gt[1:]):
        normal = want.abs() > 1e-30  # float32's normal range, with room for the products
        rel = (got.double() - want).abs()[normal] / want.abs()[normal]
        assert rel.max() < 1e-4, float(rel.max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_fewer_finite_entries_than_top_k(backend):
    s = logits((3, 30), seed=24)
    t = logits((3, 30), seed=25)
    s[:, 4:] = -math.inf  # 4 finite student entries, top_k 10: ranks 4..9 have probability 0
    check_against_reference(backend, s, t, None, top_k=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_ignored_rows_hold_anything(backend):
    s = logits((6, 25), seed=26)
    t = logits((6, 31), seed=27)
    y = make_labels((6,), 5, ignore=(0, 3, 5))
    s[0], t[3], s[5, 2] = math.nan, math.inf, -math.inf
    for top_k in (None, 4):
        loss, grads = check_against_reference(backend, s, t, y, top_k=top_k)
        assert torch.isfinite(loss).all()
        assert (grads[0][[0, 3, 5]] == 0).all() and (grads[1][[0, 3, 5]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_nothing_counted_and_empty(backend):
    s = logits((3, 12), seed=28).requires_grad_()
    t = logits((3, 15), seed=29)
    none = torch.full((3,), -100, device=DEVICE)
    loss = pdl.uld_loss(s, t, labels=none, top_k=3, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()
    empty_s = torch.randn(0, 12, device=DEVICE, requires_grad=True)
    loss = pdl.uld_loss(empty_s, torch.randn(0, 15, device=DEVICE), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and empty_s.grad.shape == (0, 12)
    nan_row = s.detach().clone()
    nan_row[1, 4] = math.nan
    rows = pdl.uld_loss(nan_row, t, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()  # NaN propagates, per row


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_triton_tiles_and_unfused_selection(backend, monkeypatch):
    """Several vocabulary tiles per row (a running top-k merged across tiles, including the
    tile == K_PAD case), and top_k above the fused limit (selected with torch.topk)."""
    if backend != "triton":
        pytest.skip("Triton-only paths")
    from pydistill.kernels import uld as K

    monkeypatch.setattr(K, "BLOCK_V_OVERRIDE", 16)
    s, t = logits((4, 150), seed=30), logits((4, 97), seed=31)
    # the largest logits at the end of the row: the candidates must be replaced tile after tile
    s = s + torch.linspace(0, 20, 150, device=DEVICE)
    for top_k in (5, 16, 23):
        check_against_reference(backend, s, t, None, top_k=top_k)
    monkeypatch.setattr(K, "MAX_FUSED_TOPK", 4)
    check_against_reference(backend, s, t, None, top_k=7)


@pytest.mark.parametrize("block", [16, 64])
def test_triton_selection_survivors_and_ties(block, monkeypatch):
    """The fused selection keeps a running K-th threshold and merges only the columns at or
    above it (buffered, or a tile's own top K when a tile has many): its values are the top K
    of the transformed logits, largest first, and its ids point at entries holding them, also
    where many entries tie (equal logits, -inf, a saturated soft-cap), ascending rows (every
    column survives) and -0.0 against 0.0."""
    if "triton" not in BACKENDS:
        pytest.skip("Triton-only path")
    from pydistill.kernels import uld as K
    from pydistill.reference.softmax_divergence import transform_logits

    monkeypatch.setattr(K, "BLOCK_V_OVERRIDE", block)
    V = 300
    rows = [logits((V,), seed=40), torch.linspace(-5, 5, V, device=DEVICE),
            torch.full((V,), 1.5, device=DEVICE), logits((V,), seed=41).round(),
            torch.zeros(V, device=DEVICE), logits((V,), seed=42) * 100]
    rows[4][::2] = -0.0
    rows.append(rows[0].clone())
    rows[-1][50:] = -math.inf
    z = torch.stack(rows)
    for k, cap in ((5, None), (17, None), (8, 2.0), (40, None), (150, None)):  # 150: merged by a sort
        stats, vals, raws, ids = K.uld_select(z, None, k, 1.3, 0.7, cap, -100)
        torch.testing.assert_close(raws, z.gather(1, ids), rtol=0, atol=0)
        want = transform_logits(z, 0.7, cap)
        tol = dict(rtol=0, atol=0) if cap is None else dict(rtol=3e-7, atol=0)  # the kernel's tanh
        torch.testing.assert_close(vals, torch.topk(want, k, dim=-1).values, **tol)
        torch.testing.assert_close(want.gather(1, ids), vals, **tol)
        assert all(len(set(r.tolist())) == k for r in ids)  # distinct ids
        m, log_l = U.log_normaliser(want * (1.0 / 1.3))
        torch.testing.assert_close(stats, torch.stack([m, log_l], -1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_scalar_grad_out_and_retain_graph(backend):
    s = logits((5, 40), seed=32).requires_grad_()
    t = logits((5, 33), seed=33)
    loss = pdl.uld_loss(s, t, top_k=6, backend=backend)
    if backend == "torch":  # gradient computed in the forward: handed over once
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            loss.backward()
        return
    g1, = torch.autograd.grad(loss, s, retain_graph=True)
    g2, = torch.autograd.grad(loss, s, torch.tensor(3.0, device=DEVICE))
    torch.testing.assert_close(g2, 3 * g1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_rank_handling_is_caught(backend, monkeypatch):
    """The comparison must be able to fail: a backend that pairs the right probabilities with
    the wrong token ids (the ranked ids reversed) keeps the loss but not the gradient."""
    import pydistill.ops.uld as ops

    def reversed_ids(select):
        def wrapped(*args, **kwargs):
            out = select(*args, **kwargs)
            return out[:-1] + (out[-1].flip(-1).contiguous(),)
        return wrapped

    if backend == "torch":
        monkeypatch.setattr(U, "select_ranked", reversed_ids(U.select_ranked))
    else:
        monkeypatch.setattr(ops, "select", reversed_ids(ops.select))
    s, t = logits((3, 30), seed=34), logits((3, 41), seed=35)
    with pytest.raises(pytest.fail.Exception, match="grad student"):
        check_against_reference(backend, s, t, None, top_k=5)


# ---------------------------------------------------------------------------------------------
# the linear (hidden-state) variant
# ---------------------------------------------------------------------------------------------


def _heads(n, hs, ht, vs, vt, dtype=torch.float32, seed=40):
    g = _gen(seed)
    mk = lambda *shape: (torch.randn(shape, generator=g) / math.sqrt(shape[-1]) * 4).to(dtype=dtype, device=DEVICE)
    return mk(n, hs), mk(vs, hs), mk(vs), mk(n, ht), mk(vt, ht), mk(vt)


LINEAR_CASES = {
    "heads,topk,chunks": dict(teacher="head", top_k=5, chunk_size=3, reduction="mean"),
    "heads,full,none": dict(teacher="head", top_k=None, chunk_size=4, reduction="none",
                            temperature=1.5, student_softcap=5.0),
    "logits,topk,auto": dict(teacher="logits", top_k=7, chunk_size="auto", reduction="sum"),
    "logits,frozen,full": dict(teacher="logits", top_k=None, chunk_size=2, reduction="mean",
                               frozen=True),
}


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_matches_reference(backend, case):
    opts = dict(LINEAR_CASES[case])
    teacher_kind, frozen = opts.pop("teacher"), opts.pop("frozen", False)
    n, vs, vt = 9, 43, 30
    hs_, ws_, bs_, ht_, wt_, bt_ = _heads(n, 8, 12, vs, vt)
    y = make_labels((n,), 5, ignore=(2, 5))
    leaves = dict(student_hidden=hs_, student_weight=ws_, student_bias=bs_)
    if teacher_kind == "head":
        leaves.update(teacher_hidden=ht_, teacher_weight=wt_, teacher_bias=bt_)
    else:
        leaves.update(teacher_logits=logits((n, vt), seed=41))
    grad_names = [k for k in leaves if not (frozen and k == "student_weight")]

    def call(fn, xs, **kw):
        pos = [xs.get("student_hidden"), xs.get("student_weight"), xs.get("teacher_hidden"), xs.get("teacher_weight")]
        rest = {k: v for k, v in xs.items() if k not in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")}
        return fn(*pos, labels=y, **rest, **kw)

    xs = {k: v.clone().requires_grad_(k in grad_names) for k, v in leaves.items()}
    loss = call(pdl.linear_uld_loss, xs, backend=backend, **opts)
    grad_out = torch.rand(loss.shape, generator=_gen(98)).to(DEVICE) + 0.5
    grads = torch.autograd.grad(loss, [xs[k] for k in grad_names], grad_out)
    cfg = pdl.functional.uld_config(**{k: v for k, v in opts.items() if k != "chunk_size"})
    refs = {}
    for dtype in (torch.float64, torch.float32):
        d = {k: v.detach().to(dtype).requires_grad_(k in grad_names) for k, v in leaves.items()}
        r = call(U.linear_uld_loss, d, cfg=cfg)
        refs[dtype] = (r.detach(), torch.autograd.grad(r, [d[k] for k in grad_names], grad_out.to(dtype)))
    assert_close("loss", loss.detach(), refs[torch.float64][0], [refs[torch.float32][0]], torch.float32, atol=1e-7)
    for name, g, g64, g32 in zip(grad_names, grads, refs[torch.float64][1], refs[torch.float32][1]):
        assert g.dtype == leaves[name].dtype
        assert_close(f"grad {name}", g, g64, [g32], torch.float32)


def test_linear_never_forms_full_logits(monkeypatch):
    """With chunk_size C the step only ever sees C rows of logits."""
    seen = []
    step = U.TORCH_STEP

    def spy(s, t, *args, **kw):
        seen.append((s.shape[0], t.shape[0]))
        return step(s, t, *args, **kw)

    monkeypatch.setattr(U, "TORCH_STEP", spy)
    hs, ws, bs, ht, wt, bt = _heads(10, 4, 6, 50, 60)
    pdl.linear_uld_loss(hs.requires_grad_(), ws, ht, wt, top_k=4, chunk_size=3, backend="torch").backward()
    assert seen and max(max(rows) for rows in seen) <= 3 and sum(r for r, _ in seen) == 10


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("teacher", ["head", "logits"])
def test_linear_nan_hidden_states_in_ignored_rows(backend, teacher):
    # NaN / inf hidden states at positions the labels ignore reach no gradient and not the loss
    hs, ws, bs, ht, wt, bt = _heads(9, 4, 6, 30, 40, seed=44)
    tl = torch.randn(9, 40, generator=_gen(45)).to(DEVICE) * 3
    y = make_labels((9,), 30, ignore=(2, 5))
    for value in (math.nan, math.inf):
        results = []
        for poisoned in (False, True):
            leaves = [x.clone().requires_grad_() for x in (hs, ws, bs, ht, wt, bt)]
            if poisoned:
                with torch.no_grad():
                    leaves[0][[2, 5]] = value
                    leaves[3][[2, 5]] = value
            t_kw = (dict(teacher_hidden=leaves[3], teacher_weight=leaves[4], teacher_bias=leaves[5])
                    if teacher == "head" else dict(teacher_logits=tl))
            loss = pdl.linear_uld_loss(leaves[0], leaves[1], student_bias=leaves[2], labels=y,
                                       top_k=5, chunk_size=4, backend=backend, **t_kw)
            used = [x for x in leaves if teacher == "head" or x is leaves[0] or x is leaves[1] or x is leaves[2]]
            results.append((loss.detach(), torch.autograd.grad(loss, used)))
        (want, want_g), (got, got_g) = results
        torch.testing.assert_close(got, want)
        for a, b in zip(got_g, want_g):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# modules, dispatch, bad input
# ---------------------------------------------------------------------------------------------


def test_modules_are_the_functions():
    s, t = logits((4, 20), seed=50), logits((4, 26), seed=51)
    y = make_labels((4,), 5, ignore=(2,))
    mod = pdl.ULDLoss(temperature=1.5, top_k=3, teacher_softcap=8.0, backend="torch")
    torch.testing.assert_close(mod(s, t, y), pdl.uld_loss(s, t, labels=y, temperature=1.5, top_k=3,
                                                          teacher_softcap=8.0, backend="torch"))
    assert "top_k=3" in repr(mod)
    hs, ws, bs, ht, wt, bt = _heads(4, 5, 6, 20, 26)
    lin = pdl.LinearULDLoss(top_k=3, chunk_size=2, backend="torch")
    torch.testing.assert_close(lin(hs, ws, ht, wt, student_bias=bs, labels=y),
                               pdl.linear_uld_loss(hs, ws, ht, wt, student_bias=bs, labels=y, top_k=3,
                                                   backend="torch"))
    assert "chunk_size=2" in repr(lin)
    with pytest.raises(ValueError, match="top_k"):
        pdl.ULDLoss(top_k=0)


def test_dispatch():
    x = torch.empty(2, 5)
    assert pdl.resolve_backend("uld_loss", x, x) == "torch"
    assert pdl.resolve_backend("linear_uld_loss", x, x) == "torch"
    if "triton" in BACKENDS:
        with pytest.raises(TypeError, match="float64"):
            pdl.resolve_backend("uld_loss", x.double(), backend="triton")


def _s():
    return logits((3, 10), seed=60)


def _t():
    return logits((3, 14), seed=61)


BAD_INPUTS = [
    (lambda: pdl.uld_loss(_s(), _t(), top_k=0), ValueError, ["top_k", ">= 1", "0"]),
    (lambda: pdl.uld_loss(_s(), _t(), top_k=11), ValueError, ["top_k", "min(V_s, V_t) = 10", "11"]),
    (lambda: pdl.uld_loss(_s(), _t(), top_k=2.0), TypeError, ["top_k", "int", "float"]),
    (lambda: pdl.uld_loss(_s(), _t(), temperature=0.0), ValueError, ["temperature", "> 0"]),
    (lambda: pdl.uld_loss(_s(), _t(), temperature=math.inf), ValueError, ["temperature", "finite"]),
    (lambda: pdl.uld_loss(_s(), _t(), student_logit_scale=-1.0), ValueError, ["student_logit_scale"]),
    (lambda: pdl.uld_loss(_s(), _t(), teacher_softcap=0.0), ValueError, ["teacher_softcap", "> 0"]),
    (lambda: pdl.uld_loss(_s(), _t(), reduction="avg"), ValueError, ["reduction", "'avg'"]),
    (lambda: pdl.uld_loss(_s(), _t(), backend="jax"), ValueError, ["backend", "'jax'"]),
    (lambda: pdl.uld_loss(_s(), logits((4, 14))), ValueError, ["teacher_logits", "(3,)", "(4, 14)"]),
    (lambda: pdl.uld_loss(_s(), _t()[:, :0]), ValueError, ["teacher_logits", "V_t >= 1"]),
    (lambda: pdl.uld_loss(_s().long(), _t()), TypeError, ["student_logits", "floating", "torch.int64"]),
    (lambda: pdl.uld_loss(_s(), [1.0]), TypeError, ["teacher_logits", "torch.Tensor", "list"]),
    (lambda: pdl.uld_loss(_s(), _t(), labels=torch.zeros(3, dtype=torch.float32, device=DEVICE)),
     TypeError, ["labels", "int64", "float32"]),
    (lambda: pdl.uld_loss(_s(), _t(), labels=torch.zeros(4, dtype=torch.int64, device=DEVICE)),
     ValueError, ["labels", "(3,)", "(4,)"]),
    (lambda: pdl.linear_uld_loss(*_heads(3, 4, 5, 10, 12)[:2], teacher_logits=_t(), top_k=11),
     ValueError, ["top_k", "min(V_s, V_t) = 10"]),
    (lambda: pdl.linear_uld_loss(*_heads(3, 4, 5, 10, 12)[:2]), ValueError, ["teacher", "neither"]),
    (lambda: pdl.linear_uld_loss(*_heads(3, 4, 5, 10, 12)[:2], _heads(3, 4, 5, 10, 12)[3]),
     ValueError, ["teacher_weight", "required"]),
    (lambda: pdl.linear_uld_loss(*_heads(3, 4, 5, 10, 12)[:2], teacher_logits=logits((2, 12))),
     ValueError, ["teacher_logits", "(3,)", "(2, 12)"]),
    (lambda: pdl.linear_uld_loss(_heads(3, 4, 5, 10, 12)[0], _heads(3, 5, 5, 10, 12)[1], teacher_logits=_t()),
     ValueError, ["student_weight", "(V, 4)"]),
    (lambda: pdl.linear_uld_loss(*_heads(3, 4, 5, 10, 12)[:2], teacher_logits=_t(), chunk_size="tiled"),
     ValueError, ["chunk_size", "tiled"]),
    (lambda: pdl.linear_uld_loss(*_heads(3, 4, 5, 10, 12)[:2], teacher_logits=_t(), chunk_size=0),
     ValueError, ["chunk_size", "positive"]),
    (lambda: pdl.linear_uld_loss(*_heads(3, 4, 5, 10, 12)[:2], teacher_logits=_t(),
                                 teacher_bias=torch.zeros(14)), ValueError, ["teacher_bias"]),
]


@pytest.mark.parametrize("call,exc,words", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), (w, str(info.value))
