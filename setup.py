"""Builds slothai's two kinds of binaries, neither of which includes a torch header:

  slothai/_C.abi3.so                  csrc/core/*.c + csrc/module.c, C11, the CPython
                                      limited API (3.10): the CPU kernels and the
                                      entry points Python calls (slothai/ops/kernels.py)
  slothai/lib/libslothai_cuda<M>.so   csrc/core/*.cu (+ status.c), nvcc, one per CUDA
                                      major M, linked to libcudart.so.<M> (torch's)

so one wheel serves every torch release (>= 2.10), Python >= 3.10, CPU-only and
CUDA 12 / CUDA 13 torch builds. docs/wheel.md says why and how it was checked.

Which nvcc builds the CUDA library (SLOTHAI_NVCC, colon-separated, one per CUDA
major; SLOTHAI_CUDA=0 for none). By default: the nvcc of CUDA_HOME, PATH or /usr/local/cuda, unless
the torch this build can see has no CUDA (a CPU-only developer install). Targets:
SLOTHAI_CUDA_ARCHS (or TORCH_CUDA_ARCH_LIST), "7.5;9.0+PTX" form, else every
architecture from sm_75 up that the nvcc knows among DEFAULT_ARCHS, with the PTX
of the newest, so later cards JIT it.
"""
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = ["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]
C_FLAGS = ["-std=c11", "-O3", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra"]
# Host code without exceptions or thread-safe statics (one, a tuning knob read from the
# environment, benignly racy): then it needs nothing of the C++ runtime, and the
# library links with the C compiler against libc and libcudart alone.
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC", "-Xcompiler", "-ffp-contract=off",
              "-Xcompiler", "-fno-exceptions", "-Xcompiler", "-fno-threadsafe-statics"]


def nvccs():
    """The nvcc executables to build a CUDA library with."""
    if os.environ.get("SLOTHAI_CUDA") == "0" or os.environ.get("SLOTHAI_FORCE_CPU") == "1":
        return []
    if os.environ.get("SLOTHAI_NVCC"):
        return os.environ["SLOTHAI_NVCC"].split(":")
    try:
        import torch
        if torch.version.cuda is None:
            return []  # a CPU-only torch: nothing here would load the kernels
    except ImportError:
        pass  # an isolated build (a wheel): build what the toolchain can
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        print("slothai: no nvcc found (CUDA_HOME, PATH, /usr/local/cuda): building without CUDA kernels")
        return []
    return [nvcc]


def cuda_major(nvcc):
    out = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    return int(re.search(r"release (\d+)\.", out).group(1))


def gencodes(nvcc):
    """-gencode flags: the asked-for architectures, else DEFAULT_ARCHS that this nvcc knows, PTX on the newest."""
    asked = os.environ.get("SLOTHAI_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if asked:
        archs = [a for a in re.split(r"[;\s]+", asked.strip()) if a]
    else:
        known = subprocess.run([nvcc, "--list-gpu-arch"], check=True, capture_output=True, text=True).stdout.split()
        archs = [a for a in DEFAULT_ARCHS if f"compute_{a.replace('.', '')}" in known]
        archs[-1] += "+PTX"
    flags = []
    for a in archs:
        num = a.replace("+PTX", "").replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if a.endswith("+PTX"):
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def cudart_dir(nvcc):
    """The folder of the libcudart.so that this nvcc's toolkit links against (nvcc
    may be a wrapper script: its own dry run names the toolkit's folders)."""
    dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    here = re.search(r"_HERE_=(.*)", dry)
    tops = [os.path.dirname(here.group(1).strip())] if here else []
    tops.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for top in tops:
        for sub in ("lib64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib", "lib"):
            if glob.glob(os.path.join(top, sub, "libcudart.so*")):
                return os.path.join(top, sub)
    raise RuntimeError(f"no libcudart.so in the toolkit of {nvcc} (looked in {tops}: lib64, targets/*/lib)")


def build_cuda_library(nvcc, out_dir, tmp_dir):
    """csrc/core/*.cu (+ status.c for the status strings) -> out_dir/libslothai_cuda<major>.so."""
    major = cuda_major(nvcc)
    obj_dir = os.path.join(tmp_dir, f"cuda{major}")
    os.makedirs(obj_dir, exist_ok=True)
    core = os.path.join(ROOT, "csrc", "core")
    flags = NVCC_FLAGS + gencodes(nvcc) + ["-I", core]
    sources = sorted(glob.glob(os.path.join(core, "*.cu")))

    def compile_one(src):
        obj = os.path.join(obj_dir, os.path.basename(src) + ".o")
        subprocess.run([nvcc, *flags, "-c", src, "-o", obj], check=True)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        objects = list(pool.map(compile_one, sources))
    os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, f"libslothai_cuda{major}.so")
    # Linked by the C compiler, not nvcc (nothing here needs a device link, and nvcc's
    # link step asks for a libcudadevrt.a the CUDA 12 toolchain lacks): libc and the
    # CUDA runtime, dynamically (libcudart.so.<major>, the one torch has loaded), and
    # only the core's entry points exported.
    cc = os.environ.get("CC", "cc")
    status = os.path.join(obj_dir, "status.o")
    subprocess.run([cc, *C_FLAGS, "-c", os.path.join(core, "status.c"), "-o", status], check=True)
    subprocess.run([cc, "-shared", "-o", lib, *objects, status, f"-L{cudart_dir(nvcc)}", "-lcudart",
                    f"-Wl,--version-script={os.path.join(core, 'exports.map')}", "-Wl,--no-undefined"], check=True)
    return lib


class BuildExt(build_ext):
    """The `_C` extension as setuptools builds any C extension, then the CUDA libraries beside it."""

    def run(self):
        super().run()
        out_dir = os.path.join(ROOT if self.inplace else self.build_lib, "slothai", "lib")
        for nvcc in nvccs():
            print(f"slothai: building the CUDA kernels with {nvcc}")
            build_cuda_library(nvcc, out_dir, self.build_temp)


setup(
    ext_modules=[Extension(
        "slothai._C",
        sources=sorted(glob.glob("csrc/core/*.c")) + ["csrc/module.c"],
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("Py_LIMITED_API", "0x030A0000")],
        py_limited_api=True,
        extra_compile_args=C_FLAGS,
        extra_link_args=["-pthread"],
        libraries=["dl"],  # dlopen, in libc itself only from glibc 2.34
    )],
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
