"""Benchmark of ``pydistill.kd_loss`` (temperature softmax + divergence) against what a user
would run instead, on the same inputs:

================================  =========================================================
``pydistill-triton``              ``kd_loss(backend="triton")``, gradient recomputed in the
                                  backward (``PYDISTILL_KD_GRAD=recompute``, the default)
``pydistill-triton-gradfwd``      the same with the gradient written by the forward
                                  (``PYDISTILL_KD_GRAD=forward``); see
                                  pydistill/ops/softmax_divergence.py for the two schedules
``pydistill-cuda``                ``kd_loss(backend="cuda")``: the CUDA C++ extension,
                                  where it is built (or builds) for this device
``pydistill-torch``               ``kd_loss(backend="torch")``: the chunked fallback
``torch-eager``                   the naive PyTorch code: for ``kl`` the usual
                                  ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T),
                                  reduction="batchmean", log_target=True) * T^2``; for the
                                  other divergences the reference ``kd_loss`` (plain
                                  autograd; pydistill/reference/softmax_divergence.py)
``torch-compile``                 ``torch.compile`` of ``torch-eager``, static shapes,
                                  compiled afresh for each size
``liger``                         Liger-Kernel (CUDA only, optional): ``LigerKLDIVLoss``
                                  (kl), ``LigerJSD`` (jsd; reverse_kl as beta = 1),
                                  ``LigerTVDLoss`` (tvd), each after the log_softmax /
                                  softmax of ``s / T`` and ``t / T`` it needs, times T^2
``trl-generalized-jsd``           TRL's ``GKDTrainer.generalized_jsd_loss`` (optional; kl,
                                  reverse_kl, jsd as its beta 0, 1, beta), times T^2
================================  =========================================================

The peers' builders are in bench/peers.py; the runner in bench/harness.py.

The student logits require grad, the teacher logits do not (the teacher is frozen), the
reduction is the mean over rows. Passes, each timed on its own:

``fwd``      the training forward (inputs require grad, so it includes whatever an
             implementation prepares for the backward);
``bwd``      ``loss.backward()`` alone, its forward re-run before each repetition outside the
             timed region (the torch backend cannot back-propagate twice);
``fwd+bwd``  both.

The backward starts from ``--grad-output`` (default 1, a plain ``loss.backward()``; the two
Triton gradient schedules differ when it is not 1).

Floor of each pass, in bytes that must move (N rows, V vocabulary, e bytes per element):
fwd reads student and teacher, 2 N V e; bwd writes the student's gradient, N V e; fwd+bwd
3 N V e. ``floor_ms`` is that divided by the measured copy bandwidth (read + write),
``ratio_to_floor`` = measured / floor, ``achieved_gbps`` = floor bytes / measured time.

``loss_rel_diff`` is each implementation's loss against the torch backend's (float32), a
check that the rows compute the same thing: the naive eager ``kl`` computes in the input
dtype and differs by that dtype's rounding.

    python -m pydistill.bench.bench_softmax_divergence --quick          # CPU-sized
    python -m pydistill.bench.bench_softmax_divergence --full           # GPU
    python -m pydistill.bench.bench_softmax_divergence --n 4096 --v 128256 --dtype bf16 --divergence kl jsd
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import pydistill
from pydistill import _dispatch
from pydistill.reference import softmax_divergence as reference

from pydistill.bench import cases, harness, peers
from pydistill.bench.harness import CaseDtype, Impl, add_run_options

# Bytes that must move, in units of one (N, V) logits tensor (module docstring).
FLOOR_TENSORS = {"fwd": 2, "bwd": 1, "fwd+bwd": 3}

COLUMNS = harness.columns(
    ("divergence", "dtype", "N", "V", "temperature", "beta", "grad_output"))

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}

PRESETS = cases.SWEEPS["softmax"]  # (dtype, sizes...) by preset: bench/cases.py


@dataclass(frozen=True)
class Case(CaseDtype):
    divergence: str
    dtype: torch.dtype
    n: int
    v: int
    temperature: float
    beta: float
    grad_output: float = 1.0  # d(objective)/d(loss) fed to the backward

    @property
    def v_t(self) -> int:
        """The teacher's vocabulary (make_inputs; the uld family's differs)."""
        return self.v

    def floor_bytes(self, pass_name: str) -> int:
        """Bytes the pass must move (module docstring); _measure_passes asks every case."""
        return FLOOR_TENSORS[pass_name] * self.n * self.v * self.element


# --------------------------------------------------------------------------------------
# The implementations. Each builder returns the loss function (student, teacher) -> loss,
# or the reason it cannot run here ("skipped: ...").
# --------------------------------------------------------------------------------------


def naive_loss(case: Case) -> Callable:
    """What users write by hand: the nn.functional one-liner for kl; for the divergences
    nn.functional lacks, the reference (plain autograd), so the math stays in one place."""
    temperature = case.temperature
    if case.divergence == "kl":

        def eager_kl(student_logits, teacher_logits):
            log_q = F.log_softmax(student_logits / temperature, dim=-1)
            log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
            kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
            return kl * (temperature * temperature)

        return eager_kl
    cfg = reference.KDConfig(divergence=case.divergence, temperature=temperature, beta=case.beta)
    return lambda student_logits, teacher_logits: reference.kd_loss(
        student_logits, teacher_logits, None, cfg
    )


@harness.pydistill_builder
def build_pydistill(case: Case, backend: str):
    return lambda student_logits, teacher_logits: pydistill.kd_loss(
        student_logits, teacher_logits, divergence=case.divergence,
        temperature=case.temperature, beta=case.beta, backend=backend,
    )


build_eager, build_compiled = peers.eager_and_compiled(naive_loss)
# Kept for code that imported it from here; the builder lives with the other peers.
build_liger = peers.liger_softmax


IMPLS = (
    Impl("pydistill-triton", build_pydistill("triton"), env=(("PYDISTILL_KD_GRAD", "recompute"),)),
    Impl("pydistill-triton-gradfwd", build_pydistill("triton"),
         env=(("PYDISTILL_KD_GRAD", "forward"),)),
    *([Impl("pydistill-cuda", build_pydistill("cuda"))] if "cuda" in _dispatch.TABLE["kd_loss"] else []),
    Impl("pydistill-torch", build_pydistill("torch")),
    Impl("torch-eager", build_eager),
    Impl("torch-compile", build_compiled, failure="skipped: torch.compile failed"),
    Impl("liger", peers.liger_softmax),
    Impl("trl-generalized-jsd", peers.trl_softmax),
)
IMPL_NAMES = tuple(impl.name for impl in IMPLS)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def make_inputs(case: Case, device: torch.device, n_sets: int, seed: int = 0):
    """``n_sets`` fresh random (student, teacher) pairs; the student requires grad."""
    sets = []
    for i in range(n_sets):
        gen = torch.Generator(device=device).manual_seed(seed + i)
        # Spread 2: softmaxes neither flat nor one-hot, like trained logits at T ~ 1-2.
        student = 2.0 * torch.randn(case.n, case.v, device=device, dtype=case.dtype, generator=gen)
        teacher = 2.0 * torch.randn(case.n, case.v_t, device=device, dtype=case.dtype,
                                    generator=gen)
        sets.append((student.requires_grad_(), teacher))
    return sets


def run_case(case: Case, impls, device, opts, prov: dict):
    base = {
        "divergence": case.divergence, "dtype": case.dtype_name, "N": case.n, "V": case.v,
        "temperature": case.temperature, "beta": case.beta, "grad_output": case.grad_output,
        **prov,
    }
    return harness.run_case(
        case, impls, device, opts, base, set_bytes=2 * case.n * case.v * case.element,
        label=f"{case.divergence} {case.dtype_name} N={case.n} V={case.v}",
        make_inputs=make_inputs, expected_loss=harness.torch_loss(build_pydistill))


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

TABLE = harness.table((("divergence", "div", None), "dtype", "N", "V"))


def _key(r):
    return (r["divergence"], r["dtype"], r["N"], r["V"])


# The goal for kd_loss: pydistill-triton's fwd+bwd within 1.6x of the floor (see
# bench/NOTES-softmax_divergence.md for what each gradient schedule can reach).
TARGET_RATIO = 1.6


def targets(rows, target_ratio: float = TARGET_RATIO) -> list:
    """For each size: the Triton backend's fwd+bwd against the floor and the peers."""
    return [{
        "divergence": r["divergence"], "dtype": r["dtype"], "N": r["N"], "V": r["V"],
        "impl": r["impl"], "median_ms": r["median_ms"], "ratio_to_floor": r["ratio_to_floor"],
        "meets": "yes" if r["ratio_to_floor"] <= target_ratio else "no",
        "vs_liger": harness.time_ratio(peer("liger"), r),
        "vs_compile": harness.time_ratio(peer("torch-compile"), r),
        "vs_eager": harness.time_ratio(peer("torch-eager"), r),
    } for r, peer in harness.against_peers(rows, _key, lambda impl: impl.startswith("pydistill-triton"))]


def targets_table(target_ratio: float):
    return (
        ("divergence", "div", None), ("dtype", "dtype", None), ("N", "N", None),
        ("V", "V", None), ("impl", "impl", None), ("median_ms", "fwd+bwd ms", ".3f"),
        ("ratio_to_floor", "x floor", ".2f"), ("meets", f"<= {target_ratio:g}x floor", None),
        ("vs_liger", "speedup vs liger", ".2f"), ("vs_compile", "vs torch-compile", ".2f"),
        ("vs_eager", "vs torch-eager", ".2f"),
    )


def report(rows, prov: dict, argv, target_ratio: float = TARGET_RATIO) -> str:
    grad_output = rows[0]["grad_output"] if rows else 1.0
    parts = harness.report_head("kd_loss (softmax divergence) benchmark",
                                "bench_softmax_divergence", prov, argv) + [
        "Floor: fwd reads student + teacher (2 N V e bytes), bwd writes the student gradient "
        "(N V e), fwd+bwd 3 N V e; divided by the measured copy bandwidth. "
        "`x floor` = measured / floor; GB/s = floor bytes / measured time; peak extra = "
        "memory above what was allocated before the call. "
        f"Backward from grad_output = {grad_output:g}.",
        "",
        harness.markdown_table(harness.order_rows(rows, _key, IMPL_NAMES), TABLE),
        "",
        "## Targets (pydistill-triton, fwd+bwd)",
        "",
    ]
    target_rows = targets(rows, target_ratio)
    if target_rows:
        parts.append(f"Goal: within {target_ratio:g}x of the floor. Speedup = peer's fwd+bwd "
                     "time / pydistill-triton's (above 1: pydistill faster).")
        parts.append("")
        parts.append(harness.markdown_table(target_rows, targets_table(target_ratio)))
    else:
        parts.append("No pydistill-triton result in this run "
                     "(the Triton backend is timed on CUDA only).")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = harness.script_parser(
        "bench_softmax_divergence",
        "Time kd_loss's backends and its peers (fwd, bwd, fwd+bwd, peak memory).",
        quick="CPU-sized: float32, N {256,1024} x V {4096,32000}",
        full="GPU: bf16 up to 16384 x 262144, an fp32 subset")
    p.add_argument("--n", type=int, nargs="+", help="rows (replaces the preset's sizes)")
    p.add_argument("--v", type=int, nargs="+", help="vocabularies (replaces the preset's sizes)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                   help="dtypes (replaces the preset's)")
    p.add_argument("--divergence", nargs="+", default=["kl"], choices=reference.DIVERGENCES)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--beta", type=float, default=0.5, help="mixture weight of jsd / skew_*")
    p.add_argument("--grad-output", type=float, default=1.0,
                   help="gradient fed to the backward (1: plain loss.backward(); other values "
                        "stand for loss weights, gradient accumulation, AMP loss scaling)")
    p.add_argument("--target-ratio", type=float, default=TARGET_RATIO,
                   help="fwd+bwd ratio to floor that pydistill-triton should reach")
    p.add_argument("--grad-mode", choices=("recompute", "forward", "both"), default="both",
                   help="which Triton gradient schedules to time (PYDISTILL_KD_GRAD)")
    add_run_options(p, "softmax_divergence", IMPL_NAMES)
    return p.parse_args(argv)


def cases_from(opts, device) -> list:
    sizes = harness.preset_sizes(PRESETS, opts, device)
    if opts.n or opts.v or opts.dtype:
        dtypes = [DTYPES[d] for d in opts.dtype] if opts.dtype else sorted(
            {d for d, _, _ in sizes}, key=str)
        ns = opts.n or sorted({n for _, n, _ in sizes})
        vs = opts.v or sorted({v for _, _, v in sizes})
        sizes = [(d, n, v) for d in dtypes for n in ns for v in vs]
    return [Case(div, d, n, v, opts.temperature, opts.beta, opts.grad_output)
            for div in opts.divergence for d, n, v in sizes]


def selected_impls(opts) -> list:
    impls = harness.selected(IMPLS, opts)
    if opts.grad_mode == "recompute":
        impls = [i for i in impls if i.name != "pydistill-triton-gradfwd"]
    elif opts.grad_mode == "forward":
        impls = [i for i in impls if i.name != "pydistill-triton"]
    return impls


def main(argv=None) -> int:
    return harness.run_script(
        argv, sys.modules[__name__], "softmax_divergence", impls=selected_impls,
        report=lambda rows, prov, argv, opts: report(rows, prov, argv, opts.target_ratio))


if __name__ == "__main__":
    sys.exit(main())
