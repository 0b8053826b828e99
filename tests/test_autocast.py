"""Every public loss computes in float32 whatever autocast is active.

Under ``torch.autocast`` PyTorch runs matmuls (and some other ops) in the autocast dtype; a
loss that let it would quietly lose precision (bf16 score GEMMs: relative errors of 1e-3).
Each loss disables autocast inside, so a call under bfloat16 autocast (of the tests' device:
CPU autocast here, CUDA autocast on a GPU, the same code path: the losses disable autocast for
the device type of their inputs) must give the value and gradients of the same call outside
it.
"""
import pytest
import torch

import pydistill as pdl

from conftest import DEVICE, available_backends

F32 = torch.float32


def _randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F32).to(DEVICE)


def _cases():
    """(name, make inputs, how many are the student's, call) for every public loss; float32
    inputs of irregular small sizes."""
    labels = torch.tensor([1, -100, 4, 0, 6, 2], device=DEVICE)

    def logits(seed):
        return _randn(6, 13, seed=seed) * 3

    def topk():
        lp = torch.log_softmax(logits(1), -1)
        vals, ids = lp.topk(5, -1)
        return vals, ids

    def linear():
        return (_randn(6, 7, seed=2), _randn(13, 7, seed=3), _randn(6, 9, seed=4),
                _randn(13, 9, seed=5))

    def qk():
        return tuple(_randn(2, 2, 5, 8, seed=10 + i) * 2 for i in range(4))

    # (name, inputs, how many of them are the student's, call)
    return [
        ("kd_loss", lambda: (logits(0), logits(1)), 1,
         lambda s, t, b: pdl.kd_loss(s, t, temperature=2.0, labels=labels, hard_weight=0.5,
                                     backend=b)),
        ("topk_kd_loss", lambda: (logits(0),), 1,
         lambda s, b: pdl.topk_kd_loss(s, *topk(), labels=labels, teacher_temperature=1.0,
                                          backend=b)),
        ("linear_kd_loss", linear, 2,
         lambda hs, ws, ht, wt, b: pdl.linear_kd_loss(hs, ws, ht, wt, labels=labels, backend=b)),
        ("attention_kd_loss/kl", qk, 2,
         lambda a, b_, c, d, b: pdl.attention_kd_loss(a, b_, c, d, backend=b)),
        ("attention_kd_loss/mse_scores", qk, 2,
         lambda a, b_, c, d, b: pdl.attention_kd_loss(a, b_, c, d, loss="mse_scores", backend=b)),
        ("relation_kd_loss", lambda: (_randn(2, 5, 12, seed=6), _randn(2, 5, 8, seed=7)), 1,
         lambda s, t, b: pdl.relation_kd_loss(s, t, num_relation_heads=2, backend=b)),
        ("uld_loss", lambda: (logits(0), _randn(6, 17, seed=8)), 1,
         lambda s, t, b: pdl.uld_loss(s, t, labels=labels, backend=b)),
        ("attention_transfer_loss", lambda: (_randn(2, 3, 4, 5, seed=9), _randn(2, 6, 4, 5, seed=11)), 1,
         lambda s, t, b: pdl.attention_transfer_loss(s, t)),
        ("hint_loss", lambda: (_randn(4, 7, seed=12), _randn(4, 7, seed=13)), 1,
         lambda s, t, b: pdl.hint_loss(s, t)),
        ("rkd_loss", lambda: (_randn(5, 7, seed=15), _randn(5, 9, seed=16)), 1,
         lambda s, t, b: pdl.rkd_loss(s, t)),
    ]


_BACKENDS = {"kd_loss": "kd_loss", "topk_kd_loss": "topk_kd_loss",
             "linear_kd_loss": "linear_kd_loss", "attention_kd_loss/kl": "attention_kd_loss",
             "attention_kd_loss/mse_scores": "attention_kd_loss",
             "relation_kd_loss": "attention_kd_loss", "uld_loss": "uld_loss"}


def _params():
    for name, make, n_student, call in _cases():
        op = _BACKENDS.get(name)
        backends = available_backends(op) if op else ["torch"]
        for backend in backends:
            for inside in (False, True):
                where = "backward-inside" if inside else "backward-outside"
                yield pytest.param(make, n_student, call, backend, inside,
                                   id=f"{name}-{backend}-{where}")


def _value_and_grads(make, n_student, call, backend, autocast=False, backward_inside=False):
    """The loss and the gradients of the student's inputs (and of the teacher's on the torch
    backend, the one that differentiates every teacher), the loss called under bfloat16
    autocast or not, its backward inside that region or after it."""
    xs = make()
    wanted = xs if backend == "torch" else xs[:n_student]
    for x in wanted:
        x.requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        out = call(*xs, backend)
        if backward_inside:
            return out.detach(), torch.autograd.grad(out, wanted)
    return out.detach(), torch.autograd.grad(out, wanted)


@pytest.mark.parametrize("make, n_student, call, backend, backward_inside", list(_params()))
def test_losses_compute_in_float32_under_autocast(make, n_student, call, backend, backward_inside):
    want, want_grads = _value_and_grads(make, n_student, call, backend)
    got, grads = _value_and_grads(make, n_student, call, backend, True, backward_inside)
    assert got.dtype == F32
    # float32 throughout: equal to float32 rounding (bf16 anywhere is ~1e-3 off)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for g, w in zip(grads, want_grads):
        assert g.dtype == F32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
