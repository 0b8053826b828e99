"""The benchmark suite: every loss family against its peers and the device's floors, in one
run, into one CSV (``python -m pydistill.bench``; bench/README.md).

A family is one entry of ``FAMILIES`` (bench/cases.py): the name used on the command line,
the module of its benchmark script and that script's arguments for each preset. The script is the family's
own (``python -m pydistill.bench.bench_<family>`` runs it alone); the suite uses what every such
script defines:

    parse_args(argv) -> options          cases_from(options, device) -> [case, ...]
    IMPLS: (harness.Impl, ...)           run_case(case, impls, device, options, prov) -> rows
    report(rows, prov, argv) -> Markdown (optional: its sections after the summary)

A script that has only ``main(argv)`` is run whole with ``--out`` into the run's folder and
its CSV merged (one progress step, its own floors). A family whose script is missing is one
row, status ``not available: ...``.

One run: the floors are measured once at the start (copy bandwidth; matrix-product rates in
the dtypes of the run's cases; on the CPU again at the end, the higher kept), every family's cases run with the same repetition settings,
the rows of all families go to one CSV (``COLUMNS``: the union of the families' columns,
plus ``family``, ``peer``, ``impl_version``, ``floor_kind`` and ``preset``; the provenance
in every row), rewritten after every case, with a Markdown summary beside it and the plots
(bench/plot.py) at the end.

``--static`` runs the compiled-code model instead (bench/static.py: a predicted lower bound,
no GPU needed, nothing measured); the arguments after it are the model's.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from pydistill.bench import cases, harness, peers


# The families and their presets (bench/cases.py).
Family, FAMILIES = cases.Family, cases.FAMILIES
FAMILY_NAMES = tuple(f.name for f in FAMILIES)
PRESETS = ("smoke", "quick", "full")

# Repetition settings of each preset; full takes the harness's per-device defaults.
RUN_SETTINGS = {
    "smoke": dict(budget_ms=5.0, min_reps=2, max_reps=3, warmup=0, long_s=1.0),
    "quick": dict(budget_ms=300.0, min_reps=3, max_reps=10, warmup=0, long_s=3.0),
}
# Floors of a smoke run: small and fast, a check that the machinery works, not a number.
# A smoke run on the CPU also uses one thread: on a loaded machine two intra-op threads
# waiting for each other make tiny ops take tens of milliseconds.
SMOKE_FLOORS = dict(copy_elements=1 << 20, matmul_n=128, reps=3)
# What a smoke run does not time, and why (a row says so).
SMOKE_SKIPS = {"compile": "skipped: torch.compile is not timed in --smoke "
                          "(compiling takes longer than the whole preset)"}

COLUMNS = (
    "family", "impl", "peer", "impl_version", "divergence", "tail", "dtype", "N", "V", "K",
    "H_s", "H_t", "B", "H", "H_kv", "L", "d_s", "d_t", "causal", "padded", "shape_extra",
    "temperature", "beta", "grad_output", "pass", "status", "median_ms", "reps", "n_sets",
    "peak_extra_mib", "peak_extra_nv", "peak_extra_vs_eager", "peak_extra_mib_per_kl",
    "floor_kind", "floor_bytes", "floor_flops", "floor_ms", "ratio_to_floor", "achieved_gbps",
    "achieved_tflops", "loss_rel_diff",
) + harness.PROVENANCE_COLUMNS + ("load_avg", "preset")
# Columns that say which case a row is (everything else is a measurement or provenance).
SHAPE_COLUMNS = ("divergence", "tail", "dtype", "N", "H_s", "H_t", "V", "K", "B", "H", "H_kv",
                 "L", "d_s", "d_t", "causal", "padded", "shape_extra")
# A family's column that the suite does not know goes, as name=value, into shape_extra.
_MEASURED = {"median_ms", "reps", "n_sets", "peak_extra_mib", "status", "pass", "impl"}


# --------------------------------------------------------------------------------------
# Progress over the sweep
# --------------------------------------------------------------------------------------


class Progress:
    """A bar over the sweep's steps (one implementation on one case): tqdm when it is
    installed and stderr is a terminal, else one line per step (readable in a log)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)

    def write(self, line: str):
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif self.enabled:
            print(line, file=sys.stderr, flush=True)

    def advance(self, label: str, steps: int = 1):
        steps = max(0, min(steps, self.total - self.done))
        self.done += steps
        if self.bar is not None:
            self.bar.set_postfix_str(label[:60], refresh=False)
            self.bar.update(steps)
        elif self.enabled:
            width = 30
            filled = width * self.done // max(self.total, 1)
            print(f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------


def load(family: Family):
    """The family's module, or why it is not available (a string)."""
    try:
        spec = importlib.util.find_spec(family.module)
    except ImportError as exc:
        return f"not available: {harness.one_line(exc)}"
    if spec is None:
        path = family.module.replace(".", "/") + ".py"
        return f"not available: {path} does not exist in this checkout"
    try:
        module = importlib.import_module(family.module)
    except Exception as exc:
        return f"not available: {family.module} does not import ({harness.one_line(exc)})"
    if all(hasattr(module, a) for a in ("parse_args", "cases_from", "IMPLS", "run_case")):
        return module
    if hasattr(module, "main"):
        return module
    return f"not available: {family.module} has neither run_case nor main"


def selected_impls(module, opts) -> list:
    impls = list(module.IMPLS)
    if opts.impl:
        impls = [i for i in impls if i.name in opts.impl]
    if opts.peer:
        impls = [i for i in impls if peers.peer_kind(i) in opts.peer]
    if opts.preset == "smoke":
        impls = [dataclasses.replace(i, build=_skipped(SMOKE_SKIPS[peers.peer_kind(i)]))
                 if peers.peer_kind(i) in SMOKE_SKIPS else i for i in impls]
    return impls


def _skipped(reason: str):
    return lambda case, device: reason


def family_argv(family: Family, opts) -> list:
    override = dict(opts.family_args or ())
    text = override.get(family.name, family.presets[opts.preset])
    return shlex.split(text)


def unify(row: dict, family: Family, kinds: dict, preset: str) -> dict:
    """A family's row in the suite's schema."""
    out, extra = {}, []
    for key, value in row.items():
        if key in COLUMNS:
            out[key] = value
        elif key not in _MEASURED:
            extra.append(f"{key}={harness._csv_value(value)}")
    out["family"] = family.name
    kind = kinds.get(row.get("impl"), peers.peer_kind(row.get("impl", "")))
    out["peer"] = kind
    out["impl_version"] = peers.impl_version(kind)
    if row.get("floor_flops") not in (None, ""):
        out["floor_kind"] = "flops"
    elif row.get("floor_bytes") not in (None, ""):
        out["floor_kind"] = "bytes"
    if extra:
        out["shape_extra"] = ";".join(([out["shape_extra"]] if out.get("shape_extra") else []) + extra)
    out["preset"] = preset
    return out


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="pydistill-bench",
        description="Every pydistill loss against its peers and the device's floors: fwd, bwd "
                    "and fwd+bwd median time, peak extra memory, ratio to the floor; one CSV, "
                    "a Markdown summary and plots.",
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                        help="tiny shapes, seconds: checks that the suite runs end to end")
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="CPU-sized: a few minutes on two cores")
    preset.add_argument("--full", dest="preset", action="store_const", const="full",
                        help="GPU sizes (the default on CUDA; --quick elsewhere)")
    p.add_argument("--family", nargs="+", choices=FAMILY_NAMES, help="only these families")
    p.add_argument("--static", action="store_true",
                   help="run the compiled-code model instead (bench/static.py; predicted, "
                        "not measured); the other arguments are the model's")
    p.add_argument("--impl", nargs="+", metavar="NAME",
                   help="only these implementations (names as in the CSV's impl column)")
    p.add_argument("--peer", nargs="+", choices=peers.KINDS,
                   help="only implementations of these kinds")
    p.add_argument("--pydistill-first", action="store_true",
                   help="every family's pydistill rows, then the peers' (a run cut short by "
                        "--time-limit keeps the former)")
    p.add_argument("--family-args", nargs=2, action="append", metavar=("FAMILY", "ARGS"),
                   help="replace a family's preset arguments, e.g. "
                        "--family-args softmax '--n 4096 --v 128256 --dtype bf16 --divergence kl jsd'")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads on the CPU (default: torch's; the device "
                        "column records the number)")
    harness.add_repetition_options(p, "seconds; work not started by then is reported as skipped")
    p.add_argument("--out", type=Path,
                   help="the run's CSV (a path ending in .csv) or a folder for it; the .md and "
                        "plots go beside it (default: bench/results/ in the repository, "
                        "./pydistill-bench/ from an installed package; the file "
                        "suite-<device>-<preset>-<date-time>.csv)")
    p.add_argument("--no-plots", action="store_true", help="do not render the plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    opts = p.parse_args(argv)
    known = {i.name for f in FAMILIES for m in [load(f)] if not isinstance(m, str)
             for i in getattr(m, "IMPLS", ())} if opts.impl else set()
    unknown = sorted(set(opts.impl or ()) - known)
    if unknown:
        p.error(f"--impl: unknown {unknown}; known: {sorted(known)}")
    for name, _ in opts.family_args or ():
        if name not in FAMILY_NAMES:
            p.error(f"--family-args: unknown family {name!r}; known: {list(FAMILY_NAMES)}")
    return opts


def _family_opts(module, family: Family, opts, device, floors):
    fopts = module.parse_args(family_argv(family, opts))
    for name in ("budget_ms", "min_reps", "max_reps", "warmup", "long_s", "time_limit"):
        setattr(fopts, name, getattr(opts, name))
    fopts.device, fopts.floors, fopts.started = str(device), floors, opts.started
    fopts.log, fopts.on_impl_done = opts.log, opts.on_impl_done
    return fopts


def _base_row(family: Family, prov: dict, preset: str, status: str, impl: str = "-") -> dict:
    return {**prov, "family": family.name, "impl": impl, "peer": peers.peer_kind(impl) if impl != "-" else "",
            "pass": "all", "status": status, "preset": preset}


def default_out(device, preset: str) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return harness.output_csv(None, f"suite-{harness.device_slug(device)}-{preset}-{stamp}.csv")


def run(opts, argv) -> Path:
    opts.started = time.monotonic()
    device = harness.pick_device(opts.device)
    opts.preset = opts.preset or ("full" if device.type == "cuda" else "quick")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    elif opts.preset == "smoke" and device.type == "cpu":
        torch.set_num_threads(1)
    harness.fill_run_defaults(opts, device, RUN_SETTINGS.get(opts.preset))
    families = [f for f in FAMILIES if not opts.family or f.name in opts.family]
    out = default_out(device, opts.preset) if opts.out is None else Path(opts.out)
    if out.suffix != ".csv":  # a folder: the default file name inside it
        out = out / default_out(device, opts.preset).name
    out.parent.mkdir(parents=True, exist_ok=True)
    opts.log = opts.on_impl_done = None

    # Plan: each family's module, options, cases and implementations.
    plans = []
    for family in families:
        module = load(family)
        if isinstance(module, str) or not hasattr(module, "run_case"):
            plans.append((family, module, None, [], []))
            continue
        try:
            fopts = module.parse_args(family_argv(family, opts))
            cases = module.cases_from(fopts, device)
        except (Exception, SystemExit) as exc:  # argparse exits on arguments it does not take
            reason = f"not available: {family.module} refused {family_argv(family, opts)}"
            if not isinstance(exc, SystemExit):
                reason += f" ({harness.one_line(exc)})"
            plans.append((family, reason, None, [], []))
            continue
        plans.append((family, module, fopts, cases, selected_impls(module, opts)))

    dtypes = {c.dtype for *_, cases, _ in plans for c in cases if hasattr(c, "dtype")}
    matmul = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    matmul += sorted(dtypes - set(matmul) - {torch.float16}, key=str)
    steps = sum(max(1, len(cases) * len(impls)) for *_, cases, impls in plans)
    bar = Progress(steps, enabled=not opts.no_progress)
    opts.log = bar.write
    harness.progress(opts, f"measuring the floors on {harness.device_name(device)}")
    floors = harness.measure_floors(device, matmul_dtypes=matmul,
                                    **(SMOKE_FLOORS if opts.preset == "smoke" else {}))
    prov = {**harness.provenance(device, floors), "load_avg": harness.load_average()}
    harness.progress(opts, harness.provenance_line(prov))

    # Modules and peers loaded once, then frozen: the collections before each measurement
    # only walk what the sweep creates.
    peers.preload()
    gc.collect()
    gc.freeze()

    rows, native = [], {}

    def save():
        harness.write_csv(rows, out, COLUMNS)
        out.with_suffix(".md").write_text(summary(rows, prov, argv, plans, native, opts))

    order = plans
    if opts.pydistill_first:
        def kind(impls, mine):
            return [i for i in impls if (peers.peer_kind(i) == "pydistill") == mine]
        order = ([(f, m, o, c, kind(i, True)) for f, m, o, c, i in plans]
                 + [(f, m, o, c, kind(i, False)) for f, m, o, c, i in plans if o is not None])
    for family, module, fopts, cases, impls in order:
        if fopts is not None and not impls:
            continue
        if fopts is None:
            if isinstance(module, str):
                rows.append(_base_row(family, prov, opts.preset, module))
                bar.advance(f"{family.name}: {module}")
            else:
                rows.extend(_run_main(family, module, opts, out, bar, prov))
            save()
            continue
        fopts = _family_opts(module, family, opts, device, floors)
        kinds = {i.name: peers.peer_kind(i) for i in impls}
        native.setdefault(family.name, [])
        for case in cases:
            done_before = bar.done
            if opts.time_limit and time.monotonic() - opts.started > opts.time_limit:
                case_rows = [{"impl": i.name, "pass": "all",
                              "status": f"skipped: --time-limit {opts.time_limit:g} s reached",
                              **_case_columns(case), **prov} for i in impls]
            else:
                opts.on_impl_done = fopts.on_impl_done = (
                    lambda name, f=family.name: bar.advance(f"{f}: {name}"))
                case_rows = module.run_case(case, impls, device, fopts, prov)
            # Steps the family did not report (implementations skipped by time): caught up.
            bar.advance(f"{family.name}", done_before + len(impls) - bar.done)
            native[family.name].extend(case_rows)
            rows.extend(unify(r, family, kinds, opts.preset) for r in case_rows)
            save()
    bar.close()
    if device.type == "cpu" and opts.preset != "smoke":
        # A shared CPU's load only lowers what a floor measurement sees: measured again now,
        # the higher of each is every row's floor.
        harness.progress(opts, "measuring the floors again (CPU: the higher of the two counts)")
        again = harness.measure_floors(device, matmul_dtypes=matmul)
        best = best_floors(floors, again)
        if best != floors:
            prov.update(harness.provenance(device, best), date_utc=prov["date_utc"],
                        git_rev=prov["git_rev"])
            harness.progress(opts, harness.provenance_line(prov))
            for r in rows + [r for family_rows in native.values() for r in family_rows]:
                refloor(r, best, prov)
    save()
    return out


def best_floors(a: harness.Floors, b: harness.Floors) -> harness.Floors:
    rates = dict(a.rates)
    for dtype, rate in b.rates:
        rates[dtype] = max(rate, rates.get(dtype, 0.0))
    first = a.matmul_dtype
    return harness.Floors(copy_bytes_per_s=max(a.copy_bytes_per_s, b.copy_bytes_per_s),
                          matmul_flops_per_s=rates.get(first, a.matmul_flops_per_s),
                          matmul_dtype=first, rates=tuple(rates.items()))


def refloor(row: dict, floors: harness.Floors, prov: dict) -> None:
    """A row's floor (and ratio) recomputed on ``floors``; its provenance updated."""
    for key in harness.PROVENANCE_COLUMNS:
        if key in row:
            row[key] = prov[key]
    median = _num(row.get("median_ms"))
    if row.get("status") != "ok" or median is None:
        return
    if _num(row.get("floor_flops")) is not None:
        rate = floors.matmul_rate(row.get("dtype", ""))
        floor_ms = _num(row["floor_flops"]) / rate * 1e3 if rate else None
    elif _num(row.get("floor_bytes")) is not None:
        floor_ms = _num(row["floor_bytes"]) / floors.copy_bytes_per_s * 1e3
    else:
        return
    if floor_ms:
        row["floor_ms"], row["ratio_to_floor"] = floor_ms, median / floor_ms


def _case_columns(case) -> dict:
    """The shape columns of a case no implementation ran on (from its attributes)."""
    names = {"divergence": "divergence", "tail": "tail", "n": "N", "v": "V", "k": "K",
             "h_s": "H_s", "h_t": "H_t", "temperature": "temperature", "beta": "beta",
             "grad_output": "grad_output"}
    out = {col: getattr(case, attr) for attr, col in names.items() if hasattr(case, attr)}
    if hasattr(case, "dtype"):
        out["dtype"] = str(case.dtype).removeprefix("torch.")
    return out


def _run_main(family: Family, module, opts, out: Path, bar: Progress, prov: dict) -> list:
    """A family script with only ``main``: run whole into the run's folder, rows merged."""
    path = out.with_name(f"{out.stem}-{family.name}.csv")
    argv = family_argv(family, opts) + ["--out", str(path), "--device", opts.device]
    try:
        module.main(argv)
        with open(path, newline="") as f:
            native = list(csv.DictReader(f))
    except (Exception, SystemExit) as exc:
        bar.advance(family.name)
        return [{"family": family.name, "impl": "-", "pass": "all", "preset": opts.preset,
                 "status": f"error: {family.module} main failed ({harness.one_line(exc)})",
                 **prov}]
    bar.advance(family.name)
    return [unify({k: v for k, v in r.items() if v != ""}, family, {}, opts.preset) for r in native]


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------


def _num(value) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def shape_label(row: dict) -> str:
    parts = []
    for key in SHAPE_COLUMNS:
        value = row.get(key)
        if value in (None, ""):
            continue
        if key == "shape_extra":
            parts.append(str(value))
        elif key in ("divergence", "tail", "dtype"):
            parts.append(str(value))
        else:
            parts.append(f"{key}={harness._csv_value(value)}")
    return " ".join(parts)


def summary_rows(rows, family: str) -> list:
    """One line per (case, implementation) that ran: the three passes' times, fwd+bwd's
    ratio to the floor and peak extra memory."""
    out, order = {}, []
    for r in rows:
        if r.get("family") != family or r.get("status") != "ok":
            continue
        key = (shape_label(r), r["impl"])
        if key not in out:
            out[key] = {"shape": key[0], "impl": r["impl"], "peer": r.get("peer")}
            order.append(key)
        line = out[key]
        line[f"{r['pass']}_ms"] = _num(r.get("median_ms"))
        if r["pass"] == "fwd+bwd":
            line["ratio"] = _num(r.get("ratio_to_floor"))
            line["mib"] = _num(r.get("peak_extra_mib"))
            line["rel"] = _num(r.get("loss_rel_diff"))
    return [out[k] for k in order]


def not_run(rows, family: str) -> list:
    """(implementation, reason) of the rows that did not run, each pair once."""
    seen = []
    for r in rows:
        if r.get("family") == family and r.get("status") != "ok":
            item = (r.get("impl", "-"), r.get("status", ""))
            if item not in seen:
                seen.append(item)
    return seen


SUMMARY_TABLE = (
    ("shape", "case", None), ("impl", "impl", None), ("peer", "kind", None),
    ("fwd_ms", "fwd ms", ".3f"), ("bwd_ms", "bwd ms", ".3f"), ("fwd+bwd_ms", "fwd+bwd ms", ".3f"),
    ("ratio", "fwd+bwd x floor", ".2f"), ("mib", "fwd+bwd peak extra MiB", ".1f"),
    ("rel", "loss rel diff", ".1e"),
)


def summary(rows, prov: dict, argv, plans, native: dict, opts) -> str:
    parts = [
        "# pydistill benchmark suite",
        "",
        harness.provenance_line(prov),
        "",
        f"Command: `python -m pydistill.bench {' '.join(argv)}`",
        "",
        "Peers: " + "; ".join(f"{k}: {v}" for k, v in peers.versions().items()) + ".",
        "",
        "Floors: memory-bound families (softmax, topk, uld) bytes that must move / measured "
        "copy bandwidth; GEMM-bound (linear, attention) FLOPs / measured matmul rate in the "
        "case's dtype. `x floor` = measured / floor. Peak extra: memory above what was "
        "allocated before the call (CUDA allocator; the CPU's resident-set high-water mark). Every "
        "pass and every row is in the CSV beside this file.",
    ]
    for family, module, *_ in plans:
        parts += ["", f"## {family.name}: {family.op}", ""]
        lines = summary_rows(rows, family.name)
        if lines:
            parts.append(harness.markdown_table(lines, SUMMARY_TABLE))
        skipped = not_run(rows, family.name)
        if skipped:
            parts += (["", "Not run:", ""] if lines else ["Not run:", ""])
            parts += [f"- `{impl}`: {status}" for impl, status in skipped]
        report = getattr(module, "report", None)
        if native.get(family.name) and callable(report) and not isinstance(module, str):
            try:
                text = report(native[family.name], prov, family_argv(family, opts))
            except Exception as exc:  # the family's report is extra; the table above is enough
                text = f"(the family's report failed: {harness.one_line(exc)})"
            if "\n## " in text:  # its targets / goals sections, a level down
                tail = text[text.index("\n## ") + 1:]
                parts += ["", tail.replace("\n## ", "\n### ").replace("## ", "### ", 1).rstrip()]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--static" in argv:
        from pydistill.bench import static

        return static.main([a for a in argv if a != "--static"])
    opts = parse_args(argv)
    out = run(opts, argv)
    md = out.with_suffix(".md")
    print(md.read_text())
    made = []
    if not opts.no_plots:
        from pydistill.bench import plot

        made = plot.render(out)
    print(f"wrote {out}, {md}" + "".join(f", {p}" for p in made))
    elapsed = time.monotonic() - opts.started
    print(f"suite: {elapsed:.0f} s", file=sys.stderr)
    return 0
