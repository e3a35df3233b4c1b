"""The C core's kernels (slothai._C: csrc/module.c, csrc/core/slothai.h) called on
tensors' memory: the argument checks every op shares, and `launch`, which runs an
entry point on the CPU (over torch's thread count) or on CUDA (on the current
stream of the tensors' device, from the library built for torch's CUDA major).
"""
import math
import os

import torch

from .. import _C

DTYPES = {torch.float32: _C.FLOAT32, torch.float16: _C.FLOAT16, torch.bfloat16: _C.BFLOAT16}
CUDA_LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib",
                            "libslothai_cuda{major}.so")


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def core_dtype(dtype, name):
    """The core's code for a float32 / float16 / bfloat16 dtype; TypeError naming `name` for any other."""
    code = DTYPES.get(dtype)
    if code is None:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype_name(dtype)}")
    return code


def check_dtype(t, want, name):
    if t.dtype != want:
        raise TypeError(f"{name} must be {dtype_name(want)}, got {dtype_name(t.dtype)}")


def check_device(t, want, name):
    if t.device != want:
        raise ValueError(f"{name} must be on {want} (where the first input is), got {t.device}")


def is_pow2(v):
    return v > 0 and v & (v - 1) == 0


def ptr(t):
    """A tensor's data pointer for the core (0, its NULL, for None)."""
    return 0 if t is None else t.data_ptr()


def rows_of(x):
    """The number of rows of x (all dims but the last, multiplied)."""
    return math.prod(x.shape[:-1])


_cuda_loaded = False


def cuda_major():
    """The CUDA major whose kernels load: torch's, or SLOTHAI_CUDA_VERSION's (as bitsandbytes'
    BNB_CUDA_VERSION: the other major's library, its libcudart.so.<major> found by the dynamic
    linker, e.g. on LD_LIBRARY_PATH; for testing that library in this process)."""
    return os.environ.get("SLOTHAI_CUDA_VERSION") or (torch.version.cuda or "").split(".")[0]


def cuda_library():
    """The CUDA kernels' library for `cuda_major()` (a path; it may not exist), and every one
    this install carries."""
    path = CUDA_LIBRARY.format(major=cuda_major())
    folder = os.path.dirname(path)
    return path, sorted(f for f in os.listdir(folder) if f.endswith(".so")) if os.path.isdir(folder) else []


def _load_cuda():
    global _cuda_loaded
    path, built = cuda_library()
    major = cuda_major()
    if not os.path.exists(path):
        chosen = f"SLOTHAI_CUDA_VERSION={major}" if os.environ.get("SLOTHAI_CUDA_VERSION") else \
            f"CUDA {torch.version.cuda}"
        raise RuntimeError(
            f"slothai has no CUDA kernels for this torch ({torch.__version__}, {chosen}): "
            f"{os.path.basename(path)} is not in {os.path.dirname(path)} (built: {built or 'none'}). Install a "
            f"slothai wheel, or build from source with an nvcc {major}.x (README, Install)")
    _C.load_cuda(path)
    _cuda_loaded = True


def launch(entry, device, *fields):
    """_C's `entry` with `fields` (its core argument block's, csrc/module.c) on `device`."""
    if device.type == "cpu":
        return entry(False, torch.get_num_threads(), *fields)
    if not _cuda_loaded:
        _load_cuda()
    index = device.index
    if index == torch._C._cuda_getDevice():  # (initialised: a tensor lives there)
        return entry(True, torch._C._cuda_getCurrentRawStream(index), *fields)
    with torch.cuda.device(index):  # the core launches on the current device
        return entry(True, torch._C._cuda_getCurrentRawStream(index), *fields)
