"""Build hook for the optional CUDA extension ``pydistill._C``.

Everything else is declared in pyproject.toml. The CUDA backend (csrc/) does not exist
yet, so this file builds nothing: a plain ``pip install -e .`` never needs a compiler.
When csrc/ lands, the extension is added here behind PYDISTILL_SKIP_CUDA_BUILD /
PYDISTILL_FORCE_CUDA_BUILD, TORCH_CUDA_ARCH_LIST and MAX_JOBS.
"""
from setuptools import setup

setup()
