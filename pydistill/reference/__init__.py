"""The reference math of every loss family, in plain PyTorch: the test oracle, the benchmark
baseline and the ``torch`` backend."""
