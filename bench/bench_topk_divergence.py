"""Benchmark of ``pydistill.topk_kd_loss`` (an offline top-k teacher) against the naive dense
path a user writes instead, on the same inputs:

================================  =========================================================
``pydistill-triton``              ``topk_kd_loss(backend="triton")``, gradient recomputed in
                                  the backward (``PYDISTILL_KD_GRAD=recompute``, the default)
``pydistill-triton-gradfwd``      the same with the gradient written by the forward
                                  (``PYDISTILL_KD_GRAD=forward``)
``pydistill-cuda``                ``topk_kd_loss(backend="cuda")``: the CUDA C++ extension,
                                  where it is built (or builds) for this device
``pydistill-torch``               ``topk_kd_loss(backend="torch")``: the chunked fallback
``reference-eager``               plain autograd of the reference
                                  (pydistill/reference/topk_divergence.py): no dense teacher,
                                  but autograd keeps several (N, V) intermediates
``dense-eager``                   the dense path: a (N, V) float32 teacher distribution
                                  scattered from the top-k (zeros off the support for
                                  ``tail=ignore``, the tail mass spread uniformly over the
                                  missing tokens for ``bucket``), then
                                  ``F.kl_div(F.log_softmax(s / T), p, reduction="batchmean") * T^2``
``dense-compile``                 ``torch.compile`` of ``dense-eager``, static shapes
================================  =========================================================

``dense-eager`` is exactly ``topk_kd_loss(tail="ignore")`` (kl); for ``bucket`` it is the
nearest dense equivalent and differs from it by the KL inside the tail (the bucket compares the
tail's total mass only): ``loss_rel_diff`` shows by how much. Only kl has a dense one-liner;
other divergences run the pydistill and reference rows only.

The student logits require grad, the teacher (log-probs and ids) does not; mean reduction.
Passes as in bench_softmax_divergence.py (``fwd``, ``bwd`` alone, ``fwd+bwd``), whose
machinery this reuses. Floor of each pass, in bytes that must move (N rows, V vocabulary,
K top-k entries, e bytes per student element, e_t per log-prob, 8 per id)::

    fwd      read the student logits and the teacher arrays   N V e + N K (e_t + 8)
    bwd      write the student's gradient                     N V e
    fwd+bwd  both                                             2 N V e + N K (e_t + 8)

divided by the copy bandwidth measured at the start of the run (``x floor``). Peak extra
memory is also given in units of one float32 (N, V) tensor (``x NV``): the dense path holds
its teacher and several softmax intermediates, pydistill the gradient plus a chunk (torch) or
the gradient alone (Triton).

    python -m pydistill.bench.bench_topk_divergence --quick          # CPU-sized
    python -m pydistill.bench.bench_topk_divergence --full           # GPU: K = 64, V = 151,936, bf16
    python -m pydistill.bench.bench_topk_divergence --n 4096 --v 151936 --k 16 64 256 --tail bucket
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pydistill
from pydistill import _dispatch
from pydistill.reference import topk_divergence as reference

from pydistill.bench import cases, harness, peers
from pydistill.bench.bench_softmax_divergence import DTYPES
from pydistill.bench.harness import CaseDtype, Impl, add_run_options

COLUMNS = harness.columns(
    ("divergence", "tail", "dtype", "N", "V", "K", "temperature", "grad_output"),
    memory=("peak_extra_nv",))

PRESETS = cases.SWEEPS["topk"]  # (dtype, sizes...) by preset: bench/cases.py


@dataclass(frozen=True)
class Case(CaseDtype):
    divergence: str
    tail: str
    dtype: torch.dtype
    n: int
    v: int
    k: int
    temperature: float
    grad_output: float = 1.0

    def floor_bytes(self, pass_name: str) -> int:
        """Bytes the pass must move (module docstring); the log-probs are stored in the
        student's dtype, the ids as int64."""
        logits = self.n * self.v * self.element
        teacher = self.n * self.k * (self.element + 8)
        return {"fwd": logits + teacher, "bwd": logits, "fwd+bwd": 2 * logits + teacher}[pass_name]


# --------------------------------------------------------------------------------------
# The implementations: each builder returns loss(student, (log-probs, ids)) or why it cannot
# run here ("skipped: ...").
# --------------------------------------------------------------------------------------


@harness.pydistill_builder
def build_pydistill(case: Case, backend: str):
    # teacher_temperature = T: the stored log-probs used as they are, as the peers use them
    return lambda student, teacher: pydistill.topk_kd_loss(
        student, *teacher, tail=case.tail, divergence=case.divergence,
        temperature=case.temperature, teacher_temperature=case.temperature, backend=backend,
    )


def build_reference(case: Case, device: torch.device):
    cfg = reference.TopKConfig(divergence=case.divergence, tail=case.tail, temperature=case.temperature,
                               teacher_temperature=case.temperature)
    return lambda student, teacher: reference.topk_kd_loss(student, *teacher, None, cfg)


def dense_loss(case: Case):
    """The dense path users write for kl (module docstring), or why there is none."""
    if case.divergence != "kl" or case.tail not in ("bucket", "ignore"):
        return f"skipped: no dense one-liner for {case.divergence} with tail={case.tail}"
    temperature, bucket = case.temperature, case.tail == "bucket"

    def dense_kl(student, teacher):
        logprobs, ids = teacher
        p_top = logprobs.float().exp()
        fill = 0.0
        if bucket:  # the tail mass spread uniformly over the missing tokens
            fill = ((1 - p_top.sum(-1, keepdim=True)).clamp(min=0) / (student.shape[-1] - ids.shape[-1]))
        p = torch.zeros(student.shape, dtype=torch.float32, device=student.device).add_(fill)
        p.scatter_(-1, ids, p_top)
        log_q = F.log_softmax(student.float() / temperature, dim=-1)
        return F.kl_div(log_q, p, reduction="batchmean") * (temperature * temperature)

    return dense_kl


build_dense, build_dense_compiled = peers.eager_and_compiled(dense_loss)
IMPLS = (
    Impl("pydistill-triton", build_pydistill("triton"), env=(("PYDISTILL_KD_GRAD", "recompute"),)),
    Impl("pydistill-triton-gradfwd", build_pydistill("triton"), env=(("PYDISTILL_KD_GRAD", "forward"),)),
    *([Impl("pydistill-cuda", build_pydistill("cuda"))] if "cuda" in _dispatch.TABLE["topk_kd_loss"] else []),
    Impl("pydistill-torch", build_pydistill("torch")),
    Impl("reference-eager", build_reference, peer="eager"),
    Impl("dense-eager", build_dense, peer="eager"),
    Impl("dense-compile", build_dense_compiled, failure="skipped: torch.compile failed"),
)
IMPL_NAMES = tuple(impl.name for impl in IMPLS)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def make_inputs(case: Case, device: torch.device, n_sets: int, seed: int = 0):
    """``n_sets`` fresh (student, (top-k log-probs, ids)): student logits of spread 2 (softmaxes
    neither flat nor one-hot), the top-K of an independent teacher's log-softmax at T, the
    ids in random order."""
    sets = []
    for i in range(n_sets):
        gen = torch.Generator(device=device).manual_seed(seed + i)
        student = 2.0 * torch.randn(case.n, case.v, device=device, dtype=case.dtype, generator=gen)
        teacher = 2.0 * torch.randn(case.n, case.v, device=device, generator=gen)
        logprobs, ids = torch.log_softmax(teacher / case.temperature, -1).topk(case.k, dim=-1)
        del teacher
        order = torch.rand(case.n, case.k, device=device, generator=gen).argsort(-1)
        sets.append((student.requires_grad_(),
                     (logprobs.gather(-1, order).to(case.dtype), ids.gather(-1, order))))
    return sets


def run_case(case: Case, impls, device, opts, prov: dict):
    base = {
        "divergence": case.divergence, "tail": case.tail, "dtype": case.dtype_name, "N": case.n,
        "V": case.v, "K": case.k, "temperature": case.temperature, "grad_output": case.grad_output,
        **prov,
    }
    rows = harness.run_case(
        case, impls, device, opts, base, set_bytes=case.floor_bytes("fwd"),
        label=f"{case.divergence} tail={case.tail} {case.dtype_name} N={case.n} V={case.v} K={case.k}",
        make_inputs=make_inputs, expected_loss=harness.torch_loss(build_pydistill))
    for row in rows:  # peak extra memory in units of one float32 (N, V) tensor
        if row.get("peak_extra_mib") is not None:
            row["peak_extra_nv"] = row["peak_extra_mib"] * 2**20 / (4 * case.n * case.v)
    return rows


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

TABLE = harness.table(("tail", "dtype", "N", "V", "K"), memory=(("peak_extra_nv", "x NV", ".2f"),))


def _key(r):
    return (r["divergence"], r["tail"], r["dtype"], r["N"], r["V"], r["K"])


def report(rows, prov: dict, argv) -> str:
    grad_output = rows[0]["grad_output"] if rows else 1.0
    return "\n".join(harness.report_head("topk_kd_loss (top-k teacher) benchmark",
                                         "bench_topk_divergence", prov, argv) + [
        "Floor: fwd reads the student logits and the teacher's N x K log-probs and ids, bwd "
        "writes the student gradient, fwd+bwd both; divided by the measured copy bandwidth. "
        "`x floor` = measured / floor; GB/s = floor bytes / measured time; peak extra = memory "
        "above what was allocated before the call, also in units of one float32 (N, V) tensor "
        "(`x NV`). dense-* scatter a (N, V) teacher and call F.kl_div: exactly tail=ignore, "
        "and for bucket the nearest dense loss (`loss rel diff` against pydistill-torch). "
        f"Backward from grad_output = {grad_output:g}.",
        "",
        harness.markdown_table(harness.order_rows(rows, _key, IMPL_NAMES), TABLE),
    ]) + "\n"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = harness.script_parser(
        "bench_topk_divergence",
        "Time topk_kd_loss's backends and the dense path (fwd, bwd, fwd+bwd, peak memory).",
        quick="CPU-sized: float32, N {256,1024} x V {4096,32000}, K 64",
        full="GPU: bf16, V 151936, N up to 16384, K {16,64,256}")
    p.add_argument("--n", type=int, nargs="+", help="rows (replaces the preset's sizes)")
    p.add_argument("--v", type=int, nargs="+", help="vocabularies (replaces the preset's sizes)")
    p.add_argument("--k", type=int, nargs="+", help="top-k sizes (replaces the preset's sizes)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="dtypes (replaces the preset's)")
    p.add_argument("--tail", nargs="+", default=["bucket", "ignore"], choices=reference.TAILS)
    p.add_argument("--divergence", nargs="+", default=["kl"], choices=pydistill.DIVERGENCES)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--grad-output", type=float, default=1.0, help="gradient fed to the backward")
    add_run_options(p, "topk_divergence", IMPL_NAMES)
    return p.parse_args(argv)


def cases_from(opts, device) -> list:
    sizes = harness.preset_sizes(PRESETS, opts, device)
    if opts.n or opts.v or opts.k or opts.dtype:
        dtypes = [DTYPES[d] for d in opts.dtype] if opts.dtype else sorted({s[0] for s in sizes}, key=str)
        ns = opts.n or sorted({s[1] for s in sizes})
        vs = opts.v or sorted({s[2] for s in sizes})
        ks = opts.k or sorted({s[3] for s in sizes})
        sizes = [(d, n, v, k) for d in dtypes for n in ns for v in vs for k in ks]
    return [Case(div, tail, d, n, v, k, opts.temperature, opts.grad_output)
            for div in opts.divergence for tail in opts.tail for d, n, v, k in sizes]


def main(argv=None) -> int:
    return harness.run_script(argv, sys.modules[__name__], "topk_divergence")


if __name__ == "__main__":
    sys.exit(main())
