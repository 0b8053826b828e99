"""The CUDA C++ backend's extension (``pydistill._C``, sources in csrc/): finding, building
and loading it, and the Python half of its ops (fake implementations for torch.compile).

Where the library comes from, first match wins:

1. built ahead of time by ``setup.py`` (``pip install -e . --no-build-isolation`` with a CUDA
   toolkit and a CUDA build of PyTorch in the environment), imported as ``pydistill._C``;
2. built on first use with ``torch.utils.cpp_extension.load`` (ninja, nvcc) from the csrc/ of
   a source checkout, cached under ``PYDISTILL_CUDA_CACHE`` (default
   ``~/.cache/pydistill/<python, torch and CUDA versions>``); the next process loads it from
   there in about a second. Only an explicit ``backend="cuda"`` (or ``load(build=True)``)
   builds: ``backend="auto"`` never starts a compiler. ``PYDISTILL_CUDA_JIT=0`` forbids it.

Architectures: ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"). Nothing here runs at
``import pydistill``; a missing extension is an error only when ``backend="cuda"`` is asked
for, and that error says how to build it.

The library also registers a host implementation of every op (the kernels' row code on one
CPU thread): with ``PYDISTILL_CUDA_ON_CPU=1`` the ``cuda`` backend accepts CPU tensors, which
is how the test suite checks the kernels' math on machines without a GPU.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

DEFAULT_ARCH_LIST = "8.0;9.0"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("_C.cpp", "softmax_divergence_ops.cpp", "topk_divergence_ops.cpp", "softmax_divergence.cu",
           "topk_divergence.cu")
HEADERS = ("args.h", "common.cuh", "kd_row.cuh", "ops_common.h", "softmax_divergence_sm90.cuh",
           "topk_row.cuh")
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo")
CXX_FLAGS = ("-O3",)

_log = logging.getLogger("pydistill")
_lock = threading.Lock()
# loaded: the library's path; error: why it is not loaded; tried: a build was attempted
_state = {"loaded": None, "error": "the CUDA C++ extension pydistill._C is not built", "tried": False}


def build_instructions() -> str:
    return (
        "build it ahead of time with `pip install -e . --no-build-isolation` (PyTorch with CUDA "
        "and a CUDA toolkit in the environment: nvcc on PATH or CUDA_HOME set; "
        "TORCH_CUDA_ARCH_LIST picks the GPUs, default '8.0;9.0'), or let backend='cuda' build it "
        "on first use from a source checkout (needs the same toolkit and `pip install ninja`; "
        "cached under ~/.cache/pydistill)"
    )


def cuda_home() -> Optional[str]:
    """The CUDA toolkit's root: CUDA_HOME / CUDA_PATH, else the nvcc on PATH (following
    wrapper scripts to the toolkit that has the headers), else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "include" / "cuda_runtime.h").exists() and (root / "bin" / "nvcc").exists():
            return str(root)
    return None


def toolchain_problem() -> Optional[str]:
    """None if this environment can build the extension, else what is missing."""
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is a CPU-only build (the extension needs PyTorch with CUDA)"
    if cuda_home() is None:
        return "no CUDA toolkit found (nvcc on PATH, CUDA_HOME or /usr/local/cuda)"
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    if not all((CSRC / s).exists() for s in SOURCES + HEADERS):
        return f"the sources csrc/ are not next to this installation ({CSRC})"
    return None


def arch_list() -> str:
    """The architectures a build targets: TORCH_CUDA_ARCH_LIST, else DEFAULT_ARCH_LIST."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def cache_dir() -> Path:
    """The JIT build's folder: one per Python, torch, CUDA and architecture list (a build for
    one device's architecture never stands in for, or is rebuilt by, one for another list)."""
    root = os.environ.get("PYDISTILL_CUDA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "pydistill")
    arch = re.sub(r"[^0-9A-Za-z]+", "_", arch_list().strip()).strip("_")
    tag = (f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
           f"-cu{torch.version.cuda}-sm{arch}")
    return Path(root) / tag.replace("+", "_")


def _cached_build() -> Optional[str]:
    """The JIT build of cache_dir() when it is newer than every source and header, else None."""
    path = cache_dir() / "pydistill_C.so"
    try:
        built = path.stat().st_mtime
        newest = max((CSRC / s).stat().st_mtime for s in SOURCES + HEADERS)
    except OSError:
        return None
    return str(path) if built >= newest else None


def _prebuilt() -> Optional[str]:
    try:
        spec = importlib.util.find_spec("pydistill._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def _prepare_toolchain_env():
    """cpp_extension reads CUDA_HOME when first imported, and guesses it from the nvcc on PATH
    (a wrapper script in /usr/local/bin makes that /usr/local): give it the real root."""
    home = cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    if home:
        cpp_extension.CUDA_HOME = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    return cpp_extension


def jit_build(verbose: bool = False) -> str:
    """Compile (or find up to date in the cache) the extension; its path. Raises on failure."""
    cpp_extension = _prepare_toolchain_env()
    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / "pydistill_C.so").exists():
        _log.warning("pydistill: building the CUDA extension for TORCH_CUDA_ARCH_LIST=%s in %s "
                     "(first use only; a few minutes)", os.environ["TORCH_CUDA_ARCH_LIST"], build_dir)
    cpp_extension.load(
        name="pydistill_C",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return str(build_dir / "pydistill_C.so")


def load(build: bool = False) -> bool:
    """Load the extension's ops into torch.ops.pydistill; with ``build``, compile it first
    if there is no prebuilt one. True if the ops are there. Without ``build``, an up-to-date
    JIT build in cache_dir() (for this TORCH_CUDA_ARCH_LIST) is loaded too, unless
    PYDISTILL_CUDA_JIT=0."""
    with _lock:
        if _state["loaded"]:
            return True
        path = _prebuilt()
        if path is None and not build and os.environ.get("PYDISTILL_CUDA_JIT", "1") != "0":
            path = _cached_build()
        try:
            if path is not None:
                torch.ops.load_library(path)
                _state["loaded"] = path
            elif build and os.environ.get("PYDISTILL_CUDA_JIT", "1") != "0" and not _state["tried"]:
                _state["tried"] = True  # a failed build is not retried in this process
                problem = toolchain_problem()
                if problem is not None:
                    _state["error"] = ("the CUDA C++ extension pydistill._C is not built and cannot "
                                       f"be built here: {problem}")
                    return False
                _state["loaded"] = jit_build()
            else:
                _state["error"] = "the CUDA C++ extension pydistill._C is not built"
                return False
        except Exception as exc:  # a failed build or load must not break the other backends
            what = "failed to load" if path is not None else "is not built: building it failed"
            _state["error"] = f"the CUDA C++ extension pydistill._C {what}: {exc}"
            return False
        _register_python_side()
        return True


def on_cpu_allowed() -> bool:
    return os.environ.get("PYDISTILL_CUDA_ON_CPU", "0") == "1"


def why_unavailable(device: torch.device, build: bool = False) -> Optional[str]:
    """None if the cuda backend can run on ``device``, else the reason and how to fix it."""
    if device.type != "cuda" and not (device.type == "cpu" and on_cpu_allowed()):
        return (f"the CUDA C++ kernels need CUDA tensors (got {device.type}); on the CPU their "
                "host implementation runs only with PYDISTILL_CUDA_ON_CPU=1 (for tests)")
    if load(build=build):
        return None
    return f"{_state['error']}; {build_instructions()}"


def ops():
    """torch.ops.pydistill, loaded (building it if needed)."""
    if not load(build=True):
        raise RuntimeError(f"{_state['error']}; {build_instructions()}")
    return torch.ops.pydistill


# ------------------------------------------------------------------------------------------
# The Python half of the ops: fake implementations (shape propagation for torch.compile and
# FakeTensor) and autograd formulas, registered once the library is loaded.
# ------------------------------------------------------------------------------------------
KD_STATS = 8
TOPK_STATS = 8


def _rows(x: torch.Tensor):
    return x.shape[:-1].numel()


def _register_python_side():
    from torch.library import register_autograd, register_fake

    def kd_fwd_fake(student, teacher, labels, divergence, temperature, beta, hard_weight,
                    soft_scale, student_scale, student_softcap, teacher_scale, teacher_softcap,
                    ignore_index):
        n = _rows(student)
        return (student.new_empty((n,), dtype=torch.float32),
                student.new_empty((n, KD_STATS), dtype=torch.float32))

    def kd_bwd_fake(grad_rows, student, teacher, labels, stats, divergence, temperature, beta,
                    hard_weight, soft_scale, student_scale, student_softcap, teacher_scale,
                    teacher_softcap, ignore_index, grad_student, grad_teacher):
        return (student.new_empty(student.shape if grad_student else (0,)),
                teacher.new_empty(teacher.shape if grad_teacher else (0,)))

    def kd_fwd_grad_fake(student, teacher, labels, row_scale, divergence, temperature, beta,
                         hard_weight, soft_scale, student_scale, student_softcap, teacher_scale,
                         teacher_softcap, ignore_index, grad_student, grad_teacher):
        return (student.new_empty((_rows(student),), dtype=torch.float32),
                student.new_empty(student.shape if grad_student else (0,)),
                teacher.new_empty(teacher.shape if grad_teacher else (0,)))

    def kd_scale_grad_fake(grad, scale):
        return None

    def topk_fwd_fake(student, lp, idx, labels, divergence, tail, temperature, teacher_power,
                      beta, hard_weight, soft_scale, student_scale, student_softcap, ignore_index):
        n = _rows(student)
        return (student.new_empty((n,), dtype=torch.float32),
                student.new_empty((n, TOPK_STATS), dtype=torch.float32))

    def topk_bwd_fake(grad_rows, student, lp, idx, labels, stats, divergence, tail, temperature,
                      teacher_power, beta, hard_weight, soft_scale, student_scale,
                      student_softcap, ignore_index):
        return student.new_empty(student.shape)

    register_fake("pydistill::kd_fwd", kd_fwd_fake)
    register_fake("pydistill::kd_bwd", kd_bwd_fake)
    register_fake("pydistill::kd_fwd_grad", kd_fwd_grad_fake)
    register_fake("pydistill::kd_scale_grad_", kd_scale_grad_fake)
    register_fake("pydistill::topk_fwd", topk_fwd_fake)
    register_fake("pydistill::topk_bwd", topk_bwd_fake)

    # kd_fwd: the backward recomputes from the saved inputs and the per-row statistics, with
    # the incoming per-row gradient folded into the same pass (one read, one write).
    def kd_setup(ctx, inputs, output):
        student, teacher, labels = inputs[:3]
        ctx.params = inputs[3:]
        ctx.save_for_backward(student, teacher, labels, output[1])

    def kd_backward(ctx, grad_rows, grad_stats):
        student, teacher, labels, stats = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gs, gt = torch.ops.pydistill.kd_bwd(grad_rows, student, teacher, labels, stats,
                                            *ctx.params, need_s, need_t)
        return (gs if need_s else None, gt if need_t else None) + (None,) * (1 + len(ctx.params))

    # once differentiable, as the other backends' Functions: under create_graph=True the
    # gradients carry no graph of their own (differentiating them again raises) rather than the
    # silent zeros of PyTorch's fallback for kd_bwd, which has no autograd formula
    register_autograd("pydistill::kd_fwd", torch.autograd.function.once_differentiable(kd_backward),
                      setup_context=kd_setup)

    def topk_setup(ctx, inputs, output):
        student, lp, idx, labels = inputs[:4]
        ctx.params = inputs[4:]
        ctx.save_for_backward(student, lp, idx, labels, output[1])

    def topk_backward(ctx, grad_rows, grad_stats):
        student, lp, idx, labels, stats = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            from pydistill.reference.topk_divergence import refuse_teacher_grad

            refuse_teacher_grad("cuda")
        gs = None
        if ctx.needs_input_grad[0]:
            gs = torch.ops.pydistill.topk_bwd(grad_rows, student, lp, idx, labels, stats, *ctx.params)
        return (gs,) + (None,) * (3 + len(ctx.params))

    register_autograd("pydistill::topk_fwd",
                      torch.autograd.function.once_differentiable(topk_backward),
                      setup_context=topk_setup)
