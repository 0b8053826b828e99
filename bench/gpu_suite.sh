#!/usr/bin/env bash
# The whole GPU run in one command, for a machine with no network: install the carried
# wheels, run the test suite on CUDA, the pytest-benchmark regressions, the full benchmark
# and a grad_output != 1 run of the Triton schedules, and leave every log and result in one
# folder, in 8 files: setup.log, tests.log, bench.log, softmax_divergence{,-grad_output}.csv
# and .md, summary.md. Sized to finish in about 9 minutes (TIME_BUDGET): each section is
# given what is left, the benchmark stops starting new work when time runs short and writes
# its CSV after every size, so a cut-off run still leaves results. For the whole --full
# preset, run the benchmark alone: SKIP_TESTS=1 SKIP_PERF_TESTS=1.
#
#   bash bench/gpu_suite.sh
#   SKIP_TESTS=1 BENCH_ARGS="--full --divergence kl jsd" bash bench/gpu_suite.sh
#
# Environment (all optional):
#   WHEELS         folder of wheels to install (default .whl; absent or empty: none)
#   OUT            results folder (default bench/results/gpu-<UTC date-time>)
#   PYTHON         interpreter (default python3)
#   INSTALL        how pydistill.kernels becomes importable when it is not already:
#                  auto (editable install, else copy) | editable | copy
#   SKIP_TESTS, SKIP_PERF_TESTS, SKIP_BENCH, SKIP_GRAD_OUTPUT    1 skips that section
#   TESTS_TIMEOUT  seconds for the test suite (default 210)
#   BENCH_ARGS     arguments of bench.bench_softmax_divergence (default --full)
#   GRAD_OUTPUT_ARGS  arguments of the second, grad_output != 1 run (default: the two
#                  Triton schedules and Liger, bf16, N 16384, V 32000 / 128256)
#   TIME_BUDGET    seconds for the whole script (default 540)
#   BENCH_GIT_REV  revision to record when the tree has no .git
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
BUDGET=${TIME_BUDGET:-540}
OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
START=$SECONDS
SUMMARY=()

elapsed() { echo $((SECONDS - START)); }
left() { echo $((BUDGET - (SECONDS - START))); }
note() {
    echo "[gpu_suite $(elapsed)s] $*"
    SUMMARY+=("- $*")
}

# ---- (a) environment ---------------------------------------------------------------------
{
    echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo "${BENCH_GIT_REV:-unknown}")"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
} >"$OUT/setup.log"

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl >>"$OUT/setup.log" 2>&1; then
        note "wheels installed from $WHEELS: $(cd "$WHEELS" && ls ./*.whl | tr '\n' ' ')"
    else
        note "wheel install from $WHEELS FAILED (see setup.log); going on without them"
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# kernels/ becomes pydistill.kernels only through pyproject's package-dir mapping, i.e. only
# in an install. The editable install keeps the checkout what runs; the copy (the installed
# layout built by hand in /tmp/site) needs neither setuptools nor pip, and PYTHONSAFEPATH
# keeps the checkout's pydistill/ (which lacks kernels/) from shadowing it under `python -m`.
kernels_importable() { (cd "$REPO" && "$PY" -c "import pydistill.kernels") >/dev/null 2>&1; }
install_editable() {
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO" \
        >>"$OUT/setup.log" 2>&1
}
install_copy() {
    mkdir -p /tmp/site && rm -rf /tmp/site/pydistill &&
        cp -r "$REPO/pydistill" /tmp/site/pydistill &&
        cp -r "$REPO/kernels" /tmp/site/pydistill/kernels &&
        cp -r "$REPO/examples" /tmp/site/pydistill/examples &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1
}
INSTALL=${INSTALL:-auto}
if kernels_importable; then
    note "pydistill.kernels already importable (installed)"
else
    case $INSTALL in
        editable) install_editable ;;
        copy) install_copy ;;
        *) install_editable && kernels_importable || install_copy ;;
    esac
    if kernels_importable; then
        note "pydistill installed for this run (INSTALL=$INSTALL; PYTHONSAFEPATH=${PYTHONSAFEPATH:-0})"
    else
        note "pydistill.kernels does NOT import: the Triton rows will fail (see setup.log)"
    fi
fi
# The checkout itself goes on the path only for the bench/ commands: on the path during the
# test suite it would make kernels/ importable as a top-level package, which a test forbids.
BENCH_PATH=${PYTHONPATH:+$PYTHONPATH:}$REPO

"$PY" - >>"$OUT/setup.log" 2>&1 <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("triton", "pydistill", "liger_kernel", "pytest_benchmark"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as exc:
        print(name, "not importable:", exc)
EOF

# ---- (b) the test suite on CUDA ----------------------------------------------------------
if [ "${SKIP_TESTS:-0}" = 1 ]; then
    note "tests: skipped (SKIP_TESTS=1)"
elif [ "$(left)" -lt 150 ]; then
    note "tests: skipped, only $(left) s of TIME_BUDGET left"
else
    limit=$(( ${TESTS_TIMEOUT:-210} < $(left) - 60 ? ${TESTS_TIMEOUT:-210} : $(left) - 60 ))
    timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ]; then
        echo "gpu_suite: test suite stopped after ${limit}s" | tee -a "$OUT/tests.log"
        failed=$(grep -o 'F' "$OUT/tests.log" | wc -l)
        note "tests: STOPPED after ${limit} s (TESTS_TIMEOUT), $failed F marks so far"
    else
        note "tests (exit $rc): $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
    fi
fi

# ---- (c) pytest-benchmark regressions (appended to tests.log) ----------------------------
if [ "${SKIP_PERF_TESTS:-0}" = 1 ]; then
    note "perf tests: skipped (SKIP_PERF_TESTS=1)"
elif [ "$(left)" -lt 150 ]; then
    note "perf tests: skipped, only $(left) s of TIME_BUDGET left"
else
    limit=$(( 60 < $(left) - 60 ? 60 : $(left) - 60 ))
    echo "==== bench/test_perf_softmax_divergence.py ====" >>"$OUT/tests.log"
    # importlib mode: pytest puts nothing on sys.path, so PYTHONPATH alone decides which
    # pydistill is imported.
    timeout "$limit" env PYTHONPATH="$BENCH_PATH" "$PY" -m pytest -q -p no:cacheprovider \
        --import-mode=importlib bench/test_perf_softmax_divergence.py \
        --benchmark-columns=min,median,max,rounds --benchmark-sort=fullname 2>&1 |
        tee /tmp/gpu_suite_perf.log
    rc=${PIPESTATUS[0]}
    cat /tmp/gpu_suite_perf.log >>"$OUT/tests.log"
    note "perf tests (exit $rc): $(grep -E '(passed|failed|error)' /tmp/gpu_suite_perf.log |
        tail -n 1)"
fi

# ---- (d) the benchmark -------------------------------------------------------------------
# run_bench NAME RESERVE ARGS...: bench.bench_softmax_divergence into $OUT/NAME.csv / .md,
# output appended to bench.log, leaving RESERVE seconds of the budget to what follows. No new
# implementation starts in the last 45 s; a hard stop 5 s before.
run_bench() {
    local name=$1 reserve=$2 rc ok total
    shift 2
    PYTHONUNBUFFERED=1 timeout $(( $(left) - reserve - 5 )) env PYTHONPATH="$BENCH_PATH" \
        "$PY" -m bench.bench_softmax_divergence "$@" --out "$OUT/$name.csv" \
        --time-limit $(( $(left) - reserve - 45 )) 2>&1 | tee -a "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    if [ -f "$OUT/$name.csv" ]; then
        ok=$(grep -c ',ok,' "$OUT/$name.csv")
        total=$(($(wc -l <"$OUT/$name.csv") - 1))
        note "$name (exit $rc): $ok of $total rows ok -> $name.csv / .md"
    else
        note "$name (exit $rc): no CSV written (see bench.log)"
    fi
}

# The second run times the two gradient schedules where they differ, grad_output != 1
# (pydistill/ops/softmax_divergence.py); the first keeps 75 s for it.
GRAD_ARGS=${GRAD_OUTPUT_ARGS:---impl pydistill-triton pydistill-triton-gradfwd liger \
--grad-output 0.5 --dtype bf16 --n 16384 --v 32000 128256}
grad_reserve=$([ "${SKIP_GRAD_OUTPUT:-0}" = 1 ] && echo 0 || echo 75)
if [ "${SKIP_BENCH:-0}" = 1 ]; then
    note "benchmark: skipped (SKIP_BENCH=1)"
elif [ "$(left)" -lt $((90 + grad_reserve)) ]; then
    note "benchmark: skipped, only $(left) s of TIME_BUDGET left"
else
    read -r -a bench_args <<<"${BENCH_ARGS:---full}"
    run_bench softmax_divergence "$grad_reserve" "${bench_args[@]}"
fi
if [ "${SKIP_BENCH:-0}" = 1 ] || [ "${SKIP_GRAD_OUTPUT:-0}" = 1 ]; then
    note "grad_output != 1 run: skipped"
elif [ "$(left)" -lt 60 ]; then
    note "grad_output != 1 run: skipped, only $(left) s of TIME_BUDGET left"
else
    read -r -a grad_args <<<"$GRAD_ARGS"
    run_bench softmax_divergence-grad_output 0 "${grad_args[@]}"
fi

# ---- summary -----------------------------------------------------------------------------
{
    echo "# gpu_suite summary"
    echo
    echo "$(head -n 3 "$OUT/setup.log" | tr '\n' ';' | sed 's/;/; /g')"
    echo
    printf '%s\n' "${SUMMARY[@]}"
    echo "- total: $(elapsed) s; results in $OUT"
    for md in "$OUT/softmax_divergence.md" "$OUT/softmax_divergence-grad_output.md"; do
        if [ -f "$md" ]; then
            echo
            echo "From $(basename "$md"):"
            sed -n '/^## Targets/,$p' "$md"
        fi
    done
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
