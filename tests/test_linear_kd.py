"""linear_kd_loss (fused LM head): every backend against the reference on materialised logits.

The ground truth is pydistill.reference.linear_kd.linear_kd_loss in float64: both heads'
logits built with plain torch, the shorter vocabulary padded with -inf, kd_loss on them,
autograd for every gradient. Tolerances are those of test_softmax_divergence.py (whose
helpers this file imports): 4x the error of the same reference run in float32 on the same
inputs, plus one rounding of the output dtype. bfloat16 is judged separately, by the relative
(Frobenius) error of each gradient against float64.
"""
import itertools
import math
import os

import pytest
import torch

import pydistill as pdl
from pydistill.reference import linear_kd as R
from pydistill.reference import softmax_divergence as SD
from pydistill.reference import topk_divergence as TK

from conftest import CUDA, DEVICE, available_backends
from test_softmax_divergence import (  # noqa: F401  (block_v is a fixture)
    OPTION_SETS,
    _gen,
    assert_close,
    block_v,
    make_labels,
    smooth_rows,
)

BACKENDS = available_backends("linear_kd_loss")
DIVERGENCES = list(SD.DIVERGENCES)
TRITON = "triton" in BACKENDS
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton cannot run here")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def matrix(*axes, interpreted=lambda *case: True):
    """(backend, *case) for every combination of the axes on every backend, except that the
    Triton interpreter (~2 s a case) runs only the cases ``interpreted`` picks; a GPU runs all."""
    return [(backend, *case) for backend in BACKENDS for case in itertools.product(*axes)
            if backend != "triton" or not INTERPRETED or interpreted(*case)]

# ragged everything: N = 13 rows, H_s = 24, H_t = 40, V = 67, chunks of 5 (not dividing N)
N, H_S, H_T, V = 13, 24, 40, 67


def randn(shape, dtype=torch.float32, scale=1.0, seed=0, requires_grad=False):
    x = (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype=dtype, device=DEVICE)
    return x.requires_grad_(requires_grad)


def head(lead, hidden, vocab, *, seed, dtype=torch.float32, bias=False, grad=True, prefix="student"):
    """A linear head whose logits spread like trained ones (std ~3)."""
    out = {
        f"{prefix}_hidden": randn(lead + (hidden,), dtype, seed=seed, requires_grad=grad),
        f"{prefix}_weight": randn((vocab, hidden), dtype, 3.0 / math.sqrt(hidden), seed + 1, grad),
    }
    if bias:
        out[f"{prefix}_bias"] = randn((vocab,), dtype, 0.5, seed + 2, grad)
    return out


def teacher(kind, lead, vocab, *, seed, dtype=torch.float32, grad=False):
    if kind == "head":
        return head(lead, H_T, vocab, seed=seed, dtype=dtype, grad=grad, prefix="teacher")
    if kind == "head+bias":
        return head(lead, H_T, vocab, seed=seed, dtype=dtype, bias=True, grad=grad, prefix="teacher")
    assert kind == "logits"
    return {"teacher_logits": randn(lead + (vocab,), dtype, 3.0, seed, grad)}


def materialised(inputs):
    """(student, teacher) logits in float64, padded to one vocabulary."""
    x = {k: v.detach().double() for k, v in inputs.items()}
    s = R.head_logits(x["student_hidden"], x["student_weight"], x.get("student_bias"))
    t = x.get("teacher_logits")
    if t is None:
        t = R.head_logits(x["teacher_hidden"], x["teacher_weight"], x.get("teacher_bias"))
    vocab = max(s.shape[-1], t.shape[-1])
    return R.pad_vocab(s, vocab), R.pad_vocab(t, vocab)


def reference(inputs, labels, cfg, grad_out, dtype):
    """Loss and the gradient of every input that requires grad, from the reference in dtype."""
    leaves = {k: v.detach().to(dtype).requires_grad_(v.requires_grad) for k, v in inputs.items()}
    loss = R.linear_kd_loss(**leaves, labels=labels, cfg=cfg)
    wanted = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in wanted], grad_out.to(dtype), allow_unused=True)
    return loss.detach(), {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(wanted, grads)}


def run(backend, inputs, labels=None, *, grad_out=None, chunk_size=5, **kw):
    """linear_kd_loss on fresh leaves: (loss, {name: gradient}, grad_out)."""
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    loss = pdl.linear_kd_loss(**leaves, labels=labels, chunk_size=chunk_size, backend=backend, **kw)
    if grad_out is None:
        grad_out = torch.rand(loss.shape, generator=_gen(99)).to(DEVICE) * 2 + 0.25
    wanted = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in wanted], grad_out.to(loss.dtype)) if wanted else ()
    return loss.detach(), dict(zip(wanted, grads)), grad_out


def check(backend, inputs, labels=None, **kw):
    """Loss and gradients of ``backend`` against the float64 reference (module docstring)."""
    cfg = pdl.functional.kd_config(**{k: v for k, v in kw.items() if k in SD.KDConfig.__dataclass_fields__})
    if cfg.divergence == "tvd":
        # rows where tvd's gradient jumps (p_j ~ q_j) would make dW and db, sums over the rows,
        # incomparable: they are ignored
        lead = inputs["student_hidden"].shape[:-1]
        s, t = materialised(inputs)
        tie = ~smooth_rows(s, t, cfg)
        if tie.any():
            labels = make_labels(lead, 1, seed=0) if labels is None else labels.clone()
            labels[tie] = cfg.ignore_index
    loss, grads, grad_out = run(backend, inputs, labels, **kw)
    expected = torch.float64 if inputs["student_hidden"].dtype == torch.float64 else torch.float32
    assert loss.dtype == expected
    gt_loss, gt = reference(inputs, labels, cfg, grad_out, torch.float64)
    ref_loss, ref32 = reference(inputs, labels, cfg, grad_out, torch.float32)
    assert_close("loss", loss, gt_loss, [ref_loss], loss.dtype, atol=1e-7)
    assert set(grads) == set(gt)
    for name, g in grads.items():
        x = inputs[name]
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close(f"grad {name}", g, gt[name], [ref32[name]], x.dtype)
    return loss, grads


# ---------------------------------------------------------------------------------------------
# the matrix: teacher kind x divergence, and the options of kd_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,kind,divergence", matrix(
    ["head", "head+bias", "logits"], DIVERGENCES, interpreted=lambda kind, _: kind == "head+bias"))
def test_teacher_kinds(backend, kind, divergence, request):
    if backend == "triton":
        request.getfixturevalue("block_v")(32)
    inputs = {**head((N,), H_S, V, seed=1, bias=kind != "head"), **teacher(kind, (N,), V, seed=11)}
    y = make_labels((N,), V, ignore=(2, 7))
    check(backend, inputs, y, divergence=divergence, temperature=2.0, beta=0.3, hard_weight=0.2)


@pytest.mark.parametrize("backend,divergence,option", matrix(
    ["kl", "skew_reverse_kl"], list(OPTION_SETS),
    interpreted=lambda d, o: d == "kl" and o in ("hard+ignore", "none", "softcap", "teacher_grad", "ce_only",
                                               "scale+cap", "teacher_cap")))
def test_options(backend, divergence, option, request):
    if backend == "triton":
        request.getfixturevalue("block_v")(32)
    opts = dict(OPTION_SETS[option])
    label_mode = opts.pop("labels", None)
    teacher_grad = opts.pop("teacher_grad", False)
    inputs = {**head((N,), H_S, V, seed=len(option), bias=True),
              **teacher("head+bias", (N,), V, seed=len(option) + 50, grad=teacher_grad)}
    y = None
    if label_mode is not None:
        y = make_labels((N,), V, ignore=(0, 3) if label_mode == "ignore" else ())
    check(backend, inputs, y, divergence=divergence, **opts)


@pytest.mark.parametrize("backend,kind,shorter,divergence", matrix(
    ["head", "logits"], ["student", "teacher"], ["natural", "jsd", "tvd"],
    interpreted=lambda k, s, d: (k, s, d) in [("head", "student", "natural"), ("logits", "teacher", "jsd")]))
def test_mismatched_vocabulary(backend, kind, shorter, divergence, request):
    # vocab_mismatch="pad": the shorter vocabulary is -inf beyond its end; "natural": the
    # divergence that stays finite there (reverse_kl when the student lacks tokens, kl when the
    # teacher does)
    if backend == "triton":
        request.getfixturevalue("block_v")(32)
    v_s, v_t = (V - 9, V) if shorter == "student" else (V, V - 9)
    if divergence == "natural":
        divergence = "reverse_kl" if shorter == "student" else "kl"
    inputs = {**head((N,), H_S, v_s, seed=3, bias=True), **teacher(kind, (N,), v_t, seed=13, grad=True)}
    y = make_labels((N,), min(v_s, v_t), ignore=(4,))
    loss, _ = check(backend, inputs, y, divergence=divergence, temperature=1.5, hard_weight=0.3,
                    vocab_mismatch="pad")
    assert torch.isfinite(loss)


def truncated_teacher(inputs, vocab):
    """The inputs with the teacher cut to its first ``vocab`` logits, explicitly."""
    out = dict(inputs)
    for name in ("teacher_weight", "teacher_bias"):
        if name in out:
            out[name] = out[name].detach()[:vocab].clone().requires_grad_(out[name].requires_grad)
    if "teacher_logits" in out:
        x = out["teacher_logits"]
        out["teacher_logits"] = x.detach()[..., :vocab].clone().requires_grad_(x.requires_grad)
    return out


@pytest.mark.parametrize("backend,kind,chunk_size,longer", matrix(
    ["head+bias", "logits"], [5, "tiled"], ["teacher", "student"],
    interpreted=lambda k, c, lg: (k, c, lg) in [("head+bias", "tiled", "teacher"),
                                                ("logits", 5, "teacher")]))
def test_vocab_mismatch_restrict(backend, kind, chunk_size, longer, request):
    # the default: a padded teacher head (V_t > V_s) is the teacher on its first V_s tokens,
    # renormalised (kl stays finite where "pad" makes it inf); a shorter teacher is -inf beyond
    # its end, as with "pad". Against the reference on explicitly truncated teacher inputs.
    if backend == "triton":
        request.getfixturevalue("block_v")(32)
    v_s, v_t = (V - 9, V) if longer == "teacher" else (V, V - 9)
    grad_t = kind == "logits" and chunk_size == 5  # a teacher gradient too (chunked)
    inputs = {**head((N,), H_S, v_s, seed=80, bias=True), **teacher(kind, (N,), v_t, seed=81, grad=grad_t)}
    y = make_labels((N,), min(v_s, v_t), ignore=(4,))
    kw = dict(divergence="kl", temperature=1.5, hard_weight=0.3)
    cfg = pdl.functional.kd_config(**kw)
    loss, grads, grad_out = run(backend, inputs, y, chunk_size=chunk_size, **kw)
    assert torch.isfinite(loss)
    cut = truncated_teacher(inputs, v_s)
    gt_loss, gt = reference(cut, y, cfg, grad_out, torch.float64)
    ref_loss, ref32 = reference(cut, y, cfg, grad_out, torch.float32)
    assert_close("loss", loss, gt_loss, [ref_loss], loss.dtype, atol=1e-7)
    for name, g in grads.items():
        assert g.shape == inputs[name].shape, name
        if name == "teacher_logits" and longer == "teacher":
            assert torch.equal(g[..., v_s:], torch.zeros_like(g[..., v_s:]))
            g = g[..., :v_s]
        assert_close(f"grad {name}", g, gt[name], [ref32[name]], torch.float32)
    # "pad" keeps the old convention: a teacher with tokens the student lacks makes kl infinite
    if longer == "teacher":
        pad, _, _ = run(backend, inputs, y, chunk_size=chunk_size, vocab_mismatch="pad", **kw)
        assert pad == math.inf
    torch.testing.assert_close(
        pdl.LinearKDLoss(chunk_size=chunk_size, backend=backend, **kw)(**inputs, labels=y), loss)



@pytest.mark.parametrize("backend,chunk_size", matrix(
    [1, 4, 13, 1000, "auto"], interpreted=lambda c: c == 4))
def test_chunk_sizes_and_leading_dims(backend, chunk_size, request):
    if backend == "triton":
        request.getfixturevalue("block_v")(32)
    lead = (3, 5)  # (B, T, H)
    inputs = {**head(lead, H_S, V, seed=5, bias=True), **teacher("head", lead, V, seed=15)}
    y = make_labels(lead, V, ignore=(0, 9))
    for reduction in ["mean", "none"]:
        loss, grads = check(backend, inputs, y, chunk_size=chunk_size, divergence="jsd",
                            temperature=2.0, hard_weight=0.1, reduction=reduction)
        assert loss.shape == (lead if reduction == "none" else ())
        assert grads["student_hidden"].shape == lead + (H_S,)


@pytest.mark.parametrize("backend,frozen", matrix(
    ["weight", "hidden", "weight+bias"], interpreted=lambda f: f == "weight"))
def test_frozen_parts(backend, frozen, monkeypatch):
    made = []
    original = R.LinearHead.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(R.LinearHead, "__init__", spy)
    inputs = {**head((N,), H_S, V, seed=6, bias=True), **teacher("head", (N,), V, seed=16)}
    for name in frozen.split("+"):
        inputs[f"student_{name}"].requires_grad_(False)
    _, grads = check(backend, inputs, make_labels((N,), V, ignore=(1,)), divergence="kl",
                     temperature=2.0, hard_weight=0.5)
    assert set(grads) == {k for k, v in inputs.items() if v.requires_grad}
    student = made[0]
    if "weight" in frozen:  # a frozen head allocates no dW
        assert student.grad_weight is None
    assert (student.grad_hidden is None) == (frozen == "hidden")


@pytest.mark.parametrize("backend,kind,divergence", matrix(
    ["head+bias", "logits"], ["kl", "reverse_kl", "jsd", "skew_kl"],
    interpreted=lambda k, d: (k, d) in [("head+bias", "jsd"), ("logits", "kl")]))
def test_teacher_requires_grad(backend, kind, divergence, request):
    if backend == "triton":
        request.getfixturevalue("block_v")(32)
    inputs = {**head((N,), H_S, V, seed=7), **teacher(kind, (N,), V, seed=17, grad=True)}
    check(backend, inputs, make_labels((N,), V, ignore=(5,)), divergence=divergence, beta=0.4,
          temperature=2.0, softcap=8.0, reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_of_another_dtype_and_int32_labels(backend, request):
    if backend == "triton":
        request.getfixturevalue("block_v")(32)
    inputs = {**head((N,), H_S, V, seed=8), **teacher("head+bias", (N,), V, seed=18, dtype=torch.bfloat16)}
    y = make_labels((N,), V, ignore=(3,)).int()
    check(backend, inputs, y, divergence="tvd", temperature=2.0, hard_weight=0.3)


def test_float64_is_exact():
    inputs = {**head((N,), H_S, V, seed=9, dtype=torch.float64, bias=True),
              **teacher("head", (N,), V, seed=19, dtype=torch.float64, grad=True)}
    y = make_labels((N,), V, ignore=(2,))
    kw = dict(divergence="skew_kl", beta=0.1, temperature=3.0, hard_weight=0.5, labels=y)
    loss, grads, grad_out = run("torch", inputs, **kw)
    cfg = pdl.functional.kd_config(**{k: v for k, v in kw.items() if k != "labels"})
    gt_loss, gt = reference(inputs, y, cfg, grad_out, torch.float64)
    torch.testing.assert_close(loss, gt_loss, rtol=1e-12, atol=1e-14)
    for name, g in grads.items():
        torch.testing.assert_close(g, gt[name], rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,reduction", matrix(
    ["mean", "sum", "none"], interpreted=lambda r: r == "none"))
def test_all_rows_ignored(backend, reduction):
    inputs = {**head((2, 3), H_S, V, seed=20, bias=True), **teacher("head", (2, 3), V, seed=21)}
    y = torch.full((2, 3), -100, device=DEVICE)
    loss, grads, _ = run(backend, inputs, y, hard_weight=1.0, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads.values():
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, reduction):
    inputs = {**head((0,), H_S, V, seed=22, bias=True), **teacher("logits", (0,), V, seed=23, grad=True)}
    loss, grads, _ = run(backend, inputs, reduction=reduction, grad_out=torch.ones(()) if reduction != "none" else torch.ones(0))
    assert loss.shape == (() if reduction != "none" else (0,)) and float(loss.sum()) == 0.0
    for name, g in grads.items():
        assert g.shape == inputs[name].shape and not g.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward(backend):
    inputs = {**head((N,), H_S, V, seed=24), **teacher("head", (N,), V, seed=25)}
    x = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    loss = pdl.linear_kd_loss(**x, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    # reduction="none" recomputes in the backward: twice is fine and gives the same gradient
    rows = pdl.linear_kd_loss(**x, reduction="none", backend=backend)
    g1 = torch.autograd.grad(rows.sum(), x["student_weight"], retain_graph=True)[0]
    g2 = torch.autograd.grad(rows.sum(), x["student_weight"])[0]
    assert torch.equal(g1, g2)


def test_no_grad_forward_matches():
    inputs = {**head((N,), H_S, V, seed=26), **teacher("logits", (N,), V, seed=27)}
    with torch.no_grad():
        a = pdl.linear_kd_loss(**inputs, temperature=2.0, chunk_size=4)
    b = R.linear_kd_loss(**{k: v.double() for k, v in inputs.items()}, cfg=SD.KDConfig(temperature=2.0))
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    inputs = {**head((2, 4), H_S, V, seed=28, bias=True), **teacher("head", (2, 4), V, seed=29)}
    y = make_labels((2, 4), V, ignore=(3,))
    kw = dict(divergence="jsd", temperature=2.0, beta=0.2, hard_weight=0.5, chunk_size=3)
    mod = pdl.LinearKDLoss(backend=backend, **kw)
    torch.testing.assert_close(mod(**inputs, labels=y), pdl.linear_kd_loss(**inputs, labels=y, backend=backend, **kw))
    assert "chunk_size=3" in repr(mod) and "jsd" in repr(mod)


@needs_triton
def test_backends_agree_in_bfloat16(block_v):
    block_v(64)
    inputs = {**head((3, 7), H_S, 211, seed=30, dtype=torch.bfloat16, bias=True),
              **teacher("head", (3, 7), 211, seed=31, dtype=torch.bfloat16)}
    y = make_labels((3, 7), 211, ignore=(0, 5))
    out = {b: run(b, inputs, y, divergence="jsd", beta=0.4, temperature=2.0, hard_weight=0.1,
                  grad_out=torch.ones(()))
           for b in ["torch", "triton"]}
    (l_a, g_a, _), (l_b, g_b, _) = out["torch"], out["triton"]
    torch.testing.assert_close(l_a, l_b, rtol=1e-5, atol=1e-6)
    for name in g_a:
        a, b = g_a[name].float(), g_b[name].float()
        assert (a - b).norm() <= 2**-7 * a.norm(), name


# ---------------------------------------------------------------------------------------------
# bfloat16: the gradients stay faithful to float32 math
# ---------------------------------------------------------------------------------------------

# Relative (Frobenius) error against float64 of each bfloat16 gradient; N = 512 rows, H = 64,
# V = 1000, kl at T = 2 with a hard term, logits of std ~8, a teacher close to the student (the
# regime of distillation, where q - p is small), grad_output != 1. Measured on the CPU with 4
# chunks: d(hidden) 2.8e-3, d(weight) 3.3e-3, d(bias) 2.4e-3, against 1.6e-3 - 1.7e-3 for the
# exact gradient rounded once to bfloat16 (the best a bfloat16 output can do); the extra comes
# from the rounding of g before the GEMMs, of the backward's rescaling by grad_output, and of
# dW's accumulation per chunk (2.7e-3 in 1 chunk, 5.6e-3 in 32). The naive path, which rounds
# the logits to bfloat16 (F.linear in bfloat16, then the loss in float32): 2.8e-2 - 3.5e-2.
BF16_BOUND = 2.5  # x the error of one rounding of the exact gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_gradients_are_faithful(backend, request):
    if backend == "triton":
        if not CUDA:
            pytest.skip("the Triton interpreter is too slow at these sizes (CUDA runs it)")
    n, h, vocab = 512, 64, 1000
    student = {k: v.detach() for k, v in head((n,), h, vocab, seed=40, bias=True).items()}
    student["student_weight"] *= 8.0 / 3.0
    near = {f"teacher_{k}": student[f"student_{k}"] + 0.05 * randn(student[f"student_{k}"].shape, seed=41 + i)
            * student[f"student_{k}"].std() for i, k in enumerate(["hidden", "weight"])}
    inputs = {k: v.to(torch.bfloat16).requires_grad_(k.startswith("student"))
              for k, v in {**student, **near}.items()}
    y = make_labels((n,), vocab, ignore=(3, 100))
    kw = dict(divergence="kl", temperature=2.0, hard_weight=0.3)
    cfg = pdl.functional.kd_config(**kw)
    _, grads, grad_out = run(backend, inputs, y, chunk_size=128, **kw)
    _, gt = reference(inputs, y, cfg, grad_out, torch.float64)
    # the naive path: logits rounded to bfloat16 by the GEMM, then the loss in float32
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    s = torch.nn.functional.linear(leaves["student_hidden"], leaves["student_weight"], leaves["student_bias"])
    t = torch.nn.functional.linear(leaves["teacher_hidden"], leaves["teacher_weight"])
    naive = torch.autograd.grad(SD.kd_loss(s, t, y, cfg), [leaves[k] for k in grads], grad_out)

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    for (name, g), g_naive in zip(grads.items(), naive):
        err, once = rel(g, gt[name]), rel(gt[name].to(torch.bfloat16), gt[name])
        assert err <= BF16_BOUND * once, f"{name}: {err:.2e} > {BF16_BOUND} x {once:.2e}"
        assert err < rel(g_naive, gt[name]) / 4, f"{name}: not better than the naive path"


# ---------------------------------------------------------------------------------------------
# the top-k teacher (the topk_divergence family)
# ---------------------------------------------------------------------------------------------


def check_topk_teacher(backend, inputs, y, lp, idx, *, chunk_size=5, **kw):
    """linear_kd_loss with a top-k teacher against the top-k family's reference on the
    materialised student logits: loss and every gradient."""
    loss, grads, grad_out = run(backend, inputs, y, teacher_topk=(lp, idx), chunk_size=chunk_size, **kw)
    cfg = pdl.functional.topk_config(**kw)
    refs = {}
    for dtype in [torch.float64, torch.float32]:
        leaves = {k_: v.detach().to(dtype).requires_grad_() for k_, v in inputs.items()}
        s = R.head_logits(leaves["student_hidden"], leaves["student_weight"], leaves.get("student_bias"))
        ref = TK.topk_kd_loss(s, lp.to(dtype), idx, y, cfg)
        refs[dtype] = ref.detach(), dict(zip(leaves, torch.autograd.grad(ref, list(leaves.values()), grad_out.to(dtype))))
    (gt_loss, gt), (ref32_loss, ref32) = refs[torch.float64], refs[torch.float32]
    assert_close("loss", loss, gt_loss, [ref32_loss], loss.dtype, atol=1e-7)
    assert set(grads) == set(gt)
    for name, g in grads.items():
        assert_close(f"grad {name}", g, gt[name], [ref32[name]], torch.float32)
    return loss, grads


@pytest.mark.parametrize("backend,tail,divergence", matrix(
    ["bucket", "renormalize", "ignore"], ["kl", "jsd", "skew_reverse_kl"],
    interpreted=lambda t, d: (t, d) in [("bucket", "kl"), ("ignore", "jsd")]))
def test_topk_teacher(backend, tail, divergence, request):
    if backend == "triton":
        request.getfixturevalue("block_v")(32)
    k = 6
    inputs = head((N,), H_S, V, seed=50, bias=True)
    teacher_logits = randn((N, V), torch.float64, 3.0, seed=51)
    lp, idx = torch.log_softmax(teacher_logits, -1).topk(k, dim=-1)
    y = make_labels((N,), V, ignore=(1,))
    check_topk_teacher(backend, inputs, y, lp.float(), idx, tail=tail, teacher_temperature=1.5,
                       divergence=divergence, temperature=2.0, hard_weight=0.2)


@pytest.mark.parametrize("backend,chunk_size", matrix([4, "auto", "tiled"]))
def test_topk_teacher_not_contiguous_along_k(backend, chunk_size, request):
    # (B, L, K) top-k stored as (K, B, L) and permuted, and transposed back from a K-major
    # copy: once read as contiguous rows by the Triton kernels (hidden and weight gradients
    # 72-100 % off)
    if backend == "triton":
        request.getfixturevalue("block_v")(32)
    lead, k = (3, 4), 5
    inputs = head(lead, H_S, V, seed=52)
    lp, idx = torch.log_softmax(randn(lead + (V,), torch.float64, 3.0, seed=53), -1).topk(k, dim=-1)
    y = make_labels(lead, V, ignore=(1,))
    views = [lambda x: x.permute(2, 0, 1).contiguous().permute(1, 2, 0),
             lambda x: x.reshape(-1, k).t().contiguous().t().reshape(x.shape)]
    for view in views:
        lp_v, idx_v = view(lp.float()), view(idx)
        assert idx_v.reshape(-1, k).stride()[-1] != 1
        check_topk_teacher(backend, inputs, y, lp_v, idx_v, chunk_size=chunk_size,
                           teacher_temperature=1.0, temperature=2.0, hard_weight=0.2)


# ---------------------------------------------------------------------------------------------
# rows ignored through labels: whatever their hidden states hold, NaN included
# ---------------------------------------------------------------------------------------------


def poison_rows(x, rows, value):
    x = x.detach().clone()
    x.view(-1, x.shape[-1])[list(rows)] = value
    return x


@pytest.mark.parametrize("backend,kind,chunk_size", matrix(
    ["head", "logits", "topk"], [4, "tiled"],
    interpreted=lambda k, c: (k, c) in [("head", 4), ("topk", 4), ("head", "tiled")]))
def test_nan_hidden_states_in_ignored_rows(backend, kind, chunk_size, request):
    # padding positions with NaN / inf hidden states: once 0 * NaN in the dW GEMM made the
    # whole weight gradient NaN (chunked paths); the result must not depend on those rows
    if backend == "triton":
        request.getfixturevalue("block_v")(32)
    lead, ignored = (2, 7), (1, 6, 9)
    inputs = head(lead, H_S, V, seed=70, bias=True)
    kw = dict(temperature=2.0, hard_weight=0.4, chunk_size=chunk_size)
    if kind == "topk":
        lp, idx = torch.log_softmax(randn(lead + (V,), torch.float64, 3.0, seed=71), -1).topk(5, dim=-1)
        kw.update(teacher_topk=(lp.float(), idx), teacher_temperature=1.0)
    else:  # a teacher that requires grad: its gradients must stay clean too
        inputs.update(teacher(kind, lead, V, seed=72, grad=True))
    y = make_labels(lead, V, ignore=ignored)
    for value in (math.nan, math.inf):
        bad = dict(inputs)
        bad["student_hidden"] = poison_rows(inputs["student_hidden"], ignored, value).requires_grad_()
        if "teacher_hidden" in bad:
            bad["teacher_hidden"] = poison_rows(inputs["teacher_hidden"], ignored, value).requires_grad_()
        for reduction in ("mean", "none"):
            loss, grads, grad_out = run(backend, bad, y, reduction=reduction, **kw)
            want, want_grads, _ = run(backend, inputs, y, grad_out=grad_out, reduction=reduction, **kw)
            torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
            for name, g in grads.items():
                assert torch.isfinite(g).all(), f"{name} ({value}, {reduction})"
                torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# return_components: the soft and hard terms from the same pass
# ---------------------------------------------------------------------------------------------


def component_references(inputs, labels, cfg, topk, dtype):
    """The reference's soft term (soft_weight 1, no hard term) and hard term (hard_weight 1, no
    soft term), reduced as the loss, in ``dtype``, on the materialised student logits."""
    x = {k: v.detach().to(dtype) for k, v in inputs.items()}
    fields = SD.config_fields(cfg)
    out = {}
    for name, weights in (("kd", dict(soft_weight=1.0, hard_weight=0.0)),
                          ("ce", dict(soft_weight=0.0, hard_weight=1.0))):
        if name == "ce" and labels is None:
            continue
        c = type(cfg)(**{**fields, **weights})
        if topk is None:
            out[name] = R.linear_kd_loss(**x, labels=labels, cfg=c)
        else:
            s = R.head_logits(x["student_hidden"], x["student_weight"], x.get("student_bias"))
            out[name] = TK.topk_kd_loss(s, topk[0].to(dtype), topk[1], labels, c)
    return out


COMPONENT_CASES = {
    "hard+ignore": dict(labels="ignore", hard_weight=0.3, soft_weight=0.8, temperature=2.0),
    "hard-T1-sum": dict(labels="all", hard_weight=1.5, reduction="sum", divergence="jsd"),
    "no_t2-none": dict(labels="ignore", hard_weight=0.2, t2=False, temperature=3.0, reduction="none"),
    "labels_without_hard": dict(labels="ignore", temperature=2.0, divergence="reverse_kl"),
    "no_labels": dict(temperature=2.0, divergence="tvd"),
    "soft_weight0": dict(labels="ignore", soft_weight=0.0, hard_weight=1.0, temperature=2.0),
    "all_ignored": dict(labels="none_count", hard_weight=0.5, temperature=2.0),
}


@pytest.mark.parametrize("backend,kind,chunk_size,case", matrix(
    ["head+bias", "logits", "topk"], [5, "tiled"], list(COMPONENT_CASES),
    interpreted=lambda k, c, case: (k, c) in [("head+bias", "tiled"), ("topk", 5)]
    or (k, c, case) == ("logits", 5, "soft_weight0")))
def test_return_components(backend, kind, chunk_size, case, request):
    if backend == "triton":
        request.getfixturevalue("block_v")(32)
    opts = dict(COMPONENT_CASES[case])
    label_mode = opts.pop("labels", None)
    lead = (3, 5)
    inputs = head(lead, H_S, V, seed=60, bias=True)
    kw = dict(opts)
    topk = None
    if kind == "topk":
        lp, idx = torch.log_softmax(randn(lead + (V,), torch.float64, 3.0, seed=61), -1).topk(6, dim=-1)
        topk = (lp.float(), idx)
        kw.update(teacher_topk=topk, teacher_temperature=1.0)
    else:
        inputs.update(teacher(kind, lead, V, seed=62))
    y = None
    if label_mode is not None:
        y = make_labels(lead, V, ignore=range(15) if label_mode == "none_count" else (0, 7))
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    loss, parts = pdl.linear_kd_loss(**leaves, labels=y, chunk_size=chunk_size, backend=backend,
                                     return_components=True, **kw)
    plain = pdl.linear_kd_loss(**inputs, labels=y, chunk_size=chunk_size, backend=backend, **kw)
    torch.testing.assert_close(loss.detach(), plain.detach(), rtol=0, atol=0)
    assert set(parts) == ({"kd", "ce"} if y is not None else {"kd"})
    cfg_kw = {k: v for k, v in kw.items() if k in SD.KDConfig.__dataclass_fields__}
    cfg = (pdl.functional.topk_config(teacher_temperature=1.0, **cfg_kw) if topk
           else pdl.functional.kd_config(**cfg_kw))
    gt = component_references(inputs, y, cfg, topk, torch.float64)
    ref32 = component_references(inputs, y, cfg, topk, torch.float32)
    for name, part in parts.items():
        assert part.dtype == torch.float32 and not part.requires_grad, name
        assert part.shape == loss.shape, name
        assert torch.isfinite(part).all(), name
        # the soft term is the step's rows less the hard term: its rounding is that of the rows
        atol = 1e-6 * (1 + gt["ce"].abs().max().item() * cfg.hard_weight) if name == "kd" and y is not None else 1e-7
        assert_close(f"parts[{name!r}]", part, gt[name], [ref32[name]], torch.float32, atol=atol)
    whole = cfg.soft_weight * parts["kd"] + (cfg.hard_weight * parts["ce"] if y is not None else 0.0)
    torch.testing.assert_close(whole, loss.detach(), rtol=1e-6, atol=1e-6)
    # the gradients are those of the loss alone
    wanted = [k for k, v in leaves.items() if v.requires_grad]
    grad_out = torch.rand(loss.shape, generator=_gen(98)).to(DEVICE) + 0.5
    g = torch.autograd.grad(loss, [leaves[k] for k in wanted], grad_out)
    fresh = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    again = pdl.linear_kd_loss(**fresh, labels=y, chunk_size=chunk_size, backend=backend, **kw)
    g2 = torch.autograd.grad(again, [fresh[k] for k in wanted], grad_out)
    for name, a, b in zip(wanted, g, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_components_with_entropy_and_module(backend):
    inputs = {**head((2, 4), H_S, V, seed=63), **teacher("logits", (2, 4), V, seed=64)}
    y = make_labels((2, 4), V, ignore=(3,))
    kw = dict(temperature=2.0, hard_weight=0.5, chunk_size=3)
    loss, parts = pdl.linear_kd_loss(**inputs, labels=y, backend=backend, return_entropy=True,
                                     return_components=True, **kw)
    assert set(parts) == {"kd", "ce", "entropy"}
    _, entropy = pdl.linear_kd_loss(**inputs, labels=y, backend=backend, return_entropy=True, **kw)
    torch.testing.assert_close(parts["entropy"], entropy)
    mod = pdl.LinearKDLoss(backend=backend, return_components=True, **kw)
    m_loss, m_parts = mod(**inputs, labels=y)
    torch.testing.assert_close(m_loss, loss)
    for name in ("kd", "ce"):
        torch.testing.assert_close(m_parts[name], parts[name])


def test_return_components_float64_and_compiled_op(monkeypatch):
    # float64 parts for float64 inputs; the custom op (torch.compile's path) returns the same
    from pydistill import _custom_ops

    inputs = {**head((N,), H_S, V, seed=65, dtype=torch.float64), **teacher("logits", (N,), V, seed=66, dtype=torch.float64)}
    y = make_labels((N,), V, ignore=(2,))
    kw = dict(temperature=2.0, hard_weight=0.4, chunk_size=4, backend="torch", return_components=True)
    loss, parts = pdl.linear_kd_loss(**inputs, labels=y, **kw)
    assert all(p.dtype == torch.float64 for p in parts.values())
    monkeypatch.setattr(_custom_ops, "FORCE", True)
    loss2, parts2 = pdl.linear_kd_loss(**inputs, labels=y, **kw)
    torch.testing.assert_close(loss2, loss)
    for name in parts:
        torch.testing.assert_close(parts2[name], parts[name])


def test_return_components_refused_with_a_process_group():
    with pytest.raises(ValueError, match="return_components"):
        pdl.linear_kd_loss(torch.randn(2, 4), torch.randn(5, 4), teacher_logits=torch.randn(2, 5),
                           process_group=object(), return_components=True)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

_H, _W = torch.randn(2, 3, 4), torch.randn(5, 4)
BAD_INPUTS = [
    # (kwargs overriding a valid call, exception, words the message must contain)
    (dict(student_hidden=[[1.0]]), TypeError, ["student_hidden", "torch.Tensor", "list"]),
    (dict(student_weight=torch.randn(5, 3)), ValueError, ["student_weight", "(V, 4)", "(5, 3)"]),
    (dict(student_weight=torch.randn(5)), ValueError, ["student_weight", "(V, H)", "(5,)"]),
    (dict(student_weight=torch.randn(0, 4)), ValueError, ["student_weight", "V >= 1", "(0, 4)"]),
    (dict(student_weight=torch.randn(5, 4, dtype=torch.float64)), TypeError,
     ["student_weight", "torch.float32", "torch.float64"]),
    (dict(student_hidden=torch.tensor(1.0)), ValueError, ["student_hidden", "0-dim"]),
    (dict(student_bias=torch.randn(6)), ValueError, ["student_bias", "(5,)", "(6,)"]),
    (dict(student_bias=torch.randn(5).half()), TypeError, ["student_bias", "float32", "float16"]),
    (dict(teacher_hidden=torch.randn(2, 4, 7)), ValueError, ["teacher_hidden", "(2, 3)", "(2, 4, 7)"]),
    (dict(teacher_weight=torch.randn(5, 6)), ValueError, ["teacher_weight", "(V, 7)", "(5, 6)"]),
    (dict(teacher_bias=torch.randn(4)), ValueError, ["teacher_bias", "(6,)", "(4,)"]),
    (dict(teacher_weight=None), ValueError, ["teacher_weight", "required", "teacher_hidden"]),
    (dict(teacher_hidden=None), ValueError, ["teacher_hidden", "required", "teacher_weight"]),
    (dict(teacher_hidden=None, teacher_weight=None), ValueError, ["teacher", "exactly one", "none"]),
    (dict(teacher_logits=torch.randn(2, 3, 5)), ValueError,
     ["teacher", "exactly one", "teacher_hidden + teacher_weight and teacher_logits"]),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_bias=torch.randn(6)), ValueError,
     ["teacher_bias", "teacher_hidden + teacher_weight"]),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(2, 5)), ValueError,
     ["teacher_logits", "(2, 3)", "(2, 5)"]),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(2, 3, 0)), ValueError,
     ["teacher_logits", "V >= 1"]),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_temperature=1.0, teacher_topk=torch.randn(2, 3, 2)), TypeError,
     ["teacher_topk", "pair", "Tensor"]),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_temperature=1.0,
          teacher_topk=(torch.randn(2, 3, 2), torch.zeros(2, 3, 2))), TypeError,
     ["teacher_topk[1] (indices)", "int64", "float32"]),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_temperature=1.0,
          teacher_topk=(torch.randn(2, 3, 2), torch.zeros(2, 3, 3, dtype=torch.long))), ValueError,
     ["teacher_topk[1] (indices)", "(2, 3, 2)", "(2, 3, 3)"]),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_temperature=1.0,
          teacher_topk=(torch.randn(2, 3, 2), torch.full((2, 3, 2), 5))), ValueError,
     ["teacher_topk[1] (indices)", "[0, 5)", "5"]),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_temperature=1.0,
          teacher_topk=(torch.randn(2, 3, 2), torch.zeros(2, 3, 2, dtype=torch.long))), ValueError,
     ["teacher_topk[1] (indices)", "distinct", "0 twice"]),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_temperature=1.0,
          teacher_topk=(torch.randn(2, 4, 2), torch.zeros(2, 4, 2, dtype=torch.long))), ValueError,
     ["teacher_topk[0] (logprobs)", "(2, 3, 'K')", "(2, 4, 2)"]),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_temperature=1.0,
          teacher_topk=(torch.full((2, 3, 2), -1.0, requires_grad=True), torch.tensor([0, 1]).expand(2, 3, 2))),
     ValueError, ["teacher_topk", "not supported", "detach"]),
    (dict(teacher_temperature=2.0), ValueError, ["teacher_temperature", "teacher_topk"]),
    (dict(teacher_hidden=None, teacher_weight=None,
          teacher_topk=(torch.randn(2, 3, 2), torch.tensor([0, 1]).expand(2, 3, 2))), ValueError,
     ["teacher_temperature", "required", "top-k", "stored", "None"]),
    (dict(tail="drop"), ValueError, ["tail", "'bucket'", "'drop'"]),
    (dict(vocab_mismatch="error"), ValueError, ["vocab_mismatch='error'", "V_s = 5", "V_t = 6",
                                                "teacher_weight"]),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(2, 3, 4),
          vocab_mismatch="error"), ValueError, ["V_s = 5", "V_t = 4", "teacher_logits"]),
    (dict(vocab_mismatch="truncate"), ValueError, ["vocab_mismatch", "'restrict'", "'truncate'"]),
    (dict(labels=torch.zeros(2, dtype=torch.long)), ValueError, ["labels", "(2, 3)", "(2,)"]),
    (dict(labels=torch.zeros(2, 3)), TypeError, ["labels", "int64", "float32"]),
    (dict(labels=torch.full((2, 3), 5), hard_weight=1.0), ValueError, ["labels", "[0, 5)", "5"]),
    (dict(hard_weight=0.5), ValueError, ["labels", "required", "hard_weight"]),
    (dict(chunk_size=0), ValueError, ["chunk_size", "'auto'", "positive int", "0"]),
    (dict(chunk_size="max"), ValueError, ["chunk_size", "'auto'", "'tiled'", "'max'"]),
    (dict(chunk_size=2.0), ValueError, ["chunk_size", "'auto'", "2.0"]),
    (dict(chunk_size=None), ValueError, ["chunk_size", "'auto'", "None"]),
    (dict(chunk_size=True), ValueError, ["chunk_size", "'auto'", "True"]),
    (dict(process_group="world"), ValueError, ["process_group", "not initialised"]),
    (dict(temperature=0.0), ValueError, ["temperature", "> 0"]),
    (dict(divergence="kld"), ValueError, ["divergence", "'kld'"]),
    (dict(backend="cudnn"), ValueError, ["backend", "'cudnn'"]),
    (dict(student_hidden=_H.double(), student_weight=_W.double(), backend="triton"), TypeError,
     ["triton", "float64"]),
]


@pytest.mark.parametrize("override,exc,words", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input(override, exc, words):
    kwargs = dict(student_hidden=_H, student_weight=_W, teacher_hidden=torch.randn(2, 3, 7),
                  teacher_weight=torch.randn(6, 7))
    kwargs.update(override)
    if override.get("backend") == "triton" and not TRITON:
        pytest.skip("Triton cannot run here")
    with pytest.raises(exc) as info:
        pdl.linear_kd_loss(**kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value!r}"


@pytest.mark.skipif(not CUDA, reason="needs two devices")
def test_bad_input_devices():
    h, w = torch.randn(2, 4, device="cuda"), torch.randn(5, 4, device="cuda")
    with pytest.raises(ValueError, match="student_weight.*cuda"):
        pdl.linear_kd_loss(h, w.cpu(), teacher_logits=torch.randn(2, 5, device="cuda"))
    with pytest.raises(ValueError, match="teacher_logits.*cuda"):
        pdl.linear_kd_loss(h, w, teacher_logits=torch.randn(2, 5))
    with pytest.raises(ValueError, match="teacher_hidden.*cuda"):
        pdl.linear_kd_loss(h, w, torch.randn(2, 4), torch.randn(5, 4))


def test_auto_chunk_rows_follow_the_budget(monkeypatch):
    # 64 MiB on the CPU: (C, V) float32 student + teacher logits, rounded down to 128 rows
    assert R.auto_chunk_rows(10**6, 2 * 4 * 32000, torch.device("cpu")) == 256
    assert R.auto_chunk_rows(100, 2 * 4 * 32000, torch.device("cpu")) == 100
    assert R.auto_chunk_rows(10**6, 2 * 4 * 10**8, torch.device("cpu")) == 1
    monkeypatch.setattr(R, "AUTO_BUDGET_CPU", 1000 * 2 * 4 * 32000)
    assert R.auto_chunk_rows(10**6, 2 * 4 * 32000, torch.device("cpu")) == 896


def test_auto_chunk_rows_do_not_follow_the_free_memory(monkeypatch):
    # once a quarter of the momentarily free memory: the rows per chunk, and with them the
    # sequence of dW's bfloat16 roundings, changed from call to call and machine to machine
    per_row = 10 * 128256  # bfloat16 heads at V = 128256: two float32 logits, a bfloat16 g
    rows = []
    for free in (2 * 10**9, 70 * 10**9):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 * 10**9))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10**9)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
        rows.append(R.auto_chunk_rows(8192, per_row, torch.device("cuda")))
    assert rows[0] == rows[1] == 384
    monkeypatch.setenv(R.AUTO_BUDGET_ENV, str(128 * per_row))
    assert R.auto_chunk_rows(8192, per_row, torch.device("cuda")) == 128
    assert R.auto_chunk_rows(8192, per_row, torch.device("cpu")) == 128
    monkeypatch.setenv(R.AUTO_BUDGET_ENV, "half")
    with pytest.raises(ValueError, match=f"{R.AUTO_BUDGET_ENV}: expected a positive number of bytes, got 'half'"):
        R.auto_chunk_rows(8192, per_row, torch.device("cuda"))


@pytest.mark.parametrize("labels", [False, True])
def test_auto_chunk_buffers_fit_the_budget_at_the_goal_shape(labels):
    # N = 8192, H = 4096, V = 128256, bfloat16 student and teacher heads, the student's hidden
    # states and weight requiring grad: the chunk buffers of the schedule (meta tensors: no
    # memory) stay within 0.5 GB with GEMM-sized chunks
    n, h, vocab = 8192, 4096, 128256

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    tensors = (meta(n, h), meta(vocab, h), None, meta(n, h), meta(vocab, h), None, None, None, None)
    need = (True, True) + (False,) * 7
    y = meta(n, dtype=torch.long) if labels else None
    state = R.LinearKDState(SD.KDConfig(temperature=2.0), R.ChunkPlan(), y, tensors, need, R.TORCH_STEPS)
    assert state.chunk == 384
    assert state.chunk_bytes() <= R.AUTO_BUDGET_ACCELERATOR <= 0.5e9


def test_bf16_gradient_written_straight_into_the_gemm_buffer(monkeypatch):
    # the step writes g in the weight's dtype into the buffer the gradient GEMMs read (once:
    # float32 g over the logits, then a copy, 8 B per logit more); a bias gradient is summed
    # from the float32 g (test_bfloat16_gradients_are_faithful). The teacher's head alike.
    seen = []

    def spy(s, t, labels, cfg, row_scale, out_s=None, out_t=None, **kw):
        seen.append((out_s.dtype, out_s.data_ptr() == s.data_ptr(), out_t is None or out_t.dtype))
        return R.torch_chunk_step(s, t, labels, cfg, row_scale, out_s, out_t, **kw)

    monkeypatch.setattr(R, "TORCH_STEPS", (spy, R.TORCH_STEPS[1]))
    for bias, teacher_grad, want in [(False, False, (torch.bfloat16, False, True)),
                                     (True, False, (torch.float32, True, True)),
                                     (False, True, (torch.bfloat16, False, torch.bfloat16))]:
        parts = {**head((N,), H_S, V, seed=3, bias=bias), **teacher("head", (N,), V, seed=5)}
        inputs = {k: v.detach().to(torch.bfloat16).requires_grad_(k.startswith("student") or teacher_grad)
                  for k, v in parts.items()}
        seen.clear()
        kw = dict(temperature=2.0, divergence="jsd")
        loss, grads, grad_out = run("torch", inputs, chunk_size=4, **kw)
        assert seen and set(seen) == {want}
        _, gt = reference(inputs, None, pdl.functional.kd_config(**kw), grad_out, torch.float64)
        assert len(grads) == 2 + bias + 2 * teacher_grad
        for name, g in grads.items():
            assert g.dtype == torch.bfloat16
            assert float((g.double() - gt[name]).norm() / gt[name].norm()) < 1e-2, name


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_grad_kernel_skips_a_unit_scale(dtype):
    # the chunked backward's scaling by grad_output: nothing rewritten when it is 1 (signalling
    # NaNs, which any product quiets, keep their bits), else a float32 product rounded once
    from pydistill.kernels import linear_kd as K

    n = 3 * K.SCALE_BLOCK + 5  # several strides of the persistent grid, a ragged end
    x = randn((n,), seed=7).to(dtype)
    bits = x.view(torch.int32 if dtype == torch.float32 else torch.int16)
    bits[::7] = 0x7F800001 if dtype == torch.float32 else 0x7F81
    before = bits.clone()
    K.scale_grad_(x, torch.ones((), device=DEVICE))
    assert torch.equal(bits, before)
    scale = torch.tensor(1.7, dtype=torch.float64, device=DEVICE)
    want = (x.float() * scale.float()).to(dtype)
    K.scale_grad_(x, scale)
    finite = torch.isfinite(want)
    assert torch.equal(x[finite], want[finite]) and x[~finite].isnan().all()
    assert not torch.equal(bits, before)


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_backward_scales_in_one_kernel(reduction, monkeypatch):
    # the row chunks of casts and products of the torch path (~20 B per element, 2,000 aten ops
    # at V = 128256, whatever grad_output) are not on the Triton backend's backward
    def refuse(*args):
        raise AssertionError("the row-chunked torch scaling ran")

    inputs = {**head((N,), H_S, V, seed=11, bias=True), **teacher("head", (N,), V, seed=13)}
    y = make_labels((N,), V, ignore=(4,))
    want, g_want, grad_out = run("torch", inputs, y, reduction=reduction, temperature=2.0)
    monkeypatch.setattr(R, "_scale_rows_", refuse)
    got, g_got, _ = run("triton", inputs, y, grad_out=grad_out, reduction=reduction, temperature=2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_teacher_duplicate_padding_ids_in_ignored_rows(backend):
    inputs = head((N,), H_S, V, seed=90)
    lp, idx = torch.log_softmax(randn((N, V), torch.float64, 3.0, seed=91), -1).topk(4, dim=-1)
    lp = lp.float()
    y = make_labels((N,), V, ignore=(2, 8))
    pad_lp, pad_idx = lp.clone(), idx.clone()
    pad_idx[[2, 8]] = 7
    kw = dict(temperature=2.0, teacher_temperature=1.0, hard_weight=0.2, chunk_size=4)
    got, g_got, grad_out = run(backend, inputs, y, teacher_topk=(pad_lp, pad_idx), **kw)
    want, g_want, _ = run(backend, inputs, y, teacher_topk=(lp, idx), grad_out=grad_out, **kw)
    torch.testing.assert_close(got, want)
    for name in g_got:
        torch.testing.assert_close(g_got[name], g_want[name], msg=name)


@pytest.mark.parametrize("fn", ["linear_kd_loss", "linear_uld_loss"])
def test_empty_hidden_size_is_a_clear_error(fn):
    # H = 0: once a reshape RuntimeError
    h, w = torch.randn(2, 3, 0), torch.randn(5, 0)
    with pytest.raises(ValueError, match=r"student_hidden: expected a hidden size H >= 1.*\(2, 3, 0\)"):
        getattr(pdl, fn)(h, w, teacher_logits=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"teacher_hidden: expected a hidden size H >= 1"):
        getattr(pdl, fn)(torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(2, 3, 0), torch.randn(5, 0))
