"""The public losses under torch.compile(fullgraph=True) (registered custom ops,
pydistill/_custom_ops.py) on the CPU torch backend, and torch.library.opcheck of each op."""
import pytest
import torch

import pydistill
from pydistill import _custom_ops

from conftest import INTERPRETER_PROBLEM, peer

torch.manual_seed(0)


def _logits_step(loss_fn):
    def step(lin, x, *extra):
        return loss_fn(lin(x), *extra)
    return step


def _compare(make_step, lin_args, inputs, backend="aot_eager"):
    """Eager and compiled (fullgraph) training steps: same loss, same weight gradients. The
    compiled function is the forward to the loss (Tensor.backward inside a fullgraph region
    is not traced by default); AOT autograd compiles its backward, custom op's included.
    ``aot_eager`` (graph capture and AOT autograd on fake tensors, without Inductor's code
    generation) except once, to keep the file fast."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        lin = torch.nn.Linear(*lin_args)
        step = make_step()
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step, fullgraph=True, backend=backend)
        loss = step(lin, *inputs)  # the compiled forward; its backward is AOT-compiled too
        loss.backward()
        results.append((loss.detach(), lin.weight.grad.clone(), lin.bias.grad.clone()))
    (l0, w0, b0), (l1, w1, b1) = results
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(w1, w0)
    torch.testing.assert_close(b1, b0)


def test_kd_loss_compiles():
    x, t = torch.randn(3, 5, 8), torch.randn(3, 5, 16)
    labels = torch.randint(0, 16, (3, 5))
    labels[0, 0] = -100

    def make():
        return _logits_step(lambda s, t, y: pydistill.kd_loss(
            s, t, labels=y, hard_weight=0.5, temperature=2.0, divergence="jsd", backend="torch"))
    _compare(make, (8, 16), (x, t, labels), backend="inductor")  # the default, once (slow)


def test_kd_loss_none_compiles():
    x, t = torch.randn(6, 8), torch.randn(6, 16)
    w = torch.rand(6)

    def make():
        return _logits_step(lambda s, t: (pydistill.kd_loss(s, t, reduction="none") * w).sum())
    _compare(make, (8, 16), (x, t))


def test_topk_kd_loss_compiles():
    x = torch.randn(7, 8)
    lp, idx = torch.randn(7, 16).log_softmax(-1).topk(4)

    def make():
        return _logits_step(lambda s, lp, idx: pydistill.topk_kd_loss(s, lp, idx, backend="torch"))
    _compare(make, (8, 16), (x, lp, idx))


def test_linear_kd_loss_compiles():
    x = torch.randn(2, 5, 8)
    w_s = torch.randn(16, 6)
    h_t, w_t = torch.randn(2, 5, 6), torch.randn(20, 6)

    def make():
        def step(lin, x, w_s, h_t, w_t):
            loss = pydistill.linear_kd_loss(lin(x), w_s, h_t, w_t, chunk_size=3, backend="torch")
            return loss
        return step
    _compare(make, (8, 6), (x, w_s, h_t, w_t))


def test_linear_kd_loss_transforms_and_entropy_compile():
    x = torch.randn(2, 5, 8)
    w_s = torch.randn(16, 6)
    h_t, w_t = torch.randn(2, 5, 6), torch.randn(16, 6)
    y = torch.randint(0, 16, (2, 5))
    y[1, 2] = -100

    def make():
        def step(lin, x, w_s, h_t, w_t, y):
            loss, entropy = pydistill.linear_kd_loss(
                lin(x), w_s, h_t, w_t, labels=y, chunk_size=3, backend="torch", divergence="jsd",
                student_logit_scale=0.5, student_softcap=3.0, teacher_logit_scale=2.0,
                return_entropy=True)
            return loss + entropy.sum()  # the entropy carries no gradient
        return step
    _compare(make, (8, 6), (x, w_s, h_t, w_t, y))


def test_attention_kd_loss_compiles():
    x = torch.randn(2, 6, 8)
    t_q, t_k = torch.randn(2, 2, 6, 4), torch.randn(2, 1, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0

    def make():
        def step(lin, x, t_q, t_k, mask):
            qk = lin(x).view(2, 6, 3, 4).transpose(1, 2)
            loss = pydistill.attention_kd_loss(qk[:, :2], qk[:, 2:], t_q, t_k, attention_mask=mask,
                                               causal=True, backend="torch")
            return loss
        return step
    _compare(make, (8, 12), (x, t_q, t_k, mask))


# ---- opcheck: each op, a few option sets, for real on CPU tensors --------------------------

_NO_TRANSFORM = [1.0, 0.0, 1.0, 0.0]  # student scale, soft-cap (0: none), teacher scale, soft-cap
_KD_OPTS = [  # divergence, temperature, beta, ignore_index, hard_w, soft_w, t2, transform, reduction
    ("kl", 1.0, 0.5, -100, 0.0, 1.0, True, _NO_TRANSFORM, "mean"),
    ("jsd", 2.0, 0.3, -100, 0.5, 1.0, False, [1.0, 20.0, 1.0, 20.0], "sum"),
    ("reverse_kl", 1.5, 0.5, -100, 0.0, 1.0, True, [0.5, 0.0, 2.0, 3.0], "none"),
]


def _detached(args):  # the backward ops are not differentiable themselves
    return tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args)


def _req(x):
    return x.clone().requires_grad_(True)


@pytest.mark.parametrize("opts", _KD_OPTS)
def test_opcheck_kd_loss(opts):
    s, t = _req(torch.randn(4, 12)), _req(torch.randn(4, 12))
    labels = torch.tensor([1, -100, 3, 0])
    torch.library.opcheck(_custom_ops.kd_loss_op, (s, t, labels, *opts, "torch", True, True))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_opcheck_topk_kd_loss(tail):
    s = _req(torch.randn(5, 12))
    lp, idx = torch.randn(5, 12).log_softmax(-1).topk(3)
    for red in ("mean", "none"):
        torch.library.opcheck(_custom_ops.topk_kd_loss_op, (
            s, lp, idx, None, tail, None, "kl", 1.0, 0.5, -100, 0.0, 1.0, True,
            [0.7, 4.0, 1.0, 0.0], red, "torch", True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_linear_kd_loss(reduction):
    h, w = _req(torch.randn(6, 4)), torch.randn(10, 4)
    b = _req(torch.randn(10))
    h_t, w_t = _req(torch.randn(6, 5)), _req(torch.randn(9, 5))  # V_t < V_s: finite kl
    kd = ("kl", 1.0, 0.5, -100, 0.0, 1.0, True, [1.3, 0.0, 0.8, 5.0], reduction)
    needs = [True, False, True, True, True, False, False]
    args = (None, h, w, b, h_t, w_t, None, None, None, None, 4, "bucket", None, *kd, "torch", needs)
    for entropy, components in ((False, False), (True, False), (False, True), (True, True)):
        torch.library.opcheck(_custom_ops.linear_kd_loss_op, (*args, entropy, components))
    if reduction == "none":
        g = torch.rand(6)
        torch.library.opcheck(_custom_ops.linear_kd_loss_backward_op, (g, *_detached(args)))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_attention_kd_loss(reduction):
    sq, sk = _req(torch.randn(2, 2, 5, 4)), _req(torch.randn(2, 1, 5, 4))
    tq, tk = torch.randn(2, 2, 5, 3), torch.randn(2, 2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    needs = [True, True, False, False]
    args = (sq, sk, tq, tk, mask, True, 0.5, 3 ** -0.5, reduction, "torch", needs)
    torch.library.opcheck(_custom_ops.attention_kd_loss_op, args)
    if reduction == "none":
        torch.library.opcheck(_custom_ops.attention_kd_loss_backward_op,
                              (torch.rand(2, 2, 5), *_detached(args)))


@pytest.fixture
def through_ops(monkeypatch):
    monkeypatch.setattr(_custom_ops, "FORCE", True)


def _eager_both_ways(monkeypatch, fn, inputs):
    out = []
    for force in (False, True):
        monkeypatch.setattr(_custom_ops, "FORCE", force)
        xs = [_req(x) if x.is_floating_point() else x for x in inputs]
        loss = fn(*xs)
        w = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)
        grads = torch.autograd.grad((loss * w).sum(), [x for x in xs if x.requires_grad])
        out.append((loss, grads))
    torch.testing.assert_close(out[1], out[0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ops_equal_functions_eager(monkeypatch, reduction):
    s, t = torch.randn(4, 12), torch.randn(4, 12)
    _eager_both_ways(monkeypatch, lambda s, t: pydistill.kd_loss(
        s, t, divergence="tvd", reduction=reduction, backend="torch"), (s, t))
    lp, idx = torch.randn(4, 12).log_softmax(-1).topk(3)
    _eager_both_ways(monkeypatch, lambda s: pydistill.topk_kd_loss(
        s, lp, idx, reduction=reduction, backend="torch"), (s,))
    h, w, h_t, w_t = torch.randn(4, 6), torch.randn(12, 6), torch.randn(4, 5), torch.randn(10, 5)
    _eager_both_ways(monkeypatch, lambda h, h_t, w_t: pydistill.linear_kd_loss(
        h, w, h_t, w_t, reduction=reduction, chunk_size=3, backend="torch"), (h, h_t, w_t))
    transforms = dict(student_logit_scale=0.6, teacher_softcap=2.0, teacher_logit_scale=1.4)
    _eager_both_ways(monkeypatch, lambda s, t: pydistill.kd_loss(
        s, t, reduction=reduction, backend="torch", **transforms), (s, t))
    _eager_both_ways(monkeypatch, lambda h, h_t, w_t: pydistill.linear_kd_loss(
        h, w, h_t, w_t, reduction=reduction, chunk_size=3, backend="torch", **transforms),
        (h, h_t, w_t))
    both = []
    for force in (False, True):  # the entropy output through the op as well
        monkeypatch.setattr(_custom_ops, "FORCE", force)
        both.append(pydistill.linear_kd_loss(h, w, h_t, w_t, reduction=reduction, chunk_size=3,
                                             backend="torch", return_entropy=True, **transforms))
    torch.testing.assert_close(both[1], both[0])
    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 1, 5, 4)
    _eager_both_ways(monkeypatch, lambda q, k, tq: pydistill.attention_kd_loss(
        q, k, tq, k.detach(), reduction=reduction, backend="torch"),
        (q, k, torch.randn(2, 2, 5, 4)))


def test_eager_overhead_is_small(through_ops):
    """The op wrapper is a thin layer: compare with the backend's Function directly."""
    from pydistill.reference.softmax_divergence import ChunkedKDLoss, KDConfig
    import time

    s, t = torch.randn(8, 64, requires_grad=True), torch.randn(8, 64)

    def best(fn, n=50):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn().backward()
            times.append(time.perf_counter() - t0)
        return min(times)
    direct = best(lambda: ChunkedKDLoss.apply(s, t, None, KDConfig()))
    via_op = best(lambda: pydistill.kd_loss(s, t, backend="torch"))
    assert via_op < direct + 2e-3  # generous: well under a millisecond measured


def test_causal_lm_kd_loss_fullgraph():
    """The integration's fused loss, traced inside the compiled student (no graph break)."""
    peer("transformers")
    from pydistill.integrations import causal_lm_kd_loss
    from test_integrations import LOSS, batch, tiny_llama

    student, teacher = tiny_llama(32, 1, 40, 3), tiny_llama(32, 1, 40, 4)
    inputs = batch(2, 10, 40, 5)
    want = causal_lm_kd_loss(student, teacher, inputs, LOSS)
    (g_want,) = torch.autograd.grad(want, student.lm_head.weight)
    torch._dynamo.reset()
    compiled = torch.compile(student, fullgraph=True, backend="aot_eager")
    got = causal_lm_kd_loss(compiled, teacher, inputs, LOSS)
    (g,) = torch.autograd.grad(got, student.lm_head.weight)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, g_want)


def _triton_device():
    """The device the Triton backend runs on here (the CPU under the interpreter), or skip."""
    from pydistill import _dispatch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = _dispatch.why_unavailable("triton", device)
    if reason is None and device.type == "cpu":
        reason = INTERPRETER_PROBLEM
    if reason is not None:
        pytest.skip(reason)
    return device


def test_triton_backend_compiles_and_opchecks():
    """kd_loss on the Triton backend (on the CPU under the interpreter; on a GPU, CUDA tensors)."""
    device = _triton_device()
    x, t = torch.randn(6, 8, device=device), torch.randn(6, 16, device=device)

    def make():
        return _logits_step(lambda s, t: pydistill.kd_loss(s, t, temperature=2.0, backend="triton"))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        lin = torch.nn.Linear(8, 16).to(device)
        step = make()
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss = step(lin, x, t)
        loss.backward()
        results.append((loss.detach(), lin.weight.grad.clone()))
    torch.testing.assert_close(results[1], results[0])
    s, t = _req(torch.randn(4, 12, device=device)), _req(torch.randn(4, 12, device=device))
    torch.library.opcheck(_custom_ops.kd_loss_op, (s, t, None, "kl", 1.0, 0.5, -100, 0.0, 1.0,
                                                   True, _NO_TRANSFORM, "mean", "triton", True, True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_tiled_linear_kd_compiles_and_opchecks(reduction):
    """linear_kd_loss(chunk_size="tiled") through the custom op (chunk_size -1 there)."""
    device = _triton_device()
    h, w = torch.randn(6, 16, device=device), torch.randn(20, 16, device=device)
    h_t, w_t = torch.randn(6, 24, device=device), torch.randn(18, 24, device=device)
    g = torch.rand(6, device=device)

    def loss_fn(h, w):
        out = pydistill.linear_kd_loss(h, w, h_t, w_t, temperature=2.0, chunk_size="tiled",
                                       backend="triton", reduction=reduction)
        return (out * g).sum() if reduction == "none" else out

    results = []
    for compiled in (False, True):
        hh, ww = _req(h), _req(w)
        fn = loss_fn
        if compiled:
            torch._dynamo.reset()
            fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        loss = fn(hh, ww)
        loss.backward()
        results.append((loss.detach(), hh.grad, ww.grad))
    torch.testing.assert_close(results[1], results[0])
    kd = ("kl", 2.0, 0.5, -100, 0.0, 1.0, True, _NO_TRANSFORM, reduction)
    args = (None, _req(h), _req(w), None, h_t, w_t, None, None, None, None, -1, "bucket", None,
            *kd, "triton", [True, True])
    for entropy in (False, True):  # the tiled kernels accumulate the entropy too
        torch.library.opcheck(_custom_ops.linear_kd_loss_op, (*args, entropy))
