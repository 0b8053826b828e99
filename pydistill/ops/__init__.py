"""autograd Functions around the compiled kernels (Triton now, CUDA C++ later): one module
per loss family, named as in kernels/ and pydistill/reference/."""
