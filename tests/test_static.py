"""The compiled-code model's CI gate (bench/static.py): every Triton kernel compiled for sm_90
as the JIT would build it at the goal shapes, none spilling or using local memory, none
issuing more than 10 % more instructions per element than bench/results/static-sm90.csv
records. Runs where the stand-in driver works with the installed Triton (3.6 and later);
skipped with the reason elsewhere."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pydistill.bench import static

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "bench" / "results" / "static-sm90.csv"


def _unsupported():
    saved = os.environ.pop("TRITON_INTERPRET", None)  # the model compiles; it is set for tests
    try:
        reason = static.triton_unsupported()
        if reason is None:
            for tool in ("cuobjdump", "nvdisasm"):
                static._tool(tool)
        return reason
    except FileNotFoundError as exc:
        return str(exc)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture(scope="module")
def current_rows(tmp_path_factory):
    reason = _unsupported()
    if reason is not None:
        pytest.skip(f"compiled-code model unavailable: {reason}")
    out = tmp_path_factory.mktemp("static") / "static-sm90.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYDISTILL_CUDA_JIT"] = "0"
    run = subprocess.run([sys.executable, "-m", "pydistill.bench.static", "--small", "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return static.read_csv(out)


def test_kernels_within_committed_model(current_rows):
    failures = static.gate_failures(static.read_csv(COMMITTED), current_rows)
    assert not failures, "\n".join(failures)


def test_every_case_has_a_total(current_rows):
    totals = {(r["family"], r["case"]) for r in current_rows if r["kernel"] == "total"}
    assert totals == {(r["family"], r["case"]) for r in static.read_csv(COMMITTED) if r["kernel"] == "total"}
    for r in current_rows:
        if r["kernel"] == "total":
            assert float(r["predicted_ms"]) > 0 and float(r["floor_ms"]) > 0


def _row(kernel="_k", ipe=1.0, spills=0, local=0, elements=100):
    return {"family": "softmax", "case": "kl", "phase": "fwd", "kernel": kernel, "regs": "40",
            "spill_stores": str(spills), "local_bytes": str(local), "elements": str(elements),
            "warp_instructions": str(ipe * elements)}


def test_gate_refuses_growth_spills_and_stale_reports():
    assert static.gate_failures([_row()], [_row(ipe=1.09)]) == []
    assert len(static.gate_failures([_row()], [_row(ipe=1.11)])) == 1
    assert len(static.gate_failures([_row()], [_row(spills=2)])) == 1
    assert len(static.gate_failures([_row()], [_row(local=16)])) == 1
    assert len(static.gate_failures([_row()], [_row(kernel="_other")])) == 2


def test_occupancy_limits():
    h100 = static.TARGETS["sm_90"]
    # 80 registers x 8 warps: 3 CTAs by registers (65536 / (80 * 32 * 8) = 3.2)
    assert static.occupancy(80, 32, 8, h100) == (3, "registers")
    assert static.occupancy(32, 0, 4, h100) == (16, "warps")
    assert static.occupancy(32, 100 * 1024, 4, h100) == (2, "shared")
    assert static.occupancy(16, 0, 1, h100) == (32, "ctas")


def test_jit_specialisation_gives_vector_loads(current_rows):
    # The JIT specialises pointers on 16-byte alignment and V = 128256 on divisibility by 16;
    # compiled without those specialisations the bf16 row kernels load 2 bytes per thread.
    rows = [r for r in current_rows if r["family"] == "softmax" and r["kernel"] in ("_kd_fwd_kernel", "_kd_bwd_kernel")]
    assert rows
    for r in rows:
        assert int(r["max_load_bytes"]) == 16, r
