"""What makes one wheel serve every torch release, checked on the binaries this
install carries (docs/wheel.md): nothing compiled references torch, `_C` needs only
the C library and the limited CPython API, each CUDA library only its own major's
CUDA runtime, and the CUDA library chosen is the one of torch's CUDA major."""
import ctypes
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import slothai
from slothai import _C
from slothai.ops import kernels

PACKAGE = os.path.dirname(slothai.__file__)
CUDA_LIBRARIES = sorted(glob.glob(os.path.join(PACKAGE, "lib", "libslothai_cuda*.so")))
# What a binary of ours may ask the dynamic linker for: the C runtime (glibc's
# parts), and for a CUDA library the CUDA runtime of its own major, which torch loads.
SYSTEM = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "ld-linux-x86-64.so.2"}


def _tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs {name} (binutils)")
    return path


def _needed(lib):
    out = subprocess.run([_tool("readelf"), "-d", lib], check=True, capture_output=True, text=True).stdout
    return {line.split("[")[1].split("]")[0] for line in out.splitlines() if "(NEEDED)" in line}


def _undefined(lib):
    out = subprocess.run([_tool("nm"), "-D", "--undefined-only", lib], check=True, capture_output=True,
                         text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def _major(lib):
    return os.path.basename(lib)[len("libslothai_cuda"):-len(".so")]


@pytest.mark.parametrize("lib", [_C.__file__, *CUDA_LIBRARIES], ids=os.path.basename)
def test_no_binary_references_torch(lib):
    torchy = [s for s in _undefined(lib) if s.startswith(("_ZN2at", "_ZN3c10", "_ZN5torch", "aoti_torch", "torch_"))]
    assert torchy == []
    assert not any(n.startswith(("libtorch", "libc10")) for n in _needed(lib))


def test_c_module_needs_only_the_c_library_and_the_limited_api():
    assert _needed(_C.__file__) <= SYSTEM
    assert _C.__file__.endswith(".abi3.so")


@pytest.mark.parametrize("lib", CUDA_LIBRARIES or [None], ids=lambda p: os.path.basename(p or "none"))
def test_cuda_library_needs_only_its_own_cuda_runtime(lib):
    if lib is None:
        pytest.skip("this install carries no CUDA library (a CPU-only build)")
    assert _needed(lib) <= SYSTEM | {f"libcudart.so.{_major(lib)}"}  # libstdc++ linked in statically
    exported = subprocess.run([_tool("nm"), "-D", "--defined-only", lib], check=True, capture_output=True,
                              text=True).stdout
    for entry in ("slothai_dequant_nf4_cuda", "slothai_nf4_matmul_cuda", "slothai_fused_ce_rows_cuda",
                  "slothai_scale_cuda"):
        assert entry in exported


def _cudart(major):
    """A libcudart.so.<major> on this machine: torch's own (its nvidia package), a CUDA toolkit's, or
    one in SLOTHAI_TEST_CUDART_DIRS (make wheel-test names the CUDA 12 toolchain's)."""
    roots = [os.path.dirname(torch.__file__) + "/..", "/usr/local/cuda", "/usr/local/cuda-*", "/usr/lib/x86_64-linux-gnu",
             *filter(None, os.environ.get("SLOTHAI_TEST_CUDART_DIRS", "").split(":"))]
    for root in roots:
        found = glob.glob(os.path.join(root, "**", f"libcudart.so.{major}"), recursive=True)
        if found:
            return found[0]
    return None


def _runtime_of(lib):
    """The libcudart.so.<major> of CUDA library `lib`; skips without one (or without `lib`)."""
    if lib is None:
        pytest.skip("this install carries no CUDA library (a CPU-only build)")
    runtime = _cudart(_major(lib))
    if runtime is None:
        pytest.skip(f"no libcudart.so.{_major(lib)} on this machine")
    return runtime


@pytest.mark.parametrize("lib", CUDA_LIBRARIES or [None], ids=lambda p: os.path.basename(p or "none"))
def test_cuda_library_loads_beside_its_cuda_runtime(lib):
    # The dynamic linker takes an already loaded libcudart.so.<major> (as torch's is
    # in a CUDA process); loading needs no GPU.
    runtime = _runtime_of(lib)
    ctypes.CDLL(runtime, mode=ctypes.RTLD_GLOBAL)
    loaded = ctypes.CDLL(lib)
    assert loaded.slothai_nf4_matmul_cuda is not None


# A kernel of each CUDA library launched in a process without torch, through its own
# major's runtime alone: the check that the CUDA 12 build runs on a GPU although the
# torch here is a CUDA 13 one. scale multiplies x by a factor read on the device.
_SCALE_ON_THE_GPU = """
import ctypes, sys
rt = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
lib = ctypes.CDLL(sys.argv[2])
count = ctypes.c_int(0)
if rt.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
    print("NO GPU"); sys.exit(0)
n = 1003  # not a whole number of 16-byte vectors
host = (ctypes.c_float * (n + 1))(*[0.5 * i - 7 for i in range(n)], 2.5)
dev = ctypes.c_void_p()
assert rt.cudaMalloc(ctypes.byref(dev), ctypes.c_size_t(4 * (n + 1))) == 0
assert rt.cudaMemcpy(dev, host, ctypes.c_size_t(4 * (n + 1)), 1) == 0  # host to device
lib.slothai_scale_cuda.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
status = lib.slothai_scale_cuda(dev, 0, n, ctypes.c_void_p(dev.value + 4 * n), None)  # SLOTHAI_FLOAT32
assert status == 0 and rt.cudaDeviceSynchronize() == 0, status
back = (ctypes.c_float * n)()
assert rt.cudaMemcpy(back, dev, ctypes.c_size_t(4 * n), 2) == 0  # device to host
assert list(back) == [2.5 * (0.5 * i - 7) for i in range(n)]
print("SCALED")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("lib", CUDA_LIBRARIES or [None], ids=lambda p: os.path.basename(p or "none"))
def test_cuda_library_runs_a_kernel_beside_its_own_runtime_without_torch(lib):
    runtime = _runtime_of(lib)
    out = subprocess.run([sys.executable, "-c", _SCALE_ON_THE_GPU, runtime, lib],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "SCALED", out.stdout + out.stderr


def test_the_cuda_library_of_torchs_major_is_the_one_chosen(monkeypatch, tmp_path):
    monkeypatch.delenv("SLOTHAI_CUDA_VERSION", raising=False)  # (set where the other major's library is tested)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(kernels, "CUDA_LIBRARY", str(tmp_path / "libslothai_cuda{major}.so"))
    (tmp_path / "libslothai_cuda13.so").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"CUDA 12\.8.*libslothai_cuda12\.so is not in .*built: "
                                           r"\['libslothai_cuda13\.so'\]"):
        kernels._load_cuda()


def test_slothai_cuda_version_picks_the_other_majors_library(monkeypatch, tmp_path):
    # As bitsandbytes' BNB_CUDA_VERSION: the CUDA 12 library in a CUDA 13 torch process (its
    # runtime found by the dynamic linker), how the GPU machine's CUDA 13 image tests it.
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(kernels, "CUDA_LIBRARY", str(tmp_path / "libslothai_cuda{major}.so"))
    monkeypatch.setenv("SLOTHAI_CUDA_VERSION", "12")
    assert kernels.cuda_library() == (str(tmp_path / "libslothai_cuda12.so"), [])
    (tmp_path / "libslothai_cuda13.so").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"SLOTHAI_CUDA_VERSION=12\): libslothai_cuda12\.so is not in"):
        kernels._load_cuda()


# The limited-API claim, tested: `_C` (which needs no torch) loaded by every other
# CPython >= 3.10 on the machine, scaling a buffer through the core.
_SCALE_WITHOUT_TORCH = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
_C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_C)
x, factor = (ctypes.c_float * 5)(1, 2, 3, 0, -4), ctypes.c_float(2.5)
_C.scale(False, 2, ctypes.addressof(x), _C.FLOAT32, 5, ctypes.addressof(factor))
print(sys.version_info[:2], list(x))
"""


def _python(minor):
    """A python3.<minor> interpreter on this machine (pyenv's shims only dispatch: look past them)."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(os.path.join(root, "versions", f"3.{minor}.*", "bin", f"python3.{minor}")))
    on_path = shutil.which(f"python3.{minor}")
    return found[-1] if found else on_path if on_path and "shims" not in on_path else None


@pytest.mark.parametrize("minor", [10, 12, 13, 14])
def test_c_module_runs_on_every_python_from_3_10(minor):
    python = _python(minor)
    if python is None:
        pytest.skip(f"no python3.{minor} on this machine")
    out = subprocess.run([python, "-c", _SCALE_WITHOUT_TORCH, _C.__file__], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"(3, {minor}) [2.5, 5.0, 7.5, 0.0, -10.0]"


def test_info_names_the_binaries_and_the_cuda_library_torch_takes(capsys, monkeypatch):
    from slothai.__main__ import main

    monkeypatch.delenv("SLOTHAI_CUDA_VERSION", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main(["info"])
    out = capsys.readouterr().out
    assert f"slothai {slothai.__version__} at {PACKAGE}" in out
    assert "C module: _C.abi3.so" in out
    want = "libslothai_cuda12.so" + ("" if os.path.exists(os.path.join(PACKAGE, "lib", "libslothai_cuda12.so"))
                                     else " MISSING")
    assert f"for CUDA 12.6: {want}\n" in out
