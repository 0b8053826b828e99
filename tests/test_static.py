"""The compiled-code model's CI gate (bench/static.py): every Triton kernel compiled for sm_90
as the JIT would build it at the goal shapes, none spilling or using local memory, none
issuing more than 10 % more instructions per element than bench/results/static-sm90.csv
records. Runs where the stand-in driver works with the installed Triton (3.6 and later);
skipped with the reason elsewhere."""
import ast
import inspect
import os
import shutil
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


def test_gate_refuses_unresolved_loops_and_a_time_below_the_floor():
    loops = lambda n: dict(_row(), unresolved_loops=str(n))  # noqa: E731
    assert static.gate_failures([loops(2)], [loops(2)]) == []
    assert len(static.gate_failures([loops(0)], [loops(1)])) == 1
    total = lambda predicted: {"family": "softmax", "case": "kl", "phase": "fwd+bwd",  # noqa: E731
                               "kernel": "total", "predicted_ms": str(predicted), "floor_ms": "1.0"}
    assert static.gate_failures([], [total(1.2)]) == []
    assert len(static.gate_failures([], [total(0.13)])) == 1


def test_report_marks_unresolved_loops_as_a_lower_bound():
    total = {"family": "topk", "case": "kl", "kernel": "total", "floor_ms": 1.0, "predicted_ms": 2.0,
             "ratio": 2.0, "bound": "issue", "unresolved_loops": 2}
    text = static.report([total], static.TARGETS["sm_90"], "cmd")
    assert "lower bound: topk kl: 2 loops unresolved" in text
    assert "loops unresolved" not in static.report([dict(total, unresolved_loops=0)], static.TARGETS["sm_90"], "cmd")


@pytest.mark.parametrize("copy_exists", [True, False])
def test_trip_count_reads_a_line_table_naming_another_copy(tmp_path, copy_exists):
    # Triton's cache is keyed on the kernels' source and starting lines, not on the file: a
    # cubin compiled from another checkout names that checkout's file (gone, perhaps), with
    # the same line numbers. The attention forward's key loop is n_ctx / BLOCK_N trips.
    from pydistill.kernels import attention_kd

    fn = attention_kd._attention_kl_fwd_kernel
    path = inspect.getsourcefile(fn.fn)
    functions, _ = static._module_ast(path)
    loop = next(n for n in ast.walk(functions[fn.fn.__name__]) if isinstance(n, ast.For))
    copy = tmp_path / "pydistill" / "kernels" / "attention_kd.py"
    if copy_exists:
        copy.parent.mkdir(parents=True)
        shutil.copy(path, copy)
    instrs = [static.Instr(i, "FFMA", "", frozenset({(str(copy), ln)}))
              for i, ln in enumerate(range(loop.lineno + 1, loop.end_lineno + 1))]
    args = {"n_ctx": 8192, "BLOCK_M": 128, "BLOCK_N": 64, "CAUSAL": False, "HAS_MASK": False}
    launch = static.Launch("fwd", fn, None, (64, 48, 1), args)
    trips, node = static.trip_count(instrs, launch)
    assert node is loop
    assert trips == 8192 // 64


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
