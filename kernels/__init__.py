"""Triton kernels (installed as ``pydistill.kernels``). Importing a module here needs Triton;
``import pydistill`` does not import them."""
