"""One suite, three environments:

* CPU, no GPU: the torch backend on CPU tensors, and the Triton kernels under the Triton
  interpreter (TRITON_INTERPRET=1 is set here before any kernel is imported);
* GPU: every backend on CUDA tensors (the interpreter stays off);
* CUDA C++ extension (csrc/): built here once per machine and cached when a CUDA toolkit and
  a CUDA build of PyTorch are present (pydistill/_cuda_ext.py; PYDISTILL_CUDA_JIT=0 skips
  it). Its backend then joins: on CUDA tensors with a GPU, and without one on CPU tensors
  through the host implementation of its kernels' row code (PYDISTILL_CUDA_ON_CPU=1).

Nothing here queries a GPU beyond ``torch.cuda.is_available()``, which needs none.
"""
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("PYDISTILL_CUDA_ON_CPU", "1")

import pytest  # noqa: E402

import pydistill._utils  # noqa: E402
from pydistill import _dispatch  # noqa: E402

pydistill._utils.POISON_OUTPUTS = True

DEVICE = torch.device("cuda" if CUDA else "cpu")


def _interpreter_broken():
    """Triton < 3.7's interpreter turns loop bounds into Python ints with int() on a 1-element
    array, which NumPy >= 2 refuses; such a pair cannot run the kernels on the CPU (compiled
    kernels on a GPU are unaffected)."""
    if CUDA or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
        from packaging.version import Version
    except ImportError:
        return None
    if Version(triton.__version__).release < (3, 7) and Version(numpy.__version__).major >= 2:
        return f"Triton {triton.__version__}'s interpreter needs numpy<2 (have {numpy.__version__})"
    return None


INTERPRETER_PROBLEM = _interpreter_broken()


def peer(module):
    """Import a peer library the parity tests compare against (scikit-learn, transformers, TRL,
    torchdistill): a skip where it is not installed, an error where the run requires the peers
    (PYDISTILL_REQUIRE_PEERS=1, as .ci/run sets), so a broken install cannot turn the drop-in
    checks into silent skips."""
    if os.environ.get("PYDISTILL_REQUIRE_PEERS") == "1":
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module)


_CUDA_EXTENSION = {}


def cuda_extension_problem():
    """Build (the first time on a machine: minutes) or load the CUDA extension, once, when a
    test first asks which backends run; None, or why it cannot."""
    if "problem" not in _CUDA_EXTENSION:
        from pydistill import _cuda_ext

        ok = _cuda_ext.load(build=True)
        _CUDA_EXTENSION["problem"] = None if ok else _cuda_ext._state["error"]
    return _CUDA_EXTENSION["problem"]


def available_backends(op="kd_loss"):
    if "cuda" in _dispatch.TABLE[op]:
        cuda_extension_problem()
    ok = [b for b in _dispatch.TABLE[op] if _dispatch.why_unavailable(b, DEVICE) is None]
    if INTERPRETER_PROBLEM is not None:
        ok = [b for b in ok if b != "triton"]
    return ok


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slowest property tests (deselect: -m 'not slow')")


def pytest_report_header(config):
    return (
        f"pydistill: device={DEVICE}, backends={available_backends()}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, torch={torch.__version__}"
        + (f"; triton skipped: {INTERPRETER_PROBLEM}" if INTERPRETER_PROBLEM else "")
        + (f"; cuda skipped: {cuda_extension_problem()}" if cuda_extension_problem() else "")
    )


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # A developer's PYDISTILL_* settings must not change what the tests exercise.
    monkeypatch.delenv("PYDISTILL_BACKEND", raising=False)
    monkeypatch.delenv("PYDISTILL_KD_GRAD", raising=False)
