"""linear_kd_loss(chunk_size="tiled"): the tiled kernels of kernels/linear_kd.py against the
float64 reference on materialised logits (the helpers and tolerances of test_linear_kd.py).

Under the interpreter the tiles are 16 x 16 x 16 and the shapes ragged around them: 37 rows
(3 row blocks, the last partial), H_s = 24 / H_t = 40 (2 and 3 K slices, partial), V = 67
(5 vocabulary tiles, partial), split over 2 (or 3) forward programs per row block, so every
tile edge, the split merge and the atomics of several programs into one gradient row are
exercised. On a GPU the launcher's own tiles run instead, and every case of the matrices; the
interpreter (~2 s a case) runs the subset ``interpreted`` picks.
"""
import itertools
import os

import pytest
import torch

import pydistill as pdl
from pydistill.reference import linear_kd as R

from conftest import CUDA, DEVICE
from test_linear_kd import (
    BF16_BOUND,
    DIVERGENCES,
    TRITON,
    check,
    head,
    randn,
    reference,
    run,
    teacher,
)
from test_softmax_divergence import OPTION_SETS, make_labels

pytestmark = pytest.mark.skipif(not TRITON, reason="Triton cannot run here")

N, H_S, V = 37, 24, 67
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def cases(*axes, interpreted=lambda *case: True):
    """Every combination of the axes on a GPU; under the interpreter those it picks."""
    return [case for case in itertools.product(*axes) if not INTERPRETED or interpreted(*case)]


@pytest.fixture
def kernels(monkeypatch):
    """The tiled kernels' module, with a record of its launches (calls of linear_kd_fwd)."""
    from pydistill.kernels import linear_kd as K

    calls = []
    original = K.linear_kd_fwd

    def spy(heads, **kwargs):
        calls.append(heads)
        return original(heads, **kwargs)

    monkeypatch.setattr(K, "linear_kd_fwd", spy)
    K.calls = calls
    return K


def tiled(inputs, labels=None, **kw):
    return check("triton", inputs, labels, chunk_size="tiled", **kw)


@pytest.mark.parametrize("kind,divergence", cases(
    ["head", "head+bias", "logits"], DIVERGENCES,
    interpreted=lambda kind, div: kind == "head+bias" or div in ("kl", "jsd")))
def test_teacher_kinds(kind, divergence, kernels):
    inputs = {**head((N,), H_S, V, seed=1, bias=kind != "head"), **teacher(kind, (N,), V, seed=11)}
    y = make_labels((N,), V, ignore=(2, 7, 36))
    tiled(inputs, y, divergence=divergence, temperature=2.0, beta=0.3, hard_weight=0.2)
    assert len(kernels.calls) == 1


@pytest.mark.parametrize("divergence,option", cases(
    ["kl", "jsd", "skew_reverse_kl"], [o for o in OPTION_SETS if "teacher_grad" not in o],
    interpreted=lambda div, opt: div == "kl" or opt in ("T0.5", "hard+ignore", "none", "softcap")))
def test_options(divergence, option, kernels):
    opts = {k: v for k, v in OPTION_SETS[option].items() if k != "teacher_grad"}
    label_mode = opts.pop("labels", None)
    inputs = {**head((N,), H_S, V, seed=len(option), bias=True),
              **teacher("head+bias", (N,), V, seed=len(option) + 50)}
    y = None
    if label_mode is not None:
        y = make_labels((N,), V, ignore=(0, 3, 20) if label_mode == "ignore" else ())
    tiled(inputs, y, divergence=divergence, **opts)
    assert len(kernels.calls) == 1


@pytest.mark.parametrize("kind,pair", cases(
    ["head", "logits"], [("student", "reverse_kl"), ("teacher", "kl"), ("student", "jsd"),
                         ("teacher", "tvd")],
    interpreted=lambda kind, pair: (kind == "head") == (pair[1] in ("reverse_kl", "tvd"))))
def test_mismatched_vocabulary(kind, pair, kernels):
    shorter, divergence = pair
    # 9 columns short: the shorter head ends inside a tile, and one whole tile is -inf for it
    v_s, v_t = (V - 19, V) if shorter == "student" else (V, V - 19)
    inputs = {**head((N,), H_S, v_s, seed=3, bias=True), **teacher(kind, (N,), v_t, seed=13)}
    y = make_labels((N,), min(v_s, v_t), ignore=(4,))
    loss, _ = tiled(inputs, y, divergence=divergence, temperature=1.5, hard_weight=0.3,
                    vocab_mismatch="pad")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("splits", [1, 100])
def test_vocabulary_splits_and_leading_dims(splits, kernels, monkeypatch):
    monkeypatch.setattr(kernels, "SPLITS_OVERRIDE", splits)
    lead = (3, 13)
    inputs = {**head(lead, H_S, V, seed=5, bias=True), **teacher("head", lead, V, seed=15)}
    y = make_labels(lead, V, ignore=(0, 9))
    for divergence, reduction in [("kl", "mean"), ("jsd", "none"), ("reverse_kl", "sum")]:
        loss, grads = tiled(inputs, y, divergence=divergence, temperature=2.0, hard_weight=0.1,
                            reduction=reduction)
        assert loss.shape == (lead if reduction == "none" else ())
        assert grads["student_hidden"].shape == lead + (H_S,)


def test_strided_inputs(kernels):
    # every operand a non-contiguous view: hidden states a slice of (B, T + 1, H), weights
    # transposed storage, bias and labels every other element, teacher logits a slice
    def view(x, kind):
        x = x.detach()
        if kind == "rows":  # (B, T, K) from (B, T + 1, K)
            x = torch.cat([x, x[:, :1]], 1)[:, :-1]
        elif kind == "t":  # (V, H) stored as (H, V)
            x = x.T.contiguous().T
        else:  # every other element
            x = torch.stack([x, x], -1)[..., 0]
        return x.requires_grad_()

    lead = (3, 5)
    inputs = {**head(lead, H_S, V, seed=80, bias=True), **teacher("logits", lead, V, seed=81)}
    kinds = {"student_hidden": "rows", "student_weight": "t", "student_bias": "step",
             "teacher_logits": "rows"}
    inputs = {k: view(v, kinds[k]).requires_grad_(v.requires_grad) for k, v in inputs.items()}
    assert not any(v.is_contiguous() for v in inputs.values())
    y = make_labels(lead, V, ignore=(2,))
    y = torch.stack([y, y], -1)[..., 0]
    tiled(inputs, y, divergence="jsd", temperature=2.0, hard_weight=0.3)
    assert len(kernels.calls) == 1


def test_extreme_logits_and_minus_inf(kernels):
    # logits of std ~300 (every softmax one-hot), teacher rows with -inf entries, one teacher
    # row -inf but for 2 tokens, one row whose student and teacher maxima sit in other tiles
    inputs = {**head((N,), H_S, V, seed=60, bias=True), **teacher("logits", (N,), V, seed=61)}
    inputs["student_weight"] = (inputs["student_weight"] * 100).detach().requires_grad_()
    t = inputs["teacher_logits"].detach().clone() * 100
    t[:, 5:9] = float("-inf")
    t[10, :] = float("-inf")
    t[10, [1, 50]] = 0.0
    t[11, 60] = 1e4
    inputs["teacher_logits"] = t
    y = make_labels((N,), V, ignore=(3,))
    loss, _ = tiled(inputs, y, divergence="kl", temperature=1.0, hard_weight=0.1)
    assert torch.isfinite(loss)
    # jsd and skew_kl at these one-hot rows: the gradient's q h - q S_q cancels next to q ~ 1,
    # so an error of S_q shows whole. The tiled forward's second pass once formed the
    # log-probabilities as x - (m + log l), rounding m + log l to ~eps |m| (|m| ~ 600 here):
    # 2e-5 - 7e-5 of the largest entry off float64. As x - m - log l (the backward's and the
    # chunked kernel's form) it is 1.4e-7, the chunked path's 2e-7
    for divergence in ["jsd", "skew_kl"]:
        kw = dict(divergence=divergence, temperature=1.0, hard_weight=0.1)
        loss, grads, grad_out = run("triton", inputs, y, chunk_size="tiled", **kw)
        cfg = pdl.functional.kd_config(**kw)
        gt_loss, gt = reference(inputs, y, cfg, grad_out, torch.float64)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), gt_loss, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            atol = 1e-6 * gt[name].abs().max().item()
            torch.testing.assert_close(g.double(), gt[name], rtol=2e-4, atol=atol,
                                       msg=lambda m, name=name: f"grad {name}: {m}")


def test_large_temperature_runs_chunked(kernels):
    # above T = 4 the tiled forward's online value loses ~T^2 eps (off by its own size at
    # T = 1e4): "tiled" runs the chunked path there, whose value keeps its precision
    inputs = {**head((N,), H_S, V, seed=70), **teacher("head", (N,), V, seed=71)}
    y = make_labels((N,), V, ignore=(3,))
    for temperature in (100.0, 1e4):
        loss, _ = tiled(inputs, y, divergence="jsd", temperature=temperature)
        cfg = pdl.functional.kd_config(divergence="jsd", temperature=temperature)
        gt = R.linear_kd_loss(**{k: v.detach().double() for k, v in inputs.items()}, labels=y,
                              cfg=cfg)
        assert abs(loss.item() - gt.item()) <= 1e-5 * abs(gt.item())
    assert kernels.calls == []
    tiled(inputs, y, divergence="jsd", temperature=4.0)
    assert len(kernels.calls) == 1


@pytest.mark.parametrize("frozen", ["weight", "hidden", "bias", "weight+bias"])
def test_frozen_parts(frozen, kernels, monkeypatch):
    wanted = []
    original = kernels.linear_kd_bwd

    def spy(heads, stats, scale, need):
        wanted.append(need)
        return original(heads, stats, scale, need)

    monkeypatch.setattr(kernels, "linear_kd_bwd", spy)
    inputs = {**head((N,), H_S, V, seed=6, bias=True), **teacher("head", (N,), V, seed=16)}
    for name in frozen.split("+"):
        inputs[f"student_{name}"].requires_grad_(False)
    _, grads = tiled(inputs, make_labels((N,), V, ignore=(1,)), divergence="kl",
                     temperature=2.0, hard_weight=0.5)
    assert set(grads) == {k for k, v in inputs.items() if v.requires_grad}
    # a frozen part is neither computed nor allocated
    assert wanted == [tuple(f"student_{k}" in grads for k in ("hidden", "weight", "bias"))]


def test_teacher_of_another_dtype_and_int32_labels(kernels):
    inputs = {**head((N,), H_S, V, seed=8),
              **teacher("head+bias", (N,), V, seed=18, dtype=torch.bfloat16)}
    y = make_labels((N,), V, ignore=(3,)).int()
    tiled(inputs, y, divergence="tvd", temperature=2.0, hard_weight=0.3)
    assert len(kernels.calls) == 1


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_and_empty(reduction, kernels):
    inputs = {**head((2, 3), H_S, V, seed=20, bias=True), **teacher("head", (2, 3), V, seed=21)}
    y = torch.full((2, 3), -100, device=DEVICE)
    loss, grads, _ = run("triton", inputs, y, hard_weight=1.0, reduction=reduction,
                         chunk_size="tiled")
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads.values():
        assert torch.equal(g, torch.zeros_like(g))
    inputs = {**head((0,), H_S, V, seed=22, bias=True), **teacher("logits", (0,), V, seed=23)}
    loss, grads, _ = run("triton", inputs, reduction=reduction, chunk_size="tiled",
                         grad_out=torch.ones(()) if reduction != "none" else torch.ones(0))
    assert loss.shape == (() if reduction != "none" else (0,)) and float(loss.sum()) == 0.0
    for name, g in grads.items():
        assert g.shape == inputs[name].shape and not g.any()


def test_backward_recomputes_so_it_runs_twice(kernels):
    # unlike the chunked path (gradients from the forward, handed over once)
    inputs = {**head((N,), H_S, V, seed=24), **teacher("head", (N,), V, seed=25)}
    x = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    loss = pdl.linear_kd_loss(**x, chunk_size="tiled", backend="triton", divergence="jsd")
    g1 = torch.autograd.grad(loss, x["student_weight"], retain_graph=True)[0]
    g2 = torch.autograd.grad(loss * 3.0, x["student_weight"])[0]
    torch.testing.assert_close(g2, 3.0 * g1)


def test_forward_only(kernels):
    # evaluation: no gradient wanted, the backward kernels never run
    inputs = {**head((N,), H_S, V, seed=26, grad=False), **teacher("logits", (N,), V, seed=27)}
    with torch.no_grad():
        a = pdl.linear_kd_loss(**inputs, temperature=2.0, chunk_size="tiled", backend="triton",
                               divergence="skew_kl", beta=0.2)
    b = R.linear_kd_loss(**{k: v.double() for k, v in inputs.items()},
                         cfg=pdl.functional.kd_config(temperature=2.0, divergence="skew_kl", beta=0.2))
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    assert len(kernels.calls) == 1


@pytest.mark.parametrize("why", ["teacher_grad", "topk", "torch_backend"])
def test_unsupported_calls_run_chunked(why, kernels):
    # what the tiled path does not implement falls back to the chunked one, with the same result
    inputs = {**head((N,), H_S, V, seed=70, bias=True),
              **teacher("head+bias", (N,), V, seed=71, grad=why == "teacher_grad")}
    y = make_labels((N,), V, ignore=(2,))
    kw = dict(divergence="kl", temperature=2.0, hard_weight=0.2)
    if why == "topk":
        del inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"]
        lp, idx = torch.log_softmax(randn((N, V), scale=3.0, seed=72), -1).topk(6, dim=-1)
        a, b = (pdl.linear_kd_loss(**inputs, teacher_topk=(lp, idx), teacher_temperature=1.0,
                                   labels=y, chunk_size=c, backend="triton", **kw)
                for c in ("tiled", "auto"))
        torch.testing.assert_close(a, b)
    else:
        backend = "torch" if why == "torch_backend" else "triton"
        check(backend, inputs, y, chunk_size="tiled", **kw)
    assert kernels.calls == []


def test_bfloat16_gradients_are_faithful(kernels, monkeypatch):
    # as test_linear_kd's bfloat16 test, smaller (interpreter), d(weight) accumulated over 3
    # vocabulary slabs of float32; one rounding of G before the gradient products, float32
    # atomics after: the error stays within BF16_BOUND x one rounding of the exact gradient.
    # Measured at test_linear_kd's size (512 x 64 x 1000, interpreter): d(hidden) 2.28e-3,
    # d(weight) 2.22e-3, d(bias) 1.61e-3 against 1.65e-3 / 1.66e-3 / 1.61e-3 for one rounding
    # (the chunked path: 2.79e-3 / 3.32e-3 / 2.39e-3)
    n, h, vocab = (512, 64, 1000) if CUDA else (96, 32, 150)
    if not CUDA:
        monkeypatch.setattr(kernels, "DW_SLAB_BYTES", 4 * h * 16 * 4)  # 4 tiles of 16 rows
    student = {k: v.detach() for k, v in head((n,), h, vocab, seed=40, bias=True).items()}
    student["student_weight"] *= 8.0 / 3.0
    near = {}
    for i, k in enumerate(["hidden", "weight"]):
        x = student[f"student_{k}"]
        near[f"teacher_{k}"] = x + 0.05 * randn(x.shape, seed=41 + i) * x.std()
    inputs = {k: v.to(torch.bfloat16).requires_grad_(k.startswith("student"))
              for k, v in {**student, **near}.items()}
    y = make_labels((n,), vocab, ignore=(3, 50))
    kw = dict(divergence="kl", temperature=2.0, hard_weight=0.3)
    cfg = pdl.functional.kd_config(**kw)
    _, grads, grad_out = run("triton", inputs, y, chunk_size="tiled", **kw)
    _, gt = reference(inputs, y, cfg, grad_out, torch.float64)
    for name, g in grads.items():
        err = float((g.double() - gt[name]).norm() / gt[name].norm())
        once = float((gt[name].to(torch.bfloat16).double() - gt[name]).norm() / gt[name].norm())
        assert err <= BF16_BOUND * once, f"{name}: {err:.2e} > {BF16_BOUND} x {once:.2e}"


def test_module_takes_tiled(kernels):
    inputs = {**head((2, 4), H_S, V, seed=28, bias=True), **teacher("head", (2, 4), V, seed=29)}
    mod = pdl.LinearKDLoss(chunk_size="tiled", backend="triton", divergence="jsd")
    torch.testing.assert_close(mod(**inputs), R.linear_kd_loss(
        **{k: v.detach().double() for k, v in inputs.items()},
        cfg=pdl.functional.kd_config(divergence="jsd")).float(), rtol=1e-5, atol=1e-6)
    assert "chunk_size='tiled'" in repr(mod) and len(kernels.calls) == 1

