"""topk_kd_loss: the reference math, then every backend against it.

The method of tests/test_softmax_divergence.py, whose helpers this imports: every backend's
loss and gradient against the float64 reference on the same (rounded) inputs, the allowed
error tied to the float32 error of two PyTorch orderings of the same math on that input
(autograd of the reference in float32, and the torch backend's closed form) plus the output
dtype's rounding; kernel outputs poisoned with NaN (conftest). The student's off-support mass
is exercised where 1 - sum q cancels (the support holding all but ~1e-9 of q), and a test
checks that the naive float32 1 - sum q fails that tolerance, so the test can fail.
"""
import math
import zlib

import pytest
import torch

import pydistill as pdl
from pydistill.reference import softmax_divergence as RK
from pydistill.reference import topk_divergence as R

from conftest import CUDA, DEVICE, available_backends
from test_softmax_divergence import DTYPES, _gen, assert_close, logits, make_labels

BACKENDS = available_backends("topk_kd_loss")
DIVERGENCES = list(pdl.DIVERGENCES)
TAILS = list(pdl.TAILS)


@pytest.fixture
def block_v():
    """Set the top-k kernels' tile size for one test; restored afterwards."""
    from pydistill.kernels import topk_divergence as K  # only imported where Triton runs

    old = K.BLOCK_V_OVERRIDE

    def set_block(value):
        K.BLOCK_V_OVERRIDE = value

    yield set_block
    K.BLOCK_V_OVERRIDE = old


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def topk_teacher(lead, vocab, k, dtype=torch.float32, *, seed=0, t_gen=1.0, scale=3.0):
    """The top-k of fresh random teacher logits at temperature ``t_gen``: (log-probs in
    ``dtype``, int64 ids in a random order within each row, the dense logits)."""
    t = logits(lead + (vocab,), torch.float32, scale=scale, seed=seed)
    lp, idx = torch.log_softmax(t.double() / t_gen, dim=-1).topk(k, dim=-1)
    order = torch.rand(lead + (k,), generator=_gen(seed + 5)).argsort(-1).to(DEVICE)
    return lp.gather(-1, order).to(dtype), idx.gather(-1, order), t


def fields(cfg):
    """topk_kd_loss's keyword arguments of a config (the teacher takes no logit transform)."""
    return {k: v for k, v in RK.config_fields(cfg).items()
            if k not in ("teacher_logit_scale", "teacher_softcap")}


def reference(student, lp, idx, labels, cfg, grad_out, dtype):
    """The reference loss and student gradient in ``dtype``, from the same input values."""
    s = student.detach().to(dtype).requires_grad_()
    loss = R.topk_kd_loss(s, lp.detach().to(dtype), idx, labels, cfg)
    if not loss.requires_grad:  # no term depends on the student (e.g. skew_kl at beta = 1)
        return loss, torch.zeros_like(s)
    g, = torch.autograd.grad(loss, s, grad_out.to(dtype))
    return loss.detach(), g


def float32_references(backend, student, lp, idx, labels, cfg, grad_out):
    """(loss, gradient) from two float32 orderings: autograd of the reference, and (for other
    backends) the torch backend's closed form."""
    refs = [reference(student, lp, idx, labels, cfg, grad_out, torch.float32)]
    if backend != "torch":
        s = student.detach().float().requires_grad_()
        loss = pdl.topk_kd_loss(s, lp.float(), idx, labels=labels, backend="torch", **fields(cfg))
        g, = torch.autograd.grad(loss, s, grad_out.to(loss.dtype))
        refs.append((loss.detach(), g))
    return refs


def smooth_rows(student, lp, idx, cfg):
    """Rows where the gradient is continuous in the inputs: tvd's jumps where an outcome has
    P = Q, which float32 and float64 may resolve differently (test_softmax_divergence)."""
    if cfg.divergence != "tvd":
        return torch.ones(student.shape[:-1], dtype=torch.bool, device=student.device)
    z = cfg.student_transform(student.double())
    log_p, log_q = R.outcome_log_probs(z, lp.double(), idx, cfg)
    p, q = log_p.exp(), log_q.exp()
    tie = (p - q).abs() <= 1e-5 * (p + q)
    return ~(tie & (p + q > 0)).any(-1)


def check_against_reference(backend, student, lp, idx, labels=None, *, grad_out=None, **kw):
    """Run topk_kd_loss on ``backend`` and compare loss and gradient with the reference."""
    cfg = pdl.functional.topk_config(**kw)
    s = student.detach().clone().requires_grad_()
    loss = pdl.topk_kd_loss(s, lp, idx, labels=labels, backend=backend, **kw)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    if grad_out is None:
        grad_out = torch.rand(loss.shape, generator=_gen(99)).to(DEVICE) * 2 + 0.25
    g, = torch.autograd.grad(loss, s, grad_out.to(loss.dtype))
    assert g.dtype == s.dtype and g.shape == s.shape
    gt_loss, gt_g = reference(student, lp, idx, labels, cfg, grad_out, torch.float64)
    refs32 = float32_references(backend, student, lp, idx, labels, cfg, grad_out)
    assert_close("loss", loss.detach(), gt_loss, [r[0] for r in refs32], loss.dtype, atol=1e-7)
    rows = smooth_rows(student, lp, idx, cfg)
    assert_close("grad student", g[rows], gt_g[rows], [r[1][rows] for r in refs32], student.dtype)
    return loss, g


# ---------------------------------------------------------------------------------------------
# the reference itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradcheck_float64(divergence, tail):
    # student and teacher (the reference differentiates both), re-tempered, softcap, hard term
    cfg = R.TopKConfig(divergence=divergence, tail=tail, temperature=1.7, teacher_temperature=1.2,
                       beta=0.3, hard_weight=0.4, softcap=4.0)
    s = logits((3, 9), torch.float64, scale=1.5, seed=1).cpu().requires_grad_()
    lp, idx, _ = topk_teacher((3,), 9, 4, torch.float64, seed=2)
    lp, idx = lp.cpu().requires_grad_(), idx.cpu()
    y = torch.tensor([2, -100, 6])
    assert torch.autograd.gradcheck(lambda a, b: R.topk_kd_loss(a, b, idx, y, cfg), (s, lp))


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("t_gen", [None, 0.7])
def test_full_support_equals_kd_loss_on_the_dense_teacher(backend, tail, t_gen):
    # K = V: no tail, and P = the dense teacher's softmax at T whatever T_gen was (a = T_gen / T
    # re-tempers exactly); every tail then is kd_loss
    vocab, temperature = 33, 2.0
    s = logits((2, 3, vocab), seed=3)
    lp_dtype = torch.float64 if backend == "reference" else torch.float32
    lp, idx, t = topk_teacher((2, 3), vocab, vocab, lp_dtype, seed=4, t_gen=t_gen or temperature)
    y = make_labels((2, 3), vocab, ignore=(4,))
    kw = dict(divergence="jsd", beta=0.3, temperature=temperature, hard_weight=0.2)
    if backend == "reference":
        cfg = R.TopKConfig(tail=tail, teacher_temperature=t_gen, **kw)
        got = R.topk_kd_loss(s.double(), lp.double(), idx, y, cfg)
        want = RK.kd_loss(s.double(), t.double(), y, RK.KDConfig(**kw))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        return
    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    got = pdl.topk_kd_loss(a, lp, idx, labels=y, tail=tail, teacher_temperature=t_gen,
                           backend=backend, **kw)
    want = pdl.kd_loss(b, t, labels=y, backend=backend, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6 * b.grad.abs().max().item())


def test_reference_retempering_is_exact_for_a_uniform_tail():
    # a dense teacher whose missing tokens share one logit: the bucket's re-tempered P (stored
    # at T_gen, used at T) is its softmax at T, the tail being the missing tokens' total
    vocab, k, t_gen, temperature = 40, 6, 0.8, 2.5
    t = logits((3, vocab), torch.float64, seed=5).cpu()
    top = t.topk(k, dim=-1).indices
    t = torch.full_like(t, -1.0).scatter(-1, top, t.gather(-1, top) + 6.0)
    lp = torch.log_softmax(t / t_gen, -1).gather(-1, top)
    cfg = R.TopKConfig(temperature=temperature, teacher_temperature=t_gen)
    log_p, log_p_tail = R.teacher_log_probs(lp, vocab, cfg, torch.float64)
    exact = torch.softmax(t / temperature, -1)
    # to float64 rounding of t = 1 - sum p (relative eps / t, here t ~ 1e-6), raised to the power a
    torch.testing.assert_close(log_p.exp(), exact.gather(-1, top), rtol=1e-10, atol=0)
    torch.testing.assert_close(log_p_tail.exp(), exact.scatter(-1, top, 0.0).sum(-1), rtol=1e-9, atol=0)
    # the rule itself, written out: p'_k = p_k^a / Z, t' = M (t / M)^a / Z
    a, p, m = t_gen / temperature, lp.exp(), vocab - k
    tail = 1 - p.sum(-1)
    z = (p**a).sum(-1) + m * (tail / m) ** a
    torch.testing.assert_close(log_p, torch.log(p**a / z[:, None]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(log_p_tail, torch.log(m * (tail / m) ** a / z), rtol=1e-10, atol=1e-12)


def test_reference_ignore_kl_gradient_is_q_minus_p():
    # DESIGN.md: kl, tail="ignore", teacher probabilities summing to 1 on the support:
    # dD/ds_j = (q_j - p_j) / T on the support and q_j / T elsewhere
    temperature = 1.5
    s = logits((4, 30), torch.float64, seed=6).cpu().requires_grad_()
    idx = torch.rand(4, 30, generator=_gen(7)).argsort(-1)[:, :5]
    lp = torch.log_softmax(torch.randn(4, 5, generator=_gen(8), dtype=torch.float64), -1)
    cfg = R.TopKConfig(tail="ignore", temperature=temperature, t2=False, reduction="sum")
    g, = torch.autograd.grad(R.topk_kd_loss(s, lp, idx, None, cfg), s)
    q = torch.softmax(s.detach() / temperature, -1)
    want = (q - torch.zeros_like(q).scatter(-1, idx, lp.exp())) / temperature
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-15)


def test_reference_renormalize_gradient_lives_on_the_support():
    s = logits((3, 25), torch.float64, seed=9).cpu().requires_grad_()
    lp, idx, _ = topk_teacher((3,), 25, 4, torch.float64, seed=10)
    lp, idx = lp.cpu(), idx.cpu()
    for d in DIVERGENCES:
        cfg = R.TopKConfig(tail="renormalize", divergence=d, temperature=2.0)
        g, = torch.autograd.grad(R.topk_kd_loss(s, lp, idx, None, cfg), s)
        off = torch.ones_like(g, dtype=torch.bool).scatter(-1, idx, False)
        assert (g[off] == 0).all() and (g[~off] != 0).any()


def test_reference_padded_entries_are_zero_probability_tokens():
    s = logits((3, 20), torch.float64, seed=11).cpu()
    lp, idx, _ = topk_teacher((3,), 20, 6, torch.float64, seed=12)
    lp, idx = lp.cpu(), idx.cpu()
    lp[:, 4:] = -math.inf  # two padded candidates per row
    lp[2, :] = -math.inf  # a row with none: all its teacher mass is the tail
    for d in ["kl", "jsd", "tvd", "skew_kl"]:
        for tail in ["bucket", "ignore"]:
            x = s.clone().requires_grad_()
            loss = R.topk_kd_loss(x, lp, idx, None, R.TopKConfig(divergence=d, tail=tail, beta=0.2))
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # kl under ignore: a zero-probability entry adds nothing, it is as if absent
    one = lambda lp_, idx_: R.topk_kd_loss(s[:2], lp_, idx_, None, R.TopKConfig(tail="ignore", reduction="none"))
    torch.testing.assert_close(one(lp[:2], idx[:2]), one(lp[:2, :4], idx[:2, :4]))


# ---------------------------------------------------------------------------------------------
# backends against the reference: the matrix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matrix_divergence_tail(backend, divergence, tail, request):
    # every divergence under every tail, re-tempered (T_gen = 1.5, T = 2), an ignored row
    if backend == "triton":
        request.getfixturevalue("block_v")(64)
    seed = zlib.crc32(f"{divergence}-{tail}".encode()) % 1000
    s = logits((4, 150), seed=seed)
    lp, idx, _ = topk_teacher((4,), 150, 7, seed=seed + 1, t_gen=1.5)
    y = make_labels((4,), 150, ignore=(2,), seed=seed)
    check_against_reference(backend, s, lp, idx, y, divergence=divergence, tail=tail,
                            temperature=2.0, teacher_temperature=1.5, beta=0.3)


LAYOUTS = {
    # name: (student shape, K)
    "rows": ((6, 507), 64),
    "btv": ((2, 3, 257), 7),
    "sliced": ((2, 4, 300), 1),  # student = base[:, :-1] of a (2, 5, 300) tensor: no copy
    "strided": ((3, 2, 130), 7),  # student with a V stride; teacher arrays transposed
}


def layout_inputs(name, dtype, seed):
    (*lead, vocab), k = LAYOUTS[name]
    lead = tuple(lead)
    if name == "sliced":
        s = logits((2, 5, vocab), dtype, seed=seed)[:, :-1]
    elif name == "strided":
        s = logits(lead + (2 * vocab,), dtype, seed=seed)[..., ::2]
    else:
        s = logits(lead + (vocab,), dtype, seed=seed)
    # stored log-probs in the student's dtype, except "btv": float32 beside a half student
    lp_dtype = torch.float32 if name == "btv" else dtype
    if name == "strided":
        lp, idx, _ = topk_teacher(lead[::-1], vocab, k, lp_dtype, seed=seed + 1)
        return s, lp.transpose(0, 1), idx.transpose(0, 1)
    lp, idx, _ = topk_teacher(lead, vocab, k, lp_dtype, seed=seed + 1)
    return s, lp, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matrix_dtype_layout(backend, layout, dtype, request):
    if backend == "triton":
        request.getfixturevalue("block_v")(128)  # ragged multi-tile rows
    i = 3 * list(LAYOUTS).index(layout) + DTYPES.index(dtype)
    divergence, tail = DIVERGENCES[i % 6], TAILS[(i + i // 6) % 3]  # 12 distinct pairs
    s, lp, idx = layout_inputs(layout, dtype, seed=zlib.crc32(f"{layout}-{dtype}".encode()) % 1000)
    y = make_labels(s.shape[:-1], s.shape[-1], ignore=(1,))
    check_against_reference(backend, s, lp, idx, y, divergence=divergence, tail=tail,
                            temperature=2.0, beta=0.3)


OPTION_SETS = {
    "T0.5": dict(temperature=0.5),
    "T4-no_t2": dict(temperature=4.0, t2=False),
    "tgen3": dict(teacher_temperature=3.0),
    "beta0": dict(beta=0.0, temperature=2.0, divergences=("jsd", "skew_kl", "skew_reverse_kl")),
    "beta1": dict(beta=1.0, temperature=2.0, divergences=("jsd", "skew_reverse_kl", "skew_kl")),
    "hard+ignore": dict(temperature=2.0, hard_weight=0.5, soft_weight=0.8, labels="ignore"),
    "hard-T1": dict(hard_weight=0.7, labels="all"),
    "ce_only": dict(soft_weight=0.0, hard_weight=1.0, labels="ignore"),
    "sum": dict(reduction="sum", temperature=1.5),
    "none": dict(reduction="none", labels="ignore", hard_weight=0.3),
    "batchmean": dict(reduction="batchmean", labels="ignore"),
    "softcap": dict(softcap=3.0, temperature=2.0, hard_weight=0.2, labels="all"),
    "scale+cap": dict(student_logit_scale=1.7, student_softcap=4.0, temperature=0.8,
                      hard_weight=0.3, labels="ignore"),
    "scale": dict(student_logit_scale=0.3, teacher_temperature=1.4, reduction="sum"),
    # -inf teacher entries (padding); divergences that stay finite with P = 0 < Q
    "padded": dict(padded=True, temperature=2.0, divergences=("kl", "jsd", "tvd")),
    "int32-ids": dict(int32=True, teacher_temperature=0.6, temperature=1.2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("option", list(OPTION_SETS))
def test_matrix_options(backend, option, tail, request):
    if backend == "triton":
        request.getfixturevalue("block_v")(64)
    opts = dict(OPTION_SETS[option])
    label_mode = opts.pop("labels", None)
    padded, int32 = opts.pop("padded", False), opts.pop("int32", False)
    i = list(OPTION_SETS).index(option)
    divergence = opts.pop("divergences", None)
    divergence = divergence[TAILS.index(tail)] if divergence else DIVERGENCES[(3 * i + TAILS.index(tail)) % 6]
    seed = zlib.crc32(f"{option}-{tail}".encode()) % 1000
    s = logits((5, 150), seed=seed)
    lp, idx, _ = topk_teacher((5,), 150, 9, seed=seed + 1, t_gen=opts.get("teacher_temperature", 1.0))
    if padded:
        lp[:, 6:] = -math.inf
        lp[3, :] = -math.inf  # no candidate at all: the bucket holds all the teacher's mass
        if tail == "renormalize":  # undefined (no teacher distribution) there: drop that row
            lp[3, 0] = 0.0
    if int32:
        idx = idx.int()
    y = None
    if label_mode is not None:
        y = make_labels((5,), 150, ignore=(0, 3) if label_mode == "ignore" else (), seed=seed)
    check_against_reference(backend, s, lp, idx, y, divergence=divergence, tail=tail, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "divergence,tail,vocab,k,dtype",
    [("kl", "bucket", 70_000, 64, torch.bfloat16), ("jsd", "ignore", 65_537, 7, torch.float16),
     ("reverse_kl", "renormalize", 131_072, 64, torch.float32)],
)
def test_large_vocabulary(backend, divergence, tail, vocab, k, dtype):
    s = logits((3, vocab), dtype, seed=20)
    lp, idx, _ = topk_teacher((3,), vocab, k, dtype, seed=21)
    y = make_labels((3,), vocab, ignore=(1,))
    check_against_reference(backend, s, lp, idx, y, divergence=divergence, tail=tail,
                            temperature=1.5, hard_weight=0.25)


def peaked_inputs(seed=30):
    """The student agrees with the teacher on its top 16 of 300 tokens by a wide margin: its
    off-support mass Q_tail is ~1e-9, where 1 - sum q has no correct digit in float32. One row
    is far more extreme still (~1e-30, a float32 subnormal as 1 - sum q could never be)."""
    s = logits((4, 300), seed=seed)
    lp, idx, _ = topk_teacher((4,), 300, 16, seed=seed + 1)
    boost = torch.full(idx.shape, 26.0, device=DEVICE)
    boost[3] = 75.0
    return s.scatter_add(-1, idx, boost), lp, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "ignore"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "skew_kl"])
def test_support_holds_nearly_all_student_mass(backend, divergence, tail, request):
    if backend == "triton":
        request.getfixturevalue("block_v")(64)
    s, lp, idx = peaked_inputs()
    check_against_reference(backend, s, lp, idx, divergence=divergence, tail=tail, beta=0.4)


def test_naive_student_tail_fails_that_tolerance():
    # test_support_holds_nearly_all_student_mass can fail: the same check on the bucket kl
    # computed with Q_tail = 1 - sum q in float32 (instead of the masked logsumexp) fails it
    s, lp, idx = peaked_inputs()
    cfg = R.TopKConfig()
    log_q = torch.log_softmax(s.float(), -1)
    q_support = log_q.gather(-1, idx)
    naive_tail = torch.log((1 - q_support.exp().sum(-1)).clamp(min=0))
    log_p, log_p_tail = R.teacher_log_probs(lp, 300, cfg, torch.float32)
    naive = RK.divergence(torch.cat([log_p, log_p_tail[:, None]], -1),
                          torch.cat([q_support, naive_tail[:, None]], -1), "kl").mean()
    gt = R.topk_kd_loss(s.double(), lp.double(), idx, None, cfg)
    ref32 = R.topk_kd_loss(s.float(), lp.float(), idx, None, cfg)
    with pytest.raises(pytest.fail.Exception, match="loss"):
        assert_close("loss", naive, gt, [ref32], torch.float32, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend, request):
    # logits in the thousands: every logsumexp stays max-stabilised, the tail too
    if backend == "triton":
        request.getfixturevalue("block_v")(64)
    s = logits((3, 200), scale=2000.0, seed=40)
    lp, idx, _ = topk_teacher((3,), 200, 8, seed=41, scale=40.0)
    for tail in TAILS:
        check_against_reference(backend, s, lp, idx, tail=tail, temperature=1.0)


# ---------------------------------------------------------------------------------------------
# edge cases, modules, schedules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    s = logits((2, 3, 50), seed=50).requires_grad_()
    lp, idx, _ = topk_teacher((2, 3), 50, 5, seed=51)
    y = torch.full((2, 3), -100, device=DEVICE)
    loss = pdl.topk_kd_loss(s, lp, idx, labels=y, hard_weight=1.0, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 17), (2, 0, 17)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty_batch(backend, shape, reduction):
    s = logits(shape, seed=60).requires_grad_()
    lp, idx, _ = topk_teacher(shape[:-1], 17, 3, seed=61)
    loss = pdl.topk_kd_loss(s, lp, idx, reduction=reduction, backend=backend)
    assert loss.shape == (() if reduction != "none" else shape[:-1])
    assert loss.sum().item() == 0.0
    loss.sum().backward()
    assert s.grad.shape == s.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    s = logits((3, 40), seed=70)
    lp, idx, _ = topk_teacher((3,), 40, 4, seed=71)
    s[1, 5] = math.nan
    rows = pdl.topk_kd_loss(s, lp, idx, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    lp2 = lp.clone()
    lp2[2, 0] = math.nan
    assert torch.isnan(pdl.topk_kd_loss(s, lp2, idx, reduction="none", backend=backend)[2])
    y = torch.tensor([0, -100, 2], device=DEVICE)  # an ignored NaN row is dropped
    assert torch.isfinite(pdl.topk_kd_loss(s, lp, idx, labels=y, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    s = logits((4, 33), seed=80)
    lp, idx, _ = topk_teacher((4,), 33, 5, seed=81)
    y = make_labels((4,), 33, ignore=(2,))
    kw = dict(tail="ignore", teacher_temperature=0.8, divergence="skew_kl", temperature=3.0,
              beta=0.1, hard_weight=0.5, softcap=10.0)
    mod = pdl.TopKKDLoss(backend=backend, **kw)
    torch.testing.assert_close(mod(s, lp, idx, y), pdl.topk_kd_loss(s, lp, idx, labels=y, backend=backend, **kw))
    assert "tail='ignore'" in repr(mod) and "skew_kl" in repr(mod)
    with pytest.raises(ValueError, match="tail"):
        pdl.TopKKDLoss(tail="all")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_entry_points_write_a_float32_gradient(backend):
    # what the fused LM-head loss calls per chunk: the torch backend's
    # topk_chunk_loss_and_grads, the Triton launcher topk_loss_and_grad; a float32 buffer for
    # bfloat16 logits, a row scale, labels with an ignored row
    if backend == "cuda":
        pytest.skip("linear_kd_loss has no cuda backend: no chunk entry point to check")
    s = logits((5, 200), torch.bfloat16, seed=90)
    lp, idx, _ = topk_teacher((5,), 200, 12, seed=91)
    y = make_labels((5,), 200, ignore=(1,))
    cfg = pdl.functional.topk_config(divergence="jsd", temperature=2.0, hard_weight=0.3)
    buf = torch.full((5, 200), math.nan, device=DEVICE)
    if backend == "torch":
        rows = R.topk_chunk_loss_and_grads(s, lp, idx, y, cfg, 0.37, buf)
    else:
        from pydistill.kernels import topk_divergence as K

        rows = K.topk_loss_and_grad(s, lp, idx, y, cfg, buf, grad_scale=0.37)
    refs = []
    for dtype in (torch.float64, torch.float32):
        x = s.detach().to(dtype).requires_grad_()
        want, _ = R.per_row_loss(x, lp.to(dtype), idx, y, cfg)
        g, = torch.autograd.grad(want.sum() * 0.37, x)
        refs.append((want.detach(), g))
    assert_close("rows", rows, refs[0][0], [refs[1][0]], torch.float32, atol=1e-7)
    assert_close("grad", buf, refs[0][1], [refs[1][1]], torch.float32)


def test_torch_backend_second_backward_raises():
    s = logits((3, 20), seed=100).requires_grad_()
    lp, idx, _ = topk_teacher((3,), 20, 4, seed=101)
    loss = pdl.topk_kd_loss(s, lp, idx, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("mode", ["recompute", "forward"])
@pytest.mark.parametrize("tail", TAILS)
def test_triton_grad_modes(mode, tail, monkeypatch, block_v):
    block_v(64)
    monkeypatch.setenv("PYDISTILL_KD_GRAD", mode)
    s = logits((2, 3, 100), torch.bfloat16, seed=110)
    lp, idx, _ = topk_teacher((2, 3), 100, 6, torch.bfloat16, seed=111)
    y = make_labels((2, 3), 100, ignore=(4,))
    for reduction, grad_out in [("mean", torch.ones(())), ("sum", torch.tensor(0.3)),
                                ("none", torch.rand(2, 3, generator=_gen(5)))]:
        check_against_reference("triton", s, lp, idx, y, tail=tail, divergence="reverse_kl",
                                temperature=2.0, hard_weight=0.2, reduction=reduction,
                                grad_out=grad_out.to(DEVICE))
    x = s.detach().clone().requires_grad_()
    loss = pdl.topk_kd_loss(x, lp, idx, tail=tail, backend="triton")
    g1, = torch.autograd.grad(loss, x, retain_graph=True)
    if mode == "recompute":
        g2, = torch.autograd.grad(loss, x)
        assert torch.equal(g1, g2)
    else:
        with pytest.raises(RuntimeError, match="second backward"):
            torch.autograd.grad(loss, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_that_requires_grad_is_refused(backend):
    s = logits((2, 10), seed=120).requires_grad_()
    lp, idx, _ = topk_teacher((2,), 10, 3, seed=121)
    lp.requires_grad_()
    with pytest.raises(ValueError, match=rf"teacher_topk_logprobs: requires grad.*backend='{backend}'.*detach"):
        pdl.topk_kd_loss(s, lp, idx, backend=backend)
    with torch.no_grad():  # nothing to differentiate: fine
        pdl.topk_kd_loss(s, lp, idx, backend=backend)
    pdl.topk_kd_loss(s, lp.detach(), idx, backend=backend).backward()


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
def test_triton_k_limit():
    from pydistill.kernels import topk_divergence as K

    with pytest.raises(ValueError, match=r"K <= 4096.*backend='torch'"):
        K.sort_support(torch.zeros(1, K.MAX_K + 1), torch.zeros(1, K.MAX_K + 1, dtype=torch.long))


@pytest.mark.skipif(not CUDA, reason="out-of-range ids on the GPU")
def test_out_of_range_ids_on_gpu_are_nan_not_crash():
    s = logits((3, 9), seed=130)
    lp, idx, _ = topk_teacher((3,), 9, 3, seed=131)
    idx[1, 0], idx[2, 2] = 9, -4
    for backend in BACKENDS:
        rows = pdl.topk_kd_loss(s, lp, idx, reduction="none", backend=backend)
        assert torch.isfinite(rows[0]) and torch.isnan(rows[1:]).all()


@pytest.mark.skipif(not CUDA, reason="needs two devices")
def test_bad_input_devices():
    s = torch.randn(2, 5, device="cuda")
    lp, idx = torch.zeros(2, 3, device="cuda"), torch.zeros(2, 3, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="teacher_topk_logprobs.*cuda"):
        pdl.topk_kd_loss(s, lp.cpu(), idx)
    with pytest.raises(ValueError, match="teacher_topk_indices.*cuda"):
        pdl.topk_kd_loss(s, lp, idx.cpu())


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

_IDS = torch.tensor([[0, 1, 2], [4, 3, 0]])
BAD_INPUTS = [
    # (kwargs overriding a valid call, exception, words the message must contain)
    (dict(student_logits=[[1.0]]), TypeError, ["student_logits", "torch.Tensor", "list"]),
    (dict(student_logits=torch.tensor(1.0)), ValueError, ["student_logits", "0-dim"]),
    (dict(student_logits=torch.randn(2, 0)), ValueError, ["student_logits", "V >= 1"]),
    (dict(teacher_topk_logprobs=[[0.0]]), TypeError, ["teacher_topk_logprobs", "torch.Tensor", "list"]),
    (dict(teacher_topk_logprobs=torch.zeros(2, 3, dtype=torch.long)), TypeError,
     ["teacher_topk_logprobs", "floating", "int64"]),
    (dict(teacher_topk_indices=torch.zeros(2, 3)), TypeError, ["teacher_topk_indices", "int64", "float32"]),
    (dict(teacher_topk_indices=_IDS.short()), TypeError, ["teacher_topk_indices", "int32", "int16"]),
    (dict(teacher_topk_logprobs=torch.zeros(3, 3)), ValueError,
     ["teacher_topk_logprobs", "(2, 'K')", "student_logits", "(3, 3)"]),
    (dict(teacher_topk_logprobs=torch.zeros(3)), ValueError, ["teacher_topk_logprobs", "(2, 'K')", "(3,)"]),
    (dict(teacher_topk_indices=_IDS[:, :2]), ValueError, ["teacher_topk_indices", "(2, 3)", "(2, 2)"]),
    (dict(teacher_topk_logprobs=torch.zeros(2, 0), teacher_topk_indices=torch.zeros(2, 0, dtype=torch.long)),
     ValueError, ["teacher_topk_logprobs", "1 <= K <= V = 5", "K = 0"]),
    (dict(teacher_topk_logprobs=torch.zeros(2, 6), teacher_topk_indices=torch.arange(6).repeat(2, 1)),
     ValueError, ["teacher_topk_logprobs", "K <= V = 5", "K = 6"]),
    (dict(teacher_topk_indices=torch.tensor([[0, 1, 5], [4, 3, 0]])), ValueError,
     ["teacher_topk_indices", "[0, 5)", "5"]),
    (dict(teacher_topk_indices=torch.tensor([[0, 1, 2], [4, -1, 0]])), ValueError,
     ["teacher_topk_indices", "[0, 5)", "-1"]),
    (dict(teacher_topk_indices=torch.tensor([[0, 1, 2], [4, 3, 4]])), ValueError,
     ["teacher_topk_indices", "distinct", "4 twice", "row 1"]),
    (dict(tail="drop"), ValueError, ["tail", "'bucket'", "'drop'"]),
    (dict(tail=None), TypeError, ["tail", "str", "NoneType"]),
    (dict(teacher_temperature=0.0), ValueError, ["teacher_temperature", "> 0", "0.0"]),
    (dict(teacher_temperature=-2.0), ValueError, ["teacher_temperature", "> 0", "-2.0"]),
    (dict(teacher_temperature=math.inf), ValueError, ["teacher_temperature", "finite", "inf"]),
    (dict(teacher_temperature="1"), TypeError, ["teacher_temperature", "float", "str"]),
    (dict(temperature=0.0), ValueError, ["temperature", "> 0", "0.0"]),
    (dict(divergence="kld"), ValueError, ["divergence", "'kl'", "'kld'"]),
    (dict(beta=1.5, divergence="jsd"), ValueError, ["beta", "<= 1", "1.5"]),
    (dict(reduction="avg"), ValueError, ["reduction", "'mean'", "'avg'"]),
    (dict(hard_weight=0.5), ValueError, ["labels", "required", "hard_weight"]),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, ["labels", "(2,)", "(3,)"]),
    (dict(labels=torch.tensor([0, 5]), hard_weight=1.0), ValueError, ["labels", "[0, 5)", "5"]),
    (dict(backend="cudnn"), ValueError, ["backend", "'auto'", "'cudnn'"]),
    (dict(student_logits=torch.randn(2, 5, dtype=torch.float64), backend="triton"), TypeError,
     ["triton", "float64"]),
]


@pytest.mark.parametrize("override,exc,words", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input(override, exc, words):
    kwargs = dict(student_logits=torch.randn(2, 5), teacher_topk_logprobs=torch.log_softmax(torch.randn(2, 3), -1),
                  teacher_topk_indices=_IDS)
    kwargs.update(override)
    if override.get("backend") == "triton" and "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    args = [kwargs.pop(n) for n in ("student_logits", "teacher_topk_logprobs", "teacher_topk_indices")]
    with pytest.raises(exc) as info:
        pdl.topk_kd_loss(*args, **kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value!r}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_labels_and_indices(backend):
    # labels and top-k ids as views with stride 2 (once read as contiguous by the Triton launcher)
    s = logits((3, 5, 40), seed=92)
    lp, idx = torch.log_softmax(logits((3, 5, 40), seed=93), -1).topk(4, dim=-1)
    y = make_labels((3, 5), 40, ignore=(1,))
    y2 = torch.stack([y, torch.zeros_like(y)], -1)[..., 0]
    idx2 = torch.stack([idx, torch.zeros_like(idx)], -1)[..., 0]
    assert y2.stride() == (10, 2) and idx2.stride()[-1] == 2
    check_against_reference(backend, s, lp, idx2, y2, temperature=2.0, hard_weight=0.5)


# (B, L, K) top-k views whose (N, K) rows are not contiguous along K (the Triton launcher once
# read them as if they were: a silent wrong loss and gradient)
TOPK_VIEWS = {
    # a (B, L, K) array stored K-major and transposed back: K stride B * L
    "transposed-back": lambda x: x.reshape(-1, x.shape[-1]).t().contiguous().t().reshape(x.shape),
    # stored as (K, B, L) and permuted to (B, L, K)
    "kbl-permuted": lambda x: x.permute(2, 0, 1).contiguous().permute(1, 2, 0),
    # one stored row per sequence, expanded over its positions (stride 0 along L)
    "expanded": lambda x: x[:, :1].expand(x.shape),
    # every other entry of a (B, L, 2K) array
    "sliced": lambda x: torch.stack([x, x.flip(-1)], -1).flatten(-2)[..., ::2],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", list(TOPK_VIEWS))
def test_topk_views_not_contiguous_along_k(backend, view, request):
    if backend == "triton":
        request.getfixturevalue("block_v")(32)  # several tiles per row
    s = logits((2, 3, 70), seed=94)
    lp, idx, _ = topk_teacher((2, 3), 70, 5, seed=95)
    lp_v, idx_v = TOPK_VIEWS[view](lp), TOPK_VIEWS[view](idx)
    y = make_labels((2, 3), 70, ignore=(1,))
    for tail in TAILS:
        check_against_reference(backend, s, lp_v, idx_v, y, tail=tail, temperature=2.0,
                                hard_weight=0.3, divergence="jsd")
