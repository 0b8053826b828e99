"""The benchmark suite runs end to end: ``python -m pydistill.bench --smoke`` (tiny shapes, seconds)
writes its CSV with every column and the provenance in every row, the Markdown summary, the
plots when matplotlib is installed, and ``python -m pydistill.bench.readme`` renders the CSV.

Run in a subprocess from the repository root, as a user runs it (bench/ is a repository
tool, not part of the installed package); no timing is asserted.
"""
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROVENANCE = ("device", "torch", "triton", "cuda", "python", "git_rev", "date_utc", "copy_gbps")
COLUMNS = (
    "family", "impl", "peer", "impl_version", "divergence", "tail", "dtype", "N", "V", "K",
    "H_s", "H_t", "pass", "status", "median_ms", "reps", "peak_extra_mib", "floor_kind",
    "floor_ms", "ratio_to_floor", "loss_rel_diff", "bf16_tflops", "fp32_tflops", "preset",
) + PROVENANCE


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the suite times no interpreted kernel
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.csv"
    proc = _run("-m", "pydistill.bench", "--smoke", "--device", "cpu", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return out, reader.fieldnames, rows


def test_csv_columns_and_provenance_in_every_row(smoke):
    _out, header, rows = smoke
    assert set(COLUMNS) <= set(header)
    assert rows
    for row in rows:
        for key in ("device", "torch", "python", "git_rev", "date_utc", "copy_gbps", "preset"):
            assert row[key], (key, row)
        assert row["preset"] == "smoke"
        assert float(row["copy_gbps"]) > 0


def test_every_family_reports_and_measured_rows_carry_their_floor(smoke):
    _out, _header, rows = smoke
    assert {r["family"] for r in rows} == {"softmax", "topk", "linear", "attention", "uld"}
    for family, floor_kind in (("softmax", "bytes"), ("topk", "bytes"), ("linear", "flops"),
                               ("uld", "bytes")):
        ok = [r for r in rows if r["family"] == family and r["status"] == "ok"]
        torch_rows = [r for r in ok if r["impl"] == "pydistill-torch"]
        assert {r["pass"] for r in torch_rows} == {"fwd", "bwd", "fwd+bwd"}, family
        for r in ok:
            assert r["floor_kind"] == floor_kind
            assert float(r["median_ms"]) > 0 and float(r["floor_ms"]) > 0
            assert float(r["ratio_to_floor"]) == pytest.approx(
                float(r["median_ms"]) / float(r["floor_ms"]), rel=1e-3)
            assert float(r["loss_rel_diff"]) < 1e-4 or r["impl"].startswith("dense")


def test_peers_that_cannot_run_are_rows_with_a_reason(smoke):
    _out, _header, rows = smoke
    by_impl = {}
    for r in rows:
        by_impl.setdefault((r["family"], r["impl"]), []).append(r)
    # Liger: CUDA only (or not installed); torch.compile: not timed in --smoke.
    for key in (("softmax", "liger"), ("linear", "liger-fused-linear-jsd"),
                ("linear", "liger-chunked-jsd"), ("softmax", "torch-compile"),
                ("topk", "dense-compile"), ("linear", "torch-compile"), ("uld", "torch-compile")):
        assert key in by_impl, key
        assert all(r["status"].startswith("skipped: ") for r in by_impl[key]), by_impl[key]
    trl = by_impl[("softmax", "trl-generalized-jsd")]
    if importlib.util.find_spec("trl") is None:
        assert trl[0]["status"].startswith("skipped: trl not installed")
    # GOLD's ULDLoss sorts whole vocabularies: a top_k case is a row that says so.
    gold = by_impl[("uld", "trl-gold-uld")]
    assert {r["K"] for r in gold} >= {"16", "all"}
    assert all(r["status"].startswith("skipped: ") for r in gold if r["K"] != "all"), gold
    attention = [r for r in rows if r["family"] == "attention"]
    assert attention and all(r["status"] for r in attention)


def test_markdown_and_plots(smoke):
    out, _header, _rows = smoke
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# pydistill benchmark suite")
    for family in ("softmax", "topk", "linear", "attention", "uld"):
        assert f"## {family}" in md
    pngs = [out.with_name(f"{out.stem}-{name}.png")
            for name in ("time_vs_V", "time_vs_N", "memory_vs_N", "ratio_to_floor")]
    if importlib.util.find_spec("matplotlib") is None:
        assert not any(p.exists() for p in pngs)
    else:
        assert all(p.stat().st_size > 1000 for p in pngs)


def test_readme_section_from_the_csv(smoke, tmp_path):
    out, _header, _rows = smoke
    readme = tmp_path / "README.md"
    begin = "<!-- bench-results:begin (python -m pydistill.bench.readme; do not edit by hand) -->"
    readme.write_text(f"before\n{begin}\nold\n<!-- bench-results:end -->\nafter\n")
    proc = _run("-m", "pydistill.bench.readme", str(out), "--readme", str(readme))
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "\nold\n" not in text
    assert "*softmax*" in text and "pydistill-torch" in text and "git " in text
    assert _run("-m", "pydistill.bench.readme", str(out), "--readme", str(readme), "--check").returncode == 0


def test_pydistill_first_runs_every_familys_pydistill_rows_before_any_peer(tmp_path):
    out = tmp_path / "first.csv"
    proc = _run("-m", "pydistill.bench", "--smoke", "--device", "cpu", "--no-progress",
                "--no-plots", "--family", "softmax", "topk", "--impl", "pydistill-torch",
                "torch-eager", "reference-eager", "--pydistill-first", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    kinds = [r["peer"] for r in rows]
    mine = kinds.count("pydistill")
    assert mine and kinds[:mine] == ["pydistill"] * mine and "pydistill" not in kinds[mine:]
    assert {r["family"] for r in rows[:mine]} == {r["family"] for r in rows[mine:]} == {"softmax", "topk"}


def test_goal_shapes_and_cases_are_defined_once():
    """bench/cases.py is the one list: the model, the GPU check's headline, the suite and the
    family scripts read it."""
    import importlib

    from pydistill.bench import cases, gpu_check, static, suite

    assert suite.FAMILIES is cases.FAMILIES
    assert [(c.family, c.argv) for c in static.goal_cases() if c.name == "goal"] == list(cases.GOAL.items())
    cmd = gpu_check.bench_command(Path("headline.csv"), 300.0, cpu=False, full=False)
    assert [(cmd[i + 1], cmd[i + 2]) for i, a in enumerate(cmd) if a == "--family-args"] == list(cases.GOAL.items())
    assert "--pydistill-first" in cmd
    for family in cases.FAMILIES:
        assert importlib.import_module(family.module).PRESETS is cases.SWEEPS[family.name]
    import torch

    shapes = {c.shape for c in gpu_check.correctness_cases(torch.device("cpu"), cpu=True)}
    assert shapes == {name for family in cases.CORRECTNESS["cpu"].values() for name in family}
