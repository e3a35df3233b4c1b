#!/usr/bin/env bash
# `make wheel-test`: the wheel in dist/ installed into a fresh environment (binaries
# only: nothing there may compile) and the test suite run against it, from outside
# the source tree, so that `import slothai` can only find the installed package.
# TORCH=... picks the torch (default: the Makefile's pinned CPU build); WHEEL_VENV=...
# reuses an environment instead of making .venv-wheel afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
wheel=$(ls dist/slothai-*.whl)
venv=${WHEEL_VENV:-$ROOT/.venv-wheel}
if [ -z "${WHEEL_VENV:-}" ]; then rm -rf "$venv"; python3 -m venv "$venv"; fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q --only-binary=:all: "${TORCH:-torch==2.13.0}" -r requirements-dev.txt
"$venv/bin/python" -m pip install -q --only-binary=:all: --no-deps --force-reinstall "$wheel"

run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
cp -r tests benchmarks "$run/"
cd "$run"
"$venv/bin/python" - <<'PY'
import os, torch, slothai
assert "site-packages" in slothai.__file__, slothai.__file__
print(f"slothai {slothai.__version__} from {os.path.dirname(slothai.__file__)}, torch {torch.__version__}, "
      f"binaries: {sorted(os.listdir(os.path.dirname(slothai._C.__file__) + '/lib'))}")
PY
# The CUDA 12 library's load test needs a libcudart.so.12: the one make wheel linked against.
SLOTHAI_TEST_CUDART_DIRS="$ROOT/.cuda12/lib64" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests
