"""The benchmark cases, defined once: the five families, their goal shapes (issue 21 and the
design's floors), the suite's presets, the family scripts' sweeps and the GPU check's
correctness shapes. bench/static.py, bench/gpu_check.py, bench/suite.py and the
bench_<family>.py scripts read them from here; none keeps a list of its own."""
from __future__ import annotations

from dataclasses import dataclass

import torch

bf16, fp32 = torch.bfloat16, torch.float32


@dataclass(frozen=True)
class Family:
    name: str  # on the command line: --family NAME
    module: str  # its benchmark script
    op: str  # what it measures
    floor: str  # "memory" (bytes / copy bandwidth) or "gemm" (FLOPs / matmul rate)
    goal: str  # the goal shapes, as the script's arguments (gpu_check's headline, the model)
    presets: dict  # the suite's preset -> the script's arguments


# smoke: seconds (the test suite runs it); quick: a few minutes on two CPU cores; full: a GPU.
FAMILIES = (
    Family("softmax", "pydistill.bench.bench_softmax_divergence", "kd_loss", "memory",
           "--n 16384 --v 128256 --dtype bf16 --divergence kl --grad-mode both", {
               "smoke": "--n 32 64 --v 256 --dtype fp32",
               "quick": "--n 256 1024 --v 4096 32000 --dtype fp32",
               "full": "--full --divergence kl jsd"}),
    Family("topk", "pydistill.bench.bench_topk_divergence", "topk_kd_loss", "memory",
           "--n 8192 --v 151936 --k 64 --dtype bf16 --tail bucket", {
               "smoke": "--n 32 64 --v 256 --k 16 --tail bucket",
               "quick": "--n 256 1024 --v 4096 32000 --k 64 --tail bucket",
               "full": "--full"}),
    Family("linear", "pydistill.bench.bench_linear_kd", "linear_kd_loss", "gemm",
           "--n 1024 8192 --h-s 4096 --h-t 4096 --v 128256 --dtype bf16", {
               "smoke": "--n 32 64 --h-s 32 --h-t 32 --v 256 --dtype fp32",
               "quick": "--n 256 1024 --h-s 256 --h-t 256 --v 4096 16384 --dtype fp32",
               "full": "--full"}),
    Family("attention", "pydistill.bench.bench_attention_kd", "attention KD", "gemm",
           "--b 4 --heads 12 --l 8192 --d-s 64 --d-t 64 --dtype bf16",
           {"smoke": "--smoke", "quick": "--quick --l 512 1024", "full": "--full"}),
    Family("uld", "pydistill.bench.bench_uld", "uld_loss", "memory",
           "--n 8192 --v 128256 --v-t 151936 --top-k 64 --dtype bf16",
           {"smoke": "--smoke", "quick": "--quick", "full": "--full"}),
)
BY_NAME = {f.name: f for f in FAMILIES}
GOAL = {f.name: f.goal for f in FAMILIES}
# The compiled-code model's cases besides the goal shapes: (family, name, arguments, impl,
# extra: "labels" adds hard labels at hard_weight = soft_weight = 0.5).
EXTRA = (
    ("softmax", "jsd T=2 hard labels", "--n 16384 --v 128256 --dtype bf16 --divergence jsd "
     "--temperature 2", "pydistill-triton", "labels"),
    ("linear", "tiled", "--n 8192 --h-s 4096 --h-t 4096 --v 128256 --dtype bf16",
     "pydistill-triton-tiled", ""),
)

# The family scripts' sweeps (--quick / --full, --smoke where it has one), by family.
# softmax (dtype, N, V): at V = 262144 the rows are halved so that the naive eager autograd
# graph (several (N, V) intermediates) fits an 80 GB GPU beside the others.
# topk (dtype, N, V, K): Qwen's vocabulary; the dense path's (N, V) float32 teacher bounds N.
# linear (dtype, N, H_s, H_t, V, K): quick at the CPU goal's N = 4096; full at Llama-3 heads,
# both models H = 4096 and a half-width student, and a top-k teacher (K = 64) at V = 151,936.
# attention (dtype, B, H, H_kv, L, d_s, d_t): the eager path holds ~6 (B, H, L, L) float32
# maps (1.2 GB at L = 2048) and runs out of memory at L = 16,384 on the GPU.
# uld (dtype, N, V_s, V_t, top_k); top_k None sorts the whole vocabularies (a full sort's
# (N, V) int64 ids bound N): a Llama-3 student under a Qwen teacher on the GPU.
SWEEPS = {
    "softmax": {"quick": [(fp32, n, v) for n in (256, 1024) for v in (4096, 32000)],
                "full": [(bf16, 16384, 32000), (bf16, 16384, 128256), (bf16, 8192, 262144)]
                + [(bf16, 4096, v) for v in (32000, 128256, 262144)]
                + [(fp32, 4096, v) for v in (32000, 128256)]},
    "topk": {"quick": [(fp32, n, v, 64) for n in (256, 1024) for v in (4096, 32000)],
             "full": [(bf16, n, 151_936, k) for n, k in ((4096, 64), (16384, 64), (4096, 16), (4096, 256))]
             + [(fp32, 4096, 151_936, 64)]},
    "linear": {"quick": [(fp32, n, 512, 512, 32000, 0) for n in (1024, 4096)]
               + [(fp32, 4096, 512, 0, 32000, 64)],
               "full": [(bf16, n, 4096, 4096, 128256, 0) for n in (1024, 2048, 4096, 8192, 16384)]
               + [(bf16, n, 2048, 4096, 128256, 0) for n in (4096, 16384)]
               + [(bf16, n, 4096, 0, 151936, 64) for n in (4096, 16384)]},
    "attention": {"smoke": [(fp32, 1, 2, 2, n, 16, 16) for n in (64, 128)],
                  "quick": [(fp32, 1, 12, 12, n, 32, 64) for n in (512, 1024, 2048)],
                  "full": [(bf16, 4, 12, 12, n, 64, 64) for n in (512, 1024, 2048, 4096, 8192, 16384)]},
    "uld": {"smoke": [(fp32, n, 256, 320, k) for n in (32, 64) for k in (16, None)],
            "quick": [(fp32, 256, vs, vt, k) for vs, vt in ((4096, 5120), (32000, 32768)) for k in (64, None)],
            "full": [(bf16, n, 128_256, 151_936, k) for n in (4096, 8192) for k in (64, None)]},
}

# gpu_check's correctness shapes: on the GPU a ragged one and one at a real vocabulary (a
# Llama-3 student, 128,256, under a Qwen teacher, 151,936, for ULD); on the CPU rehearsal
# tiny ones. kd (N, V); topk (N, V, K); linear (N, H, V); attention (B, H, L, d);
# uld (N, V_s, V_t); linear_uld (N, H, V_s, V_t).
CORRECTNESS = {
    "gpu": {"kd": {"37x3001": (37, 3001), "64x128256": (64, 128256)},
            "topk": {"37x3001,K64": (37, 3001, 64), "64x151936,K64": (64, 151936, 64)},
            "linear": {"37x96x3001": (37, 96, 3001), "256x512x128256": (256, 512, 128256)},
            "attention": {"2x3x77x64": (2, 3, 77, 64), "1x4x1024x64": (1, 4, 1024, 64)},
            "uld": {"37x3001,V_t 2999": (37, 3001, 2999), "64x128256,V_t 151936": (64, 128256, 151936)},
            "linear_uld": {"256x512x128256,V_t 151936": (256, 512, 128256, 151936)}},
    "cpu": {"kd": {"5x97": (5, 97), "3x300": (3, 300)},
            "topk": {"5x97,K8": (5, 97, 8), "3x300,K16": (3, 300, 16)},
            "linear": {"5x16x97": (5, 16, 97), "3x24x300": (3, 24, 300)},
            "attention": {"1x2x9x16": (1, 2, 9, 16), "2x2x17x16": (2, 2, 17, 16)},
            "uld": {"5x97,V_t 130": (5, 97, 130), "3x300,V_t 211": (3, 300, 211)},
            "linear_uld": {"5x16x97,V_t 80": (5, 16, 97, 80)}},
}
