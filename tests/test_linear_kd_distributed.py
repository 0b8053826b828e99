"""linear_kd_loss with the heads sharded over the vocabulary (process_group): two processes on
the gloo backend, on the CPU. On every rank the sharded run must give the unsharded loss, the
unsharded d(hidden), and this rank's rows of the unsharded weight / bias / logits gradients.

All cases run in one spawn of two processes (their start-up, ~5 s, is most of the time).
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pydistill as pdl

from test_softmax_divergence import _gen

N, H_S, H_T = 11, 16, 20

# (name, options): the shards are given by their sizes, rank 0 first.
CASES = [
    ("kl, even shards, hard CE, ignored rows, float64",
     dict(teacher="head+bias", v_s=(20, 20), v_t=(20, 20), divergence="kl", hard_weight=0.3,
          temperature=2.0, chunk_size=4)),
    ("jsd, ragged shards, sum, teacher requires grad",
     dict(teacher="head+bias", v_s=(23, 14), v_t=(23, 14), divergence="jsd", beta=0.3,
          hard_weight=0.2, reduction="sum", teacher_grad=True, chunk_size=3)),
    ("jsd, student vocabulary shorter at its end, softcap, none",
     dict(teacher="head", v_s=(20, 17), v_t=(20, 20), vocab_mismatch="pad", divergence="jsd", beta=0.7, softcap=5.0,
          hard_weight=0.5, reduction="none", chunk_size=5)),
    ("kl, teacher logits shorter at the end, T = 1 hard term, auto chunks",
     dict(teacher="logits", v_s=(20, 20), v_t=(20, 15), vocab_mismatch="pad", divergence="kl", hard_weight=1.0,
          teacher_grad=True, chunk_size="auto")),
    ("skew_reverse_kl, float32",
     dict(teacher="head", v_s=(18, 18), v_t=(18, 18), divergence="skew_reverse_kl", beta=0.1,
          hard_weight=0.1, temperature=1.5, chunk_size=4, dtype=torch.float32)),
]


def _randn(shape, dtype, scale, seed, grad):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype).requires_grad_(grad)


def _full_inputs(case, dtype):
    """The unsharded inputs, identical on every rank (same seeds)."""
    v_s, v_t = sum(case["v_s"]), sum(case["v_t"])
    grad_t = case.get("teacher_grad", False)
    x = {
        "student_hidden": _randn((N, H_S), dtype, 1.0, 1, True),
        "student_weight": _randn((v_s, H_S), dtype, 3.0 / math.sqrt(H_S), 2, True),
        "student_bias": _randn((v_s,), dtype, 0.5, 3, True),
    }
    if case["teacher"] == "logits":
        x["teacher_logits"] = _randn((N, v_t), dtype, 3.0, 4, grad_t)
    else:
        x["teacher_hidden"] = _randn((N, H_T), dtype, 1.0, 5, grad_t)
        x["teacher_weight"] = _randn((v_t, H_T), dtype, 3.0 / math.sqrt(H_T), 6, grad_t)
        if case["teacher"] == "head+bias":
            x["teacher_bias"] = _randn((v_t,), dtype, 0.5, 7, grad_t)
    labels = torch.randint(0, min(v_s, v_t), (N,), generator=_gen(8))
    labels[[1, 6]] = -100
    return x, labels


def _block(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _shard(name, x, case, rank):
    """This rank's part of input ``name``: vocabulary rows of weights and biases, columns of
    the teacher logits; hidden states are replicated."""
    if name.startswith("student_") and name != "student_hidden":
        return x[_block(case["v_s"], rank)]
    if name in ("teacher_weight", "teacher_bias"):
        return x[_block(case["v_t"], rank)]
    if name == "teacher_logits":
        return x[:, _block(case["v_t"], rank)]
    return x


def _loss_and_grads(inputs, labels, options, group):
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    loss = pdl.linear_kd_loss(**leaves, labels=labels, process_group=group, backend="torch", **options)
    grad_out = torch.rand(loss.shape, generator=_gen(9), dtype=loss.dtype) + 0.5
    wanted = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in wanted], grad_out)
    return loss.detach(), dict(zip(wanted, grads))


def _check_case(rank, name, case):
    options = {k: v for k, v in case.items() if k not in ("teacher", "v_s", "v_t", "teacher_grad", "dtype")}
    dtype = case.get("dtype", torch.float64)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    full, labels = _full_inputs(case, dtype)
    want_loss, want = _loss_and_grads(full, labels, options, None)
    shards = {k: _shard(k, v, case, rank) for k, v in full.items()}
    got_loss, got = _loss_and_grads(shards, labels, options, dist.group.WORLD)
    where = f"case {name!r}, rank {rank}"
    torch.testing.assert_close(got_loss, want_loss, **tol, msg=lambda m: f"{where}, loss: {m}")
    assert set(got) == set(want), where
    for k, g in got.items():
        torch.testing.assert_close(g, _shard(k, want[k], case, rank), **tol,
                                   msg=lambda m, k=k: f"{where}, grad {k}: {m}")


def _check_restrict_refused(rank):
    # vocab_mismatch="restrict" (the default) with blocks of unequal sizes on one rank only:
    # every rank raises the same error (none is left waiting in a collective)
    g = _gen(9)
    h = torch.randn(3, 4, generator=g, dtype=torch.float64)
    w_s = torch.randn(5 if rank == 0 else 4, 4, generator=g, dtype=torch.float64)
    w_t = torch.randn(5, 4, generator=g, dtype=torch.float64)
    for mode in ("restrict", "error"):
        with pytest.raises(ValueError, match=f"vocab_mismatch='{mode}'.*rank 1: student 4 rows, teacher 5"):
            pdl.linear_kd_loss(h, w_s, h, w_t, process_group=dist.group.WORLD, chunk_size=2,
                               vocab_mismatch=mode, backend="torch")
    dist.barrier()


def _worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, case in CASES:
            _check_case(rank, name, case)
        _check_restrict_refused(rank)
    finally:
        dist.destroy_process_group()


def test_vocabulary_parallel_equals_unsharded(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


def test_process_group_without_init_is_a_clear_error():
    h, w = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="process_group.*not initialised"):
        pdl.linear_kd_loss(h, w, teacher_logits=torch.randn(2, 5), process_group=object())
