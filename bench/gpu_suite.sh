#!/usr/bin/env bash
# The whole GPU run in one command, for a machine with a CUDA GPU and no network: install
# what is missing from wheels carried in a folder, run the test suite on CUDA, the
# pytest-benchmark regressions, then the benchmark suite (python -m pydistill.bench --full), and leave
# every log and result in one folder:
#
#   setup.log     install log, nvidia-smi, versions of everything imported
#   tests.log     the test suite on CUDA (+ tests.xml, JUnit)
#   perf.log      bench/test_perf_*.py (+ perf.json, pytest-benchmark's record)
#   bench.log     python -m pydistill.bench's progress
#   suite.csv     every row of the benchmark, provenance in each; suite.md the summary;
#                 suite-*.png the plots
#   summary.md    what ran, what failed, where the results are
#
# A failing or stopped section is recorded in summary.md and the next one still runs; the
# script exits non-zero only when the benchmark itself wrote no CSV.
#
#   bash bench/gpu_suite.sh [WHEELS_DIR]
#   SKIP_TESTS=1 BENCH_ARGS="--full --family softmax linear" bash bench/gpu_suite.sh wheels/
#   TIME_BUDGET=540 TARBALL=/tmp/gpu.tar.gz bash bench/gpu_suite.sh     # a 10-minute slot
#
# Environment (all optional):
#   WHEELS         folder of wheels (default: the first argument, else bench/wheels, else
#                  .whl; absent or empty: install nothing). How to fill it: bench/README.md
#   OUT            results folder (default bench/results/gpu-<UTC date-time>)
#   PYTHON         interpreter (default python3)
#   SITE           where the wheels are installed (default /tmp/pydistill-site, put first on
#                  PYTHONPATH)
#   INSTALL        editable: pip install -e the checkout first (offline; not needed: the
#                  source tree imports from the repository root)
#   BUILD_CUDA     1: let the editable install build the CUDA C++ extension (default: skip it
#                  there, PYDISTILL_SKIP_CUDA_BUILD=1; the benchmark's pydistill-cuda rows
#                  build or report it)
#   SKIP_TESTS, SKIP_PERF_TESTS, SKIP_BENCH    1 skips that section
#   TESTS_TIMEOUT, PERF_TIMEOUT                seconds for those sections (default: none)
#   BENCH_ARGS     arguments of python -m pydistill.bench (default --full)
#   TIME_BUDGET    seconds for the whole script (default 0: none); sections are cut to what
#                  is left, the benchmark stops starting new work 60 s before the end
#   TARBALL        also pack the results folder into this .tar.gz
#   BENCH_GIT_REV  revision to record when the tree has no .git
#
# No `set -e`: a section that fails is recorded and the next one runs, which is the point of
# the script; every step checks what it needs and says what it skipped.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD
PY=${PYTHON:-python3}
WHEELS=${1:-${WHEELS:-}}
if [ -z "$WHEELS" ]; then
    for candidate in bench/wheels .whl; do
        if compgen -G "$candidate/*.whl" >/dev/null; then WHEELS=$candidate; break; fi
    done
fi
SITE=${SITE:-/tmp/pydistill-site}
BUDGET=${TIME_BUDGET:-0}
OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
START=$SECONDS
SUMMARY=()

elapsed() { echo $((SECONDS - START)); }
left() { if [ "$BUDGET" -gt 0 ]; then echo $((BUDGET - (SECONDS - START))); else echo 999999; fi; }
note() {
    echo "[gpu_suite $(elapsed)s] $*"
    SUMMARY+=("- $*")
}
# with_timeout SECONDS CMD...: the command under timeout when SECONDS > 0
with_timeout() {
    local limit=$1
    shift
    if [ "$limit" -gt 0 ]; then timeout "$limit" "$@"; else "$@"; fi
}
# section_limit OWN_TIMEOUT RESERVE: the smaller of the section's own limit and what the
# budget leaves after RESERVE seconds (0: no limit)
section_limit() {
    local own=${1:-0} reserve=$2 limit=0
    if [ "$BUDGET" -gt 0 ]; then limit=$(($(left) - reserve)); fi
    if [ "$own" -gt 0 ] && { [ "$limit" -le 0 ] || [ "$own" -lt "$limit" ]; }; then limit=$own; fi
    echo "$limit"
}
last_line() { grep -E '(passed|failed|error|no tests ran)' "$1" 2>/dev/null | tail -n 1; }

# ---- (a) environment and install ----------------------------------------------------------
{
    echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo "${BENCH_GIT_REV:-unknown}")"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    else
        echo "nvidia-smi: not found"
    fi
    echo "wheels: ${WHEELS:-none}"
} >"$OUT/setup.log"

if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl >>"$OUT/setup.log" 2>&1; then
        note "wheels installed into $SITE from $WHEELS: $(cd "$WHEELS" && ls ./*.whl | sed 's|^\./||' | tr '\n' ' ')"
    else
        note "wheel install from $WHEELS FAILED (see setup.log); going on without them"
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
else
    note "no wheels to install (WHEELS=${WHEELS:-unset})"
fi

# From the repository root the source tree imports as the installed package does
# (pydistill/kernels, pydistill/examples and pydistill/bench link to the top-level folders),
# so nothing needs installing; INSTALL=editable installs it anyway (offline, no CUDA build
# unless BUILD_CUDA=1).
kernels_importable() { (cd "$REPO" && "$PY" -c "import pydistill.kernels, pydistill.bench") >/dev/null 2>&1; }
if [ "${INSTALL:-}" = editable ]; then
    env PYDISTILL_SKIP_CUDA_BUILD="$([ "${BUILD_CUDA:-0}" = 1 ] && echo 0 || echo 1)" \
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO" \
        >>"$OUT/setup.log" 2>&1 && note "pydistill installed editable"
fi
if kernels_importable; then
    note "pydistill.kernels and pydistill.bench import"
else
    note "pydistill.kernels does NOT import: the Triton rows will fail (see setup.log)"
fi
BENCH_PATH=${PYTHONPATH:-}

"$PY" - >>"$OUT/setup.log" 2>&1 <<'EOF'
import importlib, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "numpy", "pydistill", "liger_kernel", "trl", "transformers", "pytest",
             "pytest_benchmark", "hypothesis", "matplotlib", "tqdm"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__, exc)
EOF
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    note "WARNING: torch sees no CUDA device; tests and benchmark run on the CPU"
fi

# ---- (b) the test suite on CUDA -----------------------------------------------------------
if [ "${SKIP_TESTS:-0}" = 1 ]; then
    note "tests: skipped (SKIP_TESTS=1)"
elif [ "$BUDGET" -gt 0 ] && [ "$(left)" -lt 240 ]; then
    note "tests: skipped, only $(left) s of TIME_BUDGET left"
else
    # Reserve for what follows: the regressions and the benchmark.
    limit=$(section_limit "${TESTS_TIMEOUT:-0}" 180)
    with_timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
        tests 2>&1 | tee "$OUT/tests.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ]; then
        note "tests: STOPPED after ${limit} s; $(grep -c 'FAILED\|ERROR' "$OUT/tests.log") failures listed so far"
    else
        note "tests (exit $rc): $(last_line "$OUT/tests.log")"
    fi
fi

# ---- (c) pytest-benchmark regressions -----------------------------------------------------
if [ "${SKIP_PERF_TESTS:-0}" = 1 ]; then
    note "perf tests: skipped (SKIP_PERF_TESTS=1)"
elif ! PYTHONPATH="$BENCH_PATH" "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    note "perf tests: skipped, pytest-benchmark not installed (add its wheel)"
elif [ "$BUDGET" -gt 0 ] && [ "$(left)" -lt 180 ]; then
    note "perf tests: skipped, only $(left) s of TIME_BUDGET left"
else
    limit=$(section_limit "${PERF_TIMEOUT:-0}" 120)
    # importlib mode: pytest puts nothing on sys.path, so PYTHONPATH alone decides which
    # pydistill is imported.
    with_timeout "$limit" env PYTHONPATH="$BENCH_PATH" "$PY" -m pytest -q -p no:cacheprovider \
        --import-mode=importlib bench/test_perf_softmax_divergence.py \
        bench/test_perf_topk_divergence.py bench/test_perf_linear_kd.py \
        --benchmark-json="$OUT/perf.json" --benchmark-columns=min,median,max,rounds \
        --benchmark-sort=fullname 2>&1 | tee "$OUT/perf.log"
    rc=${PIPESTATUS[0]}
    note "perf tests (exit $rc$([ "$rc" = 124 ] && echo ", stopped after ${limit} s")): $(last_line "$OUT/perf.log")"
fi

# ---- (d) the benchmark suite ----------------------------------------------------------------
BENCH_RC=0
if [ "${SKIP_BENCH:-0}" = 1 ]; then
    note "benchmark: skipped (SKIP_BENCH=1)"
elif [ "$BUDGET" -gt 0 ] && [ "$(left)" -lt 90 ]; then
    note "benchmark: skipped, only $(left) s of TIME_BUDGET left"
    BENCH_RC=1
else
    read -r -a bench_args <<<"${BENCH_ARGS:---full}"
    time_limit=()
    hard=0
    if [ "$BUDGET" -gt 0 ]; then
        time_limit=(--time-limit $(($(left) - 60)))
        hard=$(($(left) - 10))
    fi
    PYTHONUNBUFFERED=1 with_timeout "$hard" env PYTHONPATH="$BENCH_PATH" "$PY" -m pydistill.bench \
        "${bench_args[@]}" "${time_limit[@]}" --out "$OUT/suite.csv" 2>&1 | tee "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    if [ -f "$OUT/suite.csv" ]; then
        ok=$(grep -c ',ok,' "$OUT/suite.csv")
        total=$(($(wc -l <"$OUT/suite.csv") - 1))
        note "benchmark (exit $rc): $ok of $total rows ok -> suite.csv, suite.md, suite-*.png"
        if [ "$rc" != 0 ] && [ ! -f "$OUT/suite-time_vs_N.png" ]; then
            # Cut off before its end: the plots from what it wrote.
            PYTHONPATH="$BENCH_PATH" "$PY" -m pydistill.bench.plot "$OUT/suite.csv" >>"$OUT/bench.log" 2>&1 || true
        fi
    else
        note "benchmark (exit $rc): no CSV written (see bench.log)"
        BENCH_RC=1
    fi
fi

# ---- summary ------------------------------------------------------------------------------
{
    echo "# gpu_suite summary"
    echo
    head -n 3 "$OUT/setup.log" | tr '\n' ';' | sed 's/;/; /g'
    echo
    echo
    printf '%s\n' "${SUMMARY[@]}"
    echo "- total: $(elapsed) s; results in $OUT"
    if [ -f "$OUT/suite.md" ]; then
        echo
        echo "Regenerate the README's results: python -m pydistill.bench.readme <this folder>/suite.csv"
    fi
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
if [ -n "${TARBALL:-}" ]; then
    tar -czf "$TARBALL" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "packed $OUT into $TARBALL"
fi
exit "$BENCH_RC"
