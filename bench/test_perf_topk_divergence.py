"""pytest-benchmark regression benchmarks of ``topk_kd_loss`` (an offline top-k teacher):
small fixed shapes, every call synchronised with the device.

    python -m pytest bench/test_perf_topk_divergence.py
    python -m pytest bench/test_perf_topk_divergence.py --benchmark-disable  # run once

Not part of the test suite; asserts no time. On the CPU the torch backend; on CUDA also
Triton (both gradient schedules). The teacher is the top-K of an independent teacher's
log-softmax, ids in random order (as bench/bench_topk_divergence.py makes them).
"""
import pytest
import torch

import pydistill

from pydistill.bench.harness import backend_params, benchmark_pass

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (N, V, K): Qwen-sized vocabulary on a GPU; CPU-sized otherwise.
SHAPES = [(4096, 151936, 64), (4096, 32000, 256)] if CUDA else [(128, 4096, 64), (256, 32000, 64)]
ROUNDS = 20 if CUDA else 5
TEMPERATURE = 2.0


def _teacher(n, v, k, gen):
    teacher = 2.0 * torch.randn(n, v, device=DEVICE, generator=gen)
    logprobs, ids = torch.log_softmax(teacher / TEMPERATURE, -1).topk(k, dim=-1)
    order = torch.rand(n, k, device=DEVICE, generator=gen).argsort(-1)
    return logprobs.gather(-1, order).to(DTYPE), ids.gather(-1, order)


@pytest.mark.parametrize("pass_name", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("n,v,k", SHAPES, ids=[f"{n}x{v}k{k}" for n, v, k in SHAPES])
@pytest.mark.parametrize("tail", ["bucket", "ignore"])
@pytest.mark.parametrize("backend,grad_mode",
                         backend_params("topk_kd_loss", DEVICE, ("recompute", "forward")))
def test_topk_kd_loss(benchmark, monkeypatch, backend, grad_mode, tail, n, v, k, pass_name):
    monkeypatch.setenv("PYDISTILL_KD_GRAD", grad_mode)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    student = (2.0 * torch.randn(n, v, device=DEVICE, dtype=DTYPE, generator=gen)).requires_grad_()
    logprobs, ids = _teacher(n, v, k, gen)

    def loss():
        return pydistill.topk_kd_loss(student, logprobs, ids, tail=tail, temperature=TEMPERATURE,
                                      teacher_temperature=TEMPERATURE, backend=backend)

    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), N=n, V=v, K=k)
    benchmark_pass(benchmark, loss, [student], pass_name, DEVICE, ROUNDS)
