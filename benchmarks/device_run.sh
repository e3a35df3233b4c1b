#!/usr/bin/env bash
# One call on the lent GPU: build, CUDA tests, compute-sanitizer, benchmarks.
#   bash benchmarks/device_run.sh [tests] [sanitize] [bench_dequant] [bench_fused_ce] ...
# Wheels the device lacks (bitsandbytes, liger-kernel, cut-cross-entropy) are
# unpacked under .whl/site and carried with the call.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.whl/site:${PYTHONPATH:-}"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The image's default /opt/gcc (a devtoolset) links parts of libstdc++ statically
# into the extension; streaming an integer into a c10 error message then crashes
# against torch's libstdc++. Build with the system compiler when there is one.
[ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python3 -m pip install -q --no-build-isolation --no-deps -e . \
  >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
for step in "$@"; do
  case "$step" in
    tests) python3 -X faulthandler -m pytest -q -x tests >"$OUT/tests.log" 2>&1; rc=$?
           grep -B2 -A12 "Fatal Python\|Current thread" "$OUT/tests.log" | head -40; tail -15 "$OUT/tests.log"
           [ $rc -eq 0 ] || echo "tests failed: rc $rc" ;;
    sanitize) timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x \
                -p no:cacheprovider tests -k "cuda and not compile and not opcheck" >"$OUT/sanitize.log" 2>&1
              echo "compute-sanitizer rc=$?"; grep -E "ERROR SUMMARY|passed|failed|Invalid" "$OUT/sanitize.log" | head -8 ;;
    bench_*) python3 "benchmarks/$step.py" 2>&1 | tee "$OUT/$step.log" | tail -40 ;;
    *) eval "$step" ;;
  esac
done
