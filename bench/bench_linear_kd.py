"""Benchmark of ``pydistill.linear_kd_loss`` (distillation fused with the student's LM head)
against what a user would run instead, on the same inputs (student hidden states and head
weight require grad; the teacher, hidden states + head, does not):

=============================  ============================================================
``pydistill-triton``           ``linear_kd_loss(backend="triton")``: chunked GEMMs, the
                               divergence step in the Triton kernel (CUDA)
``pydistill-triton-tiled``     ``linear_kd_loss(backend="triton", chunk_size="tiled")``: the
                               tiled kernels, no logits tile in memory, the backward recomputes
                               them (6 GEMMs for kl against the chunked path's 4; CUDA)
``pydistill-torch``            ``linear_kd_loss(backend="torch")``: the same chunks, the step
                               in closed-form PyTorch
``torch-eager``                the naive code: both logits materialised by ``F.linear`` in the
                               input dtype (the teacher's under ``no_grad``), then
                               bench_softmax_divergence's naive loss (the ``F.kl_div`` one-liner
                               for kl, the reference ``kd_loss`` for the other divergences)
``torch-compile``              ``torch.compile`` of ``torch-eager``, static shapes
``liger-fused-linear-jsd``     Liger-Kernel's ``LigerFusedLinearJSD`` (CUDA; kl, reverse_kl
                               and jsd as its ``jsd_beta`` 0, 1, beta), times T^2
``liger-chunked-jsd``          Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked_loss, hard
                               weight 0, compiled), the same divergences, times T^2
``trl-chunked-divergence``     TRL's ``ChunkedDivergenceFunction`` (trl/kernels/
                               chunked_divergence.py, TRL >= 1.16; CUDA), the same
                               divergences as its beta, mean over tokens, times T^2
``pydistill-trl-dropin``       ``pydistill.integrations.trl_chunked_divergence_loss``, the
                               drop-in for TRL's ``DistillationTrainer`` loss (its
                               signature, on ``linear_kd_loss`` with the ``auto`` backend;
                               a completion mask of ones), times T^2: what a TRL user gets
                               from the one-line patch, against ``trl-chunked-divergence``
=============================  ============================================================

Per-model logit transforms (``--transform``, TRANSFORMS below): each model's logits become
cap(scale * logits) before the temperature (Cohere's logit_scale, Granite's 1 /
logits_scaling, Gemma-2's final_logit_softcapping). pydistill, TRL and the naive code (on its
materialised logits) apply them; Liger has none (its rows say so). ``--trl-like`` is TRL's
DistillationTrainer default case: jsd at beta 0.5, T = 1, without and with transforms.

The peers' builders are in bench/peers.py.

The top-k case (``--k K``; ``H_t`` 0): the teacher is stored top-k log-probs and ids
(``teacher_topk``, tail ``ignore``: the same math as the dense peer), the student's head as
above. Its naive peer materialises the student logits and scatters the top-k into a dense
teacher (bench_topk_divergence's dense kl); Liger and TRL take no top-k teacher and the tiled
kernels hand it to the chunked path (rows say so).

Passes as in bench_softmax_divergence.py (``fwd``, ``bwd`` alone, ``fwd+bwd``), whose runner
this reuses. pydistill's chunked path computes its gradients in the forward: its ``bwd`` is a
rescaling and its ``fwd`` holds all the work; the tiled path does the opposite (its forward only
the per-row statistics, its backward recomputes the tiles); compare ``fwd+bwd``.

Floor: a GEMM-bound op's FLOPs over the matrix-product rate measured at the start of the run
(bf16 on CUDA, float32 on the CPU). N rows, V vocabulary, H_s / H_t hidden sizes::

    fwd      the two logits GEMMs                    2 N V (H_s + H_t)
    bwd      d(hidden) = G W_s, d(weight) = G^T h_s   4 N V H_s
    fwd+bwd  both                                    2 N V (3 H_s + H_t)

``x floor`` = measured / floor. Peak extra memory is also given as a fraction of the eager
path's (``x eager``). The "Targets" section checks, per size, pydistill's fwd+bwd against the
eager path (the CPU goal: peak extra memory <= 10% of eager's at <= 1.25x its time) and, on
CUDA, against the floor and Liger.

    python -m pydistill.bench.bench_linear_kd --quick        # CPU: float32, H = 512, V = 32,000
    python -m pydistill.bench.bench_linear_kd --full         # GPU: bf16, V = 128,256, H 4096 / 2048
    python -m pydistill.bench.bench_linear_kd --n 4096 --h-s 2048 --h-t 4096 --v 128256 --dtype bf16
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import pydistill
from pydistill.reference import softmax_divergence as reference

from pydistill.bench import cases, harness, peers
from pydistill.bench.bench_softmax_divergence import DTYPES, naive_loss
from pydistill.bench.bench_topk_divergence import dense_loss as dense_topk_loss
from pydistill.bench.harness import CaseDtype, Impl, add_run_options

COLUMNS = harness.columns(
    ("divergence", "dtype", "N", "H_s", "H_t", "V", "K", "transform", "temperature", "beta",
     "grad_output"), memory=("peak_extra_vs_eager",), floor="flops")

PRESETS = cases.SWEEPS["linear"]  # (dtype, sizes...) by preset: bench/cases.py
# The tail of the top-k case: "ignore" is exactly the dense peer's kl (bench_topk_divergence).
TOPK_TAIL = "ignore"
# Per-model logit transforms of a case (--transform), as linear_kd_loss's keyword arguments:
# "scale-softcap" gives both models a scale and a soft-cap (different ones), the most work a
# transform costs (the tanh and its slope on both sides).
TRANSFORMS = {
    "none": {},
    "scale-softcap": dict(student_logit_scale=0.5, student_softcap=30.0, teacher_logit_scale=2.0,
                          teacher_softcap=50.0),
}
# --trl-like: TRL's DistillationTrainer defaults (beta 0.5, temperature 1)
TRL_LIKE = dict(divergence=["jsd"], beta=0.5, temperature=1.0, transform=["none", "scale-softcap"])
# The CPU goal for pydistill's fwd+bwd against the eager path.
CPU_MEMORY_GOAL, CPU_TIME_GOAL = 0.10, 1.25


@dataclass(frozen=True)
class Case(CaseDtype):
    divergence: str
    dtype: torch.dtype
    n: int
    h_s: int
    h_t: int
    v: int
    temperature: float
    beta: float
    grad_output: float = 1.0
    k: int = 0  # > 0: a top-k teacher of k entries (h_t is then 0)
    transform: str = "none"  # a key of TRANSFORMS

    @property
    def transforms(self) -> dict:
        """linear_kd_loss's per-model transform arguments (empty: none)."""
        return TRANSFORMS[self.transform]

    @property
    def tail(self) -> str:  # for bench_topk_divergence.dense_loss
        return TOPK_TAIL

    def flops(self, pass_name: str) -> int:
        fwd, bwd = 2 * self.n * self.v * (self.h_s + self.h_t), 4 * self.n * self.v * self.h_s
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_name]

    def floor_bytes(self, pass_name: str) -> int:
        """The runner's memory floor (read the inputs, write the gradients once); the rows
        report the GEMM floor instead (``with_gemm_floor``)."""
        read = (self.n + self.v) * (self.h_s + self.h_t) * self.element
        write = (self.n + self.v) * self.h_s * self.element
        return {"fwd": read, "bwd": write, "fwd+bwd": read + write}[pass_name]


# --------------------------------------------------------------------------------------
# The implementations: each builder returns loss_fn(student_hidden, student_weight,
# teacher_hidden, teacher_weight), or why it cannot run here ("skipped: ...").
# --------------------------------------------------------------------------------------


def naive_linear_loss(case: Case) -> Callable:
    """Materialised logits in the input dtype, as users write it, then the naive loss (for a
    top-k teacher: the dense teacher scattered from it, or why there is no naive loss); the
    case's transforms on the materialised logits (reference.transform_logits)."""
    t = case.transforms

    def student_logits(student_hidden, student_weight):
        return reference.transform_logits(F.linear(student_hidden, student_weight),
                                          t.get("student_logit_scale", 1.0), t.get("student_softcap"))

    if case.k:
        dense = dense_topk_loss(case)
        if isinstance(dense, str):
            return dense
        return lambda student_hidden, student_weight, logprobs, ids: dense(
            student_logits(student_hidden, student_weight), (logprobs, ids))
    loss = naive_loss(case)

    def eager(student_hidden, student_weight, teacher_hidden, teacher_weight):
        with torch.no_grad():
            teacher_logits = reference.transform_logits(
                F.linear(teacher_hidden, teacher_weight), t.get("teacher_logit_scale", 1.0),
                t.get("teacher_softcap"))
        return loss(student_logits(student_hidden, student_weight), teacher_logits)

    return eager


@harness.pydistill_builder
def build_pydistill(case: Case, backend: str, chunk_size="auto"):
    if chunk_size == "tiled" and case.k:
        return "skipped: the tiled kernels take no top-k teacher (it runs chunked)"
    kw = dict(divergence=case.divergence, temperature=case.temperature, beta=case.beta,
              backend=backend, chunk_size=chunk_size, **case.transforms)
    if case.k:
        return lambda student_hidden, student_weight, logprobs, ids: pydistill.linear_kd_loss(
            student_hidden, student_weight, teacher_topk=(logprobs, ids), tail=TOPK_TAIL,
            teacher_temperature=case.temperature, **kw)  # log-probs used as they are
    return lambda student_hidden, student_weight, teacher_hidden, teacher_weight: (
        pydistill.linear_kd_loss(student_hidden, student_weight, teacher_hidden,
                                 teacher_weight, **kw))


build_eager, build_compiled = peers.eager_and_compiled(naive_linear_loss)


def dense_teacher_only(builder):
    """A peer that takes the teacher's hidden states and head: skipped for a top-k teacher."""
    def build(case: Case, device: torch.device):
        if case.k:
            return "skipped: takes no top-k teacher"
        return builder(case, device)

    return build


def untransformed_only(builder):
    """A peer without per-model logit transforms: skipped for a case with them."""
    def build(case: Case, device: torch.device):
        if case.transforms:
            return "skipped: has no per-model logit scale / soft-cap"
        return builder(case, device)

    return build


def build_trl_dropin(case: Case, device: torch.device):
    """TRL's DistillationTrainer loss through the one-line patch: trl_chunked_divergence_loss
    (pydistill, backend "auto") with TRL's arguments, every position in the completion mask;
    its mean over tokens, times T^2."""
    beta = peers.generalized_jsd_beta(case)
    if beta is None:
        return f"skipped: TRL's divergence has no {case.divergence}"
    from pydistill.integrations import trl_chunked_divergence_loss

    t = case.transforms
    kw = dict(temperature=case.temperature,
              student_logit_scale=t.get("student_logit_scale", 1.0),
              teacher_logit_scale=t.get("teacher_logit_scale", 1.0),
              student_final_logit_softcapping=t.get("student_softcap"),
              teacher_final_logit_softcapping=t.get("teacher_softcap"))
    mask = torch.ones(case.n, dtype=torch.long, device=device)
    t2 = case.temperature**2

    def dropin(h_s, w_s, h_t, w_t):
        loss, _entropy_sum, _count = trl_chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, **kw)
        return loss * t2

    return dropin


# Kept for code that imported them from here; the builders live with the other peers.
build_liger_fused_linear_jsd = peers.liger_fused_linear_jsd
build_liger_chunked_jsd = peers.liger_chunked_jsd


IMPLS = (
    Impl("pydistill-triton", build_pydistill("triton")),
    Impl("pydistill-triton-tiled", build_pydistill("triton", "tiled")),
    Impl("pydistill-torch", build_pydistill("torch")),
    Impl("torch-eager", build_eager),
    Impl("torch-compile", build_compiled, failure="skipped: torch.compile failed"),
    Impl("liger-fused-linear-jsd", dense_teacher_only(untransformed_only(peers.liger_fused_linear_jsd))),
    Impl("liger-chunked-jsd", dense_teacher_only(untransformed_only(peers.liger_chunked_jsd))),
    Impl("trl-chunked-divergence", dense_teacher_only(peers.trl_chunked_divergence)),
    Impl("pydistill-trl-dropin", dense_teacher_only(build_trl_dropin)),
)
IMPL_NAMES = tuple(impl.name for impl in IMPLS)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def make_inputs(case: Case, device: torch.device, n_sets: int, seed: int = 0):
    """``n_sets`` fresh (student hidden, student weight, teacher hidden, teacher weight) or,
    for a top-k teacher, (..., top-k log-probs, ids); the student's require grad. Logits
    spread ~3, softmaxes neither flat nor one-hot at T ~ 1-2."""
    sets = []
    for i in range(n_sets):
        gen = torch.Generator(device=device).manual_seed(seed + i)

        def randn(*shape, scale=1.0):
            return (scale * torch.randn(*shape, device=device, generator=gen)).to(case.dtype)

        student = (randn(case.n, case.h_s).requires_grad_(),
                   randn(case.v, case.h_s, scale=3.0 / math.sqrt(case.h_s)).requires_grad_())
        if case.k:
            sets.append(student + topk_teacher(case, device, gen))
        else:
            sets.append(student + (randn(case.n, case.h_t),
                                   randn(case.v, case.h_t, scale=3.0 / math.sqrt(case.h_t))))
    return sets


def topk_teacher(case: Case, device: torch.device, gen) -> tuple:
    """Top-k log-probs (the case's dtype) and ids of random teacher logits (spread 3), made
    1,024 rows at a time (a whole (N, V) float32 teacher would be 10 GB at the full sizes)."""
    logprobs, ids = [], []
    for start in range(0, case.n, 1024):
        rows = min(1024, case.n - start)
        t = 3.0 * torch.randn(rows, case.v, device=device, generator=gen)
        lp, idx = torch.log_softmax(t, -1).topk(case.k, dim=-1)
        logprobs.append(lp.to(case.dtype))
        ids.append(idx)
    return torch.cat(logprobs), torch.cat(ids)


def run_case(case: Case, impls, device, opts, prov: dict):
    base = {
        "divergence": case.divergence, "dtype": case.dtype_name, "N": case.n, "H_s": case.h_s,
        "H_t": case.h_t, "V": case.v, "K": case.k or "", "transform": case.transform,
        "temperature": case.temperature, "beta": case.beta,
        "grad_output": case.grad_output, **prov,
    }
    return harness.with_memory_vs(harness.run_case(
        case, impls, device, opts, base, set_bytes=case.floor_bytes("fwd"),
        label=(f"{case.divergence} {case.dtype_name} N={case.n} H_s={case.h_s} H_t={case.h_t} "
               f"V={case.v}" + (f" K={case.k}" if case.k else "")
               + (f" {case.transform}" if case.transforms else "")),
        make_inputs=make_inputs, expected_loss=harness.torch_loss(build_pydistill)))


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

TABLE = harness.table(
    (("divergence", "div", None), "dtype", "N", "H_s", "H_t", "V", "K", "transform"),
    memory=(("peak_extra_vs_eager", "x eager", ".3f"),), floor="flops", ms=".1f")

TARGETS_TABLE = (
    ("divergence", "div", None), ("dtype", "dtype", None), ("N", "N", None), ("H_s", "H_s", None),
    ("H_t", "H_t", None), ("V", "V", None), ("K", "K", None), ("transform", "transform", None),
    ("impl", "impl", None), ("median_ms", "fwd+bwd ms", ".1f"), ("ratio_to_floor", "x floor", ".2f"),
    ("time_vs_eager", "time / eager", ".2f"), ("memory_vs_eager", "memory / eager", ".3f"),
    ("cpu_goal", f"CPU goal (<= {CPU_MEMORY_GOAL:.0%} memory, <= {CPU_TIME_GOAL}x time)", None),
    ("vs_liger", "speedup vs best Liger", ".2f"), ("vs_trl", "speedup vs TRL", ".2f"),
    ("vs_compile", "vs torch-compile", ".2f"),
)


_KEY = ("divergence", "dtype", "N", "H_s", "H_t", "V", "K", "transform")


def _key(r):
    return tuple(r.get(k, "") for k in _KEY)


def targets(rows) -> list:
    out = []
    for r, peer in harness.against_peers(rows, _key):
        time_ratio = harness.time_ratio(r, peer("torch-eager"))
        memory_ratio = r.get("peak_extra_vs_eager")
        goal = None
        if time_ratio is not None and memory_ratio is not None:
            goal = "met" if memory_ratio <= CPU_MEMORY_GOAL and time_ratio <= CPU_TIME_GOAL else "not met"
        liger = [p["median_ms"] for p in map(peer, ("liger-fused-linear-jsd", "liger-chunked-jsd")) if p]
        out.append({
            **dict(zip(_KEY, _key(r))), "impl": r["impl"],
            "median_ms": r["median_ms"], "ratio_to_floor": r.get("ratio_to_floor"),
            "time_vs_eager": time_ratio, "memory_vs_eager": memory_ratio, "cpu_goal": goal,
            "vs_liger": min(liger) / r["median_ms"] if liger else None,
            "vs_trl": harness.time_ratio(peer("trl-chunked-divergence"), r),
            "vs_compile": harness.time_ratio(peer("torch-compile"), r),
        })
    return out


def report(rows, prov: dict, argv) -> str:
    parts = harness.report_head("linear_kd_loss (fused LM-head distillation) benchmark",
                                "bench_linear_kd", prov, argv) + [
        "Floor: FLOPs over the measured matmul rate; fwd 2 N V (H_s + H_t), bwd 4 N V H_s "
        "(d(hidden), d(weight)), fwd+bwd the sum. `x floor` = measured / floor; `x eager` = peak "
        "extra memory / torch-eager's in the same pass. pydistill's chunked path computes its "
        "gradients in the forward (its bwd is a rescaling), the tiled one in the backward: "
        "compare fwd+bwd. Student hidden and weight require "
        "grad; the teacher does not; mean reduction, grad_output 1.",
        "",
        harness.markdown_table(harness.order_rows(rows, _key, IMPL_NAMES), TABLE),
        "",
        "## Targets (fwd+bwd)",
        "",
        "Speedup = peer's time / pydistill's (above 1: pydistill faster).",
        "",
        harness.markdown_table(targets(rows), TARGETS_TABLE),
    ]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = harness.script_parser(
        "bench_linear_kd", "Time linear_kd_loss and its peers (fwd, bwd, fwd+bwd, peak memory).",
        quick="CPU: float32, N {1024,4096}, H 512, V 32000",
        full="GPU: bf16, V 128256, H 4096 (and H_s 2048)")
    p.add_argument("--n", type=int, nargs="+", help="rows (replaces the preset's sizes)")
    p.add_argument("--h-s", type=int, help="student hidden size (with --n)")
    p.add_argument("--h-t", type=int, help="teacher hidden size (with --n)")
    p.add_argument("--v", type=int, nargs="+", help="vocabularies (with --n)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype (with --n)")
    p.add_argument("--k", type=int, default=0,
                   help="a top-k teacher of K entries instead of a teacher head (with --n)")
    p.add_argument("--divergence", nargs="+", default=["kl"], choices=reference.DIVERGENCES)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--transform", nargs="+", default=["none"], choices=sorted(TRANSFORMS),
                   help="per-model logit transforms (TRANSFORMS in this file; dense teachers only)")
    p.add_argument("--trl-like", action="store_true",
                   help="TRL's DistillationTrainer case: jsd, beta 0.5, T 1, transforms none and "
                        "scale-softcap (replaces --divergence, --beta, --temperature, --transform)")
    add_run_options(p, "linear_kd", IMPL_NAMES)
    return p.parse_args(argv)


def cases_from(opts, device) -> list:
    sizes = harness.preset_sizes(PRESETS, opts, device)
    if opts.n:
        d, _, h_s, h_t, v, _ = sizes[0]
        h_t = 0 if opts.k else (opts.h_t or h_t)
        sizes = [(DTYPES[opts.dtype] if opts.dtype else d, n, opts.h_s or h_s, h_t, v_, opts.k)
                 for v_ in (opts.v or [v]) for n in opts.n]
    if opts.trl_like:
        for name, value in TRL_LIKE.items():
            setattr(opts, name, value)
    return [Case(div, d, n, h_s, h_t, v, opts.temperature, opts.beta, k=k, transform=transform)
            for div in opts.divergence for transform in opts.transform
            for d, n, h_s, h_t, v, k in sizes
            if not (k and TRANSFORMS[transform])]  # a top-k teacher has no logits to transform


def main(argv=None) -> int:
    return harness.run_script(argv, sys.modules[__name__], "linear_kd")


if __name__ == "__main__":
    sys.exit(main())
