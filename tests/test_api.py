"""Packaging and dispatch: what a user sees before any kernel runs."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pydistill as pdl
from pydistill import _dispatch

from conftest import CUDA, DEVICE, available_backends


def run_python(code: str, **env):
    """Run ``code`` in a fresh interpreter outside the repository (so only the installed
    package is importable) and return its stdout."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYDISTILL_")}
    full_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd="/", env=full_env,
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_needs_no_triton_and_no_gpu():
    out = run_python(
        """
        import sys
        sys.modules["triton"] = None  # as if Triton were not installed
        import torch, pydistill as pdl
        assert "pydistill.kernels.softmax_divergence" not in sys.modules
        s = torch.randn(3, 5, requires_grad=True)
        pdl.kd_loss(s, torch.randn(3, 5)).backward()
        try:
            pdl.kd_loss(s, torch.randn(3, 5), backend="triton")
        except ValueError as e:
            print(e)
        """,
        CUDA_VISIBLE_DEVICES="",
    )
    assert "Triton is not installed" in out and "Runnable here: ['torch']" in out


def test_auto_is_torch_on_cpu_tensors():
    assert _dispatch.resolve("kd_loss", "auto", torch.device("cpu"), (torch.float32,)) == "torch"
    assert _dispatch.resolve("kd_loss", "auto", torch.device("cpu"), (torch.bfloat16,)) == "torch"


@pytest.mark.skipif(not CUDA, reason="auto on CUDA tensors")
def test_auto_on_cuda_prefers_triton_and_falls_back_for_float64():
    dev = torch.device("cuda")
    assert _dispatch.resolve("kd_loss", "auto", dev, (torch.bfloat16,)) == "triton"
    assert _dispatch.resolve("kd_loss", "auto", dev, (torch.float64,)) == "torch"


def test_environment_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("PYDISTILL_BACKEND", "torch")
    assert _dispatch.resolve("kd_loss", "auto", cpu, (torch.float32,)) == "torch"
    monkeypatch.setenv("PYDISTILL_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="PYDISTILL_BACKEND.*'tritonn'"):
        _dispatch.resolve("kd_loss", "auto", cpu, (torch.float32,))
    # an explicit argument wins over the environment
    assert _dispatch.resolve("kd_loss", "torch", cpu, (torch.float32,)) == "torch"


def test_environment_override_reaches_the_kernels(monkeypatch):
    if "triton" not in available_backends():
        pytest.skip("Triton cannot run here")
    calls = []
    from pydistill.ops import softmax_divergence as ops

    original = ops.TritonKDLoss.forward

    def spy(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    monkeypatch.setattr(ops.TritonKDLoss, "forward", staticmethod(spy))
    monkeypatch.setenv("PYDISTILL_BACKEND", "triton")
    pdl.kd_loss(torch.randn(2, 9, device=DEVICE), torch.randn(2, 9, device=DEVICE))
    assert calls == [1]


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton'.*CUDA tensors.*Runnable here: \[.*'torch'\]"):
        pdl.kd_loss(torch.randn(2, 5), torch.randn(2, 5), backend="triton")


def test_unknown_grad_schedule_is_a_clear_error(monkeypatch):
    from pydistill.ops import softmax_divergence as ops

    monkeypatch.setenv("PYDISTILL_KD_GRAD", "later")
    with pytest.raises(ValueError, match="PYDISTILL_KD_GRAD.*'later'"):
        ops.grad_mode()


def test_public_names():
    for name in ["kd_loss", "KDLoss", "DIVERGENCES", "REDUCTIONS", "BACKENDS", "__version__"]:
        assert hasattr(pdl, name)
    assert pdl.DIVERGENCES == ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")
    assert set(pdl.REDUCTIONS) == {"mean", "batchmean", "sum", "none"}


def test_dispatch_table_entries_import():
    # every entry of the one table points at an autograd Function that exists (the cuda
    # backend's ops carry their own autograd: its entry only has the same apply())
    for op, backends in _dispatch.TABLE.items():
        for backend in backends:
            if backend not in available_backends(op):
                continue
            fn = _dispatch.implementation(op, backend)
            assert issubclass(fn, torch.autograd.Function) or (backend == "cuda" and callable(fn.apply))


def test_resolve_backend_is_public_and_checks_like_the_loss():
    x = torch.empty(2, 3)
    assert pdl.resolve_backend("kd_loss", x, x) == "torch"
    with pytest.raises(ValueError, match="op: expected one of"):
        pdl.resolve_backend("kd", x)
    if "triton" in available_backends():
        with pytest.raises(TypeError, match="float64"):
            pdl.resolve_backend("kd_loss", x.double(), backend="triton")


_MODULES = {  # module -> (its op in the dispatch table, the constructor's required arguments)
    pdl.KDLoss: ("kd_loss", {}),
    pdl.TopKKDLoss: ("topk_kd_loss", {"teacher_temperature": 1.0}),
    pdl.LinearKDLoss: ("linear_kd_loss", {}),
    pdl.AttentionKDLoss: ("attention_kd_loss", {}),
    pdl.RelationKDLoss: ("attention_kd_loss", {"num_relation_heads": 2}),
    pdl.ULDLoss: ("uld_loss", {}),
    pdl.LinearULDLoss: ("linear_uld_loss", {}),
}


@pytest.mark.parametrize("module", list(_MODULES), ids=lambda m: m.__name__)
def test_modules_refuse_bad_backend_at_construction(module):
    """A bad ``backend=`` fails when the module is built, not at its first call: an unknown
    name, a backend with no implementation of the module's op, a non-str."""
    op, required = _MODULES[module]
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto'.*got 'bogus'"):
        module(backend="bogus", **required)
    for backend in _dispatch.BACKENDS:
        if backend != "auto" and backend not in _dispatch.TABLE[op]:
            with pytest.raises(ValueError, match=f"backend: expected one of .* for {op}, got '{backend}'"):
                module(backend=backend, **required)
    with pytest.raises(TypeError, match="backend: expected a str"):
        module(backend=3, **required)
    for backend in ("auto", *_dispatch.TABLE[op]):  # availability is the call's to check
        assert module(backend=backend, **required).backend == backend


@pytest.mark.parametrize("module", list(_MODULES), ids=lambda m: m.__name__)
def test_modules_refuse_bad_divergence_and_reduction_at_construction(module):
    _, required = _MODULES[module]
    with pytest.raises(ValueError, match="reduction: expected one of .*'bogus'"):
        module(reduction="bogus", **required)
    if module in (pdl.KDLoss, pdl.TopKKDLoss, pdl.LinearKDLoss):
        with pytest.raises(ValueError, match="divergence: expected one of .*'bogus'"):
            module(divergence="bogus", **required)
