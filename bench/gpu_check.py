"""One GPU window, prioritised: ``python -m pydistill.bench.gpu_check [--budget 480]``
(bench/README.md). It spends the minutes in order of value, stops on time and rewrites its
report after every step (``report.json`` / ``.md``; at most seven files in ``--out``, default
``$OUT``, else bench/results/gpu-<date-time>/):

a. ``env``: device, versions, the copy bandwidth and matrix-product rates (the floors);
b. ``correctness``: every op x backend x {float32, bfloat16} x a ragged shape and one at a real
   vocabulary (bench/cases.py) x a few options, value and gradients against the torch backend
   in float64. First the CUDA extension is built for this device's arch (a subprocess, a time
   limit, MAX_JOBS = every core; TORCH_CUDA_ARCH_LIST kept for the later subprocesses: the
   build cache is keyed by it), then the section's Triton kernels compile in one process per
   core (``warm_triton``). At most ``--correctness-share`` of the budget; a timer at the
   deadline writes the report, naming the case it stopped in, and exits;
c. ``headline``: the suite at the goal shapes (``cases.GOAL``), every family's pydistill rows
   before any peer's, with the ratio to the floor and peak memory;
d. with time left, ``tests`` (the test suite on CUDA) and ``full`` (the suite's ``--full``).

``--dry-run`` (no GPU): every Triton specialisation (b) and the pydistill rows of (c) launch,
compiled for sm_90 through the compiled-code model's stand-in driver and timed, and the plan:
each section's predicted seconds on a ``--cores``-core host; exit 1 if it does not fit.
``--cpu``: every section rehearsed on the CPU (tiny shapes, the interpreter, ``--smoke``),
CI's proof that the script works. ``--wheels DIR`` installs the wheels in DIR first.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import pydistill as pdl
from pydistill.bench.cases import CORRECTNESS, GOAL

SECTIONS = ("env", "correctness", "headline", "tests", "full")

# Seconds kept back from a subprocess's limit for writing the report after it.
MARGIN_S = 5.0

# Tolerances of the smoke comparison, relative to the float64 value / the gradient's largest
# element: loose enough for bfloat16 outputs (8 mantissa bits), tight enough for a wrong term.
TOLERANCE = {"float32": (1e-4, 1e-3), "bfloat16": (1e-2, 3e-2)}


# --------------------------------------------------------------------------------------
# Budget and report
# --------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Report:
    """The report as it stands, rewritten (JSON and Markdown) after every step; thread-safe,
    so the deadline timer can write it while a case is running."""

    def __init__(self, out: Path, budget: Budget, meta: dict):
        self.out, self.budget = out, budget
        self.lock = threading.RLock()
        self.data = {"meta": meta, "budget_s": budget.seconds, "status": "running",
                     "current": None, "sections": {}, "correctness": []}

    def section(self, name: str, **fields):
        with self.lock:
            self.data["sections"].setdefault(name, {}).update(fields)
            self.write()

    def case(self, row: dict):
        with self.lock:
            self.data["correctness"].append(row)
            self.write()

    def finish(self, status: str):
        with self.lock:
            self.data["status"] = status
            self.data["elapsed_s"] = round(self.budget.elapsed(), 1)
            self.write()

    def write(self):
        with self.lock:
            self.data["elapsed_s"] = round(self.budget.elapsed(), 1)
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / "report.json.tmp"
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.out / "report.json")
            (self.out / "report.md").write_text(markdown(self.data, self.out))


def markdown(data: dict, out: Path) -> str:
    meta, sections = data["meta"], data["sections"]
    lines = [f"# GPU check: {meta.get('device', '?')}", ""]
    lines.append(f"{meta.get('date_utc', '')}; budget {data['budget_s']:.0f} s, "
                 f"elapsed {data.get('elapsed_s', 0):.0f} s; status: **{data['status']}**"
                 + ("; a rehearsal on the CPU (tiny shapes, interpreter: not numbers)"
                    if meta.get("cpu") else ""))
    lines.append("")
    env = sections.get("env", {})
    if env.get("info"):
        lines += ["| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in env["info"].items()]
        lines.append("")
    lines += ["| section | status | seconds | summary |", "|---|---|---|---|"]
    for name in SECTIONS:
        s = sections.get(name, {})
        lines.append(f"| {name} | {s.get('status', 'not reached')} | "
                     f"{s.get('elapsed_s', '')} | {s.get('summary', '')} |")
    lines.append("")
    rows = data["correctness"]
    if rows:
        failed = [r for r in rows if r["status"] == "FAIL"]
        lines += [f"## Correctness against float64 ({len(rows)} cases, {len(failed)} failed)", "",
                  "| op | backend | dtype | shape | options | status | loss rel err | grad rel err | ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['op']} | {r['backend']} | {r['dtype']} | {r['shape']} | "
                         f"{r['options']} | {r['status']} | {_fmt(r.get('loss_err'))} | "
                         f"{_fmt(r.get('grad_err'))} | {_fmt(r.get('ms'))} |")
        lines.append("")
    headline = out / "headline.md"
    if headline.is_file():
        lines += ["## Headline benchmarks (headline.md)", "", headline.read_text(), ""]
    for name in ("tests", "full"):
        if sections.get(name, {}).get("tail"):
            lines += [f"## {name}", "", "```", sections[name]["tail"], "```", ""]
    if data.get("current"):
        lines += [f"Stopped in: {data['current']}", ""]
    return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return ""
    return f"{x:.1e}" if isinstance(x, float) and (abs(x) < 1e-2 and x != 0) else (
        f"{x:.2f}" if isinstance(x, float) else str(x))


def start_watchdog(report: Report, seconds: float, exit_code: int = 3) -> threading.Timer:
    """At the deadline: the report as it stands, the step it stopped in named, then exit
    (a kernel or a compile running in this process cannot be interrupted otherwise)."""
    def fire():
        with report.lock:
            report.data["status"] = "stopped: budget ran out"
            report.write()
        sys.stdout.flush()
        os._exit(exit_code)

    timer = threading.Timer(max(seconds, 0.0), fire)
    timer.daemon = True
    timer.start()
    return timer


# --------------------------------------------------------------------------------------
# a. environment
# --------------------------------------------------------------------------------------


def environment(device, cpu: bool) -> dict:
    from pydistill.bench import harness

    info = {"device": harness.device_name(device), "python": platform.python_version(),
            "torch": torch.__version__, "triton": harness._triton_version() or "not installed",
            "cuda (torch)": torch.version.cuda or "", "pydistill": harness._pydistill_version(),
            "git": harness.git_revision()}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        props = torch.cuda.get_device_properties(device)
        info["capability"] = f"sm_{major}{minor}"
        info["memory GiB"] = f"{props.total_memory / 2**30:.1f}"
        info["SMs"] = props.multi_processor_count
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = "nvidia-smi not available"
    for name in ("liger_kernel", "trl", "transformers"):
        try:
            from importlib.metadata import version

            info[name] = version(name.replace("_", "-"))
        except Exception:
            info[name] = "not installed"
    floors = (harness.measure_floors(device, copy_elements=1 << 20, matmul_n=128, reps=3)
              if cpu else harness.measure_floors(device))
    info["copy GB/s"] = f"{floors.copy_bytes_per_s / 1e9:.1f}"
    for dtype, rate in floors.rates:
        info[f"{dtype} matmul TFLOP/s"] = f"{rate / 1e12:.2f}"
    return info


def build_cuda_extension(device, limit_s: float) -> str:
    """Build (or find cached) pydistill._C for this device only, in a subprocess under
    ``limit_s``; then load it here. Returns a one-line status."""
    from pydistill import _cuda_ext

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        # set here, not only for the build: the cache folder is keyed by it, so this process
        # loads that build and the later subprocesses (headline, tests) inherit it
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    code = ("from pydistill import _cuda_ext as e; import sys; "
            "ok = e.load(build=True); print(e._state.get('error') or 'ok'); sys.exit(0 if ok else 1)")
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=max(limit_s, 1.0))
    except subprocess.TimeoutExpired:
        return f"not built: the build passed its {limit_s:.0f} s limit"
    took = time.monotonic() - start
    if proc.returncode != 0:
        return f"not available ({took:.0f} s): {(proc.stdout + proc.stderr).strip()[-300:]}"
    ok = _cuda_ext.load(build=False)
    return f"built or cached in {took:.0f} s" if ok else f"built but not loadable: {_cuda_ext._state['error']}"


# --------------------------------------------------------------------------------------
# b. correctness
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    backend: str
    dtype: str
    shape: str
    options: str
    make: Callable  # (dtype, device) -> (loss_fn(inputs, backend), inputs to differentiate)
    env: dict = field(default_factory=dict)
    cost: float = 1.0  # a relative cost, for the order only


def _gen(seed: int, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device)


def _op(fn, **fixed):
    """loss(inputs, backend, **kw): ``fn`` of the inputs, with ``fixed`` keyword arguments."""
    return lambda inputs, backend, **kw: fn(*inputs, backend=backend, **fixed, **kw)


def kd_inputs(n, v, extreme=False):
    def make(dtype, device):
        r = _gen(n * 7 + v, device)
        scale = 30.0 if extreme else 2.0
        s, t = r(n, v, scale=scale), r(n, v, scale=scale)
        if extreme:  # masked vocabulary entries in both models, one fully peaked teacher row
            s[:, -3:] = float("-inf")
            t[:, -3:] = float("-inf")
            t[0, 1] = 1e4
        labels = torch.randint(0, v - 3, (n,), generator=torch.Generator().manual_seed(v)).to(device)
        labels[::5] = -100
        s, t = s.to(dtype).requires_grad_(), t.to(dtype)
        return _op(pdl.kd_loss, labels=labels), [s, t]
    return make


def topk_inputs(n, v, k):
    def make(dtype, device):
        r = _gen(n * 11 + v, device)
        s, t = r(n, v, scale=2.0), r(n, v, scale=2.0)
        lp, idx = torch.log_softmax(t.double(), -1).topk(k, dim=-1)
        s = s.to(dtype).requires_grad_()
        # the log-probs are log_softmax(t): stored at 1.0
        return (_op(pdl.topk_kd_loss, teacher_topk_indices=idx, teacher_temperature=1.0),
                [s, lp.float()])
    return make


def linear_inputs(n, h, v, chunk):
    def make(dtype, device):
        r = _gen(n * 13 + v, device)
        hs, ws = r(n, h), r(v, h, scale=h ** -0.5)
        ht, wt = r(n, h), r(v, h, scale=h ** -0.5)
        hs, ws = hs.to(dtype).requires_grad_(), ws.to(dtype).requires_grad_()

        def loss(inputs, backend, **kw):
            out = pdl.linear_kd_loss(inputs[0], inputs[1], inputs[2], inputs[3],
                                     chunk_size=chunk if backend != "torch" else "auto",
                                     backend=backend, **kw)
            if kw.get("return_entropy"):  # compared as one vector: the loss, then the entropies
                return torch.cat([out[0].reshape(1), out[1].reshape(-1).to(out[0].dtype)])
            return out

        return loss, [hs, ws, ht.to(dtype), wt.to(dtype)]
    return make


def attention_inputs(b, heads, length, d):
    def make(dtype, device):
        r = _gen(b * 17 + length, device)
        sq, sk, tq, tk = (r(b, heads, length, d).to(dtype) for _ in range(4))
        sq.requires_grad_()
        sk.requires_grad_()
        mask = torch.ones(b, length, dtype=torch.bool, device=device)
        mask[-1, length - length // 3:] = False  # a padded sequence
        return _op(pdl.attention_kd_loss, attention_mask=mask), [sq, sk, tq, tk]
    return make


def uld_inputs(n, v_s, v_t):
    def make(dtype, device):
        r = _gen(n * 19 + v_s, device)
        s, t = r(n, v_s, scale=2.0), r(n, v_t, scale=2.0)
        s[:, -2:] = float("-inf")  # padded vocabulary entries
        labels = torch.zeros(n, dtype=torch.long, device=device)
        labels[::5] = -100
        s, t = s.to(dtype).requires_grad_(), t.to(dtype)
        return _op(pdl.uld_loss, labels=labels), [s, t]
    return make


def linear_uld_inputs(n, h, v_s, v_t):
    def make(dtype, device):
        r = _gen(n * 23 + v_s, device)
        hs, ws = r(n, h), r(v_s, h, scale=h ** -0.5 * 3)
        ht, wt = r(n, h), r(v_t, h, scale=h ** -0.5 * 3)
        hs, ws = hs.to(dtype).requires_grad_(), ws.to(dtype).requires_grad_()
        return _op(pdl.linear_uld_loss), [hs, ws, ht.to(dtype), wt.to(dtype)]
    return make


# both models with a logit scale and a soft-cap, different ones (the most work the transforms add)
MIXED_FAMILY = dict(student_logit_scale=0.5, student_softcap=30.0, teacher_logit_scale=2.0,
                    teacher_softcap=50.0)


def correctness_cases(device, cpu: bool, backends: Optional[dict] = None) -> list:
    """The section's cases; ``backends``: op -> the backends to check (default: those that
    can run on ``device``)."""
    from pydistill import _dispatch

    shapes = CORRECTNESS["cpu" if cpu else "gpu"]
    kd_shapes, topk_shapes, lin_shapes, att_shapes, uld_shapes, lin_uld_shapes = (
        shapes[k] for k in ("kd", "topk", "linear", "attention", "uld", "linear_uld"))
    kd_options = {
        "kl": dict(),
        "jsd b0.3 T2 hard0.5": dict(divergence="jsd", beta=0.3, temperature=2.0, hard_weight=0.5),
        "reverse_kl softcap30 sum": dict(divergence="reverse_kl", softcap=30.0, reduction="sum"),
        "jsd per-model scale+cap hard0.3": dict(divergence="jsd", temperature=1.5, hard_weight=0.3,
                                                **MIXED_FAMILY),
    }
    out = []
    backends = backends or {op: [b for b in _dispatch.TABLE[op]
                                 if _dispatch.why_unavailable(b, device) is None]
                            for op in _dispatch.TABLE}
    for dtype in ("float32", "bfloat16"):
        for shape, (n, v) in kd_shapes.items():
            for backend in backends["kd_loss"]:
                schedules = ("recompute", "forward") if backend == "triton" else ("",)
                for name, kw in kd_options.items():
                    for sched in schedules:
                        out.append(Case("kd_loss", backend, dtype, shape,
                                        name + (f" grad={sched}" if sched else ""),
                                        _bind(kd_inputs(n, v), kw),
                                        {"PYDISTILL_KD_GRAD": sched} if sched else {}))
                out.append(Case("kd_loss", backend, dtype, shape, "extreme -inf",
                                _bind(kd_inputs(n, v, extreme=True), dict(temperature=2.0))))
        for shape, (n, v, k) in topk_shapes.items():
            for backend in backends["topk_kd_loss"]:
                for name, kw in {"bucket kl": dict(tail="bucket"),
                                 "renormalize jsd T2": dict(tail="renormalize", divergence="jsd",
                                                            temperature=2.0),
                                 "bucket student scale+cap": dict(
                                     tail="bucket", student_logit_scale=0.5,
                                     student_softcap=20.0)}.items():
                    out.append(Case("topk_kd_loss", backend, dtype, shape, name,
                                    _bind(topk_inputs(n, v, k), kw)))
        for shape, (n, h, v) in lin_shapes.items():
            for backend in backends["linear_kd_loss"]:
                chunks = ("auto", "tiled") if backend == "triton" else ("auto",)
                for chunk in chunks:
                    for name, kw in {"kl": dict(), "jsd T2": dict(divergence="jsd", temperature=2.0),
                                     "jsd per-model scale+cap entropy": dict(
                                         divergence="jsd", return_entropy=True,
                                         **MIXED_FAMILY)}.items():
                        out.append(Case("linear_kd_loss", backend, dtype, shape,
                                        f"{name} chunk={chunk}", _bind(linear_inputs(n, h, v, chunk), kw)))
        for shape, (b, heads, length, d) in att_shapes.items():
            for backend in backends["attention_kd_loss"]:
                for name, kw in {"kl": dict(), "kl causal": dict(causal=True)}.items():
                    out.append(Case("attention_kd_loss", backend, dtype, shape, name,
                                    _bind(attention_inputs(b, heads, length, d), kw)))
    # ULD in float32 only: bfloat16's 8-bit mantissa makes many logits of a row equal, and at
    # such a tie ULD's gradient depends on the order the sort gives the tied entries, which
    # differs between backends (each a valid subgradient); the loss does not
    uld_options = {"top_k=64 T2 transforms": dict(top_k=64, temperature=2.0, **MIXED_FAMILY),
                   "full sort": dict(top_k=None)}
    for shape, (n, v_s, v_t) in uld_shapes.items():
        largest = min(1024, v_s, v_t)  # the largest top_k of the fused selection
        for backend in backends["uld_loss"]:
            for name, kw in {**uld_options, f"top_k={largest}": dict(top_k=largest)}.items():
                out.append(Case("uld_loss", backend, "float32", shape, name,
                                _bind(uld_inputs(n, v_s, v_t), kw)))
    for shape, (n, h, v_s, v_t) in lin_uld_shapes.items():
        for backend in backends["linear_uld_loss"]:
            for name, kw in {"top_k=64 T2 transforms": uld_options["top_k=64 T2 transforms"],
                             "full sort chunk=128": dict(top_k=None, chunk_size=128)}.items():
                out.append(Case("linear_uld_loss", backend, "float32", shape, name,
                                _bind(linear_uld_inputs(n, h, v_s, v_t), kw)))
    # the fast backends first within each op, torch (the reference's own path) last
    order = {"triton": 0, "cuda": 1, "torch": 2}
    return sorted(out, key=lambda c: (c.op != "kd_loss", order.get(c.backend, 3)))


def _bind(make, kw):
    def bound(dtype, device):
        loss, inputs = make(dtype, device)
        return (lambda inp, backend: loss(inp, backend, **kw)), inputs
    return bound


def run_case(case: Case, device) -> dict:
    from pydistill.bench import harness

    row = {"op": case.op, "backend": case.backend, "dtype": case.dtype, "shape": case.shape,
           "options": case.options}
    with harness.environment(tuple(case.env.items())):
        try:
            _compare(case, device, row)
        except Exception as exc:  # a crash is a failed case, not a failed run
            row["status"] = "FAIL"
            row["error"] = harness.one_line(exc, 200)
            row["traceback"] = traceback.format_exc(limit=4)[-1500:]
    return row


def _compare(case: Case, device, row: dict):
    """The case's loss and gradients against the torch backend in float64, into ``row``."""
    loss_fn, inputs = case.make(getattr(torch, case.dtype), device)
    leaves = [x for x in inputs if x.requires_grad]
    start = time.monotonic()
    loss = loss_fn(inputs, case.backend)
    grads = torch.autograd.grad(loss.sum(), leaves)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row["ms"] = (time.monotonic() - start) * 1e3
    ref_inputs = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    ref_loss = loss_fn(ref_inputs, "torch")
    ref_grads = torch.autograd.grad(ref_loss.sum(), [x for x in ref_inputs if x.requires_grad])
    row["loss_err"] = _rel(loss.detach().double(), ref_loss.detach())
    row["grad_err"] = max(_rel(g.double(), r) for g, r in zip(grads, ref_grads))
    finite = bool(torch.isfinite(loss).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    tol_loss, tol_grad = TOLERANCE[case.dtype]
    ok = finite and row["loss_err"] <= tol_loss and row["grad_err"] <= tol_grad
    row["status"] = "ok" if ok else "FAIL"
    if not finite:
        row["error"] = "non-finite loss or gradient"


def _rel(a, b) -> float:
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)):
        return float("inf")
    scale = b[fin].abs().max().item() if fin.any() else 0.0
    err = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
    return err / max(scale, 1e-30)


# --------------------------------------------------------------------------------------
# c, d. subprocess sections
# --------------------------------------------------------------------------------------


def run_logged(cmd: list, log: Path, limit_s: float, env=None) -> tuple:
    """(exit code or 'timeout', the log's last lines) of ``cmd`` under ``limit_s``."""
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                timeout=max(limit_s, 1.0)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    lines = log.read_text(errors="replace").splitlines()
    return rc, "\n".join(lines[-15:])


def bench_command(out_csv: Path, limit_s: float, cpu: bool, full: bool) -> list:
    cmd = [sys.executable, "-m", "pydistill.bench", "--no-plots", "--no-progress",
           "--out", str(out_csv), "--time-limit", f"{max(limit_s - 30, 10):.0f}"]
    if cpu:
        return cmd + ["--smoke", "--device", "cpu"] + ([] if not full else ["--family", "softmax"])
    if full:
        return cmd + ["--full"]
    cmd += ["--full", "--pydistill-first"]
    for family, args in GOAL.items():
        cmd += ["--family-args", family, args]
    return cmd


# --------------------------------------------------------------------------------------
# --dry-run: the plan, compiled for sm_90 here
# --------------------------------------------------------------------------------------

# Seconds of what the dry run cannot measure without the GPU host (stated estimates); compile
# costs are measured here, run times predicted by the compiled-code model (bench/static.py).
ESTIMATES = {
    "start": 8.0,  # a Python process: torch, Triton and pydistill imported, a CUDA context
    "floors": 15.0,  # copy bandwidth and matrix-product rates (section a; the suite's own)
    "cuda build": 90.0,  # the extension for one arch, MAX_JOBS = 16 (issue 21: 169 s for two, 2 cores)
    "case": 0.3,  # a compiled correctness case: its launches, the float64 reference, the comparison
    "row": 1.0,  # a headline implementation beyond its timing: inputs, loss check, memory release
}
MODEL_MARGIN = 2.0  # a launch's run time: this x the model's predicted lower bound
# Backends not compiled here: their run time, in the Triton row's (issue 21's CUDA prediction;
# the torch backend's chunks make ~15 passes over each chunk)
SLOWER = {"cuda": 3.0, "torch": 10.0}
PEER_S = {"eager": 3.0, "compile": 60.0, "liger": 15.0, "trl": 5.0, "sdpa": 2.0}  # a peer, one case


def compiled(run, costs: dict) -> set:
    """The hashes of the Triton specialisations ``run()`` compiles; ``costs`` (hash -> (kernel,
    seconds)) gets each one's first compile: CPU seconds of this process and its children
    (ptxas), what it takes on an idle core whatever else this host runs."""
    from triton.runtime.jit import JITFunction

    inner, seen = JITFunction.run, set()

    def timed(self, *args, **kwargs):
        t0 = _cpu_s()
        kernel = inner(self, *args, **kwargs)
        costs.setdefault(kernel.hash, (self.fn.__name__, _cpu_s() - t0))
        seen.add(kernel.hash)
        return kernel

    JITFunction.run = timed  # the stand-in (bench/static.py) wraps it inside run()
    try:
        run()
    finally:
        JITFunction.run = inner
    return seen


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _capture_correctness(case, target):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pydistill.bench import harness, static

    with harness.environment(tuple(case.env.items())), static.standin(target, static.Capture()), \
            FakeTensorMode(allow_non_fake_inputs=True):
        loss_fn, inputs = case.make(getattr(torch, case.dtype), torch.device("cuda"))
        loss = loss_fn(inputs, case.backend).sum()
        static.backward(loss, torch.ones((), device=loss.device))


def pass_s(t: float) -> float:
    """Wall seconds of one pass of harness.measure at CUDA's settings, a call taking ``t``."""
    from pydistill.bench import harness

    d = harness.run_defaults(torch.device("cuda"))
    reps = (max(1, int(d["long_s"] / t)) if t * d["min_reps"] > d["long_s"]
            else max(d["min_reps"], min(d["max_reps"], int(d["budget_ms"] / 1e3 / t))))
    return (d["warmup"] + 1 + reps) * t


def make_plan(cores: int = 16, budget: float = 480.0, share: float = 0.45, families=None,
              case_filter=None, impls=None, progress=print) -> dict:
    """What the GPU run compiles and how long each section takes on a ``cores``-core host, as
    ``main`` spends it (its limits included): every Triton specialisation of the correctness
    cases (``case_filter``: a subset) and of the headline's pydistill rows (``families``,
    ``impls``: subsets), compiled for sm_90 through the model's stand-in driver and timed."""
    import importlib

    from pydistill import _cuda_ext, _dispatch
    from pydistill.bench import cases as shared, peers, static

    target, costs = static.TARGETS["sm_90"], {}
    model = {(r["family"], r["case"]): float(r["predicted_ms"]) / 1e3 for r in static.read_csv(
        Path(static.__file__).parent / "results" / "static-sm90.csv") if r["kernel"] == "total"}
    todo = [c for c in correctness_cases(torch.device("cuda"), False, {  # the extension is built there
        op: list(t) for op, t in _dispatch.TABLE.items()}) if case_filter is None or case_filter(c)]
    triton = [c for c in todo if c.backend == "triton"]
    hashes = []
    for i, case in enumerate(triton):
        progress(f"  compiling correctness {i + 1}/{len(triton)}: {case.op} {case.dtype} {case.shape} {case.options}")
        hashes.append(compiled(lambda: _capture_correctness(case, target), costs))
    warmed = set().union(*hashes)
    # warm_shard's split: each process compiles what its own cases launch, and runs them
    shard_s = max((ESTIMATES["start"] + len(hashes[i::cores]) * ESTIMATES["case"]
                   + sum(costs[h][1] for h in set().union(*hashes[i::cores])) for i in range(cores)), default=0.0)
    env_s = ESTIMATES["start"] + ESTIMATES["floors"]
    deadline = share * (budget - env_s)
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # the cache main builds into
    cached = _cuda_ext._prebuilt() or _cuda_ext._cached_build()
    os.environ.pop("TORCH_CUDA_ARCH_LIST") if saved is None else os.environ.update(TORCH_CUDA_ARCH_LIST=saved)
    build_s = 0.0 if cached else min(ESTIMATES["cuda build"], 0.5 * deadline, 300.0)
    warm_s = min(shard_s, 0.5 * (deadline - build_s))
    cases_s = min(len(todo) * ESTIMATES["case"], deadline - build_s - warm_s)
    late = len(todo) - int(cases_s / ESTIMATES["case"] + 1e-9)
    correctness = {
        "seconds": build_s + warm_s + cases_s, "not started": late,
        "cuda build": (build_s, "cached" if cached else f"estimate, limit {min(0.5 * deadline, 300.0):.0f} s"),
        "warm-up": (warm_s, f"{cores} processes, {len(warmed)} specialisations, {sum(costs[h][1] for h in warmed):.0f}"
                    f" CPU s of compiling; the largest share {shard_s:.0f} s (start + its compiles + its cases), "
                    f"limit {0.5 * (deadline - build_s):.0f} s"),
        "cases": (cases_s, f"{len(todo)} cases x {ESTIMATES['case']:g} s" + (f"; {late} not started" if late else "")),
        "cases by backend": {b: sum(c.backend == b for c in todo) for b in ("triton", "cuda", "torch")},
        "cases by op": {op: sum(c.op == op for c in todo) for op in dict.fromkeys(c.op for c in todo)}}
    # headline: the suite at the goal shapes, every family's pydistill rows first
    rows, peer_rows, new = [], [], set()
    for family in [f for f in shared.FAMILIES if families is None or f.name in families]:
        module = importlib.import_module(family.module)
        for case in module.cases_from(module.parse_args(family.goal.split()), torch.device("cuda")):
            for impl in [i for i in module.IMPLS if impls is None or i.name in impls]:
                kind, backend = peers.peer_kind(impl), impl.name.rsplit("-", 1)[-1]
                if kind != "pydistill":
                    peer_rows.append((family.name, impl.name, PEER_S.get(kind, 5.0)))
                    continue
                sc = static.StaticCase(family.name, "goal", family.goal, impl.name)
                progress(f"  compiling headline {family.name} {static.case_label(sc, case)} {impl.name}")
                known = [static.case_label(static.StaticCase(*e), case) for e in shared.EXTRA
                         if e[0] == family.name and e[3] == impl.name and not e[4]]
                known += [static.case_label(sc, case)] if impl.name == "pydistill-triton" else []
                captured, found, how = [], set(), ""
                if backend not in SLOWER:  # (the torch and CUDA backends compile no Triton)
                    try:
                        found = compiled(lambda: captured.append(static.capture_case(sc, case, module, target)), costs)
                    except Exception as exc:  # an optional dependency missing here
                        how = f"not captured here ({type(exc).__name__}); "
                hit = [model[family.name, k] for k in known if (family.name, k) in model]
                if captured and hit:
                    t, how = hit[0], how + "model"
                elif captured:
                    t = max(static.floor_s(family.name, case, target), sum(
                        static.footprint(x) for x in captured[0].launches) / target.bandwidth + sum(
                        max(b / target.bandwidth, f / target.tensor_flops) for _, _, b, f in captured[0].torch_ops))
                    how += "max(floor, footprint / bandwidth)"
                else:
                    t = SLOWER.get(backend, 3.0) * next(
                        (r[6] / MODEL_MARGIN for r in reversed(rows) if r[2] == "pydistill-triton"), 1e-2)
                    how += f"{SLOWER.get(backend, 3.0):g} x the Triton row"
                compile_s = sum(costs[h][1] for h in found - warmed - new)
                new |= found
                t *= MODEL_MARGIN
                rows.append((family.name, static.case_label(sc, case), impl.name,
                             ESTIMATES["row"] + t + 3 * pass_s(t) + compile_s, compile_s, how, t))
    mine = env_s + sum(r[3] for r in rows)
    # the suite's --time-limit: the time left at its start less MARGIN_S + 1 and 30 s
    peers_left = budget - env_s - correctness["seconds"] - MARGIN_S - 31.0 - mine
    required = env_s + correctness["seconds"] + mine
    return {"cores": cores, "budget": budget, "load": os.getloadavg()[0], "env": env_s,
            "correctness": correctness, "required": required,
            "fits": required <= budget - MARGIN_S and late == 0,
            "compiles": {"specialisations": len(costs), "seconds": sum(c for _, c in costs.values())},
            "headline": {"pydistill": mine, "rows": rows, "peers": sum(r[2] for r in peer_rows),
                         "peer rows": len(peer_rows), "peers left": max(0.0, peers_left),
                         "not warmed": len(new - warmed)}}


def format_plan(plan: dict) -> str:
    c, h, w = plan["correctness"], plan["headline"], 66
    out = [f"gpu_check plan: a {plan['cores']}-core host with an sm_90 GPU, budget {plan['budget']:.0f} s.",
           f"Compiled for sm_90 through the stand-in driver: {plan['compiles']['specialisations']} Triton "
           f"specialisations, {plan['compiles']['seconds']:.0f} CPU s measured here (load {plan['load']:.1f}, "
           f"{os.cpu_count()} cores).",
           f"Run times: {MODEL_MARGIN:g} x the model's predicted lower bound (bench/results/static-sm90.csv), else "
           "max(floor, footprint / bandwidth), x repetitions at the suite's CUDA settings.",
           "Estimates (s): " + ", ".join(f"{k} {v:g}" for k, v in ESTIMATES.items()) + "; peers per case: "
           + ", ".join(f"{k} {v:g}" for k, v in PEER_S.items()) + ".", "",
           f"{'section':{w}} {'seconds':>7}  how",
           f"{'env':{w}} {plan['env']:7.0f}  start + floors",
           f"{'correctness':{w}} {c['seconds']:7.0f}  "
           + ", ".join(f"{n} {b}" for b, n in c["cases by backend"].items())]
    out += [f"{'  ' + part:{w}} {c[part][0]:7.0f}  {c[part][1]}" for part in ("cuda build", "warm-up", "cases")]
    out.append(f"{'headline: pydistill rows, every family first':{w}} {h['pydistill']:7.0f}  start + floors + rows; "
               f"{h['not warmed']} specialisations compiled there")
    out += [f"{'  ' + ' '.join(r[:3]):{w}} {r[3]:7.1f}  {r[5]}" + (f"; compiles {r[4]:.1f} s" if r[4] else "")
            for r in h["rows"]]
    out.append(f"{'headline: peers, after':{w}} {h['peers']:7.0f}  {h['peer rows']} rows (estimates); "
               f"{h['peers left']:.0f} s left for them, the rest reported as skipped")
    out += ["", f"correctness + headline pydistill rows of {len({r[0] for r in h['rows']})} families: "
                f"{plan['required']:.0f} s of {plan['budget']:.0f} s: " + ("fits" if plan["fits"] else "DOES NOT FIT")]
    return "\n".join(out)


def dry_run(opts, argv) -> int:
    """--dry-run: the plan printed (and written to --out/plan.json when given); 0 if it fits."""
    from pydistill.bench import static

    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must compile: start again
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "pydistill.bench.gpu_check", *argv], env=env).returncode
    reason = static.triton_unsupported()
    if reason is not None:
        print(f"gpu_check --dry-run: the stand-in driver cannot compile here: {reason}", file=sys.stderr)
        return 2
    os.environ.setdefault("PYDISTILL_CUDA_JIT", "0")
    # an empty Triton cache: every specialisation compiles, its cost measured
    os.environ["TRITON_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="pydistill-plan-triton-")
    try:
        plan = make_plan(opts.cores, opts.budget, opts.correctness_share,
                         progress=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(format_plan(plan), flush=True)
    if opts.out:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "plan.json").write_text(json.dumps(plan, indent=1, default=str))
    return 0 if plan["fits"] else 1


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pydistill.bench.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    p.add_argument("--out", type=Path, help="results folder (default $OUT, else bench/results/gpu-<date-time>/)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="no GPU: compile for sm_90 what the run would and print the plan "
                           "(sections' predicted seconds; exit 1 if it does not fit the budget)")
    mode.add_argument("--cpu", action="store_true",
                      help="a rehearsal on the CPU: tiny shapes, interpreter, smoke preset")
    p.add_argument("--cores", type=int, default=16, help="the GPU host's cores, for --dry-run (default 16)")
    p.add_argument("--correctness-share", type=float, default=0.45,
                   help="the most of the budget the correctness cases may use (default 0.45)")
    p.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="sections not to run")
    p.add_argument("--wheels", type=Path, help="install these wheels (no network) into a temporary folder first")
    p.add_argument("--tests", nargs="+", help="pytest arguments of the tests section (default: tests)")
    p.add_argument("--warm", metavar="I/N", help=argparse.SUPPRESS)  # one warm-up process's share
    return p.parse_args(argv)


def warm_shard(cases, shard: str) -> list:
    """The Triton cases of warm-up process I of N (``shard`` = "I/N")."""
    i, n = (int(x) for x in shard.split("/"))
    return [c for c in cases if c.backend == "triton"][i::n]


def warm_triton(limit_s: float, cpu: bool) -> str:
    """Compile the correctness section's Triton specialisations before it runs: one process per
    core (at most 16), each running its share of the Triton cases once, so that Triton's
    on-disk cache holds them when the section (timed against its deadline) reaches them.
    Processes still compiling at ``limit_s`` are stopped: the section compiles the rest."""
    n = max(1, min(os.cpu_count() or 1, 16))
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "pydistill.bench.gpu_check", "--warm", f"{i}/{n}",
                               *(["--cpu"] if cpu else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(n)]
    stopped = 0
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, limit_s - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stopped += 1
    took = time.monotonic() - start
    return f"{n} processes, {took:.0f} s" + (f", {stopped} stopped at the {limit_s:.0f} s limit" if stopped else "")


def install_wheels(folder: Path) -> str:
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return f"no wheels in {folder}"
    site = Path(tempfile.mkdtemp(prefix="pydistill-gpu-site-"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--target", str(site), *map(str, wheels)], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"wheel install failed: {proc.stderr.strip()[-300:]}"
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return "installed " + ", ".join(w.name for w in wheels)


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    from pydistill.bench import harness

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return harness.results_dir() / f"gpu-{stamp}"


def main(argv=None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    budget = Budget(opts.budget)
    if opts.dry_run:
        return dry_run(opts, sys.argv[1:] if argv is None else list(argv))
    if opts.cpu and (os.environ.get("TRITON_INTERPRET") != "1"
                         or os.environ.get("CUDA_VISIBLE_DEVICES") != ""):
        # Both must hold before torch and Triton are imported (importing pydistill, the
        # parent package, already imported them): start again with them set.
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
                   PYDISTILL_CUDA_ON_CPU="1")  # the CUDA extension's row code, when built
        args = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "pydistill.bench.gpu_check", *args],
                              env=env).returncode
    wheels = install_wheels(opts.wheels) if opts.wheels else None

    device = torch.device("cuda" if torch.cuda.is_available() and not opts.cpu else "cpu")
    if opts.warm:
        for case in warm_shard(correctness_cases(device, opts.cpu), opts.warm):
            run_case(case, device)
        return 0
    out = (opts.out or default_out()).resolve()
    meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device": "?", "cpu": opts.cpu, "argv": sys.argv[1:] if argv is None else list(argv)}
    report = Report(out, budget, meta)
    start_watchdog(report, budget.left() - 1.0)
    report.write()

    def skip(name, why):
        report.section(name, status=f"skipped: {why}")

    # a. environment
    if "env" in opts.skip:
        skip("env", "--skip")
    else:
        t0 = time.monotonic()
        report.data["current"] = "env"
        info = environment(device, opts.cpu)
        if wheels:
            info["wheels"] = wheels
        meta["device"] = info["device"]
        report.section("env", status="ok", info=info, elapsed_s=round(time.monotonic() - t0, 1))
        print("env:", json.dumps(info), flush=True)

    # b. correctness
    if "correctness" in opts.skip:
        skip("correctness", "--skip")
    else:
        t0 = time.monotonic()
        deadline = t0 + opts.correctness_share * budget.left()
        if device.type == "cuda":
            report.data["current"] = "building the CUDA extension"
            status = build_cuda_extension(device, min(0.5 * (deadline - t0), 300.0))
        else:  # the host build of its row code, when CI (or a user) has built it already
            from pydistill import _cuda_ext

            status = ("loaded (row code on the CPU)" if _cuda_ext.load(build=False)
                      else f"not available: {_cuda_ext._state['error']}")
        report.section("correctness", cuda_extension=status)
        print("cuda extension:", status, flush=True)
        if device.type == "cuda":  # (the rehearsal interprets: nothing to compile)
            report.data["current"] = "compiling the Triton kernels in parallel"
            status = warm_triton(0.5 * (deadline - time.monotonic()), opts.cpu)
            report.section("correctness", triton_warmup=status)
            print("triton warm-up:", status, flush=True)
        cases = correctness_cases(device, opts.cpu)
        done = 0
        for case in cases:
            if time.monotonic() >= deadline:
                break
            report.data["current"] = f"correctness {case.op} {case.backend} {case.dtype} {case.shape} {case.options}"
            row = run_case(case, device)
            report.case(row)
            done += 1
            print(f"{row['status']:4} {case.op:18} {case.backend:6} {case.dtype:8} {case.shape:15} "
                  f"{case.options:30} loss {_fmt(row.get('loss_err'))} grad {_fmt(row.get('grad_err'))}"
                  + (f"  {row['error']}" if row.get("error") else ""), flush=True)
        failed = sum(r["status"] == "FAIL" for r in report.data["correctness"])
        status = "ok" if failed == 0 else f"{failed} FAILED"
        if done < len(cases):
            status += f"; {len(cases) - done} of {len(cases)} cases not started (budget share)"
        report.section("correctness", status=status, cases=len(cases), done=done,
                       summary=f"{done - failed} ok, {failed} failed of {done} run",
                       elapsed_s=round(time.monotonic() - t0, 1))
    report.data["current"] = None

    # c. headline benchmarks, d. tests and the full sweep: subprocesses under the time left
    tests_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 *(opts.tests or (["tests/test_objective.py"] if opts.cpu else ["tests"]))]
    plan = [
        ("headline", lambda limit: bench_command(out / "headline.csv", limit, opts.cpu, False),
         out / "headline.log", 60.0),
        ("tests", lambda limit: tests_cmd, out / "tests.log", 60.0),
        ("full", lambda limit: bench_command(out / "full.csv", limit, opts.cpu, True),
         out / "full.log", 60.0),
    ]
    env = dict(os.environ)
    if opts.cpu:
        env.pop("TRITON_INTERPRET", None)  # the suite's CPU rows time no interpreted kernel
    for name, command, log, least in plan:
        limit = budget.left() - MARGIN_S - 1.0
        if name in opts.skip:
            skip(name, "--skip")
            continue
        if name == "tests" and not Path("tests").is_dir():
            skip(name, "no tests/ folder here (run from the repository root)")
            continue
        if limit < (5.0 if opts.cpu else least):
            skip(name, f"budget ({max(limit, 0):.0f} s left)")
            continue
        t0 = time.monotonic()
        report.data["current"] = name
        report.section(name, status="running")
        section_env = env if name != "tests" else {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
        rc, tail = run_logged(command(limit), log, limit, section_env)
        summary = tail.splitlines()[-1] if tail else ""
        if name == "tests":
            found = re.findall(r"\d+ (?:passed|failed|error|skipped)[^\n]*", tail)
            summary = found[-1] if found else summary
        report.section(name, status="ok" if rc == 0 else f"exit {rc}", tail=tail,
                       summary=summary[:200], elapsed_s=round(time.monotonic() - t0, 1))
        if name != "tests":
            log.unlink(missing_ok=True)  # its CSV and Markdown hold the results
        report.data["current"] = None
    report.finish("done")
    print(f"gpu_check: {budget.elapsed():.0f} s; report in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
