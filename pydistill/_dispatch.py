"""Backend dispatch: the one table that decides which implementation runs.

``backend="auto"`` picks, for CUDA tensors, the first entry of ``TABLE[op]`` that is
available and supports the input dtypes; for CPU tensors always ``torch``. An explicit
backend is honoured or refused with an error that names what can run. The environment
variable ``PYDISTILL_BACKEND`` replaces ``auto`` (an explicit ``backend=`` argument wins).

Why this order (kd_loss): the Triton kernel fuses softcap, both tempered softmaxes, the
divergence and its gradient into one streaming kernel (2 passes over the logits for kl /
reverse_kl instead of the 6+ of eager PyTorch); the torch backend is the chunked fallback
and the only one that computes in float64. (Measured on the CPU only so far: the Triton
ordering is by construction, to be confirmed by bench/ on a GPU.)
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
_HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Impl:
    target: str  # "module:attribute" of the autograd Function, imported on first use
    dtypes: tuple  # dtypes of the floating inputs it accepts


# op -> backend -> implementation. The order of each op's entries is the order in which
# ``auto`` tries them on CUDA tensors (fastest measured first); CPU tensors always get torch.
TABLE = {
    "kd_loss": {
        "triton": Impl("pydistill.ops.softmax_divergence:TritonKDLoss", _HALF_AND_SINGLE),
        # after triton for auto until bench/ measures it faster on a GPU (not yet run on one);
        # auto also never builds it: only an explicit backend="cuda" compiles the extension
        "cuda": Impl("pydistill.ops.softmax_divergence:CudaKDLoss", _HALF_AND_SINGLE),
        "torch": Impl(
            "pydistill.reference.softmax_divergence:ChunkedKDLoss",
            _HALF_AND_SINGLE + (torch.float64,),
        ),
    },
    # The Triton kernel reads the student logits once in the forward and once more to write
    # the gradient (3 logits-sized transfers; the torch backend's chunks make ~15 passes over
    # each chunk); torch is the fallback and the only float64 path. By count, not yet measured.
    "topk_kd_loss": {
        "triton": Impl("pydistill.ops.topk_divergence:TritonTopKKDLoss", _HALF_AND_SINGLE),
        # after triton for auto until measured faster on a GPU (as kd_loss's)
        "cuda": Impl("pydistill.ops.topk_divergence:CudaTopKKDLoss", _HALF_AND_SINGLE),
        "torch": Impl(
            "pydistill.reference.topk_divergence:ChunkedTopKKDLoss",
            _HALF_AND_SINGLE + (torch.float64,),
        ),
    },
    # Both run the same chunked GEMMs; triton's divergence step is one kernel per chunk
    # (kd_loss's, gradient written over the float32 logits) instead of ~20 PyTorch ops.
    # Triton also has the tiled kernels (chunk_size="tiled", opt-in until timed on a GPU).
    "linear_kd_loss": {
        "triton": Impl("pydistill.ops.linear_kd:TritonLinearKDLoss", _HALF_AND_SINGLE),
        "torch": Impl(
            "pydistill.reference.linear_kd:ChunkedLinearKDLoss",
            _HALF_AND_SINGLE + (torch.float64,),
        ),
    },
    # loss="kl". Triton: one streaming kernel per direction, score tiles in registers and
    # shared memory (the torch backend writes and re-reads float32 (block, L) slabs of both
    # maps ~8 times). loss="mse_scores" runs the same closed form (a few (d_s + d_t)-wide
    # GEMMs, pydistill.reference.attention_kd.mse_score_rows) whichever backend is chosen.
    # By construction, not yet measured on a GPU.
    "attention_kd_loss": {
        "triton": Impl("pydistill.ops.attention_kd:TritonAttentionKL", _HALF_AND_SINGLE),
        "torch": Impl(
            "pydistill.reference.attention_kd:ChunkedAttentionKL",
            _HALF_AND_SINGLE + (torch.float64,),
        ),
    },
}


def implementation(op: str, backend: str):
    module, attr = TABLE[op][backend].target.split(":")
    return getattr(importlib.import_module(module), attr)


@lru_cache(maxsize=None)
def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton.language")
    except Exception:  # a broken Triton install must not break pydistill
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Host-side facts (imports, environment, the extension's build) that torch.compile must not
# trace: evaluated once at trace time and taken as constants.
@torch.compiler.assume_constant_result
def why_unavailable(backend: str, device: torch.device, build: bool = False) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason, in words. ``build``: the
    cuda backend may compile its extension now (an explicit request; never for auto)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not _triton_importable():
            return "Triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return (
            f"Triton kernels need CUDA tensors (got {device.type}); on the CPU they run only "
            "under the interpreter (TRITON_INTERPRET=1, for tests)"
        )
    if backend == "cuda":
        from pydistill import _cuda_ext

        return _cuda_ext.why_unavailable(device, build=build)
    return f"unknown backend {backend!r}"


def resolve(op: str, backend: str, device: torch.device, dtypes) -> str:
    """The concrete backend ('triton' / 'torch' / ...) that runs ``op`` on tensors of
    ``dtypes`` on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("PYDISTILL_BACKEND", "") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"PYDISTILL_BACKEND: expected one of {BACKENDS}, got {backend!r}")
    table = TABLE[op]
    if backend == "auto":
        if device.type == "cuda":
            for candidate, impl in table.items():
                if all(d in impl.dtypes for d in dtypes) and why_unavailable(candidate, device) is None:
                    return candidate
        return "torch"
    reason = why_unavailable(backend, device, build=True) if backend in table else None
    if backend not in table and reason is None:
        reason = f"no {backend} implementation of {op} exists yet"
    if reason is not None:
        runnable = [b for b in table if why_unavailable(b, device) is None]
        raise ValueError(f"backend={backend!r} cannot run {op} here: {reason}. Runnable here: {runnable}")
    impl = table[backend]
    for d in dtypes:
        if d not in impl.dtypes:
            raise TypeError(
                f"backend={backend!r} does not support dtype {d} for {op}; it supports "
                f"{[str(x) for x in impl.dtypes]}"
            )
    return backend


def resolve_backend(op: str, *tensors: torch.Tensor, backend: str = "auto") -> str:
    """The backend that ``op`` (e.g. ``"kd_loss"``) runs on for these input tensors: what
    ``backend="auto"`` (or ``PYDISTILL_BACKEND``) resolves to, or an explicit choice checked
    the same way the loss would check it (ValueError / TypeError when it cannot run)."""
    if op not in TABLE:
        raise ValueError(f"op: expected one of {tuple(TABLE)}, got {op!r}")
    if not tensors:
        raise ValueError("tensors: expected at least one input tensor")
    return resolve(op, backend, tensors[0].device, tuple(t.dtype for t in tensors))


# Cross-tokenizer distillation (ULD). Triton: the fused top-k + logsumexp selection reads the
# logits once and the backward writes the gradient once (top_k None sorts with torch.sort on
# both backends); torch is the chunked closed form and the only float64 path. By construction,
# not yet measured on a GPU.
TABLE.update({
    "uld_loss": {
        "triton": Impl("pydistill.ops.uld:TritonULDLoss", _HALF_AND_SINGLE),
        "torch": Impl("pydistill.reference.uld:ChunkedULDLoss", _HALF_AND_SINGLE + (torch.float64,)),
    },
    "linear_uld_loss": {
        "triton": Impl("pydistill.ops.uld:TritonLinearULDLoss", _HALF_AND_SINGLE),
        "torch": Impl("pydistill.reference.uld:ChunkedLinearULDLoss",
                      _HALF_AND_SINGLE + (torch.float64,)),
    },
})
