"""The machinery every bench/bench_*.py shares: provenance, floors, timing, peak memory,
and the CSV / Markdown output. Written once; a benchmark script only says what to run.

Timing. Each measured call is preceded by ``prepare(i)``, outside the timed region, which
hands over the i-th of several input sets: enough sets that the data touched between two
uses of one set exceeds twice the last-level cache (the GPU's L2; a single set when it is
that large by itself), so a repetition does not measure the cache. On CUDA a call is timed
with CUDA events between two synchronisations; on the CPU with ``time.perf_counter``. The
``warmup`` calls (Triton JIT, autotuning, torch.compile; none where the caller has already
run the code) are not timed; the next call runs under the peak-memory probe and sizes the
number of repetitions to a time budget; the median of the repetitions is reported.

Peak extra memory. On CUDA: ``torch.cuda.max_memory_allocated`` during the call minus what
was allocated just before it. On the CPU: the process's resident-set high-water mark
(VmHWM, reset by writing 5 to /proc/self/clear_refs) minus its resident set before the call,
after ``gc.collect()`` and ``malloc_trim`` so that freed heap pages do not hide new ones.

Floors. The device's copy bandwidth (bytes read + bytes written by a large copy, median of
several) and its matrix-product rate: bf16 8192^3 on CUDA, float32 2048^3 on the CPU (random
data). A memory-bound op's floor is the bytes it must move divided by the first; a GEMM-bound
op's, its FLOPs divided by the second.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent

# Columns of provenance that every result row carries (stable: plots and later runs rely on
# the names).
PROVENANCE_COLUMNS = (
    "device", "torch", "triton", "cuda", "python", "pydistill", "git_rev", "date_utc",
    "copy_gbps", "bf16_tflops", "fp32_tflops",
)


def in_checkout() -> bool:
    """Whether this file runs from the repository (bench/ beside pyproject.toml) rather than
    from an installed wheel (site-packages/pydistill/bench/)."""
    return (REPO / "pyproject.toml").is_file() and (REPO / "bench" / "harness.py").is_file()


def results_dir() -> Path:
    """Where results go without ``--out``: bench/results/ in the repository; from an installed
    package, ./pydistill-bench/ in the current folder."""
    return REPO / "bench" / "results" if in_checkout() else Path.cwd() / "pydistill-bench"


def output_csv(out: Optional[Path], default_name: str) -> Path:
    """``--out`` as given when it names a .csv file; a folder (existing or not, any other
    name) gets ``default_name`` inside it; nothing: results_dir()/default_name."""
    if out is None:
        return results_dir() / default_name
    out = Path(out)
    return out if out.suffix == ".csv" else out / default_name


# --------------------------------------------------------------------------------------
# Device and provenance
# --------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A file-name-safe short name: 'cpu', or the GPU's name ('nvidia-h100-80gb-hbm3')."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def git_revision() -> str:
    """Short revision of the checkout, '-dirty' when tracked files differ from it.
    BENCH_GIT_REV overrides (for a copy of the tree without its .git)."""
    override = os.environ.get("BENCH_GIT_REV")
    if override:
        return override
    if not in_checkout():
        return "installed"  # the pydistill column has the version

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def _pydistill_version() -> str:
    import pydistill

    return pydistill.__version__


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # absent or broken: the row says so instead of the run failing
        return ""
    return getattr(triton, "__version__", "?")


@dataclass(frozen=True)
class Floors:
    copy_bytes_per_s: float  # bytes read + bytes written per second by a large copy
    matmul_flops_per_s: Optional[float]  # the first rate measured: bf16 on CUDA, float32 on a CPU
    matmul_dtype: str = "bfloat16"
    # Every matrix-product rate measured, ((dtype name, FLOP/s), ...); empty in Floors made
    # by hand, where only matmul_flops_per_s / matmul_dtype are known.
    rates: tuple = ()

    def matmul_rate(self, dtype) -> Optional[float]:
        """FLOP/s of a matrix product in ``dtype`` (a torch.dtype or its name), None when
        not measured. float16 takes the bf16 rate (the same tensor-core rate on the GPUs
        this targets) when float16 itself was not measured."""
        name = str(dtype).removeprefix("torch.")
        table = dict(self.rates)
        if not table and self.matmul_flops_per_s is not None:
            table[self.matmul_dtype] = self.matmul_flops_per_s
        if name == "float16" and name not in table:
            name = "bfloat16"
        return table.get(name)


def _tflops(floors: Floors, dtype: str) -> Optional[float]:
    rate = floors.matmul_rate(dtype)
    return None if rate is None else rate / 1e12


def provenance(device: torch.device, floors: Floors) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "pydistill": _pydistill_version(),
        "git_rev": git_revision(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "copy_gbps": floors.copy_bytes_per_s / 1e9,
        "bf16_tflops": _tflops(floors, "bfloat16"),
        "fp32_tflops": _tflops(floors, "float32"),
    }


def load_average() -> Optional[float]:
    """The host's 1-minute load average: on a shared machine, how much of the CPU a run had
    (CPU timings are noise when it exceeds the core count). The suite records it at the
    start of a run (its ``load_avg`` column)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------------------
# Floors
# --------------------------------------------------------------------------------------


def _median_wall(fn, device, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        dt, _out = _timed_call(lambda _: fn(), None, device)
        times.append(dt)
    return statistics.median(times)


def measure_floors(device: torch.device, *, copy_elements: Optional[int] = None,
                   matmul_dtypes: Optional[Sequence] = None, matmul_n: Optional[int] = None,
                   reps: Optional[int] = None) -> Floors:
    """The device's copy bandwidth and matrix-product rates (module docstring), on fresh
    random data. Defaults: a 1 GiB copy on a GPU (far beyond its L2), 256 MiB on a CPU
    (beyond its caches, quick to fill); matrix products in bf16 and float32 on a GPU
    (8192^3), float32 on a CPU (2048^3; bf16 there only when asked, at 512^3: without bf16
    hardware it runs at a few GFLOP/s). Smaller sizes are for smoke runs, not for numbers."""
    cuda = device.type == "cuda"
    elements = copy_elements or ((1 << 28) if cuda else (1 << 26))
    reps = reps or (10 if cuda else 5)
    warmup = 3 if cuda else 1
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    t = _median_wall(lambda: dst.copy_(src), device, reps=reps, warmup=warmup)
    copy = 2 * src.numel() * src.element_size() / t
    del src, dst

    if matmul_dtypes is None:
        matmul_dtypes = (torch.bfloat16, torch.float32) if cuda else (torch.float32,)
    rates = []
    for dtype in matmul_dtypes:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        n = matmul_n or (8192 if cuda else 512 if dtype in (torch.bfloat16, torch.float16) else 2048)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = _median_wall(lambda: a @ b, device, reps=reps, warmup=warmup)
        rates.append((str(dtype).removeprefix("torch."), 2 * n**3 / t))
        del a, b
    release_memory(device)
    first = rates[0] if rates else (None, None)
    return Floors(copy_bytes_per_s=copy, matmul_flops_per_s=first[1],
                  matmul_dtype=first[0] or "", rates=tuple(rates))


# --------------------------------------------------------------------------------------
# Input rotation: how many input sets defeat the cache
# --------------------------------------------------------------------------------------


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or (50 << 20))
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * unit)
    return largest or (32 << 20)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    kb = _proc_kb("/proc/meminfo", "MemAvailable")
    return kb * 1024 if kb is not None else (4 << 30)


def rotation_count(set_bytes: int, device: torch.device, *, max_sets: int = 64,
                   memory_fraction: float = 0.25) -> int:
    """Number of input sets of ``set_bytes`` each so that, between two uses of one set,
    more than twice the last-level cache is touched by the others; one set when it alone is
    that large (streaming through it evicts its own beginning). At most ``memory_fraction``
    of the free memory, and one set always."""
    twice_cache = 2 * last_level_cache_bytes(device)
    wanted = 1 if set_bytes >= twice_cache else math.ceil(twice_cache / max(set_bytes, 1)) + 1
    affordable = int(memory_fraction * free_memory_bytes(device)) // max(set_bytes, 1)
    return max(1, min(wanted, affordable, max_sets))


# --------------------------------------------------------------------------------------
# Peak extra memory
# --------------------------------------------------------------------------------------


def _proc_kb(path: str, key: str) -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed pages may stay resident
        pass


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.extra_bytes`` (None where it cannot be
    measured). Whatever the block allocates and keeps (its result) counts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra_bytes: Optional[int] = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _malloc_trim()
            self._base = _proc_kb("/proc/self/status", "VmRSS")
            self._armed = self._base is not None and _reset_high_water_mark()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._armed:
            hwm = _proc_kb("/proc/self/status", "VmHWM")
            if hwm is not None:
                self.extra_bytes = max(0, hwm - self._base) * 1024
        return False


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        "out of memory" in str(exc).lower()
    )


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def _timed_call(run, arg, device: torch.device):
    """(seconds, result) of ``run(arg)`` between two synchronisations. The result is handed
    back so that freeing it happens outside the timed region."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        out = run(arg)
        end.record()
        synchronize(device)
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = run(arg)
    return time.perf_counter() - t0, out


@dataclass(frozen=True)
class Measurement:
    median_s: float
    reps: int
    peak_extra_bytes: Optional[int]


def measure(
    run: Callable,
    prepare: Callable[[int], object],
    *,
    device: torch.device,
    n_sets: int = 1,
    budget_s: float = 0.3,
    min_reps: int = 3,
    max_reps: int = 100,
    long_s: float = 2.0,
    warmup: int = 1,
) -> Measurement:
    """Median time of ``run(prepare(i))`` over the input sets i = 0, 1, ... (mod n_sets),
    only ``run`` timed, and the peak extra memory of one such call.

    Repetitions: as many as fit ``budget_s`` (at least ``min_reps``, at most ``max_reps``),
    except that calls so slow that ``min_reps`` of them would take more than ``long_s`` get
    only what fits ``long_s`` (at least one): the slow fallbacks must not eat the run."""
    i = 0
    for _ in range(warmup):
        arg = prepare(i % n_sets)
        out = run(arg)
        del arg, out
        synchronize(device)
        i += 1

    t0 = time.perf_counter()
    arg = prepare(i % n_sets)
    synchronize(device)
    per_rep = time.perf_counter() - t0  # prepare included: it is what a repetition costs
    with PeakMemory(device) as memory:  # (its own gc.collect is left out of the estimate)
        t0 = time.perf_counter()
        out = run(arg)
        synchronize(device)
        per_rep += time.perf_counter() - t0
    del arg, out
    i += 1

    if per_rep * min_reps > long_s:
        reps = max(1, int(long_s / per_rep))
    else:
        reps = max(min_reps, min(max_reps, int(budget_s / per_rep)))
    times = []
    for _ in range(reps):
        arg = prepare(i % n_sets)
        dt, out = _timed_call(run, arg, device)
        del arg, out
        times.append(dt)
        i += 1
    return Measurement(statistics.median(times), reps, memory.extra_bytes)


# --------------------------------------------------------------------------------------
# Running one family: implementations, passes, the run's options
# --------------------------------------------------------------------------------------

PASSES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Impl:
    """One implementation a family times. ``build(case, device)`` returns the loss function
    (called on one input set's tensors) or why it cannot run here ("skipped: ..."). ``peer``
    is its kind (bench/peers.py: pydistill, eager, compile, liger, trl); empty: derived from
    the name."""
    name: str
    build: Callable
    env: tuple = ()  # (variable, value) pairs set while it runs
    failure: str = "error"  # status prefix when it raises (other than out of memory)
    peer: str = ""


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


def one_line(exc: BaseException, limit: int = 160) -> str:
    text = (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure_status(exc: BaseException, prefix: str = "error") -> str:
    if is_out_of_memory(exc):
        return "error: out of memory"
    return f"{prefix}: {one_line(exc)}"


def clear_grads(sets):
    """Drop the gradient of every tensor of every input set (whichever of them require grad:
    the student logits, hidden states and weights)."""
    for inputs in sets:
        for x in inputs:
            if isinstance(x, torch.Tensor):
                x.grad = None


def pass_callables(loss_fn: Callable, sets, gradient):
    """(prepare, run) for each pass: prepare(i) runs outside the timed region; run returns
    the loss. ``gradient``: what the backward starts from, None for a plain
    ``loss.backward()`` (grad_output 1)."""

    def prepare_inputs(i):
        clear_grads(sets)
        return sets[i]

    def prepare_loss(i):
        clear_grads(sets)
        return loss_fn(*sets[i])

    def forward(inputs):
        return loss_fn(*inputs)

    def backward(loss):
        loss.backward(gradient)
        return loss

    def forward_backward(inputs):
        return backward(loss_fn(*inputs))

    return {
        "fwd": (prepare_inputs, forward),
        "bwd": (prepare_loss, backward),
        "fwd+bwd": (prepare_inputs, forward_backward),
    }


def progress(opts, message: str):
    """A line of progress: through ``opts.log`` when the caller set one (the suite's progress
    bar), else to stderr."""
    line = f"[{time.monotonic() - opts.started:7.1f}s] {message}"
    log = getattr(opts, "log", None)
    if log is not None:
        log(line)
    else:
        print(line, file=sys.stderr, flush=True)


def run_case(case, impls, device, opts, base: dict, *, set_bytes: int, label: str,
             make_inputs: Callable, expected_loss: Callable,
             finish: Optional[Callable] = None) -> list:
    """Every implementation's rows on one case. ``make_inputs(case, device, n_sets)`` builds
    the rotated input sets (how many: from ``set_bytes``, the size of one), and
    ``expected_loss(case, first_set)`` the value each loss is checked against. A GEMM-bound
    case (one with ``case.flops(pass)``) gets the GEMM floor instead of the bytes floor;
    ``finish(row)`` completes each measured row. A case whose inputs cannot be made, and
    implementations not started before ``--time-limit``, get one ``all`` row saying why."""
    n_sets = rotation_count(set_bytes, device)
    base = {**base, "n_sets": n_sets}
    progress(opts, f"{label} ({n_sets} input sets)")
    sets, status = None, None
    try:
        sets = make_inputs(case, device, n_sets)
        expected = expected_loss(case, sets[0])
    except Exception as exc:
        status = failure_status(exc)
    if status is not None:  # out of the except block, whose traceback holds the tensors
        del sets
        release_memory(device)
        return [{**base, "impl": impl.name, "pass": "all", "status": status} for impl in impls]
    rows = []
    for impl in impls:
        if opts.time_limit and time.monotonic() - opts.started > opts.time_limit:
            rows.append({**base, "impl": impl.name, "pass": "all",
                         "status": f"skipped: --time-limit {opts.time_limit:g} s reached"})
            continue
        measured = run_impl(impl, case, sets, expected, device, opts, base)
        if callable(getattr(case, "flops", None)):
            measured = [with_gemm_floor(r, case, opts.floors) for r in measured]
        rows.extend(measured if finish is None else map(finish, measured))
    del sets
    release_memory(device)
    return rows


def with_gemm_floor(row: dict, case, floors) -> dict:
    """The row with its bytes floor replaced by the GEMM floor: ``case.flops(pass)`` over the
    measured matmul rate of ``case.dtype``."""
    row = dict(row)
    row.pop("floor_bytes", None)
    row.pop("achieved_gbps", None)
    rate = floors.matmul_rate(case.dtype)
    if row["status"] != "ok" or rate is None:
        row.pop("floor_ms", None)
        row.pop("ratio_to_floor", None)
        return row
    flops = case.flops(row["pass"])
    floor_s = flops / rate
    median_s = row["median_ms"] / 1e3
    row.update(floor_flops=flops, floor_ms=floor_s * 1e3, ratio_to_floor=median_s / floor_s,
               achieved_tflops=flops / median_s / 1e12)
    return row


def order_rows(rows: list, key: Callable, impl_names: Sequence[str]) -> list:
    """Rows sorted by case (``key(row)``), then pass, then the family's implementation order."""
    impl_rank = {name: i for i, name in enumerate(impl_names)}
    pass_rank = {p: i for i, p in enumerate(("all",) + PASSES)}
    return sorted(rows, key=lambda r: (*key(r), pass_rank[r["pass"]], impl_rank[r["impl"]]))


def with_memory_vs(rows: list, impl: str = "torch-eager") -> list:
    """Adds ``peak_extra_vs_eager``: each row's peak extra memory over ``impl``'s in the same
    pass."""
    ref = {r["pass"]: r.get("peak_extra_mib") for r in rows if r["impl"] == impl}
    for r in rows:
        if r.get("peak_extra_mib") is not None and ref.get(r["pass"]):
            r["peak_extra_vs_eager"] = r["peak_extra_mib"] / ref[r["pass"]]
    return rows


def run_impl(impl: Impl, case, sets, expected: float, device, opts, base: dict):
    """Rows of one implementation on one case (one per pass, or one ``all`` row that says why
    it did not run). ``case.floor_bytes(pass)`` gives each pass's memory floor;
    ``opts.on_impl_done(name)``, when set, is told when the implementation is done."""
    def row(pass_name, status, **values):
        return {**base, "impl": impl.name, "pass": pass_name, "status": status, **values}

    built = impl.build(case, device)
    if isinstance(built, str):
        rows = [row("all", built)]
    else:
        with environment(impl.env):
            rows = measure_passes(impl, built, case, sets, expected, device, opts, row)
        clear_grads(sets)
    # Here, not in an except block, whose traceback would keep a failed call's tensors alive.
    release_memory(device)
    hook = getattr(opts, "on_impl_done", None)
    if hook is not None:
        hook(impl.name)
    return rows


def measure_passes(impl: Impl, loss_fn, case, sets, expected, device, opts, row):
    try:
        # The first forward and backward compile / JIT both, and give the loss for the
        # agreement check.
        loss = loss_fn(*sets[0])
        value = float(loss.detach())
        gradient = None
        if getattr(case, "grad_output", 1.0) != 1.0:
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
            m = measure(
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
        shown_s = _gemm_floor_s(case, pass_name, opts.floors) or floor_s
        progress(opts, f"{impl.name:26s} {pass_name:8s} {m.median_s * 1e3:10.3f} ms "
                       f"{m.median_s / shown_s:7.2f}x floor  ({m.reps} reps)")
    return rows


def _gemm_floor_s(case, pass_name: str, floors) -> Optional[float]:
    """A GEMM-bound case's floor (``case.flops(pass)`` over the matmul rate of its dtype),
    for the progress line; None for a memory-bound case (its rows keep the bytes floor)."""
    flops = getattr(case, "flops", None)
    rate = floors.matmul_rate(getattr(case, "dtype", "")) if callable(flops) else None
    return flops(pass_name) / rate if rate else None


def columns(shape: Sequence[str], memory: Sequence[str] = (), floor: str = "bytes") -> tuple:
    """A family's CSV columns: ``impl``, its ``shape`` columns, the measurement, its own
    peak-memory columns (``memory``), the floor (``bytes`` for a memory-bound op, ``flops``
    for a GEMM-bound one, with the achieved GB/s or TFLOP/s), the loss check, provenance."""
    rate = {"bytes": "achieved_gbps", "flops": "achieved_tflops"}[floor]
    return ("impl", *shape, "pass", "status", "median_ms", "reps", "n_sets", "peak_extra_mib",
            *memory, f"floor_{floor}", "floor_ms", "ratio_to_floor", rate,
            "loss_rel_diff") + PROVENANCE_COLUMNS


class CaseDtype:
    """What every family's Case (a frozen dataclass with a ``dtype`` field) shares: the
    dtype's name as the CSV writes it, and its size in bytes."""

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def element(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def script_parser(script: str, description: str, **presets: str) -> argparse.ArgumentParser:
    """A family script's parser: ``python -m pydistill.bench.<script>``, with its presets
    (``--<name>``, ``help``) as mutually exclusive flags."""
    p = argparse.ArgumentParser(prog=f"python -m pydistill.bench.{script}", description=description)
    preset = p.add_mutually_exclusive_group()
    for name, text in presets.items():
        preset.add_argument(f"--{name}", action="store_true", help=text)
    return p


def preset_sizes(presets: dict, opts, device: torch.device) -> list:
    """The sizes of the preset the command line names (``--smoke``, ``--full``, ``--quick``),
    else of ``full`` on CUDA and ``quick`` elsewhere."""
    named = [name for name in ("smoke", "full", "quick") if getattr(opts, name, False)]
    return presets[named[0] if named else "full" if device.type == "cuda" else "quick"]


def add_repetition_options(p: argparse.ArgumentParser, time_limit_help: str):
    """The repetition settings and ``--time-limit``."""
    p.add_argument("--budget-ms", type=float, help="time budget of one measurement's repetitions")
    p.add_argument("--min-reps", type=int)
    p.add_argument("--max-reps", type=int)
    p.add_argument("--warmup", type=int, help="untimed calls before each measurement")
    p.add_argument("--long-s", type=float,
                   help="seconds: calls so slow that --min-reps of them exceed it get fewer reps")
    p.add_argument("--time-limit", type=float, default=0.0, help=time_limit_help)


def add_run_options(p: argparse.ArgumentParser, family: str, impl_names: Sequence[str]):
    """``--impl`` (one of ``impl_names``) and the options every benchmark's run takes
    (device, repetitions, time limit, output); ``fill_run_defaults`` fills in the repetition
    settings left out."""
    p.add_argument("--impl", nargs="+", choices=impl_names, help="only these implementations")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    add_repetition_options(p, "seconds; implementations not started by then are reported as "
                              "skipped")
    p.add_argument("--out", type=Path,
                   help="CSV path, a .md of the same name beside it "
                        f"(default bench/results/{family}-<device>-<date>.csv)")


def run_defaults(device: torch.device) -> dict:
    """Repetition settings. On CUDA two untimed calls precede each measurement (clocks,
    caches of the allocator), after each implementation's first forward + backward (the
    loss check, which compiles / JITs everything). The CPU gets no warm-up beyond that and a
    longer allowance for slow calls: a shared CPU's outliers need a median of three."""
    if device.type == "cuda":
        return dict(budget_ms=250.0, min_reps=3, max_reps=100, warmup=2, long_s=2.0)
    return dict(budget_ms=1000.0, min_reps=3, max_reps=20, warmup=0, long_s=8.0)


def fill_run_defaults(opts, device: torch.device, defaults: Optional[dict] = None):
    for name, value in (defaults or run_defaults(device)).items():
        if getattr(opts, name, None) is None:
            setattr(opts, name, value)


def start_run(opts, family: str):
    """What a benchmark's main does first: start the clock, pick the device, fill in the
    repetition settings the command line left out, measure the floors, and name the output
    (``--out``, else bench/results/<family>-<device>-<date>.csv). Returns (device, the
    provenance every row carries, the CSV path)."""
    opts.started = time.monotonic()
    device = pick_device(opts.device)
    fill_run_defaults(opts, device)
    progress(opts, f"measuring the floors on {device_name(device)}")
    opts.floors = measure_floors(device)
    prov = provenance(device, opts.floors)
    progress(opts, provenance_line(prov))
    out = output_csv(opts.out, f"{family}-{device_slug(device)}-"
                                f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%d}.csv")
    return device, prov, out


def selected(impls, opts) -> list:
    """The implementations ``--impl`` names (all of them without it)."""
    return [i for i in impls if not opts.impl or i.name in opts.impl]


def run_script(argv, module, family: str, impls: Optional[Sequence] = None,
               report: Optional[Callable] = None) -> int:
    """Every family script's main: parse ``argv`` (the command line's when None) with
    ``module.parse_args``, start the run, measure each of ``module.cases_from``'s cases with
    ``module.run_case`` (the implementations ``--impl`` selects from ``module.IMPLS``, unless
    ``impls(opts)`` says which), and after every case rewrite the CSV (``module.COLUMNS``) and
    the Markdown report (``module.report(rows, prov, argv)``, or ``report(rows, prov, argv,
    opts)``), so that a run stopped from outside still leaves what it measured."""
    argv = sys.argv[1:] if argv is None else argv
    opts = module.parse_args(argv)
    impls = selected(module.IMPLS, opts) if impls is None else impls(opts)
    device, prov, out = start_run(opts, family)
    rows, text = [], ""
    for case in module.cases_from(opts, device):
        rows.extend(module.run_case(case, impls, device, opts, prov))
        write_csv(rows, out, module.COLUMNS)
        text = (module.report(rows, prov, argv) if report is None
                else report(rows, prov, argv, opts))
        out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


# --------------------------------------------------------------------------------------
# pytest-benchmark (bench/test_perf_*.py)
# --------------------------------------------------------------------------------------


def benchmark_pass(benchmark, loss: Callable, leaves: Sequence, pass_name: str,
                   device: torch.device, rounds: int, warmup_rounds: int = 1):
    """Time one pass of ``loss()`` with pytest-benchmark's pedantic mode, every call
    synchronised with the device; ``leaves``: the tensors whose gradients are cleared before
    each round. The passes are ``pass_callables``': ``bwd`` runs its forward in the setup,
    outside the timed region (the chunked backends cannot back-propagate twice through one
    graph). Checks that the last loss and (but for ``fwd``) the leaves' gradients are
    finite, and returns the loss."""
    prepare, run = pass_callables(lambda *_: loss(), [tuple(leaves)], None)[pass_name]

    def setup():
        arg = prepare(0)
        synchronize(device)
        return (arg,), {}

    def target(arg):
        out = run(arg)
        synchronize(device)
        return out

    result = benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)
    assert torch.isfinite(result.detach()).all()
    for x in leaves if pass_name != "fwd" else ():
        assert x.grad is not None and torch.isfinite(x.grad).all()
    return result


def pydistill_builder(loss: Callable) -> Callable:
    """Decorator of a family's ``loss(case, backend, *args)``, the loss function of
    pydistill's ``backend`` on one case (or why it cannot run, "skipped: ..."): it becomes
    ``build_pydistill(backend, *args)``, an Impl's builder, skipped where the backend cannot
    be timed on the device (``backend_unavailable``)."""

    def build_pydistill(backend: str, *args):
        def build(case, device: torch.device):
            return backend_unavailable(backend, device) or loss(case, backend, *args)

        return build

    return build_pydistill


def torch_loss(build_pydistill: Callable) -> Callable:
    """``run_case``'s ``expected_loss`` of a family: the loss of its pydistill builder's
    torch backend (float32 math, the chunked fallback) on the first input set, no autograd."""

    def expected_loss(case, inputs) -> float:
        with torch.no_grad():
            return float(build_pydistill("torch")(case, inputs[0].device)(*inputs))

    return expected_loss


def backend_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why pydistill's ``backend`` cannot be timed on ``device`` (a "skipped: ..." row status),
    or None. Triton off CUDA is the interpreter, which is not a benchmark; the CUDA C++
    extension may be built here, untimed: the benchmark asked for it."""
    from pydistill import _dispatch

    if backend == "triton" and device.type != "cuda":
        return "skipped: Triton kernels run on CUDA (the CPU interpreter is not timed)"
    reason = _dispatch.why_unavailable(backend, device, build=backend == "cuda")
    return None if reason is None else f"skipped: {reason}"


def backend_params(op: str, device: torch.device, grad_modes=("recompute",)):
    """pytest parameters (backend, grad_mode) for each of ``op``'s backends and Triton
    gradient schedules, skipped with the reason where one cannot be timed here (Triton off
    CUDA: the interpreter is not a benchmark)."""
    import pytest

    from pydistill import _dispatch

    params = []
    for backend in _dispatch.TABLE[op]:
        for grad_mode in (grad_modes if backend == "triton" else ("recompute",)):
            reason = _dispatch.why_unavailable(backend, device)
            if backend == "triton" and device.type != "cuda":
                reason = "Triton is timed on CUDA only (the CPU interpreter is not a benchmark)"
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            name = backend if grad_mode == "recompute" else f"{backend}-gradfwd"
            params.append(pytest.param(backend, grad_mode, id=name, marks=marks))
    return params


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_csv(rows: Sequence[dict], path, columns: Sequence[str]) -> Path:
    """Rows as CSV with exactly ``columns`` (a missing value is an empty cell; an unknown
    key is an error, so the columns cannot drift silently)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """``columns``: (key, header, format) triples; format is a format spec for numbers
    ('.3f') or a callable; None and NaN print as '-'."""

    def cell(value, fmt):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if callable(fmt):
            return fmt(value)
        if fmt and isinstance(value, (int, float)):
            return format(value, fmt)
        return str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(k), fmt) for k, _, fmt in columns) + " |")
    return "\n".join(lines)


def table(shape: Sequence, memory: Sequence[tuple] = (), floor: str = "bytes", ms: str = ".3f",
          mib: str = ".0f") -> tuple:
    """A family's results table (``markdown_table``'s columns) in the order of ``columns``:
    impl, ``shape`` (a name is its own header, unformatted; else a (key, header, format)
    triple), the pass and its time (format ``ms``), the ratio to the floor and the achieved
    rate, the peak extra memory (format ``mib``) and ``memory``, reps, loss check, status."""
    rate = {"bytes": ("achieved_gbps", "GB/s", ".1f"),
            "flops": ("achieved_tflops", "TFLOP/s", ".3f")}[floor]
    return (("impl", "impl", None), *((c, c, None) if isinstance(c, str) else c for c in shape),
            ("pass", "pass", None), ("median_ms", "ms", ms), ("ratio_to_floor", "x floor", ".2f"),
            rate, ("peak_extra_mib", "peak extra MiB", mib), *memory, ("reps", "reps", None),
            ("loss_rel_diff", "loss rel diff", ".1e"), ("status", "status", None))


def against_peers(rows, key: Callable, mine: Callable = lambda impl: impl.startswith("pydistill")):
    """The ok fwd+bwd rows of the implementations ``mine(impl)`` accepts, in the order of
    (``key(row)``, impl), each with ``peer(name)``: the same case's ok fwd+bwd row of
    implementation ``name`` (None where it did not run)."""
    done = {(*key(r), r["impl"]): r for r in rows if r["pass"] == "fwd+bwd" and r["status"] == "ok"}
    for (*case, impl), r in sorted(done.items(), key=lambda kv: kv[0]):
        if mine(impl):
            yield r, lambda name, case=tuple(case): done.get((*case, name))


def time_ratio(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
    """Row ``a``'s median time over row ``b``'s; None where either did not run."""
    return None if a is None or b is None else a["median_ms"] / b["median_ms"]


def report_head(title: str, script: str, prov: dict, argv) -> list:
    """The first lines of a family script's Markdown report: title, provenance, command."""
    return [f"# {title}", "", provenance_line(prov), "",
            f"Command: `python -m pydistill.bench.{script} {' '.join(argv)}`", ""]


def provenance_line(prov: dict) -> str:
    matmul = ""
    if prov.get("bf16_tflops"):
        matmul += f", bf16 matmul {prov['bf16_tflops']:.3g} TFLOP/s"
    if prov.get("fp32_tflops"):
        fp32 = prov["fp32_tflops"]
        matmul += (f", float32 matmul {fp32:.3g} TFLOP/s" if fp32 >= 1
                   else f", float32 matmul {fp32 * 1e3:.3g} GFLOP/s")
    return (
        f"device: {prov['device']}; torch {prov['torch']}, triton {prov['triton'] or '-'}, "
        f"CUDA {prov['cuda'] or '-'}, Python {prov['python']}; git {prov['git_rev']}; "
        f"{prov['date_utc']}; measured copy bandwidth {prov['copy_gbps']:.1f} GB/s{matmul}"
        + (f"; load average {prov['load_avg']:.2f} on {os.cpu_count()} CPUs"
           if prov.get("load_avg") is not None else "")
    )
