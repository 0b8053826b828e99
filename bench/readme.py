"""Regenerate the README's benchmark results from committed suite CSVs:

    python -m pydistill.bench.readme bench/results/suite-cpu-quick.csv [more.csv ...] [--readme README.md]
    python -m pydistill.bench.readme bench/results/suite-cpu-quick.csv --check   # exit 1 if out of date

Replaces what lies between the two marker lines (``BEGIN`` / ``END`` below) in the README and
nothing else. For each CSV: its device, versions, git revision and date (from the rows'
provenance), then one table per family of the forward + backward median time, its ratio to
the floor and the peak extra memory of every implementation that ran, and a line naming
those that did not and why. GPU runs first (their times are the ones to quote), then CPU
runs.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- bench-results:begin (python -m pydistill.bench.readme; do not edit by hand) -->"
END = "<!-- bench-results:end -->"
CASE_KEYS = ("divergence", "tail", "dtype", "N", "H_s", "H_t", "V", "K", "B", "H", "H_kv", "L",
             "d_s", "d_t", "causal", "padded", "shape_extra")


def _read(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def _fmt_int(text: str) -> str:
    value = _num(text)
    return str(int(value)) if value is not None and value.is_integer() else text


def _run_line(rows, path: Path) -> str:
    r = rows[0]
    matmul = []
    for key, label in (("bf16_tflops", "bf16"), ("fp32_tflops", "float32")):
        value = _num(r.get(key))
        if value:
            matmul.append(f"{label} matmul {value:.3g} TFLOP/s" if value >= 1
                          else f"{label} matmul {value * 1e3:.3g} GFLOP/s")
    floors = ", ".join([f"copy {_num(r.get('copy_gbps')) or 0:.3g} GB/s"] + matmul)
    load = _num(r.get("load_avg"))
    if load is not None:
        floors += f"; host load average {load:.1f} at the start"
    versions = f"torch {r.get('torch')}, Triton {r.get('triton') or '-'}, CUDA {r.get('cuda') or '-'}"
    preset = f"`--{r['preset']}`" if r.get("preset") else "a custom run"
    try:
        shown = path.resolve().relative_to(REPO)
    except ValueError:
        shown = path
    return (f"**{r.get('device')}** — {versions}; git {r.get('git_rev')}; {r.get('date_utc', '')[:10]}; "
            f"{preset}; measured floors: {floors}. From `{shown}`.")


def family_table(rows, family: str) -> list:
    """Markdown lines for one family of one run."""
    mine = [r for r in rows if r.get("family") == family]
    ok = [r for r in mine if r.get("status") == "ok" and r.get("pass") == "fwd+bwd"]
    lines = []
    if ok:
        varying = [k for k in CASE_KEYS if len({r.get(k, "") for r in ok}) > 1]
        fixed = [k for k in CASE_KEYS if k not in varying and ok[0].get(k)]
        impls = list(dict.fromkeys(r["impl"] for r in ok))
        cases = list(dict.fromkeys(tuple(r.get(k, "") for k in varying) for r in ok))
        cell = {(tuple(r.get(k, "") for k in varying), r["impl"]): r for r in ok}
        described = " ".join(ok[0][k] if k in ("divergence", "tail", "dtype", "shape_extra")
                             else f"{k} = {_fmt_int(ok[0][k])}" for k in fixed)
        lines.append(f"*{family}* ({described}): fwd+bwd median time, its ratio to the floor, "
                     "peak extra memory")
        lines.append("")
        header = [" × ".join(varying) if varying else "case"] + impls
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for case in cases:
            label = " × ".join(_fmt_int(v) for v in case) or "-"
            cells = [label]
            for impl in impls:
                r = cell.get((case, impl))
                if r is None:
                    cells.append("-")
                    continue
                ms, ratio, mib = (_num(r.get(k)) for k in ("median_ms", "ratio_to_floor", "peak_extra_mib"))
                text = _fmt_ms(ms)
                if ratio is not None:
                    text += f" ({ratio:.3g}×)"
                if mib is not None:
                    text += f", {mib:.0f} MiB" if mib >= 10 else f", {mib:.2g} MiB"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
    not_run = {}
    for r in mine:
        if r.get("status") != "ok":
            not_run.setdefault(r.get("impl", "-"), r.get("status", ""))
    ran = {r["impl"] for r in ok}
    missing = [(impl, status) for impl, status in not_run.items() if impl not in ran]
    if missing:
        by_reason = {}
        for impl, status in missing:
            by_reason.setdefault(status.removeprefix("skipped: "), []).append(
                "" if impl in ("-", "") else f"`{impl}`")
        if lines:
            lines.append("")
        lines.append(f"*{family}*, not run: " + "; ".join(
            (f"{', '.join(i for i in impls if i)}: {reason}" if any(impls) else reason)
            for reason, impls in by_reason.items()) + ".")
    return lines


def generate(paths) -> str:
    runs = [(Path(p), _read(p)) for p in paths]
    runs = [(p, rows) for p, rows in runs if rows]
    runs.sort(key=lambda run: ("NVIDIA" not in run[1][0].get("device", ""), run[1][0].get("date_utc", "")))
    out = [BEGIN, ""]
    if not runs:
        out += ["No committed results.", ""]
    for path, rows in runs:
        out += [_run_line(rows, path), ""]
        for family in dict.fromkeys(r.get("family") for r in rows):
            lines = family_table(rows, family)
            if lines:
                out += lines + [""]
    gpu = any("NVIDIA" in rows[0].get("device", "") for _, rows in runs)
    if not gpu:
        out += ["No GPU results are committed yet: the CPU rows measure the torch fallback and "
                "memory, not the Triton kernels; `python -m pydistill.bench.gpu_check` produces the GPU run.", ""]
    out.append(END)
    return "\n".join(out)


def replace_section(text: str, block: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"pydistill.bench.readme: the README has no {BEGIN!r} ... {END!r} markers")
    start = text.index(BEGIN)
    end = text.index(END, start) + len(END)
    return text[:start] + block + text[end:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pydistill.bench.readme",
                                description="Regenerate the README's benchmark results.")
    p.add_argument("csv", type=Path, nargs="+", help="suite CSVs (python -m pydistill.bench --out ...)")
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 when the README differs from what would be written")
    opts = p.parse_args(argv)
    text = opts.readme.read_text()
    new = replace_section(text, generate(opts.csv))
    if opts.check:
        if new != text:
            print(f"pydistill.bench.readme: {opts.readme} is out of date", file=sys.stderr)
            return 1
        return 0
    if new != text:
        opts.readme.write_text(new)
        print(f"pydistill.bench.readme: updated {opts.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
