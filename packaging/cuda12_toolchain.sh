#!/usr/bin/env bash
# A CUDA 12.4 compiler for the wheel's CUDA 12 kernels, assembled without a system
# install or root, into $1 (default .cuda12); prints its nvcc's path on stdout.
#
# No PyPI package can compile a .cu file for CUDA 12: every nvidia-cuda-nvcc-cu12
# wheel (12.1 ... 12.9) holds ptxas, libnvvm and headers, but no nvcc, cicc,
# cudafe++ or fatbinary. The front end comes from Debian's non-free
# nvidia-cuda-toolkit 12.4 (downloaded with a private apt state, unpacked, never
# installed); headers and libcudart.so.12 (to link against) from PyPI's cu12 wheels.
# nvcc 12.4 knows sm_50 ... sm_90: the CUDA 12 library carries sm_75 ... sm_90 and
# compute_90 PTX, which Blackwell cards compile at load (CUDA 13 torch builds get
# real sm_100 / sm_120 code from the system's nvcc 13).
set -euo pipefail
TK=$(mkdir -p "${1:-.cuda12}" && cd "${1:-.cuda12}" && pwd)
PY=${PYTHON:-python3}
DEB_VER=12.4.131~12.4.1-2
if [ -f "$TK/.ready" ]; then echo "$TK/bin/nvcc"; exit 0; fi
log() { echo "[cuda12] $*" >&2; }
W=$TK/download
rm -rf "$W" && mkdir -p "$W/apt/lists/partial" "$W/apt/cache/archives/partial" "$W/apt/pref" "$W/deb" \
    "$TK/bin/crt" "$TK/nvvm/bin" "$TK/nvvm/libdevice" "$TK/include" "$TK/lib64"

log "PyPI: the CUDA 12.4 headers and runtime"
"$PY" -m pip install -q --no-deps --no-compile --target "$W/py" nvidia-cuda-nvcc-cu12==12.4.131 \
    nvidia-cuda-runtime-cu12==12.4.127 nvidia-cuda-cccl-cu12==12.4.127.post1  # plain 12.4.127 is yanked
log "Debian: nvidia-cuda-toolkit $DEB_VER (the compiler front end)"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie non-free" \
    > "$W/apt/sources.list"
APT=(-o Dir::Etc::sourcelist="$W/apt/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$W/apt/lists"
     -o Dir::Cache="$W/apt/cache" -o Dir::Etc::preferencesparts="$W/apt/pref" -o Acquire::Languages=none
     -o APT::Sandbox::User=root)
apt-get "${APT[@]}" -q update >/dev/null
(cd "$W/deb" && apt-get "${APT[@]}" -q download "nvidia-cuda-toolkit=$DEB_VER" >/dev/null)
dpkg-deb -x "$W"/deb/nvidia-cuda-toolkit_*.deb "$W/x"

X=$W/x/usr
cp "$X/lib/nvidia-cuda-toolkit/bin/nvcc" "$TK/bin/"      # $X/bin/nvcc is a shell wrapper
cp "$X"/bin/{cudafe++,fatbinary,nvlink,bin2c,ptxas} "$TK/bin/"
cp "$X"/lib/nvidia-cuda-toolkit/bin/crt/*.stub "$TK/bin/crt/"
cp "$X/lib/nvidia-cuda-toolkit/bin/cicc" "$TK/nvvm/bin/"  # statically linked
cp "$X/lib/nvidia-cuda-toolkit/libdevice/libdevice.10.bc" "$TK/nvvm/libdevice/"
for d in cuda_runtime cuda_nvcc cuda_cccl; do cp -r "$W/py/nvidia/$d/include/." "$TK/include/"; done
find "$TK/include" \( -name __init__.py -o -name __pycache__ \) -prune -exec rm -rf {} +
cp "$W/py/nvidia/cuda_runtime/lib/libcudart.so.12" "$TK/lib64/"
ln -sf libcudart.so.12 "$TK/lib64/libcudart.so"
# Debian's own profile points at /usr and /etc: this one at the tree assembled here.
cat > "$TK/bin/nvcc.profile" <<'PROFILE'
TOP              = $(_HERE_)/..
CICC_PATH        = $(TOP)/nvvm/bin
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH            += $(CICC_PATH):$(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64"
CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
PROFILE
rm -rf "$W"
"$TK/bin/nvcc" --version | tail -1 >&2
touch "$TK/.ready"
echo "$TK/bin/nvcc"
