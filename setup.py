"""Build hook for the optional CUDA extension ``pydistill._C`` (csrc/); everything else is
declared in pyproject.toml.

The extension is built when PyTorch is importable in the build environment, is a CUDA build,
and a CUDA toolkit is found (pydistill/_cuda_ext.py: CUDA_HOME, the nvcc on PATH or
/usr/local/cuda). pip's default isolated build environment holds only setuptools and wheel,
so a plain ``pip install -e .`` builds nothing (and needs no compiler): torch is deliberately
not in build-system.requires, which would install a second multi-GB torch into the build
environment, possibly of another version than the one the extension is then loaded into
(C++ ABI mismatch). To build ahead of time, use the environment's own torch:

    pip install -e . --no-build-isolation          # needs setuptools, wheel, ninja installed

Otherwise ``backend="cuda"`` compiles the extension on first use and caches it (see
pydistill/_cuda_ext.py). Knobs (the names flash-attention users know):

    PYDISTILL_SKIP_CUDA_BUILD=1    never build it here
    PYDISTILL_FORCE_CUDA_BUILD=1   build it or fail (no silent skip), e.g. without a GPU
    TORCH_CUDA_ARCH_LIST           architectures, default "8.0;9.0" (the Hopper cluster kernel
                                   needs 9.0)
    MAX_JOBS                       parallel compile jobs, default from cores and free memory
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _skip(reason: str):
    if _flag("PYDISTILL_FORCE_CUDA_BUILD"):
        sys.exit(f"PYDISTILL_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}")
    print(f"pydistill: not building the CUDA extension pydistill._C ({reason}); "
          "backend='cuda' can build it on first use", file=sys.stderr)
    return {}


def _loader():
    """pydistill/_cuda_ext.py, for its source list, flags and toolchain checks (it imports
    only torch and the standard library)."""
    spec = importlib.util.spec_from_file_location("_pydistill_cuda_ext", HERE / "pydistill" / "_cuda_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _default_jobs() -> int:
    # each nvcc job of these translation units peaks near 2 GB
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    return max(1, min(os.cpu_count() or 1, int(mem_gb // 2)))


def cuda_extension_kwargs():
    if _flag("PYDISTILL_SKIP_CUDA_BUILD"):
        return _skip("PYDISTILL_SKIP_CUDA_BUILD is set")
    if importlib.util.find_spec("torch") is None:
        return _skip("torch is not importable in this build environment; build with "
                     "`pip install -e . --no-build-isolation` to use the installed torch")
    loader = _loader()
    problem = loader.toolchain_problem()
    if problem is not None:
        return _skip(problem)
    cpp_extension = loader._prepare_toolchain_env()  # CUDA_HOME, TORCH_CUDA_ARCH_LIST default
    os.environ.setdefault("MAX_JOBS", str(_default_jobs()))
    ext = cpp_extension.CUDAExtension(
        name="pydistill._C",
        sources=[os.path.relpath(loader.CSRC / s, HERE) for s in loader.SOURCES],
        depends=[os.path.relpath(loader.CSRC / h, HERE) for h in loader.HEADERS],
        extra_compile_args={"cxx": list(loader.CXX_FLAGS), "nvcc": list(loader.NVCC_FLAGS)},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**cuda_extension_kwargs())
