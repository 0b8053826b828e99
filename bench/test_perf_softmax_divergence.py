"""pytest-benchmark regression benchmarks of ``kd_loss``: small fixed shapes, every call
synchronised with the device, so that two commits can be compared on one machine.

    python -m pytest bench/test_perf_softmax_divergence.py                      # time
    python -m pytest bench/test_perf_softmax_divergence.py --benchmark-disable  # run once
    python -m pytest bench/test_perf_*.py --benchmark-autosave                   # all three
    python -m pytest bench/test_perf_*.py --benchmark-compare

Not part of the test suite (pyproject's testpaths is ``tests``). On the CPU: the torch
backend; on CUDA also the Triton backend with both gradient schedules. Nothing here asserts
a time (only that the result is finite); the floors and the peers are ``python -m pydistill.bench``'s
job.
"""
import pytest
import torch

import pydistill

from pydistill.bench.harness import backend_params, benchmark_pass

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (N, V): a short and a long vocabulary, small enough for a CPU, fixed so runs compare.
SHAPES = [(2048, 32000), (512, 128256)] if CUDA else [(128, 4096), (256, 32000)]
ROUNDS = 20 if CUDA else 5
TEMPERATURE = 2.0


@pytest.mark.parametrize("pass_name", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"{n}x{v}" for n, v in SHAPES])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("backend,grad_mode",
                         backend_params("kd_loss", DEVICE, ("recompute", "forward")))
def test_kd_loss(benchmark, monkeypatch, backend, grad_mode, divergence, n, v, pass_name):
    monkeypatch.setenv("PYDISTILL_KD_GRAD", grad_mode)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    student = (2.0 * torch.randn(n, v, device=DEVICE, dtype=DTYPE, generator=gen)).requires_grad_()
    teacher = 2.0 * torch.randn(n, v, device=DEVICE, dtype=DTYPE, generator=gen)

    def loss():
        return pydistill.kd_loss(student, teacher, divergence=divergence,
                                 temperature=TEMPERATURE, backend=backend)

    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), N=n, V=v)
    benchmark_pass(benchmark, loss, [student], pass_name, DEVICE, ROUNDS)
