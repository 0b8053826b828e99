"""pytest-benchmark regression benchmarks of ``linear_kd_loss`` (distillation fused with the
LM head): small fixed shapes, every call synchronised with the device.

    python -m pytest bench/test_perf_linear_kd.py
    python -m pytest bench/test_perf_linear_kd.py --benchmark-disable  # run once

Not part of the test suite; asserts no time. Student hidden states and head weight require
grad, the teacher's do not. On the CPU the torch backend; on CUDA also Triton.
"""
import math

import pytest
import torch

import pydistill

from pydistill.bench.harness import backend_params, benchmark_pass

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (N, H, V): Llama-3-sized head on a GPU; CPU-sized otherwise (both models of width H).
SHAPES = [(4096, 4096, 128256), (8192, 2048, 32000)] if CUDA else [(128, 256, 8192), (512, 256, 8192)]
ROUNDS = 10 if CUDA else 3
TEMPERATURE = 2.0


@pytest.mark.parametrize("pass_name", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("n,h,v", SHAPES, ids=[f"{n}x{h}x{v}" for n, h, v in SHAPES])
@pytest.mark.parametrize("chunk_size", ["auto", "tiled"])
@pytest.mark.parametrize("backend,grad_mode", backend_params("linear_kd_loss", DEVICE))
def test_linear_kd_loss(benchmark, backend, grad_mode, chunk_size, n, h, v, pass_name):
    if chunk_size == "tiled" and backend != "triton":
        pytest.skip("the tiled kernels are Triton's")
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=DEVICE, generator=gen)).to(DTYPE)

    student_hidden = randn(n, h).requires_grad_()
    student_weight = randn(v, h, scale=3.0 / math.sqrt(h)).requires_grad_()
    teacher_hidden, teacher_weight = randn(n, h), randn(v, h, scale=3.0 / math.sqrt(h))

    def loss():
        return pydistill.linear_kd_loss(student_hidden, student_weight, teacher_hidden,
                                        teacher_weight, temperature=TEMPERATURE, backend=backend,
                                        chunk_size=chunk_size)

    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), N=n, H=h, V=v,
                                chunk_size=chunk_size)
    benchmark_pass(benchmark, loss, [student_hidden, student_weight], pass_name, DEVICE, ROUNDS)
