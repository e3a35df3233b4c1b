"""Builds slothai._C: the C core, the torch registration layer and the CPython module.

CUDA sources are compiled when torch has CUDA and nvcc is found (CUDA_HOME),
for sm_75..sm_90 plus PTX unless TORCH_CUDA_ARCH_LIST says otherwise;
otherwise a CPU-only extension is built. Install with
`pip install --no-build-isolation .` so the torch already installed is used.

Which files are built, by name (no list to keep up to date):
  csrc/core/*.c, csrc/module.c     C11, always (compiled by BuildC below)
  csrc/torch/*.cpp                 C++, always, EXCEPT files ending in `_cuda.cpp`:
  csrc/torch/*_cuda.cpp            C++ that includes CUDA headers (CUDA registrations),
                                   only in a CUDA build
  csrc/core/*.cu                   nvcc, only in a CUDA build
So a new op's CUDA registration goes in csrc/torch/<op>_cuda.cpp and its kernel in
csrc/core/<op>_cuda.cu; CONTRIBUTING.md lists the rest.
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
C_FLAGS = ["-std=c11", "-O3", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra"]


def want_cuda():
    import torch

    if os.environ.get("SLOTHAI_FORCE_CPU") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


class BuildC(BuildExtension):
    """torch's BuildExtension compiles every non-CUDA file as C++; the core and
    the module are C11, so compile them here with the C compiler and link the
    objects in."""

    def build_extensions(self):
        for ext in self.extensions:
            c_sources = [s for s in ext.sources if s.endswith(".c")]
            ext.sources = [s for s in ext.sources if not s.endswith(".c")]
            objects = self.compiler.compile(
                c_sources,
                output_dir=self.build_temp,
                include_dirs=ext.include_dirs,
                macros=[("Py_LIMITED_API", "0x03090000")],
                extra_postargs=C_FLAGS,
            )
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extensions()


def extension():
    cuda = want_cuda()
    sources = sorted(glob.glob("csrc/core/*.c")) + ["csrc/module.c"]
    sources += [s for s in sorted(glob.glob("csrc/torch/*.cpp")) if cuda or not s.endswith("_cuda.cpp")]  # see above
    cxx = ["-O3", "-ffp-contract=off"]  # torch adds Py_LIMITED_API for py_limited_api=True
    kwargs = dict(
        name="slothai._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,
        extra_compile_args={"cxx": cxx},
    )
    if not cuda:
        return CppExtension(sources=sources, **kwargs)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    sources += sorted(glob.glob("csrc/core/*.cu"))
    kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]
    return CUDAExtension(sources=sources, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildC.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
