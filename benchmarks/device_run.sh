#!/usr/bin/env bash
# On a GPU machine: build for its card, then run the steps named, in order.
#   bash benchmarks/device_run.sh [tests] [sanitize] [racecheck] [t4] [wheel] [configs] [bench_dequant] [bench_fused_ce] [bench_qlora] ...
# `wheel` installs the wheel carried in dist/ (`make wheel` here; carry ["dist"]) into
# /tmp/slothai-wheel, runs the suite against it from outside the tree, and leaves it
# first on PYTHONPATH, so that the steps after it measure the wheel, not the source build.
# TORCH_CUDA_ARCH_LIST overrides the card's own architecture; CC / CXX pick the
# compiler (see CONTRIBUTING.md); logs go to $OUT (default /tmp/out). Wheels the
# machine lacks (bitsandbytes, liger-kernel, cut-cross-entropy) can be unpacked
# under .whl/site: that folder is put on PYTHONPATH. Anything else (a benchmark
# with options) runs after this script in the same shell: `... && python3 benchmarks/bench_qlora.py --full`.
# SANITIZE_FILES (default: tests) narrows `sanitize` to some test files, WHEEL_TESTS (default:
# tests) the `wheel` step's. BUILD=0 skips the source build (a call that measures the wheel only);
# after `wheel`, `sanitize` runs from the wheel's test folder, so it checks the wheel too.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.whl/site:${PYTHONPATH:-}"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
arch=${TORCH_CUDA_ARCH_LIST:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)}
t0=$(date +%s)
if [ "${BUILD:-1}" != 0 ]; then
  TORCH_CUDA_ARCH_LIST=$arch python3 -m pip install -q --no-build-isolation --no-deps -e . \
    >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "built for $arch in $(( $(date +%s) - t0 )) s"
fi
# The suite over 10 processes where pytest-xdist is there (the CUDA image has it: ~2400
# tests do not fit one call otherwise), each test's outcome on its own line as it ends,
# so that a run cut short by the call's limit still names what failed.
PYTEST_ARGS="-rfE -v"
python3 -c "import xdist" 2>/dev/null && PYTEST_ARGS="$PYTEST_ARGS -n ${JOBS:-10}"
status=0
testdir=$PWD
for step in "$@"; do
  case "$step" in
    tests) python3 -X faulthandler -m pytest $PYTEST_ARGS tests >"$OUT/tests.log" 2>&1; rc=$?
           grep -B2 -A12 "Fatal Python\|Current thread" "$OUT/tests.log" | head -40
           grep -E "(FAILED|ERROR) tests/" "$OUT/tests.log" | head -30; tail -3 "$OUT/tests.log"
           [ $rc -eq 0 ] || { echo "tests failed: rc $rc"; status=1; } ;;
    sanitize) (cd "$testdir" && timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x \
                -p no:cacheprovider ${SANITIZE_FILES:-tests} -k "cuda and not compile and not graphs and not opcheck" \
                >"$OUT/sanitize.log" 2>&1)
              rc=$?; echo "compute-sanitizer rc=$rc"; [ $rc -eq 0 ] || status=1
              grep -E "ERROR SUMMARY|passed|failed|Invalid" "$OUT/sanitize.log" | head -8 ;;
    wheel) python3 -m pip install -q --no-deps --target /tmp/slothai-wheel dist/slothai-*.whl || { status=1; continue; }
           export PYTHONPATH="/tmp/slothai-wheel:$PYTHONPATH"; run=$(mktemp -d); cp -r tests benchmarks "$run/"; testdir=$run
           (cd "$run" && python3 -c "import slothai; print('wheel:', slothai.__file__)" &&
            timeout ${WHEEL_TIMEOUT:-3600} python3 -X faulthandler -m pytest $PYTEST_ARGS -p no:cacheprovider \
              ${WHEEL_TESTS:-tests} >"$OUT/wheel_tests.log" 2>&1)
           rc=$?; grep -E "(FAILED|ERROR) tests/" "$OUT/wheel_tests.log" | head -30; tail -3 "$OUT/wheel_tests.log"; [ $rc -eq 0 ] || { echo "wheel tests failed: rc $rc"; status=1; } ;;
    t4) # The T4-level build (sm_75 + PTX, which the driver compiles for this card) of the same
        # source, installed apart and first on the path, through the kernels' CUDA tests.
        SLOTHAI_CUDA_ARCHS="7.5+PTX" python3 -m pip install -q --no-build-isolation --no-deps \
          --target /tmp/slothai-sm75 . >"$OUT/t4_build.log" 2>&1 || { tail -20 "$OUT/t4_build.log"; status=1; continue; }
        run=$(mktemp -d); cp -r tests "$run/"
        (cd "$run" && PYTHONPATH="/tmp/slothai-sm75:$PYTHONPATH" python3 -m pytest $PYTEST_ARGS -p no:cacheprovider \
           -k cuda tests/test_nf4_matmul.py tests/test_nf4_linear.py tests/test_dequant_nf4.py tests/test_fused_ce.py \
           tests/test_fused_ce_options.py tests/test_scale.py >"$OUT/t4.log" 2>&1)
        rc=$?; grep -E "(FAILED|ERROR) tests/" "$OUT/t4.log" | head -20; tail -2 "$OUT/t4.log"
        [ $rc -eq 0 ] || { echo "sm_75+PTX tests failed: rc $rc"; status=1; } ;;
    configs) # The 4-bit product's default (config 0) and tuning configs (TUNE_CONFIGS, default "3";
             # csrc/core/nf4_matmul_cuda.cu's launch_decode): one sweep (each config checked against
             # dequantize + cuBLAS before it is timed), then each config's kernel tests and memcheck
             # (TEST_CONFIGS: those configs only), time-limited (a copy that never lands hangs).
             (cd "$testdir" && SWEEP_CONFIGS="0 ${TUNE_CONFIGS:-3}" SWEEP_M="${SWEEP_M:-1 16}" \
                python3 benchmarks/bench_nf4_matmul.py --sweep 2>&1 | tee "$OUT/sweep.log" | tail -30)
             for c in ${TEST_CONFIGS:-0 ${TUNE_CONFIGS:-3}}; do
               (cd "$testdir" && SLOTHAI_NF4MM_CONFIG=$c timeout 240 python3 -m pytest $PYTEST_ARGS -p no:cacheprovider -k cuda \
                  tests/test_nf4_matmul.py tests/test_nf4_group.py tests/test_lora_linear4bit.py >"$OUT/config$c.log" 2>&1)
               rc=$?; echo "config $c tests rc=$rc: $(tail -1 "$OUT/config$c.log")"; [ $rc -eq 0 ] || status=1
               (cd "$testdir" && SLOTHAI_NF4MM_CONFIG=$c timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
                  python3 -m pytest -q -x -p no:cacheprovider tests/test_nf4_matmul.py tests/test_nf4_group.py \
                  -k "cuda and not compile and not graphs and not opcheck" >"$OUT/config${c}_memcheck.log" 2>&1)
               rc=$?; echo "config $c memcheck rc=$rc"; [ $rc -eq 0 ] || status=1
               grep -E "ERROR SUMMARY|passed|failed" "$OUT/config${c}_memcheck.log" | head -3
             done ;;
    racecheck) # compute-sanitizer's shared-memory race check over the 4-bit kernels' tests (RACECHECK_K, default
               # the streaming kernel's LoRA-term test: its cp.async ring across several tiles a CTA)
               (cd "$testdir" && timeout 300 compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest -q -x \
                  -p no:cacheprovider tests/test_nf4_matmul.py tests/test_nf4_group.py \
                  -k "${RACECHECK_K:-streaming_kernel and cuda and dtype1}" >"$OUT/racecheck.log" 2>&1)
               rc=$?; echo "racecheck rc=$rc"; [ $rc -eq 0 ] || status=1
               grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$OUT/racecheck.log" | head -4 ;;
    bench_*) [ -f "benchmarks/$step.py" ] || { echo "no benchmarks/$step.py"; status=1; continue; }
             python3 "benchmarks/$step.py" 2>&1 | tee "$OUT/$step.log" | tail -40 ;;
    *) echo "unknown step '$step' (tests, sanitize, racecheck, t4, wheel, configs, bench_<name>)"; status=1 ;;
  esac
done
exit $status
