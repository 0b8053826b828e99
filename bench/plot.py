"""Plots of a suite run, rendered from its CSV alone:

    python -m pydistill.bench.plot bench/results/suite-cpu-quick.csv [--out-dir DIR] [--pass fwd+bwd]

Four PNG files beside the CSV (or in ``--out-dir``), one panel per family, one line per
implementation, the pass chosen by ``--pass`` (fwd+bwd by default):

``<stem>-time_vs_V.png``       median time against the vocabulary, the other sizes fixed
``<stem>-time_vs_N.png``       median time against the rows (attention: the tokens L)
``<stem>-memory_vs_N.png``     peak extra memory against the rows
``<stem>-ratio_to_floor.png``  measured / floor for every case of the family

For the "against X" plots each panel holds the other sizes (and dtype, divergence, ...) at
the combination that has the most values of X, the largest sizes on a tie; its title says
which. Needs matplotlib (``pip install -e ".[bench]"``); without it, says so and draws
nothing.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

PLOTS = ("time_vs_V", "time_vs_N", "memory_vs_N", "ratio_to_floor")
# Which columns make a case, in the order the titles name them.
CASE_KEYS = ("divergence", "tail", "dtype", "N", "H_s", "H_t", "V", "K", "B", "H", "H_kv", "L",
             "d_s", "d_t", "causal", "padded", "shape_extra")
_NUMERIC = ("N", "V", "K", "H_s", "H_t", "B", "H", "H_kv", "L", "d_s", "d_t", "median_ms",
            "peak_extra_mib", "ratio_to_floor")
# A family without N has its rows along another axis: attention's tokens L.
ROW_AXES = {"N": ("N", "L")}


def read_rows(path) -> list:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in _NUMERIC:
            value = r.get(key)
            try:
                r[key] = float(value) if value not in (None, "") else None
            except ValueError:
                r[key] = None
    return rows


def _fmt(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _series_against(rows, x: str, y: str):
    """(title, {impl: [(x, y), ...]}) for the fixed combination of the other case columns
    that has the most distinct x values (largest sizes on a tie); None when none has two."""
    groups = defaultdict(list)
    for r in rows:
        if r.get(x) is None or r.get(y) is None:
            continue
        fixed = tuple((k, r.get(k)) for k in CASE_KEYS if k != x and r.get(k) not in (None, ""))
        groups[fixed].append(r)
    if not groups:
        return None

    def rank(item):
        fixed, members = item
        sizes = tuple(v for _, v in fixed if isinstance(v, float))
        return (len({m[x] for m in members}), sizes)

    fixed, members = max(groups.items(), key=rank)
    if len({m[x] for m in members}) < 2:
        return None
    series = defaultdict(list)
    for m in members:
        series[m["impl"]].append((m[x], m[y]))
    title = " ".join(f"{k}={_fmt(v)}" if isinstance(v, float) or v in ("True", "False") else str(v)
                     for k, v in fixed)
    return title, {impl: sorted(points) for impl, points in sorted(series.items())}


def _case_label(r) -> str:
    return " ".join(f"{k}={_fmt(r[k])}" if isinstance(r.get(k), float) or r[k] in ("True", "False")
                    else str(r[k])
                    for k in CASE_KEYS if r.get(k) not in (None, "") and k not in ("divergence",))


def render(csv_path, out_dir=None, pass_name: str = "fwd+bwd", quiet: bool = False) -> list:
    """Draw the four plots of ``csv_path``; returns the paths written ([] without
    matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("pydistill.bench.plot: matplotlib is not installed (pip install -e \".[bench]\"); "
              "no plots drawn", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    out_dir = Path(out_dir) if out_dir else csv_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_rows(csv_path) if r.get("status") == "ok" and r.get("pass") == pass_name]
    families = list(dict.fromkeys(r["family"] for r in rows))
    # One colour per implementation across every panel and plot.
    palette = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    colors = {impl: palette[k % len(palette)]
              for k, impl in enumerate(sorted({r["impl"] for r in rows}))}
    device = next((r.get("device") for r in rows), "")
    written = []
    specs = {
        "time_vs_V": ("V", "median_ms", "median time (ms)"),
        "time_vs_N": ("N", "median_ms", "median time (ms)"),
        "memory_vs_N": ("N", "peak_extra_mib", "peak extra memory (MiB)"),
    }
    for name in PLOTS:
        panels = max(1, len(families))
        fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
        for ax, family in zip(axes[0], families or [None]):
            members = [r for r in rows if r["family"] == family]
            ax.set_title(family or "no rows", fontsize=9)
            if name == "ratio_to_floor":
                _ratio_panel(ax, members, colors)
                continue
            x, y, ylabel = specs[name]
            x = next((a for a in ROW_AXES.get(x, (x,)) if any(r.get(a) is not None for r in members)), x)
            found = _series_against(members, x, y)
            if found is None:
                ax.text(0.5, 0.5, f"fewer than two values of {x}", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8)
                continue
            title, series = found
            for impl, points in series.items():
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3,
                        label=impl, color=colors[impl])
            ax.set_xscale("log", base=2)
            if all(p[1] > 0 for pts in series.values() for p in pts):
                ax.set_yscale("log")
            ax.set_xlabel(x, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{family}: {title}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3, which="both")
        fig.suptitle(f"{name.replace('_', ' ')} ({pass_name}) on {device}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{csv_path.stem}-{name}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)
    if not quiet:
        print("pydistill.bench.plot: wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return written


def _ratio_panel(ax, members, colors):
    cases = list(dict.fromkeys(_case_label(r) for r in members if r.get("ratio_to_floor")))
    if not cases:
        ax.text(0.5, 0.5, "no floor", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        return
    impls = list(dict.fromkeys(r["impl"] for r in members if r.get("ratio_to_floor")))
    for k, impl in enumerate(impls):
        points = [(cases.index(_case_label(r)), r["ratio_to_floor"]) for r in members
                  if r["impl"] == impl and r.get("ratio_to_floor")]
        ax.plot([p[0] + 0.08 * (k - len(impls) / 2) for p in points], [p[1] for p in points],
                marker="o", ms=4, ls="", label=impl, color=colors[impl])
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=6)
    ax.set_ylabel("measured / floor", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3, axis="y", which="both")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pydistill.bench.plot",
                                description="Plots of a benchmark suite CSV.")
    p.add_argument("csv", type=Path, nargs="+")
    p.add_argument("--out-dir", type=Path, help="where the PNG files go (default: beside the CSV)")
    p.add_argument("--pass", dest="pass_name", default="fwd+bwd", choices=("fwd", "bwd", "fwd+bwd"))
    opts = p.parse_args(argv)
    for path in opts.csv:
        render(path, opts.out_dir, opts.pass_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
