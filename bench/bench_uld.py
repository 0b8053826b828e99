"""Benchmark of ``pydistill.uld_loss`` (Universal Logit Distillation, cross-tokenizer: each
model's probabilities sorted in decreasing order, the L1 distance between the sorted vectors,
the shorter one zero-padded; ``top_k`` keeps the first K ranks) against what users run instead,
on the same inputs: student logits (N, V), V = V_s, and teacher logits (N, V_t).

================================  =========================================================
``pydistill-triton``              ``uld_loss(backend="triton")``: for ``top_k`` <= 1024 a fused
                                  selection kernel (one read of the logits), otherwise (and
                                  for the full sort) ``torch.sort`` / ``torch.topk`` of the
                                  logits; gradient recomputed in the backward
``pydistill-torch``               ``uld_loss(backend="torch")``: the chunked fallback, gradient
                                  computed in the forward
``torch-eager``                   the loss as users write it, plain autograd in the input
                                  dtype: ``softmax(s / T)``, ``softmax(t / T)``, each sorted
                                  (``torch.sort(descending=True)``, or ``torch.topk`` with
                                  ``top_k``), the shorter zero-padded, ``(q - p).abs().sum(-1)
                                  .mean()`` (the reference's ``sorted_probs`` and
                                  ``wasserstein_rows``, pydistill/reference/uld.py)
``torch-compile``                 ``torch.compile`` of ``torch-eager``, static shapes
``trl-gold-uld``                  TRL GOLD's ``ULDLoss`` (``trl.experimental.gold``), the rows
                                  as one sequence, positional alignment, no cross-entropy;
                                  full sort only (no ``top_k``)
================================  =========================================================

The student logits require grad, the teacher's do not; mean over the rows, no T^2 factor (ULD
and GOLD have none). Passes as in bench_softmax_divergence.py (``fwd``, ``bwd`` alone,
``fwd+bwd``). Floor of each pass, in bytes that must move (N rows, e bytes per element)::

    fwd      read the student and the teacher logits      N (V + V_t) e
    bwd      write the student's gradient                 N V e
    fwd+bwd  both                                         N (2 V + V_t) e

divided by the copy bandwidth measured at the start of the run (``x floor``). The sort is not
free: the floor is what any implementation must move, not what a sort-based one can reach.
``loss_rel_diff`` is each loss against the torch backend's (float32 math): the eager, compiled
and GOLD rows compute in the input dtype and differ by its rounding.

    python -m pydistill.bench.bench_uld --smoke          # tiny shapes; torch.compile takes most
    python -m pydistill.bench.bench_uld --quick          # CPU-sized
    python -m pydistill.bench.bench_uld --full           # GPU: V 128,256 / V_t 151,936, bf16
    python -m pydistill.bench.bench_uld --n 4096 --v 128256 --v-t 151936 --top-k 64 2048 none
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import pydistill
from pydistill.reference import uld as reference

from pydistill.bench import cases, harness, peers
from pydistill.bench.bench_softmax_divergence import DTYPES, make_inputs  # (N, V) and (N, V_t)
from pydistill.bench.harness import CaseDtype, Impl, add_run_options

COLUMNS = harness.columns(("dtype", "N", "V", "V_t", "K", "temperature", "grad_output"))

PRESETS = cases.SWEEPS["uld"]  # (dtype, sizes...) by preset: bench/cases.py


@dataclass(frozen=True)
class Case(CaseDtype):
    dtype: torch.dtype
    n: int
    v: int  # the student's vocabulary, V_s
    v_t: int
    top_k: Optional[int]
    temperature: float
    grad_output: float = 1.0

    @property
    def k(self):
        """The ``K`` column: top_k, or "all" for the full sort (an empty cell would read as
        a family without K)."""
        return "all" if self.top_k is None else self.top_k

    def floor_bytes(self, pass_name: str) -> int:
        """Bytes the pass must move (module docstring)."""
        student, teacher = self.n * self.v * self.element, self.n * self.v_t * self.element
        return {"fwd": student + teacher, "bwd": student,
                "fwd+bwd": 2 * student + teacher}[pass_name]


# --------------------------------------------------------------------------------------
# The implementations: each builder returns loss(student, teacher) or why it cannot run here
# ("skipped: ...").
# --------------------------------------------------------------------------------------


def naive_loss(case: Case) -> Callable:
    """What users write by hand (module docstring), with the reference's own sort and
    distance so that the math stays in one place."""
    temperature, top_k = case.temperature, case.top_k

    def eager_uld(student_logits, teacher_logits):
        q = torch.softmax(student_logits / temperature, dim=-1)
        p = torch.softmax(teacher_logits / temperature, dim=-1)
        rows = reference.wasserstein_rows(reference.sorted_probs(q, top_k),
                                          reference.sorted_probs(p, top_k))
        return rows.mean()

    return eager_uld


@harness.pydistill_builder
def build_pydistill(case: Case, backend: str):
    return lambda student_logits, teacher_logits: pydistill.uld_loss(
        student_logits, teacher_logits, temperature=case.temperature, top_k=case.top_k,
        backend=backend,
    )


build_eager, build_compiled = peers.eager_and_compiled(naive_loss)
IMPLS = (
    Impl("pydistill-triton", build_pydistill("triton")),
    Impl("pydistill-torch", build_pydistill("torch")),
    Impl("torch-eager", build_eager),
    Impl("torch-compile", build_compiled, failure="skipped: torch.compile failed"),
    Impl("trl-gold-uld", peers.trl_uld),
)
IMPL_NAMES = tuple(impl.name for impl in IMPLS)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def run_case(case: Case, impls, device, opts, prov: dict):
    base = {
        "dtype": case.dtype_name, "N": case.n, "V": case.v, "V_t": case.v_t, "K": case.k,
        "temperature": case.temperature, "grad_output": case.grad_output, **prov,
    }
    return harness.run_case(
        case, impls, device, opts, base, set_bytes=case.floor_bytes("fwd"),
        label=f"uld {case.dtype_name} N={case.n} V={case.v} V_t={case.v_t} K={case.k}",
        make_inputs=make_inputs, expected_loss=harness.torch_loss(build_pydistill))


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

TABLE = harness.table(("dtype", "N", "V", "V_t", ("K", "top_k", None)))
PEERS = ("torch-eager", "torch-compile", "trl-gold-uld")


def _key(r):
    return (r["dtype"], r["N"], r["V"], r["V_t"], r["K"] == "all", 0 if r["K"] == "all" else r["K"])


def speedups(rows) -> list:
    """For each case and pydistill backend that ran: each peer's fwd+bwd time over its own."""
    out = []
    for r, peer in harness.against_peers(rows, _key):
        out.append({"dtype": r["dtype"], "N": r["N"], "V": r["V"], "V_t": r["V_t"], "K": r["K"],
                    "impl": r["impl"], "median_ms": r["median_ms"],
                    "ratio_to_floor": r["ratio_to_floor"],
                    **{name: harness.time_ratio(peer(name), r) for name in PEERS}})
    rank = {name: i for i, name in enumerate(IMPL_NAMES)}
    return sorted(out, key=lambda r: (*_key(r), rank[r["impl"]]))


SPEEDUP_TABLE = (
    ("dtype", "dtype", None), ("N", "N", None), ("V", "V", None), ("V_t", "V_t", None),
    ("K", "top_k", None), ("impl", "impl", None), ("median_ms", "fwd+bwd ms", ".3f"),
    ("ratio_to_floor", "x floor", ".2f"),
) + tuple((peer, f"vs {peer}", ".2f") for peer in PEERS)


def report(rows, prov: dict, argv) -> str:
    grad_output = rows[0]["grad_output"] if rows else 1.0
    parts = harness.report_head("uld_loss (Universal Logit Distillation) benchmark",
                                "bench_uld", prov, argv) + [
        "Floor: fwd reads the student (N V e bytes) and teacher (N V_t e) logits, bwd writes "
        "the student gradient (N V e), fwd+bwd N (2 V + V_t) e; divided by the measured copy "
        "bandwidth. `x floor` = measured / floor; GB/s = floor bytes / measured time; peak "
        "extra = memory above what was allocated before the call. V is the student's "
        "vocabulary, V_t the teacher's; top_k `all` sorts the whole vocabularies. "
        f"Backward from grad_output = {grad_output:g}.",
        "",
        harness.markdown_table(harness.order_rows(rows, _key, IMPL_NAMES), TABLE),
        "",
        "## Speedups (fwd+bwd)",
        "",
    ]
    lines = speedups(rows)
    if lines:
        parts += ["Each peer's fwd+bwd time / the pydistill backend's (above 1: pydistill "
                  "faster); `-` where the peer did not run.", "",
                  harness.markdown_table(lines, SPEEDUP_TABLE)]
    else:
        parts.append("No pydistill row ran in this run.")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def top_k_arg(text: str) -> Optional[int]:
    if text.lower() in ("none", "all"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"top_k must be >= 1 or none, got {value}")
    return value


def parse_args(argv=None):
    p = harness.script_parser(
        "bench_uld", "Time uld_loss's backends and its peers (fwd, bwd, fwd+bwd, peak memory).",
        smoke="tiny: float32, N {32,64}, V 256 / V_t 320, top_k {16,none}",
        quick="CPU-sized: float32, N 256, V / V_t {4096/5120, 32000/32768}, top_k {64,none}",
        full="GPU: bf16, N {4096,8192}, V 128256 / V_t 151936, top_k {64,none}")
    p.add_argument("--n", type=int, nargs="+", help="rows (replaces the preset's sizes)")
    p.add_argument("--v", type=int, nargs="+",
                   help="student vocabularies, paired in order with --v-t (one value pairs "
                        "with each of the other's; without --v-t the teacher's is the same)")
    p.add_argument("--v-t", type=int, nargs="+",
                   help="teacher vocabularies (without --v the student's is the same)")
    p.add_argument("--top-k", type=top_k_arg, nargs="+", metavar="K",
                   help="ranks compared, each an integer or none (the full sort)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                   help="dtypes (replaces the preset's)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--grad-output", type=float, default=1.0, help="gradient fed to the backward")
    add_run_options(p, "uld", IMPL_NAMES)
    return p.parse_args(argv)


def vocab_pairs(vs, vts) -> list:
    """(V_s, V_t) pairs from --v and --v-t (help text of parse_args)."""
    vs, vts = vs or vts, vts or vs
    if len(vs) == 1:
        vs = vs * len(vts)
    if len(vts) == 1:
        vts = vts * len(vs)
    if len(vs) != len(vts):
        raise SystemExit(f"--v and --v-t pair in order: {len(vs)} and {len(vts)} values")
    return list(zip(vs, vts))


def cases_from(opts, device) -> list:
    sizes = harness.preset_sizes(PRESETS, opts, device)
    if opts.n or opts.v or opts.v_t or opts.top_k or opts.dtype:
        dtypes = [DTYPES[d] for d in opts.dtype] if opts.dtype else sorted(
            {s[0] for s in sizes}, key=str)
        ns = opts.n or sorted({s[1] for s in sizes})
        vocabs = (vocab_pairs(opts.v, opts.v_t) if opts.v or opts.v_t
                  else list(dict.fromkeys((s[2], s[3]) for s in sizes)))
        ks = opts.top_k or list(dict.fromkeys(s[4] for s in sizes))
        sizes = [(d, n, vs, vt, k) for d in dtypes for n in ns for vs, vt in vocabs for k in ks]
    return [Case(d, n, vs, vt, k, opts.temperature, opts.grad_output)
            for d, n, vs, vt, k in sizes]


def main(argv=None) -> int:
    return harness.run_script(argv, sys.modules[__name__], "uld")


if __name__ == "__main__":
    sys.exit(main())
