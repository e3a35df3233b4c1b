"""Unsloth: a `FastLanguageModel` keeps its own loss head and LoRA paths; its
`fast_dequantize` is routed to slothai's op for NF4 (with Unsloth's own signature)."""
import sys

import torch

from ..ops import dequantize_nf4


def _is_unsloth(model):
    config = getattr(model, "config", None)
    return getattr(config, "unsloth_version", None) is not None


def _unsloth_fast_dequantize(W, quant_state=None, out=None, use_global_buffer=False, dtype=None):
    """Unsloth's `fast_dequantize(W, quant_state, out, use_global_buffer, dtype)` on top of
    slothai's op for bitsandbytes NF4 states; every other format (fp4, int4, fp8, MXFP4,
    NVFP4, the legacy list form) goes to Unsloth's own function. As in Unsloth, `dtype`
    steers only fp8 and an NF4 weight comes out in `quant_state.dtype`; the scratch
    buffer of `use_global_buffer` is Unsloth's decode optimisation, not needed here."""
    if quant_state is None or type(quant_state).__name__ != "QuantState" or \
            getattr(quant_state, "quant_type", None) != "nf4" or W.dtype == torch.float8_e4m3fn:
        return _UNSLOTH_ORIGINAL["fast_dequantize"](W, quant_state, out=out, use_global_buffer=use_global_buffer,
                                                    dtype=dtype)
    w = dequantize_nf4(W, quant_state)
    if out is not None:
        out.copy_(w)
        w = out
    return w.t() if W.shape[0] == 1 else w  # Unsloth passes W.t() of the (n/2, 1) codes and expects W^T back


_UNSLOTH_ORIGINAL = {}


def _patch_unsloth():
    """If Unsloth is loaded, send its fast_dequantize (and the modules that
    imported it by name) to slothai's op."""
    utils = sys.modules.get("unsloth.kernels.utils")
    if utils is None or "fast_dequantize" in _UNSLOTH_ORIGINAL:
        return
    original = _UNSLOTH_ORIGINAL["fast_dequantize"] = utils.fast_dequantize
    for name, mod in list(sys.modules.items()):
        if name.startswith("unsloth") and getattr(mod, "fast_dequantize", None) is original:
            mod.fast_dequantize = _unsloth_fast_dequantize


def _unpatch_unsloth():
    original = _UNSLOTH_ORIGINAL.pop("fast_dequantize", None)
    if original is None:
        return
    for name, mod in list(sys.modules.items()):
        if name.startswith("unsloth") and getattr(mod, "fast_dequantize", None) is _unsloth_fast_dequantize:
            mod.fast_dequantize = original
