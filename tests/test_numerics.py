"""One rule for the edge cases of kd_loss and topk_kd_loss, on every backend.

The torch backend's results are the contract for non-finite values: a loss that is +inf
mathematically stays +inf (never NaN), a finite one stays finite wherever float32 can hold
the math, and NaN appears only where torch's own log-softmax makes it (a +inf logit in the
soft term). Each case is run on every backend and compared, value and gradient, with the
torch backend and, where they are known in closed form, with the exact numbers.
"""
import math

import pytest
import torch

import pydistill as pdl
from pydistill.reference import softmax_divergence as R

from conftest import DEVICE, available_backends
from test_softmax_divergence import logits

BACKENDS = available_backends()
TOPK_BACKENDS = available_backends("topk_kd_loss")
INF = math.inf
BF16_MAX = torch.finfo(torch.bfloat16).max


def run_kd(backend, s, t, labels=None, **kw):
    """(loss, student gradient) of kd_loss on ``backend`` for grad_output 1."""
    x = s.detach().clone().requires_grad_()
    loss = pdl.kd_loss(x, t, labels=labels, backend=backend, **kw)
    g, = torch.autograd.grad(loss.sum(), x)
    return loss.detach().double(), g.double()


def assert_same(what, out, want, rtol=1e-5):
    """Equal non-finite pattern (NaN where want is NaN, the same infinities) and close finite
    values."""
    out, want = out.double().cpu(), want.double().cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(want)), f"{what}: NaN at {out} vs {want}"
    inf_w = torch.isinf(want)
    assert torch.equal(torch.isinf(out), inf_w) and torch.equal(out[inf_w], want[inf_w]), \
        f"{what}: infinities differ: {out} vs {want}"
    fin = torch.isfinite(want)
    torch.testing.assert_close(out[fin], want[fin], rtol=rtol, atol=1e-6, msg=f"{what}: {out} vs {want}")


def check_like_torch(backend, s, t, labels=None, rtol=1e-5, **kw):
    want = run_kd("torch", s, t, labels, **kw)
    got = run_kd(backend, s, t, labels, **kw)
    assert_same(f"{backend} loss", got[0], want[0], rtol)
    assert_same(f"{backend} grad", got[1], want[1], max(rtol, 1e-5))
    return got


def t32(rows):
    return torch.tensor(rows, dtype=torch.float32, device=DEVICE)


# ---------------------------------------------------------------------------------------------
# +inf losses stay +inf
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_is_inf_where_the_student_is_minus_inf_under_teacher_mass(backend):
    loss, grad = check_like_torch(backend, t32([[0.0, -INF, 1.0]]), t32([[0.0, 0.5, 1.0]]))
    assert loss == INF and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_is_inf_where_the_teacher_is_minus_inf_under_student_mass(backend):
    loss, _ = check_like_torch(backend, t32([[0.0, 0.5, 1.0]]), t32([[0.0, -INF, 1.0]]),
                               divergence="reverse_kl")
    assert loss == INF


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "ignore"])
def test_topk_is_inf_where_the_student_is_minus_inf_at_a_listed_id(backend, tail):
    s = logits((2, 12), seed=3)
    s[1, 7] = -INF
    lp = torch.log_softmax(logits((2, 4), seed=4), -1) - 0.2
    idx = torch.tensor([[0, 3, 7, 9], [7, 2, 11, 5]], device=DEVICE)
    rows = pdl.topk_kd_loss(s, lp, idx, tail=tail, teacher_temperature=1.0,
                            reduction="none", backend=backend)
    want = pdl.topk_kd_loss(s, lp, idx, tail=tail, teacher_temperature=1.0,
                            reduction="none", backend="torch")
    assert want[1] == INF and torch.isfinite(want[0])
    assert_same("topk rows", rows, want)


# ---------------------------------------------------------------------------------------------
# finite logits near float32's range: finite results where torch's are
# ---------------------------------------------------------------------------------------------

HUGE_S = [[3e38, 1e38, -1e37, 0.0], [3e38, -3e38, 1e37, 2.0], [1e37, 1e37, -3e38, 0.5]]
HUGE_T = [[1e38, 3e38, 2e37, 1.0], [3e38, -3e38, 1e37, 2.0], [-3e38, 5.0, 1e37, 1e37]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_huge_finite_logits_at_t1(backend, divergence):
    # once NaN on the kernels: e^{a - m_a} underflowing to 0 beside a log-ratio that overflows
    loss, grad = check_like_torch(backend, t32(HUGE_S), t32(HUGE_T), divergence=divergence,
                                  reduction="none")
    assert not torch.isnan(loss).any() and not torch.isnan(grad).any()
    assert loss[1] == 0.0  # identical rows


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_hard_term_keeps_the_logsumexp_in_two_terms(backend):
    # two equal maxima of 1e37: CE = log 2 and softmax = 1/2 there. Folding the logsumexp into
    # one float (1e37 + log 2 == 1e37) once gave the torch backend CE 0 and a gradient of 1.
    s = torch.tensor([[1e37, -INF, 1e37, 0.0], [BF16_MAX, BF16_MAX, 0.0, 1.0]],
                     dtype=torch.bfloat16, device=DEVICE)
    y = torch.tensor([0, 1], device=DEVICE)
    if backend == "reference":
        x = s.double().requires_grad_()
        loss = R.kd_loss(x, s.double(), y, R.KDConfig(hard_weight=1.0, soft_weight=0.0,
                                                       reduction="none"))
        grad, = torch.autograd.grad(loss.sum(), x)
    else:
        loss, grad = run_kd(backend, s, s, y, hard_weight=1.0, soft_weight=0.0, reduction="none")
    torch.testing.assert_close(loss.double().cpu(), torch.full((2,), math.log(2.0), dtype=torch.float64),
                               rtol=1e-6, atol=0)
    want = torch.tensor([[-0.5, 0.0, 0.5, 0.0], [0.5, -0.5, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grad.double().cpu(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bfloat16_max_logits_with_a_hard_term(backend, temperature):
    s = torch.tensor([[BF16_MAX, -BF16_MAX, 0.0, 1.0], [-BF16_MAX, 0.5, 0.0, 1.0],
                      [BF16_MAX, 0.5, -BF16_MAX, 1.0]], dtype=torch.bfloat16, device=DEVICE)
    # (a divergence that is a sum of several terms near float32's max is out of reach: the
    # kernels' unnormalised sums overflow to +inf where torch's normalised one stays finite)
    t = torch.tensor([[BF16_MAX, -BF16_MAX, 0.0, 1.0], [0.0, 3.0, 0.0, 1.0],
                      [1.0, BF16_MAX, -BF16_MAX, 0.0]], dtype=torch.bfloat16, device=DEVICE)
    y = torch.tensor([1, 1, 0], device=DEVICE)
    for divergence in R.DIVERGENCES:
        check_like_torch(backend, s, t, y, rtol=2e-2, divergence=divergence, hard_weight=1.0,
                         temperature=temperature, reduction="none")


# ---------------------------------------------------------------------------------------------
# +inf logits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_plus_inf_student_logit_in_the_hard_term(backend, temperature):
    # CE = lse - z_y = +inf for a finite z_y (NaN when z_y is the +inf itself); the gradient
    # softmax - onehot is NaN at the +inf column only, as torch.logsumexp makes it
    s = t32([[INF, 0.0, 1.0], [INF, 0.0, 1.0]])
    y = torch.tensor([1, 0], device=DEVICE)
    loss, grad = check_like_torch(backend, s, logits((2, 3), seed=5), y, hard_weight=1.0,
                                  soft_weight=0.0, temperature=temperature, reduction="none")
    assert loss[0] == INF and torch.isnan(loss[1])
    assert torch.isnan(grad[0, 0]) and grad[0, 1] == -1.0 and grad[0, 2] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_plus_inf_logit_in_the_soft_term_is_nan(backend, where):
    s, t = logits((3, 9), seed=6), logits((3, 9), seed=7)
    (s if where == "student" else t)[1, 4] = INF
    y = torch.tensor([0, 2, 3], device=DEVICE)
    for kw in (dict(), dict(hard_weight=0.5, labels=y), dict(divergence="jsd", temperature=2.0)):
        labels = kw.pop("labels", None)
        loss, grad = check_like_torch(backend, s, t, labels, reduction="none", **kw)
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


# ---------------------------------------------------------------------------------------------
# second-order gradients: the same clear refusal on every backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["kd_loss", "topk_kd_loss"])
def test_create_graph_does_not_give_a_silent_zero(backend, fn):
    # the cuda backend once returned an all-zero second-order gradient (PyTorch's fallback for
    # an op without an autograd formula) where the others refuse
    s = logits((3, 11), seed=8).requires_grad_()

    def loss():
        if fn == "kd_loss":
            return pdl.kd_loss(s, logits((3, 11), seed=9), backend=backend)
        idx = torch.tensor([[0, 4, 7, 9], [1, 2, 3, 10], [5, 6, 8, 0]], device=DEVICE)
        lp = torch.log_softmax(logits((3, 4), seed=10), -1) - 0.1
        return pdl.topk_kd_loss(s, lp, idx, teacher_temperature=1.0, backend=backend)

    g, = torch.autograd.grad(loss(), s, create_graph=True)
    assert not g.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad((g * g).sum(), s)
    # with a grad_output that requires grad, the gradient raises when differentiated
    w = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    g, = torch.autograd.grad(loss() * w, s, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (g * g).sum().backward()


# ---------------------------------------------------------------------------------------------
# large temperatures: the loss keeps float32's relative precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("temperature", [100.0, 1e3, 1e4])
def test_large_temperature_loss_is_precise(backend, divergence, temperature, request):
    # p and q near uniform: D = O(1/T^2) is a difference of O(1/T) sums, and T^2 D was off by
    # 0.1 % at T = 100, by its own size at 1e3, negative at 1e4. Gradients: as accurate as
    # float32 PyTorch's (check_against_reference's tolerance).
    from test_softmax_divergence import check_against_reference

    if backend == "triton":
        from pydistill.kernels import softmax_divergence as K

        request.getfixturevalue("monkeypatch").setattr(K, "BLOCK_V_OVERRIDE", 128)
    s = logits((3, 512), seed=11)
    t = s + logits((3, 512), scale=2.0, seed=12)
    kw = dict(divergence=divergence, temperature=temperature, beta=0.3, reduction="none")
    loss, _ = check_against_reference(backend, s, t, **kw)
    want = R.kd_loss(s.double(), t.double(), None, pdl.functional.kd_config(**kw))
    # tvd: no Bregman form, ~eps T (its value grows like T); the others: ~eps
    torch.testing.assert_close(loss.double(), want, rtol=1e-4 if divergence == "tvd" else 1e-5, atol=0)


def _topk_inputs(vocab=512, k=8):
    """A student and the top-k of a teacher near it (the teacher at T_gen = 1)."""
    s = logits((3, vocab), seed=11)
    t = s + logits((3, vocab), scale=2.0, seed=12)
    lp, idx = torch.log_softmax(t.double(), -1).topk(k, dim=-1)
    return s, lp.float(), idx


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [100.0, 1e3, 1e4])
def test_topk_large_temperature_loss_is_precise(backend, divergence, tail, temperature, request):
    # the outcomes (K ids and the tail) near uniform at large T, as in kd_loss: the value was
    # a difference of O(1/T) sums, and the tail's log-probability rounded at the size of log M
    from pydistill.reference import topk_divergence as RT
    from test_topk_divergence import check_against_reference

    if backend == "triton":
        from pydistill.kernels import topk_divergence as K

        request.getfixturevalue("monkeypatch").setattr(K, "BLOCK_V_OVERRIDE", 128)
    s, lp, idx = _topk_inputs()
    kw = dict(divergence=divergence, temperature=temperature, beta=0.3, tail=tail,
              teacher_temperature=1.0, reduction="none")
    loss, _ = check_against_reference(backend, s, lp, idx, **kw)
    want = RT.topk_kd_loss(s.double(), lp.double(), idx, None, pdl.functional.topk_config(**kw))
    rtol = 1e-4 if divergence == "tvd" else 1e-5  # as kd_loss's
    torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=0)


# ---------------------------------------------------------------------------------------------
# the mixture weight beta near 0 and 1
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["jsd", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("beta", [1e-12, 1e-9, 1 - 1e-9, 1 - 1e-12])
def test_beta_near_its_ends(backend, divergence, beta):
    # within 1e-9 of 0 or 1 the value is tiny (skew_kl at 1 - 1e-9: 1e-16) and was summed as
    # a difference of O(1) terms (wrong, sometimes negative); beta also reached the kernels
    # rounded to float32, where 1 - 1e-9 is 1. The truth: the float64 Bregman sum.
    s, t = logits((3, 64), scale=2.0, seed=13), logits((3, 64), scale=2.0, seed=14)
    rows = pdl.kd_loss(s, t, divergence=divergence, beta=beta, reduction="none", backend=backend)
    log_p, log_q = torch.log_softmax(t.double(), -1), torch.log_softmax(s.double(), -1)
    want = R.divergence_value(log_p, log_q, log_p.exp(), log_q.exp(),
                              R.tempered_log_ratio(t.double(), s.double()), divergence, beta)
    assert (rows >= 0).all()
    torch.testing.assert_close(rows.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("divergence", ["jsd", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("beta", [1e-12, 1e-9, 1 - 1e-9, 1 - 1e-12])
def test_topk_beta_near_its_ends(backend, divergence, tail, beta):
    # as kd_loss's: the truth is the float64 Bregman sum over the outcomes
    from pydistill.reference import topk_divergence as RT

    s, lp, idx = _topk_inputs(vocab=64, k=8)
    s = 2.0 * s
    kw = dict(divergence=divergence, beta=beta, tail=tail, teacher_temperature=1.0)
    rows = pdl.topk_kd_loss(s, lp, idx, reduction="none", backend=backend, **kw)
    cfg = pdl.functional.topk_config(**kw)
    log_p, log_q = RT.outcome_log_probs(s.double(), lp.double(), idx, cfg)
    want = R.divergence_value(log_p, log_q, log_p.exp(), log_q.exp(), log_p - log_q, divergence,
                              beta)
    assert (rows >= 0).all()
    torch.testing.assert_close(rows.double(), want, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# a divergence is never negative, rounding included
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_value_is_not_negative_where_student_matches_teacher(backend, divergence):
    # the student within rounding of the teacher at V = 50257: the online value is a difference
    # of O(1) sums whose rounding (~1e-7) was returned as a negative loss (cuda: kl -1.2e-7)
    s = logits((4, 50257), scale=3.0, seed=21)
    t = s + logits((4, 50257), scale=1e-6, seed=22)
    rows = pdl.kd_loss(s, t, divergence=divergence, reduction="none", backend=backend)
    assert (rows >= 0).all(), rows.tolist()
    assert (rows < 1e-6).all(), rows.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_large_vocabulary_value_is_precise(backend, divergence, temperature):
    # V = 50257 logits of LLM-like spread, a hard term with its own logsumexp at T = 2: the
    # row's sums (plain per chunk or thread, compensated where they are combined) keep the value
    # at float32's precision
    s = logits((2, 50257), scale=4.0, seed=31)
    t = s + logits((2, 50257), scale=0.5, seed=32)
    labels = torch.tensor([7, 50000], device=DEVICE)
    kw = dict(divergence=divergence, temperature=temperature, hard_weight=0.5, reduction="none")
    rows = pdl.kd_loss(s, t, labels=labels, backend=backend, **kw)
    want = R.kd_loss(s.double(), t.double(), labels, pdl.functional.kd_config(**kw))
    torch.testing.assert_close(rows.double(), want, rtol=1e-5, atol=0)


@pytest.mark.skipif("cuda" not in TOPK_BACKENDS, reason="the cuda backend is not built")
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_topk_value_is_not_negative_where_student_matches_teacher(divergence):
    # K = V with the bucket tail: the outcomes are the whole vocabulary, student = teacher; the
    # plain terms' rounding (~1e-5 at T = 8) was returned as a negative loss. Under tail='ignore'
    # the value is not a divergence (the support's masses do not sum to 1) and may be negative.
    s = logits((2, 64), scale=3.0, seed=23)
    lp, idx = torch.log_softmax(s.double() / 8, -1).float().topk(64, dim=-1)
    rows = pdl.topk_kd_loss(s, lp, idx, divergence=divergence, temperature=8.0, tail="bucket",
                            teacher_temperature=8.0, reduction="none", backend="cuda")
    assert (rows >= 0).all(), rows.tolist()
    assert (rows < 1e-4).all(), rows.tolist()


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("temperature", [4.0, 100.0])
def test_topk_bucket_over_the_whole_vocabulary_keeps_precision_at_large_t(backend, temperature):
    # K = V: no token is missing, so the bucket is empty and the loss is renormalize's (kd_loss
    # on the dense teacher). Summed with the bucket's outcome of two zeros the value lost
    # T^2 eps: 1.9e-4 of it at T = 4, 10 % at T = 100 (every backend alike).
    from pydistill.reference import topk_divergence as RT

    s = logits((8, 128), scale=3.0, seed=31)
    t = s + 0.3 * logits((8, 128), scale=1.0, seed=32)
    lp, idx = torch.log_softmax(t.double(), -1).topk(128, dim=-1)
    lp = lp.float()
    for divergence in ("kl", "jsd"):
        kw = dict(divergence=divergence, temperature=temperature, teacher_temperature=1.0,
                  reduction="none")
        x = s.clone().requires_grad_()
        rows = pdl.topk_kd_loss(x, lp, idx, tail="bucket", backend=backend, **kw)
        (g,) = torch.autograd.grad(rows.sum(), x)
        a = s.double().requires_grad_()
        want = RT.topk_kd_loss(a, lp.double(), idx, None, RT.TopKConfig(tail="bucket", **kw))
        (gw,) = torch.autograd.grad(want.sum(), a)
        torch.testing.assert_close(rows.double(), want, rtol=2e-5, atol=0)
        # the gradient T (q - p): float32 rounds q = exp(x - lse) to ~eps |log q| q, times T
        q_max = float(torch.softmax(s.double() / temperature, -1).max())
        torch.testing.assert_close(g.double(), gw, rtol=0, atol=4e-6 * temperature * q_max)
    if backend == "cuda":
        return
    # the fused-head form takes the same rule (V = the head's rows)
    h, w = logits((8, 16), scale=1.0, seed=33), logits((128, 16), scale=1.0, seed=34)
    z = (h.double() @ w.double().t())
    lp, idx = torch.log_softmax(z + 0.3 * logits((8, 128), scale=1.0, seed=35).double(), -1).topk(128, dim=-1)
    got = pdl.linear_kd_loss(h, w, teacher_topk=(lp.float(), idx), teacher_temperature=1.0,
                             temperature=temperature, backend=backend, chunk_size=4)
    want = RT.topk_kd_loss(h.double() @ w.double().t(), lp.float().double(), idx, None,
                           RT.TopKConfig(tail="bucket", temperature=temperature,
                                         teacher_temperature=1.0))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# the torch backend's memory: no (N, V) buffer it does not need
# ---------------------------------------------------------------------------------------------


def _large_allocations(fn, inputs, limit_bytes):
    """The ops that create a new storage of at least ``limit_bytes`` while ``fn`` runs (views of
    the inputs and chunk-sized temporaries do not count)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    known = {x.untyped_storage().data_ptr() for x in inputs}
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor) and o.device.type != "meta":
                    st = o.untyped_storage()
                    if st.nbytes() >= limit_bytes and st.data_ptr() not in known:
                        known.add(st.data_ptr())
                        seen.append((str(func), tuple(o.shape)))
            return out

    with Watch():
        fn()
    return seen


@pytest.mark.parametrize("grad", [False, True])
def test_torch_backend_builds_no_needless_logits_sized_buffer(grad):
    # the causal shift logits[:, :-1] (not viewable as (N, V)) was copied, and under no_grad the
    # (N, V) gradient was still computed: 3 logits-sized float32 buffers where 1 (or 0) is due
    vocab, length = 4096, 129  # (N, V) float32: 8 MB, 8x a chunk's temporaries (R.CHUNK_ELEMENTS)
    base = logits((4, length, vocab), seed=15)
    s = base[:, :-1].requires_grad_(grad) if grad else base[:, :-1]
    t = logits((4, length - 1, vocab), seed=16)
    if not grad:
        s.requires_grad_()  # a training model's logits, evaluated under no_grad
    nv_bytes = s.shape[:-1].numel() * vocab * 4

    def run():
        if grad:
            loss = pdl.kd_loss(s, t, backend="torch", temperature=2.0)
            loss.backward()
        else:
            with torch.no_grad():
                pdl.kd_loss(s, t, backend="torch", temperature=2.0)

    assert nv_bytes // 2 > 4 * R.CHUNK_ELEMENTS
    big = _large_allocations(run, [base, t], nv_bytes // 2)
    # with grad: the gradient itself, nothing else
    assert len(big) == (1 if grad else 0), big


@pytest.mark.parametrize("grad", [False, True])
def test_topk_torch_backend_builds_no_needless_logits_sized_buffer(grad):
    # as kd_loss's: the shifted student was copied (reshape) and under no_grad the (N, V)
    # gradient was still computed
    vocab, length = 4096, 129
    base = logits((4, length, vocab), seed=15)
    s = base[:, :-1].requires_grad_(grad) if grad else base[:, :-1]
    t = logits((4, length - 1, vocab), seed=16)
    lp, idx = torch.log_softmax(t, -1).topk(16, dim=-1)
    if not grad:
        s.requires_grad_()
    nv_bytes = s.shape[:-1].numel() * vocab * 4
    kw = dict(backend="torch", temperature=2.0, teacher_temperature=1.0)

    def run():
        if grad:
            pdl.topk_kd_loss(s, lp, idx, **kw).backward()
        else:
            with torch.no_grad():
                pdl.topk_kd_loss(s, lp, idx, **kw)

    big = _large_allocations(run, [base, t, lp, idx], nv_bytes // 2)
    assert len(big) == (1 if grad else 0), big


# ---------------------------------------------------------------------------------------------
# skew_kl near convergence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_skew_kl_gradient_near_convergence(backend):
    # student ~ teacher: the gradient -(1 - a) q (r - S), r = p / m ~ 1, from r and its sum S
    # lost the digits of r - 1 (the torch backend 4.6x float32 autograd's error here)
    t = logits((2, 50_257), seed=17)
    s = t + logits((2, 50_257), scale=1e-3, seed=18)
    cfg = R.KDConfig(divergence="skew_kl", beta=0.5)

    def grad(fn, dtype):
        x = s.detach().to(dtype).requires_grad_()
        g, = torch.autograd.grad(fn(x, t.to(dtype)), x)
        return g.double()

    gt = grad(lambda x, y: R.kd_loss(x, y, None, cfg), torch.float64)
    err32 = (grad(lambda x, y: R.kd_loss(x, y, None, cfg), torch.float32) - gt).abs().max()
    got = grad(lambda x, y: pdl.kd_loss(x, y, divergence="skew_kl", beta=0.5, backend=backend),
               torch.float32)
    assert (got - gt).abs().max() <= 4 * err32
