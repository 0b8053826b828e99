"""Benchmark of ``pydistill.attention_kd_loss(loss="kl")`` (MiniLM's attention transfer) against
what a user runs instead, on the same inputs (student queries and keys require grad; the
teacher's do not):

=====================  ====================================================================
``pydistill-triton``   ``attention_kd_loss(backend="triton")``: one streaming kernel each
                       way, no L x L map (CUDA)
``pydistill-torch``    ``attention_kd_loss(backend="torch")``: query blocks, O(block L)
``torch-eager``        the naive code: both (B, H, L, L) score maps materialised in the input
                       dtype (the teacher's under ``no_grad``), padded keys filled with the
                       dtype's minimum (as Hugging Face does), softmaxes in float32,
                       ``F.kl_div``, the mean over valid rows
``torch-compile``      ``torch.compile`` of ``torch-eager``, static shapes
``sdpa``               the speed yardstick, not the same op: PyTorch's
                       ``scaled_dot_product_attention`` forward + backward on the student's
                       (Q, K, V = K) at the same shape, no padding mask (so that the flash
                       kernel runs), ``out.float().mean()`` as the loss (CUDA; its
                       ``loss rel diff`` is meaningless)
=====================  ====================================================================

Floor: a GEMM-bound op's FLOPs over the matrix-product rate measured at the start of the run
(bf16 on CUDA, float32 on the CPU). B batch, H query heads, L tokens, d_s / d_t head dims,
c = 1 (c = (L + 1) / 2L causal); the products that cannot be avoided::

    fwd      both score maps                           2 c B H L^2 (d_s + d_t)
    bwd      dQ_s = G K_s, dK_s = G^T Q_s              4 c B H L^2 d_s
    fwd+bwd  both                                      2 c B H L^2 (3 d_s + d_t)

(pydistill's Triton backward recomputes both score tiles on top: 2 c B H L^2 (d_s + d_t)
more.) ``x floor`` = measured / floor. Peak extra memory is also given per 1,024 tokens
(``MiB / kL``: constant when memory grows linearly in L) and as a fraction of the eager
path's (``x eager``).

    python -m pydistill.bench.bench_attention_kd --quick     # CPU: float32, H 12, d 32 / 64, L 512-2048
    python -m pydistill.bench.bench_attention_kd --full      # GPU: bf16, B 4, H 12, d 64, L 512-16384
    python -m pydistill.bench.bench_attention_kd --l 1024 4096 --b 2 --heads 16 --d-s 64 --d-t 128 --causal
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import pydistill
from pydistill.reference.attention_kd import expand_heads

from pydistill.bench import cases, harness, peers
from pydistill.bench.bench_softmax_divergence import DTYPES
from pydistill.bench.harness import CaseDtype, Impl, add_run_options

COLUMNS = harness.columns(
    ("dtype", "B", "H", "H_kv", "L", "d_s", "d_t", "causal", "padded"),
    memory=("peak_extra_mib_per_kl", "peak_extra_vs_eager"), floor="flops")

PRESETS = cases.SWEEPS["attention"]  # (dtype, sizes...) by preset: bench/cases.py


@dataclass(frozen=True)
class Case(CaseDtype):
    dtype: torch.dtype
    b: int
    h: int
    h_kv: int
    length: int
    d_s: int
    d_t: int
    causal: bool
    padded: bool  # right padding: every other sequence one quarter shorter
    grad_output: float = 1.0

    def _pairs(self) -> float:
        n = self.length
        return self.b * self.h * n * n * ((n + 1) / (2 * n) if self.causal else 1.0)

    def flops(self, pass_name: str) -> float:
        fwd, bwd = 2 * self._pairs() * (self.d_s + self.d_t), 4 * self._pairs() * self.d_s
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_name]

    def input_bytes(self) -> int:
        return self.b * self.length * (self.h + self.h_kv) * (self.d_s + self.d_t) * self.element

    def floor_bytes(self, pass_name: str) -> int:
        """The runner's memory floor (read the inputs, write the student's gradients); the rows
        report the GEMM floor instead (``with_gemm_floor``)."""
        write = self.b * self.length * (self.h + self.h_kv) * self.d_s * self.element
        read = self.input_bytes()
        return {"fwd": read, "bwd": write, "fwd+bwd": read + write}[pass_name]


# --------------------------------------------------------------------------------------
# The implementations: each builder returns loss_fn(student_q, student_k, teacher_q,
# teacher_k, attention_mask), or why it cannot run here ("skipped: ...").
# --------------------------------------------------------------------------------------


def naive_attention_kl(case: Case) -> Callable:
    """Both maps materialised, as users write MiniLM's loss."""
    scale_s, scale_t = case.d_s**-0.5, case.d_t**-0.5

    def masked(scores, mask):
        keep = None
        if mask is not None:
            keep = mask[:, None, None, :].bool()
        if case.causal:
            n = scores.shape[-1]
            tril = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
            keep = tril if keep is None else keep & tril
        if keep is None:
            return scores
        return scores.masked_fill(~keep, torch.finfo(scores.dtype).min)

    def eager(student_q, student_k, teacher_q, teacher_k, attention_mask):
        heads = student_q.shape[1]
        s = student_q @ expand_heads(student_k, heads).transpose(-1, -2) * scale_s
        with torch.no_grad():
            t = teacher_q @ expand_heads(teacher_k, heads).transpose(-1, -2) * scale_t
            p = F.softmax(masked(t, attention_mask).float(), dim=-1)
        log_q = F.log_softmax(masked(s, attention_mask).float(), dim=-1)
        rows = F.kl_div(log_q, p, reduction="none").sum(-1)
        if attention_mask is None:
            return rows.mean()
        valid = attention_mask[:, None, :].to(rows.dtype)
        return (rows * valid).sum() / (heads * valid.sum())

    return eager


@harness.pydistill_builder
def build_pydistill(case: Case, backend: str):
    return lambda sq, sk, tq, tk, mask: pydistill.attention_kd_loss(
        sq, sk, tq, tk, attention_mask=mask, causal=case.causal, backend=backend)


build_eager, build_compiled = peers.eager_and_compiled(naive_attention_kl)


def build_sdpa(case: Case, device: torch.device):
    if device.type != "cuda":
        return "skipped: the SDPA yardstick is timed on CUDA only"
    gqa = {"enable_gqa": True} if case.h_kv != case.h else {}

    def sdpa(sq, sk, tq, tk, mask):
        return F.scaled_dot_product_attention(sq, sk, sk, is_causal=case.causal, **gqa).float().mean()

    return sdpa


IMPLS = (
    Impl("pydistill-triton", build_pydistill("triton")),
    Impl("pydistill-torch", build_pydistill("torch")),
    Impl("torch-eager", build_eager),
    Impl("torch-compile", build_compiled, failure="skipped: torch.compile failed"),
    Impl("sdpa", build_sdpa, peer="sdpa"),
)
IMPL_NAMES = tuple(impl.name for impl in IMPLS)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def make_inputs(case: Case, device: torch.device, n_sets: int, seed: int = 0):
    """``n_sets`` fresh (student_q, student_k, teacher_q, teacher_k, attention_mask); the
    student's require grad. Unit-variance entries: scores of spread ~1 at scale 1 / sqrt(d)."""
    sets = []
    for i in range(n_sets):
        gen = torch.Generator(device=device).manual_seed(seed + i)

        def randn(heads, dim):
            return torch.randn(case.b, heads, case.length, dim, device=device, generator=gen).to(case.dtype)

        mask = None
        if case.padded:
            lengths = torch.full((case.b,), case.length, device=device)
            lengths[::2] = case.length - case.length // 4
            mask = (torch.arange(case.length, device=device)[None, :] < lengths[:, None]).long()
        sets.append((randn(case.h, case.d_s).requires_grad_(), randn(case.h_kv, case.d_s).requires_grad_(),
                     randn(case.h, case.d_t), randn(case.h_kv, case.d_t), mask))
    return sets


def with_attention_columns(row: dict, case: Case) -> dict:
    """Peak extra memory per 1,024 tokens; no loss check for the SDPA yardstick (another op)."""
    if row.get("peak_extra_mib") is not None:
        row["peak_extra_mib_per_kl"] = row["peak_extra_mib"] / (case.length / 1024)
    if row["impl"] == "sdpa":
        row.pop("loss_rel_diff", None)
    return row


def run_case(case: Case, impls, device, opts, prov: dict):
    base = {
        "dtype": case.dtype_name, "B": case.b, "H": case.h, "H_kv": case.h_kv, "L": case.length,
        "d_s": case.d_s, "d_t": case.d_t, "causal": case.causal, "padded": case.padded, **prov,
    }
    return harness.with_memory_vs(harness.run_case(
        case, impls, device, opts, base, set_bytes=case.input_bytes(),
        label=(f"{case.dtype_name} B={case.b} H={case.h}/{case.h_kv} L={case.length} "
               f"d={case.d_s}/{case.d_t} causal={case.causal} padded={case.padded}"),
        make_inputs=make_inputs, expected_loss=harness.torch_loss(build_pydistill),
        finish=lambda row: with_attention_columns(row, case)))


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

TABLE = harness.table(
    ("dtype", "B", "H", "L", "d_s", "d_t", "causal", "padded"),
    memory=(("peak_extra_mib_per_kl", "MiB / kL", ".1f"), ("peak_extra_vs_eager", "x eager", ".3f")),
    floor="flops", ms=".1f", mib=".1f")

TARGETS_TABLE = (
    ("dtype", "dtype", None), ("B", "B", None), ("H", "H", None), ("L", "L", None),
    ("causal", "causal", None), ("impl", "impl", None), ("median_ms", "fwd+bwd ms", ".1f"),
    ("ratio_to_floor", "x floor", ".2f"), ("peak_extra_mib_per_kl", "MiB / kL", ".1f"),
    ("time_vs_eager", "time / eager", ".2f"), ("memory_vs_eager", "memory / eager", ".3f"),
    ("vs_compile", "vs torch-compile", ".2f"), ("vs_sdpa", "time / sdpa", ".2f"),
)


def _key(r):
    return (r["dtype"], r["B"], r["H"], r["H_kv"], r["d_s"], r["d_t"], r["causal"], r["padded"], r["L"])


def targets(rows) -> list:
    return [{
        "dtype": r["dtype"], "B": r["B"], "H": r["H"], "L": r["L"], "causal": r["causal"],
        "impl": r["impl"], "median_ms": r["median_ms"], "ratio_to_floor": r.get("ratio_to_floor"),
        "peak_extra_mib_per_kl": r.get("peak_extra_mib_per_kl"),
        "time_vs_eager": harness.time_ratio(r, peer("torch-eager")),
        "memory_vs_eager": r.get("peak_extra_vs_eager"),
        "vs_compile": harness.time_ratio(peer("torch-compile"), r),
        "vs_sdpa": harness.time_ratio(r, peer("sdpa")),
    } for r, peer in harness.against_peers(rows, _key)]


def report(rows, prov: dict, argv) -> str:
    parts = harness.report_head("attention_kd_loss (MiniLM attention KL) benchmark",
                                "bench_attention_kd", prov, argv) + [
        "Floor: FLOPs over the measured matmul rate; fwd 2 B H L^2 (d_s + d_t) (both score "
        "maps), bwd 4 B H L^2 d_s (dQ_s, dK_s), halved (+L) when causal. `x floor` = measured / "
        "floor; `MiB / kL` = peak extra memory per 1,024 tokens (flat when memory grows "
        "linearly in L); `x eager` = peak extra memory / torch-eager's in the same pass. "
        "Student queries and keys require grad, the teacher's do not; mean over valid rows, "
        "grad_output 1. `sdpa` is the speed yardstick (flash attention fwd + bwd at the "
        "student's shape), not the same op.",
        "",
        harness.markdown_table(harness.order_rows(rows, _key, IMPL_NAMES), TABLE),
        "",
        "## Targets (fwd+bwd)",
        "",
        "`vs torch-compile` = its time / pydistill's (above 1: pydistill faster); `time / sdpa` = "
        "pydistill's time / flash attention's (the GPU target: <= 1.5 at L = 8,192).",
        "",
        harness.markdown_table(targets(rows), TARGETS_TABLE),
    ]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = harness.script_parser(
        "bench_attention_kd",
        "Time attention_kd_loss (kl) and its peers (fwd, bwd, fwd+bwd, peak memory).",
        smoke="seconds: float32, H 2, d 16, L {64,128}",
        quick="CPU: float32, H 12, d 32 / 64, L 512-2048",
        full="GPU: bf16, B 4, H 12, d 64, L 512-16384")
    p.add_argument("--l", type=int, nargs="+", help="sequence lengths (replace the preset's)")
    p.add_argument("--b", type=int, help="batch (with --l)")
    p.add_argument("--heads", type=int, help="query heads (with --l)")
    p.add_argument("--kv-heads", type=int, help="key heads, dividing --heads (with --l)")
    p.add_argument("--d-s", type=int, help="student head dim (with --l)")
    p.add_argument("--d-t", type=int, help="teacher head dim (with --l)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype (with --l)")
    p.add_argument("--causal", action="store_true", help="causal masking")
    p.add_argument("--padded", action="store_true", help="a key-padding mask (every other sequence 3/4 long)")
    add_run_options(p, "attention_kd", IMPL_NAMES)
    return p.parse_args(argv)


def cases_from(opts, device) -> list:
    sizes = harness.preset_sizes(PRESETS, opts, device)
    if opts.l:
        d, b, h, h_kv, _, d_s, d_t = sizes[-1]
        h = opts.heads or h
        sizes = [(DTYPES[opts.dtype] if opts.dtype else d, opts.b or b, h, opts.kv_heads or h, n,
                  opts.d_s or d_s, opts.d_t or d_t) for n in opts.l]
    return [Case(d, b, h, h_kv, n, d_s, d_t, opts.causal, opts.padded)
            for d, b, h, h_kv, n, d_s, d_t in sizes]


def main(argv=None) -> int:
    return harness.run_script(argv, sys.modules[__name__], "attention_kd")


if __name__ == "__main__":
    sys.exit(main())
