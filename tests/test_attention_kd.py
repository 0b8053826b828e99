"""attention_kd_loss / relation_kd_loss: the reference against the papers' formulas, then every
backend against the float64 reference (materialised maps).

Tolerances are those of tests/test_softmax_divergence.py (``assert_close``: 4x the error of
float32 PyTorch on the same case plus one rounding of the output dtype). Half-precision inputs
on the Triton backend add 2 roundings of the largest gradient entry: the kernels round each
(q - p) tile to the input dtype before its two products (FlashAttention's practice), an error
of eps * sum_j |g_ij| |K_j| per entry, which cancellation can make large next to a small entry.
Outputs are poisoned with NaN before the kernels write them (conftest).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import pydistill as pdl
from pydistill.reference import attention_kd as R

from conftest import CUDA, DEVICE, available_backends
from test_softmax_divergence import OUT_EPS, _gen, assert_close

BACKENDS = available_backends("attention_kd_loss")
NAMES = ("student_q", "student_k", "teacher_q", "teacher_k")


@pytest.fixture
def small_tiles(monkeypatch):
    """Blocks smaller than L in the torch backend and the mse closed form, so the multi-block
    paths run at small L."""
    monkeypatch.setattr(R, "BLOCK_ELEMENTS", 16 * 64)
    monkeypatch.setattr(R, "MSE_CAUSAL_BLOCK", 16)


@pytest.fixture
def triton_tiles(monkeypatch):
    """Set the Triton tiles (BLOCK_M, BLOCK_N) for one test; the interpreter pays per tile, so
    small ones are used sparingly."""
    from pydistill.kernels import attention_kd as K  # only imported where Triton runs

    def set_tiles(tiles):
        monkeypatch.setattr(K, "BLOCK_OVERRIDE", tiles)

    return set_tiles


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def qk(batch, heads, kv_heads, length, dim, dtype=torch.float32, seed=0, scale=1.0):
    """Fresh random (queries, keys), float32 on the CPU, then cast and moved."""
    q = torch.randn((batch, heads, length, dim), generator=_gen(seed)) * scale
    k = torch.randn((batch, kv_heads, length, dim), generator=_gen(seed + 1)) * scale
    return q.to(dtype=dtype, device=DEVICE), k.to(dtype=dtype, device=DEVICE)


def padding_mask(batch, length, kind, seed=0):
    """None; ``right``: right padding of random lengths (the last sequence full); ``left``: left
    padding, one sequence entirely padded; both as int64 0/1 (Hugging Face's form)."""
    if kind is None:
        return None
    lengths = torch.randint(1, length + 1, (batch,), generator=_gen(seed + 5))
    lengths[-1] = length
    pos = torch.arange(length)
    if kind == "right":
        mask = pos[None, :] < lengths[:, None]
    else:
        mask = pos[None, :] >= length - lengths[:, None]
        mask[0] = False
    return mask.long().to(DEVICE)


# (B, H, H_k student, H_k teacher, L, d_s, d_t, mask, causal): ragged L, GQA in either model,
# unequal head dims (not powers of two), padding on either side, causal with and without it
CASES = {
    "L7": (2, 2, 2, 2, 7, 16, 16, None, False),
    "L37-gqa-dims": (2, 4, 2, 1, 37, 8, 24, None, False),
    "L37-right-causal": (2, 2, 1, 2, 37, 16, 12, "right", True),
    "L64-left": (3, 2, 2, 1, 64, 32, 16, "left", False),
    "L37-left-causal-gqa": (3, 4, 1, 2, 37, 16, 20, "left", True),
}


def make_case(name, dtype=torch.float32, seed=0):
    batch, heads, kv_s, kv_t, length, d_s, d_t, mask, causal = CASES[name]
    sq, sk = qk(batch, heads, kv_s, length, d_s, dtype, seed)
    tq, tk = qk(batch, heads, kv_t, length, d_t, dtype, seed + 2, scale=1.5)
    return (sq, sk, tq, tk), padding_mask(batch, length, mask, seed), causal


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def reference(inputs, mask, cfg, grad_out, dtype, teacher_grad=True):
    """The reference loss and the gradients of all four inputs in ``dtype``."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    loss = R.attention_kd_loss(*xs, mask, cfg)
    grads = torch.autograd.grad(loss, xs, grad_out.to(dtype), allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]


def check_against_reference(backend, inputs, mask, *, teacher_grad=False, grad_out=None,
                            grad_atol=0.0, **kw):
    """attention_kd_loss on ``backend`` against the float64 reference: loss and the gradients
    of the student (and the teacher's with ``teacher_grad``), ``grad_atol`` added to the
    gradients' tolerance."""
    cfg = pdl.functional.attention_config(**kw)
    xs = [x.detach().clone().requires_grad_(i < 2 or teacher_grad) for i, x in enumerate(inputs)]
    loss = pdl.attention_kd_loss(*xs, attention_mask=mask, backend=backend, **kw)
    assert loss.dtype == (torch.float64 if inputs[0].dtype == torch.float64 else torch.float32)
    if grad_out is None:
        grad_out = torch.rand(loss.shape, generator=_gen(99)).to(DEVICE) * 2 + 0.25
    wanted = [x for x in xs if x.requires_grad]
    grads = torch.autograd.grad(loss, wanted, grad_out.to(loss.dtype))
    for g, x in zip(grads, wanted):
        assert g.dtype == x.dtype and g.shape == x.shape
    gt_loss, gt = reference(inputs, mask, cfg, grad_out, torch.float64)
    refs32 = [reference(inputs, mask, cfg, grad_out, torch.float32)]
    if backend != "torch":  # the torch backend orders its float32 sums differently again
        refs32.append(reference_torch_backend(inputs, mask, kw, grad_out))
    assert_close("loss", loss.detach(), gt_loss, [r[0] for r in refs32], loss.dtype, atol=1e-7)
    half = inputs[0].dtype in (torch.float16, torch.bfloat16)
    for i, g in enumerate(grads):
        atol = grad_atol + (2 * OUT_EPS[inputs[i].dtype] * float(gt[i].abs().max()) if half else 0.0)
        assert_close(f"grad {NAMES[i]}", g, gt[i], [r[1][i] for r in refs32], g.dtype, atol=atol)
    return loss, grads


def reference_torch_backend(inputs, mask, kw, grad_out):
    xs = [x.detach().float().requires_grad_() for x in inputs]
    loss = pdl.attention_kd_loss(*xs, attention_mask=mask, backend="torch", **kw)
    return loss.detach(), list(torch.autograd.grad(loss, xs, grad_out.to(loss.dtype)))


def tinybert_att_mse(sq, sk, tq, tk, mask):
    """TinyBERT's attention loss as its code writes it: BERT's additive mask (-10000 on padded
    keys) on the scaled scores, entries <= -100 set to 0, then MSELoss (mean over B H L L)."""
    def att(q, k):
        a = (q @ R.expand_heads(k, q.shape[1]).transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is not None:
            a = a + (1.0 - mask[:, None, None, :].to(a.dtype)) * -10000.0
        return torch.where(a <= -1e2, torch.zeros_like(a), a)

    return F.mse_loss(att(sq, sk), att(tq, tk))


# ---------------------------------------------------------------------------------------------
# the reference itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", R.ATTENTION_LOSSES)
@pytest.mark.parametrize("causal,mask,reduction", [(False, None, "mean"), (True, "left", "none"),
                                                   (False, "right", "sum")])
def test_reference_gradcheck_float64(loss, causal, mask, reduction):
    sq, sk = (x.cpu().double().requires_grad_() for x in qk(2, 2, 1, 5, 3, seed=1))
    tq, tk = (x.cpu().double().requires_grad_() for x in qk(2, 2, 2, 5, 4, seed=3))
    m = padding_mask(2, 5, mask, seed=2)
    m = m.cpu() if m is not None else None
    cfg = R.AttentionKDConfig(loss=loss, causal=causal, student_scale=0.7, reduction=reduction)
    assert torch.autograd.gradcheck(lambda *x: R.attention_kd_loss(*x, m, cfg), (sq, sk, tq, tk))


def test_reference_kl_is_minilm():
    # MiniLM: KL(teacher attention || student attention) summed over keys, averaged over the
    # batch, heads and query positions (no padding here)
    (sq, sk, tq, tk), _, _ = make_case("L37-gqa-dims", torch.float64)
    p = torch.softmax(tq @ R.expand_heads(tk, 4).transpose(-1, -2) / math.sqrt(24), -1)
    log_q = torch.log_softmax(sq @ R.expand_heads(sk, 4).transpose(-1, -2) / math.sqrt(8), -1)
    want = F.kl_div(log_q, p, reduction="sum") / (2 * 4 * 37)
    got = R.attention_kd_loss(sq, sk, tq, tk, None, R.AttentionKDConfig())
    torch.testing.assert_close(got, want)


def test_reference_kl_with_padding_averages_valid_rows():
    (sq, sk, tq, tk), mask, _ = make_case("L64-left", torch.float64)
    cfg = R.AttentionKDConfig(reduction="none")
    rows = R.attention_kd_loss(sq, sk, tq, tk, mask, cfg)
    assert (rows[mask[:, None, :].expand_as(rows) == 0] == 0).all()
    want = 0.0
    for b in range(3):  # each sequence on its own, cut to its real tokens
        keep = mask[b].bool()
        if keep.any():
            one = R.attention_kd_loss(*(x[b:b + 1, :, keep] for x in (sq, sk, tq, tk)), None,
                                      R.AttentionKDConfig(reduction="sum"))
            want = want + one
    mean = R.attention_kd_loss(sq, sk, tq, tk, mask, R.AttentionKDConfig())
    torch.testing.assert_close(mean, want / (2 * mask.sum()))


@pytest.mark.parametrize("mask", [None, "right"])
def test_reference_mse_scores_is_tinybert(mask):
    (sq, sk, tq, tk), _, _ = make_case("L37-gqa-dims", torch.float64)
    m = padding_mask(2, 37, mask, seed=4)
    got = R.attention_kd_loss(sq, sk, tq, tk, m, R.AttentionKDConfig(loss="mse_scores"))
    torch.testing.assert_close(got, tinybert_att_mse(sq, sk, tq, tk, m))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mse_closed_form_matches_materialised(case, reduction, small_tiles):
    inputs, mask, causal = make_case(case, torch.float64)
    inputs = [x.requires_grad_() for x in inputs]
    cfg = R.AttentionKDConfig(loss="mse_scores", causal=causal, teacher_scale=0.3, reduction=reduction)
    closed = R.mse_scores_loss(*inputs, mask, cfg)
    dense = R.attention_kd_loss(*inputs, mask, cfg)
    torch.testing.assert_close(closed, dense, rtol=1e-12, atol=1e-12)
    g = torch.ones_like(closed)
    for a, b in zip(torch.autograd.grad(closed, inputs, g), torch.autograd.grad(dense, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# every backend against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss", R.ATTENTION_LOSSES)
def test_matrix(backend, case, loss, small_tiles):
    inputs, mask, causal = make_case(case)
    check_against_reference(backend, inputs, mask, loss=loss, causal=causal,
                            teacher_grad=backend == "torch" or loss == "mse_scores")


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("case,tiles", [("L37-left-causal-gqa", (16, 32)), ("L37-right-causal", (32, 16))])
def test_triton_multi_tile(case, tiles, triton_tiles):
    # several query and key tiles, of unequal sizes (the causal start of the backward's loop)
    triton_tiles(tiles)
    inputs, mask, causal = make_case(case, seed=5)
    check_against_reference("triton", inputs, mask, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_scales(backend, reduction):
    inputs, mask, causal = make_case("L37-right-causal", seed=10)
    check_against_reference(backend, inputs, mask, causal=causal, reduction=reduction,
                            student_scale=0.4, teacher_scale=0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence(backend, request):
    # L = 513: one key past a power of two
    if backend == "triton":
        request.getfixturevalue("triton_tiles")((128, 128))  # fewer tiles for the interpreter
    inputs = (*qk(1, 2, 1, 513, 16, seed=20), *qk(1, 2, 2, 513, 8, seed=22))
    check_against_reference(backend, inputs, padding_mask(1, 513, None), causal=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype):
    inputs, mask, causal = make_case("L37-right-causal", dtype, seed=30)
    check_against_reference(backend, inputs, mask, causal=causal)


def test_torch_backend_float64():
    inputs, mask, causal = make_case("L37-left-causal-gqa", torch.float64, seed=40)
    check_against_reference("torch", inputs, mask, causal=causal, teacher_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_scores(backend):
    # scores of a few thousand: the softmaxes are one-hot-like, their logsumexps far from 0
    sq, sk = qk(2, 2, 1, 37, 16, seed=50, scale=12.0)
    tq, tk = qk(2, 2, 2, 37, 16, seed=52, scale=12.0)
    # The Triton backward recomputes the scores, with other tiles than the forward: they may
    # differ from the forward's by a rounding of |s|, which moves q = exp(s - lse) by as much
    # (relative). The reference forms them once.
    mask = padding_mask(2, 37, "right", seed=5)
    scores = max(float(R.scores(q, k, 0.25, torch.float64).abs().max()) for q, k in ((sq, sk), (tq, tk)))
    grad_scale = max(float(g.abs().max()) for g in reference(
        (sq, sk, tq, tk), mask, pdl.functional.attention_config(), torch.ones((), device=DEVICE),
        torch.float64)[1][:2])
    atol = 4 * 2.0**-24 * scores * grad_scale if backend != "torch" else 0.0
    check_against_reference(backend, (sq, sk, tq, tk), mask, grad_atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", R.ATTENTION_LOSSES)
def test_empty_batch(backend, loss):
    sq, sk = (x.requires_grad_() for x in qk(0, 2, 1, 5, 8))
    tq, tk = qk(0, 2, 2, 5, 16)
    out = pdl.attention_kd_loss(sq, sk, tq, tk, loss=loss, backend=backend)
    assert out.item() == 0.0
    out.backward()
    assert sq.grad.shape == sq.shape and sk.grad.shape == sk.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_padded_batch_is_zero_not_nan(backend):
    (sq, sk, tq, tk), _, _ = make_case("L37-gqa-dims", seed=60)
    sq, sk = sq.requires_grad_(), sk.requires_grad_()
    mask = torch.zeros(2, 37, dtype=torch.bool, device=DEVICE)
    loss = pdl.attention_kd_loss(sq, sk, tq, tk, attention_mask=mask, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert (sq.grad == 0).all() and (sk.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", R.ATTENTION_LOSSES)
def test_nan_propagates_and_padding_is_not_read(backend, loss):
    (sq, sk, tq, tk), _, _ = make_case("L37-gqa-dims", seed=70)
    mask = torch.ones(2, 37, dtype=torch.long, device=DEVICE)
    mask[0, 30:] = 0
    sq = sq.requires_grad_()
    clean = pdl.attention_kd_loss(sq, sk, tq, tk, loss=loss, attention_mask=mask, backend=backend)
    (grad_clean,) = torch.autograd.grad(clean, sq)
    hot = sk.clone()
    hot[0, 0, 33] = math.nan  # a padded key: never read, in the forward or the backward
    padded = pdl.attention_kd_loss(sq, hot, tq, tk, loss=loss, attention_mask=mask, backend=backend)
    (grad_padded,) = torch.autograd.grad(padded, sq)
    torch.testing.assert_close(padded, clean)
    torch.testing.assert_close(grad_padded, grad_clean)
    sq = sq.detach()
    hot[1, 0, 3] = math.nan  # a real key
    assert torch.isnan(pdl.attention_kd_loss(sq, hot, tq, tk, loss=loss, attention_mask=mask, backend=backend))
    hot = tq.clone()
    hot[1, 1, 4] = math.nan
    assert torch.isnan(pdl.attention_kd_loss(sq, sk, hot, tk, loss=loss, attention_mask=mask, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward(backend):
    (sq, sk, tq, tk), mask, causal = make_case("L37-right-causal", seed=80)
    sq = sq.requires_grad_()
    loss = pdl.attention_kd_loss(sq, sk, tq, tk, attention_mask=mask, causal=causal, backend=backend)
    (first,) = torch.autograd.grad(loss, sq, retain_graph=True)
    (second,) = torch.autograd.grad(loss, sq, torch.tensor(2.0, device=DEVICE))
    torch.testing.assert_close(second, 2 * first)


def test_triton_refuses_teacher_grad():
    if "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    (sq, sk, tq, tk), _, _ = make_case("L7")
    with pytest.raises(ValueError, match="teacher_q / teacher_k.*backend='torch'"):
        pdl.attention_kd_loss(sq, sk, tq.requires_grad_(), tk, backend="triton")
    with torch.no_grad():  # no gradient asked for: fine
        pdl.attention_kd_loss(sq, sk, tq, tk, backend="triton")
    # mse_scores differentiates the teacher on every backend
    pdl.attention_kd_loss(sq, sk, tq, tk, loss="mse_scores", backend="triton").backward()
    assert tq.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    (sq, sk, tq, tk), mask, causal = make_case("L37-right-causal", seed=90)
    kw = dict(loss="kl", causal=causal, student_scale=0.3, reduction="sum")
    mod = pdl.AttentionKDLoss(backend=backend, **kw)
    torch.testing.assert_close(mod(sq, sk, tq, tk, mask),
                               pdl.attention_kd_loss(sq, sk, tq, tk, attention_mask=mask, backend=backend, **kw))
    assert "causal=True" in repr(mod)


# ---------------------------------------------------------------------------------------------
# relation_kd_loss (MiniLMv2)
# ---------------------------------------------------------------------------------------------


def minilmv2_relation(xs, xt, heads, mask):
    """MiniLMv2 written out: split the concatenated heads into ``heads`` relation heads,
    relation = softmax(x x^T / sqrt(d_r)) over the real keys, KL(teacher || student) averaged
    over relation heads and real query positions."""
    def relation(x):
        b, n, w = x.shape
        r = x.view(b, n, heads, w // heads).transpose(1, 2)
        logits = r @ r.transpose(-1, -2) / math.sqrt(w // heads)
        if mask is not None:
            logits = logits.masked_fill(mask[:, None, None, :] == 0, -math.inf)
        return torch.log_softmax(logits, -1)

    log_t, log_s = relation(xt), relation(xs)
    kl = (log_t.exp() * (log_t - log_s)).nan_to_num(0.0).sum(-1)
    if mask is None:
        return kl.mean()
    return (kl * mask[:, None, :]).sum() / (heads * mask.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_relation_kd_matches_minilmv2(backend):
    batch, length, heads = 2, 37, 4
    mask = padding_mask(batch, length, "right", seed=7)
    gen = [torch.randn((batch, length, w), generator=_gen(100 + i), dtype=torch.float64).to(DEVICE)
           for i, w in enumerate((32, 32, 32, 48, 48, 48))]  # student (Q, K, V) width 32, teacher 48
    student = [x.float().requires_grad_() for x in gen[:3]]
    teacher = [x.float() for x in gen[3:]]
    loss = pdl.relation_kd_loss(student, teacher, num_relation_heads=heads, attention_mask=mask,
                                backend=backend)
    ref_s = [x.clone().requires_grad_() for x in gen[:3]]
    want = sum(minilmv2_relation(s, t, heads, mask) for s, t in zip(ref_s, gen[3:]))
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, student)
    for g, w in zip(grads, torch.autograd.grad(want, ref_s)):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-7)
    if backend != "torch":
        return  # the rest runs the same kernels again
    one = pdl.relation_kd_loss(student[0], teacher[0], num_relation_heads=heads,
                               attention_mask=mask, backend=backend)
    torch.testing.assert_close(one.double(), minilmv2_relation(gen[0], gen[3], heads, mask),
                               rtol=1e-5, atol=1e-6)
    mod = pdl.RelationKDLoss(num_relation_heads=heads, backend=backend)
    torch.testing.assert_close(mod(student, teacher, mask), loss)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def _valid_call():
    sq, sk = qk(2, 4, 2, 6, 8)
    tq, tk = qk(2, 4, 1, 6, 16)
    return dict(student_q=sq, student_k=sk, teacher_q=tq, teacher_k=tk)


BAD_INPUTS = [
    (dict(student_q=[[1.0]]), TypeError, ["student_q", "torch.Tensor", "list"]),
    (dict(teacher_k=torch.zeros(2, 1, 6, 16, dtype=torch.long)), TypeError, ["teacher_k", "floating", "int64"]),
    (dict(student_q=torch.randn(2, 4, 6)), ValueError, ["student_q", "(B, H, L, d)", "(2, 4, 6)"]),
    (dict(teacher_q=torch.randn(3, 4, 6, 16)), ValueError, ["teacher_q", "(2, H, 6, d)", "(3, 4, 6, 16)"]),
    (dict(teacher_q=torch.randn(2, 4, 7, 16)), ValueError, ["teacher_q", "(2, H, 6, d)", "(2, 4, 7, 16)"]),
    (dict(teacher_q=torch.randn(2, 6, 6, 16)), ValueError, ["teacher_q", "4 heads", "6", "relation_kd_loss"]),
    (dict(student_k=torch.randn(2, 3, 6, 8)), ValueError, ["student_k", "dividing 4", "got 3"]),
    (dict(teacher_k=torch.randn(2, 1, 5, 16)), ValueError, ["teacher_k", "(2, H_k, 6, 16)", "(2, 1, 5, 16)"]),
    (dict(student_k=torch.randn(2, 2, 6, 4)), ValueError, ["student_k", "(2, H_k, 6, 8)", "(2, 2, 6, 4)"]),
    (dict(student_k=torch.randn(2, 2, 6, 8, dtype=torch.float16)), TypeError, ["student_k", "float32", "float16"]),
    (dict(student_q=torch.randn(2, 4, 6, 0), student_k=torch.randn(2, 2, 6, 0)), ValueError, ["student_q", "d >= 1"]),
    (dict(attention_mask=torch.ones(2, 7, dtype=torch.long)), ValueError, ["attention_mask", "(2, 6)", "(2, 7)"]),
    (dict(attention_mask=torch.ones(6, dtype=torch.long)), ValueError, ["attention_mask", "(2, 6)", "(6,)"]),
    (dict(attention_mask=torch.zeros(2, 6)), TypeError, ["attention_mask", "bool or integer", "float32", "additive"]),
    (dict(attention_mask=torch.full((2, 6), 2)), ValueError, ["attention_mask", "0 or 1", "2"]),
    (dict(attention_mask=[[1] * 6] * 2), TypeError, ["attention_mask", "list"]),
    (dict(loss="kld"), ValueError, ["loss", "'kl'", "'kld'"]),
    (dict(reduction="batchmean"), ValueError, ["reduction", "'mean'", "'batchmean'"]),
    (dict(student_scale=0.0), ValueError, ["student_scale", "> 0", "0.0"]),
    (dict(teacher_scale=-1.0), ValueError, ["teacher_scale", "> 0", "-1.0"]),
    (dict(teacher_scale=math.inf), ValueError, ["teacher_scale", "finite"]),
    (dict(causal=1), TypeError, ["causal", "bool", "int"]),
    (dict(backend="cudnn"), ValueError, ["backend", "'auto'", "'cudnn'"]),
    (dict(backend="cuda"), ValueError, ["backend='cuda'", "attention_kd_loss"]),
    (dict(student_q=torch.randn(2, 4, 6, 8, dtype=torch.float64),
          student_k=torch.randn(2, 2, 6, 8, dtype=torch.float64), backend="triton"), TypeError, ["triton", "float64"]),
    (dict(teacher_q=torch.randn(2, 4, 6, 300), teacher_k=torch.randn(2, 1, 6, 300), backend="triton"),
     ValueError, ["teacher_q", "256", "300", "backend='torch'"]),
]


@pytest.mark.parametrize("override,exc,words", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input(override, exc, words):
    kwargs = _valid_call()
    kwargs.update(override)
    if override.get("backend") == "triton" and "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    tensors = [kwargs.pop(n) for n in NAMES]
    with pytest.raises(exc) as info:
        pdl.attention_kd_loss(*tensors, **kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value!r}"


BAD_RELATION_INPUTS = [
    (dict(num_relation_heads=3), ValueError, ["student_x", "divisible by num_relation_heads = 3", "W = 20"]),
    (dict(num_relation_heads=5), ValueError, ["teacher_x", "divisible by num_relation_heads = 5", "W = 12"]),
    (dict(num_relation_heads=0), ValueError, ["num_relation_heads", ">= 1", "0"]),
    (dict(num_relation_heads=2.0), TypeError, ["num_relation_heads", "int", "float"]),
    (dict(teacher_x=torch.randn(2, 5, 12)), ValueError, ["teacher_x", "(2, 6, W)", "(2, 5, 12)"]),
    (dict(teacher_x=torch.randn(2, 6, 9)), ValueError, ["teacher_x", "divisible", "W = 9"]),
    (dict(student_x=torch.randn(2, 6)), ValueError, ["student_x", "(B, L, W)", "(2, 6)"]),
    (dict(teacher_x=(torch.randn(2, 6, 12),)), TypeError, ["teacher_x", "same kind", "tuple"]),
    (dict(student_x=[torch.randn(2, 6, 20)] * 2, teacher_x=[torch.randn(2, 6, 12)] * 3), ValueError,
     ["teacher_x", "expected 2 tensors", "got 3"]),
    (dict(student_x=[torch.randn(2, 6, 20), torch.randn(2, 6, 7)], teacher_x=[torch.randn(2, 6, 12)] * 2),
     ValueError, ["student_x[1]", "W = 7"]),
]


@pytest.mark.parametrize("override,exc,words", BAD_RELATION_INPUTS,
                         ids=[str(i) for i in range(len(BAD_RELATION_INPUTS))])
def test_bad_relation_input(override, exc, words):
    kwargs = dict(student_x=torch.randn(2, 6, 20), teacher_x=torch.randn(2, 6, 12), num_relation_heads=4)
    kwargs.update(override)
    with pytest.raises(exc) as info:
        pdl.relation_kd_loss(kwargs.pop("student_x"), kwargs.pop("teacher_x"), **kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value!r}"


def test_modules_validate_at_construction():
    with pytest.raises(ValueError, match="loss"):
        pdl.AttentionKDLoss(loss="mse")
    with pytest.raises(ValueError, match="student_scale"):
        pdl.AttentionKDLoss(student_scale=-2.0)
    with pytest.raises(ValueError, match="num_relation_heads"):
        pdl.RelationKDLoss(num_relation_heads=0)


@pytest.mark.skipif(not CUDA, reason="needs two devices")
def test_bad_input_devices():
    kwargs = _valid_call()
    with pytest.raises(ValueError, match="teacher_k.*cuda"):
        pdl.attention_kd_loss(kwargs["student_q"], kwargs["student_k"], kwargs["teacher_q"],
                              kwargs["teacher_k"].cpu())
    with pytest.raises(ValueError, match="attention_mask.*cuda"):
        pdl.attention_kd_loss(*kwargs.values(), attention_mask=torch.ones(2, 6, dtype=torch.long))
