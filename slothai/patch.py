"""`slothai.patch(model)`: route a Hugging Face / PEFT / bitsandbytes QLoRA model
through slothai's ops, in place; `slothai.unpatch(model)` undoes it.

- Every bitsandbytes NF4 `Linear4bit` (bare, or the base layer inside PEFT's
  LoRA wrapper) computes through `slothai::dequant_nf4`, and its backward
  dequantizes again instead of keeping the dense weight.
- Causal-LM heads of the families in `CAUSAL_LM_FAMILIES` compute the training
  loss with `fused_linear_cross_entropy` from the last hidden states when labels
  are given: the [tokens x vocab] logits are never built, and the output's
  `logits` is None. Without labels the model's own forward runs unchanged.
- If Unsloth is importable, its `fast_dequantize` is routed to slothai's op.

This module is the one place that knows about model families; the ops know
nothing about models.
"""
import dataclasses
import functools
import sys

import torch
import torch.nn.functional as F

from .fused_ce import fused_linear_cross_entropy
from .nf4 import dequantize_nf4, nf4_linear

# model_type -> config attribute holding the final-logit softcap (None: no softcap).
CAUSAL_LM_FAMILIES = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "gemma": None,
    "gemma2": "final_logit_softcapping",
    "gemma3_text": "final_logit_softcapping",
}

_ORIGINAL = "_slothai_original_forward"


def _is_bnb_linear4bit(module):
    cls = type(module)
    return cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes") and \
        getattr(getattr(module.weight, "quant_state", None), "quant_type", None) == "nf4"


def _standard_layout(module):
    """bitsandbytes (>= 0.49) repacks CPU weights into its own inference layout on
    an eval-mode forward without grad; put them back as bitsandbytes itself does
    before saving, so the codes are NF4 as stored."""
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, module.weight.quant_state)


def _linear4bit_forward(self, x):
    """bitsandbytes Linear4bit.forward, with slothai's one-launch dequant."""
    _standard_layout(self)
    inp_dtype = x.dtype
    if getattr(self, "compute_dtype", None) is not None:
        x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return nf4_linear(x, self.weight, bias).to(inp_dtype)


def _causal_lm_forward(self, *args, labels=None, **kwargs):
    """The family's CausalLM forward, but the loss comes from the hidden states."""
    original = getattr(self, _ORIGINAL)
    head = self.lm_head
    if labels is None or len(args) > 1 or kwargs.get("return_dict") is False or \
            not isinstance(head, torch.nn.Linear):
        return original(*args, labels=labels, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    kwargs.pop("logits_to_keep", None)
    outputs = self.model(*args, **kwargs)
    hidden = outputs[0]
    if shift_labels is None:  # tokens < n predict n, as transformers' ForCausalLMLoss
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    softcap_attr = CAUSAL_LM_FAMILIES.get(self.config.model_type)
    softcap = getattr(self.config, softcap_attr, None) if softcap_attr else None
    chunk_bytes = getattr(self, "slothai_loss_chunk_bytes", None)  # set by slothai.compile(low_memory=True)
    chunk = max(1, chunk_bytes // (head.weight.shape[0] * head.weight.element_size())) if chunk_bytes else None
    loss = fused_linear_cross_entropy(
        hidden.to(head.weight.dtype), head.weight, shift_labels.to(hidden.device), head.bias,
        ignore_index=ignore_index, reduction="mean" if num_items is None else "sum", softcap=softcap,
        chunk_size=chunk)
    if num_items is not None:  # gradient accumulation: transformers divides the sum by it
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    output_cls, fields = _OUTPUT
    rest = {k: v for k, v in outputs.items() if k in fields and k not in ("loss", "logits")}
    return output_cls(loss=loss, logits=None, **rest)


_OUTPUT = []  # (CausalLMOutputWithPast, its field names), read at patch time, outside any trace


def _load_output_class():
    if not _OUTPUT:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        _OUTPUT.extend([CausalLMOutputWithPast, frozenset(f.name for f in dataclasses.fields(CausalLMOutputWithPast))])


def _is_causal_lm(module):
    config = getattr(module, "config", None)
    return type(module).__name__.endswith("ForCausalLM") and hasattr(module, "lm_head") and \
        hasattr(module, "model") and getattr(config, "model_type", None) in CAUSAL_LM_FAMILIES


def _set_forward(module, fn):
    if _ORIGINAL not in module.__dict__:
        setattr(module, _ORIGINAL, module.forward)

    # A plain function with the original's signature (functools.wraps): callers
    # such as transformers' Trainer read forward's parameters to pick columns.
    @functools.wraps(module.__dict__[_ORIGINAL])
    def forward(*args, **kwargs):
        return fn(module, *args, **kwargs)

    module.forward = forward


def _is_unsloth(model):
    config = getattr(model, "config", None)
    return getattr(config, "unsloth_version", None) is not None


def patch(model, *, linear4bit=True, loss=True):
    """Patch `model` in place (idempotent) and return it. See the module docstring."""
    if _is_unsloth(model):
        # A FastLanguageModel computes its own chunked fused loss from the hidden
        # states; slothai leaves its head alone and serves its NF4 dequantization.
        loss = False
    for module in model.modules():
        if linear4bit and _is_bnb_linear4bit(module):
            _set_forward(module, _linear4bit_forward)
        elif loss and _is_causal_lm(module):
            _load_output_class()
            _set_forward(module, _causal_lm_forward)
    _patch_unsloth()
    return model


def unpatch(model):
    """Undo `patch`: every patched module gets its own forward back (and Unsloth
    its own fast_dequantize)."""
    for module in model.modules():
        if _ORIGINAL in module.__dict__:
            del module.__dict__["forward"]
            delattr(module, _ORIGINAL)
    _unpatch_unsloth()
    return model


def is_patched(module):
    return _ORIGINAL in module.__dict__


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
