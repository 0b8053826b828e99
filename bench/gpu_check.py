"""One GPU window, prioritised: ``python -m pydistill.bench.gpu_check [--budget 480]``.

A lent GPU comes for minutes. This spends them in order of value and stops on time, writing
what it has after every step (a run cut off from outside still leaves a valid report):

a. ``env``: device, driver, torch / Triton / CUDA versions, the measured copy bandwidth and
   matrix-product rates (the floors every benchmark row is divided by);
b. ``correctness``: every op x backend x {float32, bfloat16} x two shapes (one ragged, one at
   a large vocabulary) x a few options (both gradient schedules, extreme logits with -inf
   entries, soft-capping, hard labels), value and gradients against the torch backend in
   float64; one line per case. The CUDA extension is built first (in a subprocess with a
   time limit, MAX_JOBS = every core, TORCH_CUDA_ARCH_LIST = this device's architecture,
   kept for the later subprocesses: the build cache is keyed by it), then the Triton
   kernels of the section are compiled by one process per core (``warm_triton``);
c. ``headline``: one benchmark per family at the goal shapes, against the peers, with the
   ratio to the floor and peak memory (``python -m pydistill.bench`` with those shapes);
d. with time left, ``tests``: the whole test suite on CUDA; then ``full``: the suite's
   ``--full`` sweep.

Correctness may use at most ``--correctness-share`` of the budget, so the headline numbers
always get their turn; what a section could not start is reported as skipped. Steps (c) and
(d) run as subprocesses under the time left; the in-process cases of (b) are watched by a
timer that, at the deadline, writes the report (naming the case it stopped in) and exits.

Output (``--out``, default ``$OUT`` when set, else bench/results/gpu-<date-time>/), at most
seven files: ``report.json``, ``report.md`` (what ran, every correctness line, the headline
table), ``headline.csv`` / ``.md``, ``tests.log``, ``full.csv`` / ``.md``.

``--dry-run`` does the same on the CPU with tiny shapes, the Triton kernels under the
interpreter, the benchmarks' ``--smoke`` preset and one test file, so CI proves the script
works between GPU windows. ``--wheels DIR`` installs the wheels in DIR (liger-kernel, ...)
into a temporary folder first, for a machine without network.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

SECTIONS = ("env", "correctness", "headline", "tests", "full")

# Goal shapes (the design's performance floors): one benchmark per family.
HEADLINE_ARGS = {
    "softmax": "--n 16384 --v 128256 --dtype bf16 --divergence kl --grad-mode both",
    "linear": "--n 1024 8192 --h-s 4096 --h-t 4096 --v 128256 --dtype bf16",
    "topk": "--n 8192 --v 151936 --k 64 --dtype bf16 --tail bucket",
    "attention": "--b 4 --heads 12 --l 8192 --d-s 64 --d-t 64 --dtype bf16",
    "uld": "--n 8192 --v 128256 --v-t 151936 --top-k 64 --dtype bf16",
}
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
                 + ("; dry run on the CPU (tiny shapes, interpreter: not numbers)"
                    if meta.get("dry_run") else ""))
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


def environment(device, dry_run: bool) -> dict:
    import torch

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
              if dry_run else harness.measure_floors(device))
    info["copy GB/s"] = f"{floors.copy_bytes_per_s / 1e9:.1f}"
    for dtype, rate in floors.rates:
        info[f"{dtype} matmul TFLOP/s"] = f"{rate / 1e12:.2f}"
    return info


def build_cuda_extension(device, limit_s: float) -> str:
    """Build (or find cached) pydistill._C for this device only, in a subprocess under
    ``limit_s``; then load it here. Returns a one-line status."""
    from pydistill import _cuda_ext

    if device.type == "cuda":
        import torch

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
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    return lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device)


def kd_inputs(n, v, extreme=False):
    def make(dtype, device):
        import torch

        import pydistill as pdl

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

        def loss(inputs, backend, **kw):
            return pdl.kd_loss(inputs[0], inputs[1], labels=labels, backend=backend, **kw)

        return loss, [s, t]
    return make


def topk_inputs(n, v, k):
    def make(dtype, device):
        import torch

        import pydistill as pdl

        r = _gen(n * 11 + v, device)
        s, t = r(n, v, scale=2.0), r(n, v, scale=2.0)
        lp, idx = torch.log_softmax(t.double(), -1).topk(k, dim=-1)
        s = s.to(dtype).requires_grad_()

        def loss(inputs, backend, **kw):
            # the log-probs are log_softmax(t): stored at 1.0
            return pdl.topk_kd_loss(inputs[0], inputs[1], idx, backend=backend,
                                    teacher_temperature=1.0, **kw)

        return loss, [s, lp.float()]
    return make


def linear_inputs(n, h, v, chunk):
    def make(dtype, device):
        import torch

        import pydistill as pdl

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
        import torch

        import pydistill as pdl

        r = _gen(b * 17 + length, device)
        sq, sk, tq, tk = (r(b, heads, length, d).to(dtype) for _ in range(4))
        sq.requires_grad_()
        sk.requires_grad_()
        mask = torch.ones(b, length, dtype=torch.bool, device=device)
        mask[-1, length - length // 3:] = False  # a padded sequence

        def loss(inputs, backend, **kw):
            return pdl.attention_kd_loss(inputs[0], inputs[1], inputs[2], inputs[3],
                                         attention_mask=mask, backend=backend, **kw)

        return loss, [sq, sk, tq, tk]
    return make


def uld_inputs(n, v_s, v_t):
    def make(dtype, device):
        import torch

        import pydistill as pdl

        r = _gen(n * 19 + v_s, device)
        s, t = r(n, v_s, scale=2.0), r(n, v_t, scale=2.0)
        s[:, -2:] = float("-inf")  # padded vocabulary entries
        labels = torch.zeros(n, dtype=torch.long, device=device)
        labels[::5] = -100
        s, t = s.to(dtype).requires_grad_(), t.to(dtype)

        def loss(inputs, backend, **kw):
            return pdl.uld_loss(inputs[0], inputs[1], labels=labels, backend=backend, **kw)

        return loss, [s, t]
    return make


def linear_uld_inputs(n, h, v_s, v_t):
    def make(dtype, device):
        import pydistill as pdl

        r = _gen(n * 23 + v_s, device)
        hs, ws = r(n, h), r(v_s, h, scale=h ** -0.5 * 3)
        ht, wt = r(n, h), r(v_t, h, scale=h ** -0.5 * 3)
        hs, ws = hs.to(dtype).requires_grad_(), ws.to(dtype).requires_grad_()

        def loss(inputs, backend, **kw):
            return pdl.linear_uld_loss(inputs[0], inputs[1], inputs[2], inputs[3], backend=backend,
                                       **kw)

        return loss, [hs, ws, ht.to(dtype), wt.to(dtype)]
    return make


# both models with a logit scale and a soft-cap, different ones (the most work the transforms add)
MIXED_FAMILY = dict(student_logit_scale=0.5, student_softcap=30.0, teacher_logit_scale=2.0,
                    teacher_softcap=50.0)


def correctness_cases(device, dry_run: bool) -> list:
    from pydistill import _dispatch

    if dry_run:
        kd_shapes = {"5x97": (5, 97), "3x300": (3, 300)}
        topk_shapes = {"5x97,K8": (5, 97, 8), "3x300,K16": (3, 300, 16)}
        lin_shapes = {"5x16x97": (5, 16, 97), "3x24x300": (3, 24, 300)}
        att_shapes = {"1x2x9x16": (1, 2, 9, 16), "2x2x17x16": (2, 2, 17, 16)}
        uld_shapes = {"5x97,V_t 130": (5, 97, 130), "3x300,V_t 211": (3, 300, 211)}
        lin_uld_shapes = {"5x16x97,V_t 80": (5, 16, 97, 80)}
    else:
        kd_shapes = {"37x3001": (37, 3001), "64x128256": (64, 128256)}
        topk_shapes = {"37x3001,K64": (37, 3001, 64), "64x151936,K64": (64, 151936, 64)}
        lin_shapes = {"37x96x3001": (37, 96, 3001), "256x512x128256": (256, 512, 128256)}
        att_shapes = {"2x3x77x64": (2, 3, 77, 64), "1x4x1024x64": (1, 4, 1024, 64)}
        # a Llama-3 student (128,256) under a Qwen teacher (151,936): vocabularies of both sizes
        uld_shapes = {"37x3001,V_t 2999": (37, 3001, 2999), "64x128256,V_t 151936": (64, 128256, 151936)}
        lin_uld_shapes = {"256x512x128256,V_t 151936": (256, 512, 128256, 151936)}
    kd_options = {
        "kl": dict(),
        "jsd b0.3 T2 hard0.5": dict(divergence="jsd", beta=0.3, temperature=2.0, hard_weight=0.5),
        "reverse_kl softcap30 sum": dict(divergence="reverse_kl", softcap=30.0, reduction="sum"),
        "jsd per-model scale+cap hard0.3": dict(divergence="jsd", temperature=1.5, hard_weight=0.3,
                                                **MIXED_FAMILY),
    }
    out = []
    backends = {op: [b for b in _dispatch.TABLE[op] if _dispatch.why_unavailable(b, device) is None]
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
    import torch

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
    import torch

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


def bench_command(out_csv: Path, limit_s: float, dry_run: bool, full: bool) -> list:
    cmd = [sys.executable, "-m", "pydistill.bench", "--no-plots", "--no-progress",
           "--out", str(out_csv), "--time-limit", f"{max(limit_s - 30, 10):.0f}"]
    if dry_run:
        return cmd + ["--smoke", "--device", "cpu"] + ([] if not full else ["--family", "softmax"])
    if full:
        return cmd + ["--full"]
    cmd.append("--full")
    for family, args in HEADLINE_ARGS.items():
        cmd += ["--family-args", family, args]
    return cmd


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pydistill.bench.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    p.add_argument("--out", type=Path, help="results folder (default $OUT, else bench/results/gpu-<date-time>/)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU: tiny shapes, interpreter, smoke preset")
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


def warm_triton(limit_s: float, dry_run: bool) -> str:
    """Compile the correctness section's Triton specialisations before it runs: one process per
    core (at most 16), each running its share of the Triton cases once, so that Triton's
    on-disk cache holds them when the section (timed against its deadline) reaches them.
    Processes still compiling at ``limit_s`` are stopped: the section compiles the rest."""
    n = max(1, min(os.cpu_count() or 1, 16))
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "pydistill.bench.gpu_check", "--warm", f"{i}/{n}",
                               *(["--dry-run"] if dry_run else [])],
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
    if opts.dry_run and (os.environ.get("TRITON_INTERPRET") != "1"
                         or os.environ.get("CUDA_VISIBLE_DEVICES") != ""):
        # Both must hold before torch and Triton are imported (importing pydistill, the
        # parent package, already imported them): start again with them set.
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
                   PYDISTILL_CUDA_ON_CPU="1")  # the CUDA extension's row code, when built
        args = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "pydistill.bench.gpu_check", *args],
                              env=env).returncode
    wheels = install_wheels(opts.wheels) if opts.wheels else None

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not opts.dry_run else "cpu")
    if opts.warm:
        for case in warm_shard(correctness_cases(device, opts.dry_run), opts.warm):
            run_case(case, device)
        return 0
    out = (opts.out or default_out()).resolve()
    meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device": "?", "dry_run": opts.dry_run, "argv": sys.argv[1:] if argv is None else list(argv)}
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
        info = environment(device, opts.dry_run)
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
        if device.type == "cuda":  # (the dry run interprets: nothing to compile)
            report.data["current"] = "compiling the Triton kernels in parallel"
            status = warm_triton(0.5 * (deadline - time.monotonic()), opts.dry_run)
            report.section("correctness", triton_warmup=status)
            print("triton warm-up:", status, flush=True)
        cases = correctness_cases(device, opts.dry_run)
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
                 *(opts.tests or (["tests/test_objective.py"] if opts.dry_run else ["tests"]))]
    plan = [
        ("headline", lambda limit: bench_command(out / "headline.csv", limit, opts.dry_run, False),
         out / "headline.log", 60.0),
        ("tests", lambda limit: tests_cmd, out / "tests.log", 60.0),
        ("full", lambda limit: bench_command(out / "full.csv", limit, opts.dry_run, True),
         out / "full.log", 60.0),
    ]
    env = dict(os.environ)
    if opts.dry_run:
        env.pop("TRITON_INTERPRET", None)  # the suite's CPU rows time no interpreted kernel
    for name, command, log, least in plan:
        limit = budget.left() - MARGIN_S - 1.0
        if name in opts.skip:
            skip(name, "--skip")
            continue
        if name == "tests" and not Path("tests").is_dir():
            skip(name, "no tests/ folder here (run from the repository root)")
            continue
        if limit < (5.0 if opts.dry_run else least):
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
