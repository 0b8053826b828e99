"""Benchmark of ``pydistill.kd_loss`` (temperature softmax + divergence) against what a user
would run instead, on the same inputs:

================================  =========================================================
``pydistill-triton``              ``kd_loss(backend="triton")``, gradient recomputed in the
                                  backward (``PYDISTILL_KD_GRAD=recompute``, the default)
``pydistill-triton-gradfwd``      the same with the gradient written by the forward
                                  (``PYDISTILL_KD_GRAD=forward``); see
                                  pydistill/ops/softmax_divergence.py for the two schedules
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
================================  =========================================================

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

    python -m bench.bench_softmax_divergence --quick          # CPU-sized
    python -m bench.bench_softmax_divergence --full           # GPU
    python -m bench.bench_softmax_divergence --n 4096 --v 128256 --dtype bf16 --divergence kl jsd
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
import torch.nn.functional as F

import pydistill
from pydistill import _dispatch
from pydistill.reference import softmax_divergence as reference

from bench import harness

PASSES = ("fwd", "bwd", "fwd+bwd")
# Bytes that must move, in units of one (N, V) logits tensor (module docstring).
FLOOR_TENSORS = {"fwd": 2, "bwd": 1, "fwd+bwd": 3}

COLUMNS = (
    "impl", "divergence", "dtype", "N", "V", "temperature", "beta", "grad_output", "pass", "status",
    "median_ms", "reps", "n_sets", "peak_extra_mib", "floor_bytes", "floor_ms",
    "ratio_to_floor", "achieved_gbps", "loss_rel_diff",
) + harness.PROVENANCE_COLUMNS

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}

# (dtype, N, V). quick: minutes on two CPU cores. full: an 80 GB GPU in a few minutes; at
# V = 262144 the rows are halved so that the naive eager autograd graph (several (N, V)
# intermediates) fits beside the others.
PRESETS = {
    "quick": [(torch.float32, n, v) for n in (256, 1024) for v in (4096, 32000)],
    "full": [
        (torch.bfloat16, 16384, 32000),
        (torch.bfloat16, 16384, 128256),
        (torch.bfloat16, 8192, 262144),
        (torch.bfloat16, 4096, 32000),
        (torch.bfloat16, 4096, 128256),
        (torch.bfloat16, 4096, 262144),
        (torch.float32, 4096, 32000),
        (torch.float32, 4096, 128256),
    ],
}


@dataclass(frozen=True)
class Case:
    divergence: str
    dtype: torch.dtype
    n: int
    v: int
    temperature: float
    beta: float
    grad_output: float = 1.0  # d(objective)/d(loss) fed to the backward

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def floor_bytes(self, pass_name: str) -> int:
        """Bytes the pass must move (module docstring); _measure_passes asks every case."""
        return FLOOR_TENSORS[pass_name] * self.n * self.v * torch.empty((), dtype=self.dtype).element_size()


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


def build_pydistill(backend: str):
    def build(case: Case, device: torch.device):
        if backend == "triton" and device.type != "cuda":
            return "skipped: Triton kernels run on CUDA (the CPU interpreter is not timed)"
        reason = _dispatch.why_unavailable(backend, device)
        if reason is not None:
            return f"skipped: {reason}"
        return lambda student_logits, teacher_logits: pydistill.kd_loss(
            student_logits, teacher_logits, divergence=case.divergence,
            temperature=case.temperature, beta=case.beta, backend=backend,
        )

    return build


def build_eager(case: Case, device: torch.device):
    return naive_loss(case)


def build_compiled(case: Case, device: torch.device):
    import torch._dynamo

    # A fresh cache per size: static shapes, the compiled peer's best case, and no
    # recompile limit reached across sizes.
    torch._dynamo.reset()
    return torch.compile(naive_loss(case), dynamic=False)


def build_liger(case: Case, device: torch.device):
    if importlib.util.find_spec("liger_kernel") is None:
        return "skipped: liger-kernel not installed (optional: pip install liger-kernel)"
    if device.type != "cuda":
        return "skipped: Liger-Kernel runs on CUDA only"
    if case.divergence.startswith("skew"):
        return f"skipped: Liger-Kernel has no {case.divergence}"
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss, LigerTVDLoss
    except Exception as exc:  # a broken install is a finding, not a crash
        return f"skipped: liger-kernel does not import ({_one_line(exc)})"

    temperature, t2 = case.temperature, case.temperature * case.temperature
    if case.divergence == "tvd":
        # LigerTVDLoss takes probabilities (student first) and returns the gradient of the first.
        tvd = LigerTVDLoss(reduction="batchmean")

        def liger_tvd(student_logits, teacher_logits):
            q = torch.softmax(student_logits / temperature, dim=-1)
            p = torch.softmax(teacher_logits / temperature, dim=-1)
            return tvd(q, p) * t2

        return liger_tvd
    if case.divergence == "kl":
        # nn.KLDivLoss convention: (student log-probs, teacher log-probs with log_target).
        loss_fn = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    else:
        # LigerJSD(log_q, log_p): student first; beta = 1 is reverse KL (same convention as
        # pydistill's jsd, TRL's generalized JSD).
        loss_fn = LigerJSD(beta=1.0 if case.divergence == "reverse_kl" else case.beta)

    def liger_loss(student_logits, teacher_logits):
        log_q = F.log_softmax(student_logits / temperature, dim=-1)
        log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
        return loss_fn(log_q, log_p) * t2

    return liger_loss


@dataclass(frozen=True)
class Impl:
    name: str
    build: Callable[[Case, torch.device], Union[Callable, str]]
    env: tuple = ()  # (variable, value) pairs set while it runs
    failure: str = "error"  # status prefix when it raises (other than out of memory)


IMPLS = (
    Impl("pydistill-triton", build_pydistill("triton"), env=(("PYDISTILL_KD_GRAD", "recompute"),)),
    Impl("pydistill-triton-gradfwd", build_pydistill("triton"),
         env=(("PYDISTILL_KD_GRAD", "forward"),)),
    Impl("pydistill-torch", build_pydistill("torch")),
    Impl("torch-eager", build_eager),
    Impl("torch-compile", build_compiled, failure="skipped: torch.compile failed"),
    Impl("liger", build_liger),
)
IMPL_NAMES = tuple(impl.name for impl in IMPLS)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(pairs):
    saved = {name: os.environ.get(name) for name, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure_status(exc: BaseException, prefix: str = "error") -> str:
    if harness.is_out_of_memory(exc):
        return "error: out of memory"
    return f"{prefix}: {_one_line(exc)}"


def make_inputs(case: Case, device: torch.device, n_sets: int, seed: int = 0):
    """``n_sets`` fresh random (student, teacher) pairs; the student requires grad."""
    sets = []
    for i in range(n_sets):
        gen = torch.Generator(device=device).manual_seed(seed + i)
        # Spread 2: softmaxes neither flat nor one-hot, like trained logits at T ~ 1-2.
        student = 2.0 * torch.randn(case.n, case.v, device=device, dtype=case.dtype, generator=gen)
        teacher = 2.0 * torch.randn(case.n, case.v, device=device, dtype=case.dtype, generator=gen)
        sets.append((student.requires_grad_(), teacher))
    return sets


def expected_loss(case: Case, student, teacher) -> float:
    with torch.no_grad():
        loss = pydistill.kd_loss(
            student, teacher, divergence=case.divergence, temperature=case.temperature,
            beta=case.beta, backend="torch",
        )
    return float(loss)


def clear_grads(sets):
    """Drop the gradient of every tensor of every input set (whichever of them require grad:
    the student logits here, hidden states and weights in bench_linear_kd.py)."""
    for inputs in sets:
        for x in inputs:
            if isinstance(x, torch.Tensor):
                x.grad = None


def pass_callables(loss_fn: Callable, sets, gradient):
    """(prepare, run) for each pass: prepare(i) runs outside the timed region. ``gradient``:
    what the backward starts from, None for a plain ``loss.backward()`` (grad_output 1)."""

    def prepare_inputs(i):
        clear_grads(sets)
        return sets[i]

    def prepare_loss(i):
        clear_grads(sets)
        return loss_fn(*sets[i])

    def forward(pair):
        return loss_fn(*pair)

    def backward(loss):
        loss.backward(gradient)

    def forward_backward(pair):
        loss_fn(*pair).backward(gradient)

    return {
        "fwd": (prepare_inputs, forward),
        "bwd": (prepare_loss, backward),
        "fwd+bwd": (prepare_inputs, forward_backward),
    }


def run_impl(impl: Impl, case: Case, sets, expected: float, device, opts, base: dict):
    def row(pass_name, status, **values):
        return {**base, "impl": impl.name, "pass": pass_name, "status": status, **values}

    built = impl.build(case, device)
    if isinstance(built, str):
        return [row("all", built)]
    with environment(impl.env):
        rows = _measure_passes(impl, built, case, sets, expected, device, opts, row)
    clear_grads(sets)
    # Here, not in an except block, whose traceback would keep a failed call's tensors alive.
    harness.release_memory(device)
    return rows


def _measure_passes(impl: Impl, loss_fn, case: Case, sets, expected, device, opts, row):
    try:
        # The first forward and backward compile / JIT both, and give the loss for the
        # agreement check.
        loss = loss_fn(*sets[0])
        value = float(loss.detach())
        gradient = None
        if case.grad_output != 1.0:
            # Made once, outside the timed region; in the loss's dtype, as autograd would.
            gradient = torch.full_like(loss, case.grad_output)
        loss.backward(gradient)
        del loss
    except Exception as exc:
        return [row("all", failure_status(exc, impl.failure))]
    rel_diff = abs(value - expected) / max(abs(expected), 1e-30)

    callables = pass_callables(loss_fn, sets, gradient)
    rows = []
    for k, pass_name in enumerate(PASSES):
        prepare, run = callables[pass_name]
        try:
            m = harness.measure(
                run, prepare, device=device, n_sets=len(sets), budget_s=opts.budget_ms / 1e3,
                min_reps=opts.min_reps, max_reps=opts.max_reps, long_s=opts.long_s,
                warmup=opts.warmup,
            )
        except Exception as exc:
            status = failure_status(exc, impl.failure)
            rows.extend(row(p, status, loss_rel_diff=rel_diff) for p in PASSES[k:])
            break
        floor_bytes = case.floor_bytes(pass_name)
        floor_s = floor_bytes / opts.floors.copy_bytes_per_s
        rows.append(row(
            pass_name, "ok",
            median_ms=m.median_s * 1e3, reps=m.reps,
            peak_extra_mib=None if m.peak_extra_bytes is None else m.peak_extra_bytes / 2**20,
            floor_bytes=floor_bytes, floor_ms=floor_s * 1e3,
            ratio_to_floor=m.median_s / floor_s, achieved_gbps=floor_bytes / m.median_s / 1e9,
            loss_rel_diff=rel_diff,
        ))
        _progress(opts, f"{impl.name:26s} {pass_name:8s} {m.median_s * 1e3:10.3f} ms "
                        f"{m.median_s / floor_s:7.2f}x floor  ({m.reps} reps)")
    return rows


def _progress(opts, message: str):
    print(f"[{time.monotonic() - opts.started:7.1f}s] {message}", file=sys.stderr, flush=True)


def run_case(case: Case, impls, device, opts, prov: dict):
    base = {
        "divergence": case.divergence, "dtype": case.dtype_name, "N": case.n, "V": case.v,
        "temperature": case.temperature, "beta": case.beta, "grad_output": case.grad_output,
        **prov,
    }
    element = torch.empty((), dtype=case.dtype).element_size()
    n_sets = harness.rotation_count(2 * case.n * case.v * element, device)
    base["n_sets"] = n_sets
    _progress(opts, f"{case.divergence} {case.dtype_name} N={case.n} V={case.v} "
                    f"({n_sets} input sets)")
    sets, status = None, None
    try:
        sets = make_inputs(case, device, n_sets)
        expected = expected_loss(case, *sets[0])
    except Exception as exc:
        status = failure_status(exc)
    if status is not None:
        del sets
        harness.release_memory(device)
        return [{**base, "impl": impl.name, "pass": "all", "status": status} for impl in impls]
    rows = []
    for impl in impls:
        if opts.time_limit and time.monotonic() - opts.started > opts.time_limit:
            status = f"skipped: --time-limit {opts.time_limit:g} s reached"
            rows.append({**base, "impl": impl.name, "pass": "all", "status": status})
            continue
        rows.extend(run_impl(impl, case, sets, expected, device, opts, base))
    del sets
    harness.release_memory(device)
    return rows


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

TABLE = (
    ("impl", "impl", None), ("divergence", "div", None), ("dtype", "dtype", None),
    ("N", "N", None), ("V", "V", None), ("pass", "pass", None),
    ("median_ms", "ms", ".3f"), ("ratio_to_floor", "x floor", ".2f"),
    ("achieved_gbps", "GB/s", ".1f"), ("peak_extra_mib", "peak extra MiB", ".0f"),
    ("reps", "reps", None), ("loss_rel_diff", "loss rel diff", ".1e"), ("status", "status", None),
)


def _order(rows):
    impl_rank = {name: i for i, name in enumerate(IMPL_NAMES)}
    pass_rank = {p: i for i, p in enumerate(("all",) + PASSES)}
    return sorted(rows, key=lambda r: (
        r["divergence"], r["dtype"], r["N"], r["V"], pass_rank[r["pass"]], impl_rank[r["impl"]]
    ))


# The goal for kd_loss: pydistill-triton's fwd+bwd within 1.6x of the floor (see
# bench/NOTES-softmax_divergence.md for what each gradient schedule can reach).
TARGET_RATIO = 1.6


def targets(rows, target_ratio: float = TARGET_RATIO) -> list:
    """For each size: the Triton backend's fwd+bwd against the floor and the peers."""
    done = {(r["divergence"], r["dtype"], r["N"], r["V"], r["impl"]): r
            for r in rows if r["pass"] == "fwd+bwd" and r["status"] == "ok"}
    out = []
    for (*case, impl), r in done.items():
        if not impl.startswith("pydistill-triton"):
            continue

        def speedup(peer):
            other = done.get((*case, peer))
            return None if other is None else other["median_ms"] / r["median_ms"]

        out.append({
            "divergence": case[0], "dtype": case[1], "N": case[2], "V": case[3], "impl": impl,
            "median_ms": r["median_ms"], "ratio_to_floor": r["ratio_to_floor"],
            "meets": "yes" if r["ratio_to_floor"] <= target_ratio else "no",
            "vs_liger": speedup("liger"), "vs_compile": speedup("torch-compile"),
            "vs_eager": speedup("torch-eager"),
        })
    return sorted(out, key=lambda r: (r["divergence"], r["dtype"], r["N"], r["V"], r["impl"]))


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
    parts = [
        "# kd_loss (softmax divergence) benchmark",
        "",
        harness.provenance_line(prov),
        "",
        f"Command: `python -m bench.bench_softmax_divergence {' '.join(argv)}`",
        "",
        "Floor: fwd reads student + teacher (2 N V e bytes), bwd writes the student gradient "
        "(N V e), fwd+bwd 3 N V e; divided by the measured copy bandwidth. "
        "`x floor` = measured / floor; GB/s = floor bytes / measured time; peak extra = "
        "memory above what was allocated before the call. "
        f"Backward from grad_output = {grad_output:g}.",
        "",
        harness.markdown_table(_order(rows), TABLE),
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
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_softmax_divergence",
        description="Time kd_loss's backends and its peers (fwd, bwd, fwd+bwd, peak memory).",
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="CPU-sized: float32, N {256,1024} x V {4096,32000}")
    preset.add_argument("--full", action="store_true",
                        help="GPU: bf16 up to 16384 x 262144, an fp32 subset")
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
    p.add_argument("--impl", nargs="+", choices=IMPL_NAMES, help="only these implementations")
    p.add_argument("--grad-mode", choices=("recompute", "forward", "both"), default="both",
                   help="which Triton gradient schedules to time (PYDISTILL_KD_GRAD)")
    add_run_options(p, "softmax_divergence")
    return p.parse_args(argv)


def add_run_options(p: argparse.ArgumentParser, family: str):
    """The options every benchmark's run takes (device, repetitions, time limit, output);
    ``start_run`` fills in the repetition settings left out."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--budget-ms", type=float, help="time budget of one measurement's repetitions")
    p.add_argument("--min-reps", type=int)
    p.add_argument("--max-reps", type=int)
    p.add_argument("--warmup", type=int, help="untimed calls before each measurement")
    p.add_argument("--long-s", type=float,
                   help="seconds: calls so slow that --min-reps of them exceed it get fewer reps")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="seconds; implementations not started by then are reported as skipped")
    p.add_argument("--out", type=Path,
                   help="CSV path, a .md of the same name beside it "
                        f"(default bench/results/{family}-<device>-<date>.csv)")


def cases_from(opts, device) -> list:
    preset = "full" if opts.full else "quick" if opts.quick else (
        "full" if device.type == "cuda" else "quick")
    sizes = PRESETS[preset]
    if opts.n or opts.v or opts.dtype:
        dtypes = [DTYPES[d] for d in opts.dtype] if opts.dtype else sorted(
            {d for d, _, _ in sizes}, key=str)
        ns = opts.n or sorted({n for _, n, _ in sizes})
        vs = opts.v or sorted({v for _, _, v in sizes})
        sizes = [(d, n, v) for d in dtypes for n in ns for v in vs]
    return [Case(div, d, n, v, opts.temperature, opts.beta, opts.grad_output)
            for div in opts.divergence for d, n, v in sizes]


def selected_impls(opts) -> list:
    impls = [i for i in IMPLS if not opts.impl or i.name in opts.impl]
    if opts.grad_mode == "recompute":
        impls = [i for i in impls if i.name != "pydistill-triton-gradfwd"]
    elif opts.grad_mode == "forward":
        impls = [i for i in impls if i.name != "pydistill-triton"]
    return impls


def start_run(opts, family: str):
    """What a benchmark's main does first: start the clock, pick the device, fill in the
    repetition settings the command line left out, measure the floors, and name the output
    (``--out``, else bench/results/<family>-<device>-<date>.csv). Returns (device, the
    provenance every row carries, the CSV path)."""
    opts.started = time.monotonic()
    device = harness.pick_device(opts.device)
    cuda = device.type == "cuda"
    # No warm-up by default: each implementation's first forward + backward (the loss check)
    # has compiled everything, and the memory-probe call precedes the timed ones. The CPU gets
    # a longer allowance for slow calls: a shared CPU's outliers need a median of three.
    defaults = dict(budget_ms=250.0, min_reps=3, max_reps=100, warmup=0, long_s=2.0) if cuda \
        else dict(budget_ms=1000.0, min_reps=3, max_reps=20, warmup=0, long_s=8.0)
    for name, value in defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)

    _progress(opts, f"measuring the floors on {harness.device_name(device)}")
    opts.floors = harness.measure_floors(device)
    prov = harness.provenance(device, opts.floors)
    _progress(opts, harness.provenance_line(prov))

    out = opts.out or harness.REPO / "bench" / "results" / (
        f"{family}-{harness.device_slug(device)}-"
        f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%d}.csv")
    return device, prov, out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    device, prov, out = start_run(opts, "softmax_divergence")
    impls = selected_impls(opts)
    rows = []
    for case in cases_from(opts, device):
        rows.extend(run_case(case, impls, device, opts, prov))
        # After every size: a run stopped from outside still leaves what it measured.
        harness.write_csv(rows, out, COLUMNS)
        text = report(rows, prov, argv, opts.target_ratio)
        out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
