"""bench/gpu_check.py cannot rot between GPU windows: its CPU rehearsal (tiny shapes, the
Triton interpreter) goes through every section, its budget logic leaves a valid report
whatever it cuts off, and its dry run's plan (compiled for sm_90 with the stand-in driver)
covers every family inside the budget. Run as a user runs it, in a subprocess from the repository root; no
timing is asserted beyond the budget the script itself enforces."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "correctness", "headline", "tests", "full")
OPS = {"kd_loss", "topk_kd_loss", "linear_kd_loss", "attention_kd_loss", "uld_loss",
       "linear_uld_loss"}
# ULD's gradient at tied logits depends on the backend's tie order, and bfloat16 rows tie
# often: its cases are float32 only (bench/gpu_check.py)
FLOAT32_ONLY = {"uld_loss", "linear_uld_loss"}


def _run(args, timeout=400):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    return subprocess.run([sys.executable, "-m", "pydistill.bench.gpu_check", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _report(out: Path) -> dict:
    data = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# GPU check: ")
    return data


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = _run(["--cpu", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, _report(out)


def test_rehearsal_runs_every_section(rehearsal):
    out, _stdout, data = rehearsal
    assert data["status"] == "done" and data["meta"]["cpu"] is True
    assert [data["sections"][s]["status"] for s in SECTIONS] == ["ok"] * len(SECTIONS)
    assert data["sections"]["tests"]["summary"].split()[1] == "passed"
    # small enough to come back from a device: at most 8 files
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"report.json", "report.md", "headline.csv", "headline.md", "tests.log"} <= set(files)


def test_rehearsal_checks_every_op_backend_and_dtype(rehearsal):
    _out, stdout, data = rehearsal
    rows = data["correctness"]
    failed = [r for r in rows if r["status"] != "ok"]
    assert not failed, failed[:3]
    assert {r["op"] for r in rows} == OPS
    for op in OPS:
        mine = [r for r in rows if r["op"] == op]
        assert {"triton", "torch"} <= {r["backend"] for r in mine}, op
        want = {"float32"} if op in FLOAT32_ONLY else {"float32", "bfloat16"}
        assert {r["dtype"] for r in mine} == want, op
        assert len({r["shape"] for r in mine}) == (1 if op == "linear_uld_loss" else 2), op
    options = {r["options"] for r in rows if r["op"] == "kd_loss" and r["backend"] == "triton"}
    assert any("grad=forward" in o for o in options) and any("grad=recompute" in o for o in options)
    assert "extreme -inf" in options
    assert sum(line.startswith(("ok ", "FAIL")) for line in stdout.splitlines()) == len(rows)


def test_rehearsal_report_has_the_headline_table(rehearsal):
    out, _stdout, data = rehearsal
    md = (out / "report.md").read_text()
    assert "## Headline benchmarks" in md and "| section | status |" in md
    import csv

    rows = list(csv.DictReader((out / "headline.csv").open()))
    assert {r["family"] for r in rows} == {"softmax", "topk", "linear", "attention", "uld"}
    assert any(r["status"] == "ok" and r["ratio_to_floor"] for r in rows)


def test_a_budget_too_small_for_everything_still_writes_a_valid_partial_report(tmp_path):
    proc = _run(["--cpu", "--budget", "12", "--out", str(tmp_path)], timeout=120)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    data = _report(tmp_path)
    assert data["status"] in ("done", "stopped: budget ran out")
    assert data["elapsed_s"] <= 12 + 5
    statuses = [data["sections"].get(s, {}).get("status", "not reached") for s in SECTIONS]
    # the later sections did not fit: each says so instead of running
    assert any(s.startswith("skipped: budget") or s == "not reached" for s in statuses), statuses


def test_the_deadline_stops_a_step_that_overruns_and_names_it(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from pydistill.bench import gpu_check as g
        budget = g.Budget(2.0)
        report = g.Report(Path({str(tmp_path)!r}), budget, {{"device": "test"}})
        report.case({{"op": "kd_loss", "backend": "torch", "dtype": "float32", "shape": "1x2",
                     "options": "kl", "status": "ok", "loss_err": 0.0, "grad_err": 0.0}})
        g.start_watchdog(report, 1.0)
        report.data["current"] = "a case that hangs"
        time.sleep(60)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 3, proc.stderr
    data = _report(tmp_path)
    assert data["status"] == "stopped: budget ran out"
    assert data["current"] == "a case that hangs" and len(data["correctness"]) == 1
    assert "Stopped in: a case that hangs" in (tmp_path / "report.md").read_text()


def test_bad_arguments_are_refused():
    proc = _run(["--skip", "everything"], timeout=60)
    assert proc.returncode == 2 and "--skip" in proc.stderr


def test_warm_up_shards_cover_every_triton_case_once():
    import torch
    from pydistill.bench import gpu_check

    cases = gpu_check.correctness_cases(torch.device("cpu"), cpu=True)
    shards = [gpu_check.warm_shard(cases, f"{i}/3") for i in range(3)]
    names = [(c.op, c.backend, c.dtype, c.shape, c.options) for shard in shards for c in shard]
    triton = [(c.op, c.backend, c.dtype, c.shape, c.options) for c in cases if c.backend == "triton"]
    assert sorted(names) == sorted(triton) and len(set(names)) == len(names) and triton


def test_a_warm_up_process_runs_its_share():
    proc = _run(["--cpu", "--warm", "0/60"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_warm_up_processes_past_the_limit_are_stopped():
    from pydistill.bench import gpu_check

    status = gpu_check.warm_triton(0.01, cpu=True)
    assert "stopped at the 0 s limit" in status


# --------------------------------------------------------------------------------------
# --dry-run: the plan
# --------------------------------------------------------------------------------------

PLAN = textwrap.dedent("""
    import json, sys
    from pydistill.bench import gpu_check as g
    seen = set()
    def first_of_op_and_backend(case):  # one case of each (op, backend): a subset, fast
        key = (case.op, case.backend)
        return key not in seen and not seen.add(key)
    plan = g.make_plan(case_filter=first_of_op_and_backend, impls={"pydistill-triton"},
                       progress=lambda line: None)
    print(g.format_plan(plan), file=sys.stderr)
    print(json.dumps(plan, default=str))
""")


@pytest.fixture(scope="module")
def plan():
    from pydistill.bench import static

    saved = os.environ.pop("TRITON_INTERPRET", None)  # the plan compiles; tests interpret
    try:
        reason = static.triton_unsupported()
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    if reason is not None:
        pytest.skip(f"the stand-in driver does not work here: {reason}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYDISTILL_CUDA_JIT"] = "0"
    proc = subprocess.run([sys.executable, "-c", PLAN], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def test_plan_covers_every_family_op_and_backend_inside_the_budget(plan):
    data, text = plan
    from pydistill.bench import cases

    assert {row[0] for row in data["headline"]["rows"]} == {f.name for f in cases.FAMILIES}
    assert set(data["correctness"]["cases by op"]) == OPS
    assert all(data["correctness"]["cases by backend"][b] for b in ("triton", "cuda", "torch"))
    assert data["compiles"]["specialisations"] > 0
    sections = data["env"] + data["correctness"]["seconds"] + data["headline"]["pydistill"]
    assert abs(sections - data["required"]) < 1e-6 and data["required"] < 480
    assert data["fits"] and data["correctness"]["not started"] == 0
    assert "families: " in text and text.rstrip().endswith(": fits") and "warm-up" in text


def test_plan_rows_are_predicted_for_every_goal_case(plan):
    data, _text = plan
    rows = data["headline"]["rows"]
    # linear at N = 1024 and 8192; one goal case for every other family
    assert sorted(r[1].split()[1] for r in rows if r[0] == "linear") == ["n=1024", "n=8192"]
    assert all(r[3] > 0 for r in rows)
    assert any(r[5].endswith("model") for r in rows)  # from bench/results/static-sm90.csv
