"""`slothai.patch(model)`: route a Hugging Face / PEFT / bitsandbytes QLoRA model
through slothai's ops, in place; `slothai.unpatch(model)` undoes it.

- Every bitsandbytes NF4 `Linear4bit` (bare, or the base layer inside PEFT's
  LoRA wrapper) computes through `slothai::dequant_nf4`, and its backward
  dequantizes again instead of keeping the dense weight.
- Causal-LM heads of the families in `CAUSAL_LM_FAMILIES` compute the training
  loss with `fused_linear_cross_entropy` from the last hidden states when labels
  are given: the [tokens x vocab] logits are never built, and the output's
  `logits` is None. Without labels the model's own forward runs unchanged; with
  `keep_logits=True` the head is left alone.
- If Unsloth is importable, its `fast_dequantize` is routed to slothai's op.
- If TRL is loaded and has no kernel for its fused LM head here (no Triton: the
  CPU), slothai supplies one (see slothai/trl.py).

The head patched is the module that owns `lm_head` and the backbone (e.g.
`LlamaForCausalLM`), never a wrapper around it (PEFT's `PeftModelForCausalLM`,
whose forward calls the inner model's): one patched forward is never called
from another.

A patched module's `forward` is a `_Forward` object in its instance dict, not a
closure: it names the module it serves, so `copy.deepcopy` gives the copy a
forward of its own and pickle / `torch.save` store and restore it (the copy, or
the loaded model, is patched and computes with its own weights).

This module is the one place that knows about model families; the ops know
nothing about models.
"""
import dataclasses
import inspect
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

_PATCH = "_slothai_patch"  # instance-dict entry: the _Forward that patch installed on this module


class _Forward:
    """The forward `patch` installs on one module: `fn(self, *args, **kwargs)`.

    It holds the module it serves (deepcopy's memo maps it to the copy; pickle
    stores a reference to the module being saved), `fn`, a module-level function
    (pickled by name), and `inner`: the forward another library had put in the
    module's instance dict before (TRL's fused LM head, accelerate's hooks), or
    None for the class's own. When another library later wraps this object (TRL
    keeps the forward it replaces), `unpatch` cannot take it out of their
    wrapper; it turns it off instead (`active`), and it passes every call on.
    """

    def __init__(self, module, fn, options, inner):
        self.module, self.fn, self.options, self.inner = module, fn, dict(options), inner
        self.active = True

    def original(self, *args, **kwargs):
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.original(*args, **kwargs)
        return self.fn(self, *args, **kwargs)

    @property
    def __signature__(self):
        # The original's signature: transformers' Trainer picks dataset columns
        # from it and generate() validates its keyword arguments against it.
        if self.inner is not None:
            return inspect.signature(self.inner)
        return inspect.signature(type(self.module).forward.__get__(self.module))

    def __repr__(self):
        return f"<slothai {self.fn.__name__} of {type(self.module).__name__}{'' if self.active else ' (off)'}>"


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


def _linear4bit_forward(fwd, x):
    """bitsandbytes Linear4bit.forward, with slothai's one-launch dequant."""
    self = fwd.module
    _standard_layout(self)
    inp_dtype = x.dtype
    if getattr(self, "compute_dtype", None) is not None:
        x = x.to(self.compute_dtype)
    if torch.is_autocast_enabled(x.device.type):
        # bitsandbytes' matmul is F.linear on the dequantized weight, which autocast
        # runs in its dtype; a custom op is not autocast, so cast here (TRL and
        # accelerate train under autocast with bf16=True).
        x = x.to(torch.get_autocast_dtype(x.device.type))
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return nf4_linear(x, self.weight, bias).to(inp_dtype)


def _causal_lm_forward(fwd, *args, labels=None, **kwargs):
    """The family's CausalLM forward, but the loss comes from the hidden states.

    Calls TRL makes to its own fused LM head (`fused_lm_head=True`) go to that head
    unchanged: it returns per-token log-probs, entropy and accuracy, which this loss
    path does not (see slothai/trl.py for why slothai stands aside there)."""
    self = fwd.module
    head = self.lm_head
    if not kwargs.get("fused_lm_head", True):
        kwargs.pop("fused_lm_head")  # an explicit False: TRL's head would drop it too
    if labels is None or fwd.options["keep_logits"] or "fused_lm_head" in kwargs or len(args) > 1 or \
            kwargs.get("return_dict") is False or not isinstance(head, torch.nn.Linear):
        return fwd.original(*args, labels=labels, **kwargs)
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
    loss = fused_linear_cross_entropy(
        hidden.to(head.weight.dtype), head.weight, shift_labels.to(hidden.device), head.bias,
        ignore_index=ignore_index, reduction="mean" if num_items is None else "sum", softcap=softcap)
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
    """The module that owns the head and the backbone as its own children: a wrapper
    that reaches them through attribute forwarding (PEFT's PeftModelForCausalLM,
    whose name also ends in ForCausalLM) is not one."""
    config = getattr(module, "config", None)
    return type(module).__name__.endswith("ForCausalLM") and "lm_head" in module._modules and \
        "model" in module._modules and getattr(config, "model_type", None) in CAUSAL_LM_FAMILIES


def _causal_lm_heads(model):
    """Causal-LM modules to patch; one nested inside another is left to the outer one
    (whose forward does not call the inner one's through a patched forward: it is
    not patched)."""
    heads = []
    for name, module in model.named_modules(remove_duplicate=True):
        if _is_causal_lm(module) and not any(name.startswith(h + ".") or h == "" for h, _ in heads):
            heads.append((name, module))
    return [m for _, m in heads]


def _install(module, fn, options):
    existing = module.__dict__.get(_PATCH)
    if existing is not None:  # patched already: take the new options (idempotent otherwise)
        existing.options.update(options)
        existing.active = True
        return
    fwd = _Forward(module, fn, options, module.__dict__.get("forward"))
    module.__dict__[_PATCH] = fwd
    module.__dict__["forward"] = fwd


def patch(model, *, linear4bit=True, loss=True, keep_logits=False):
    """Patch `model` in place (idempotent) and return it. See the module docstring.

    linear4bit: route bitsandbytes NF4 layers through slothai's dequant.
    loss: compute the causal-LM loss without the logits when labels are given.
    keep_logits: for code that reads `outputs.logits` of a labelled call (e.g.
    TRL 1.0's SFTTrainer computes entropy and token accuracy from them): the
    head's own forward runs, logits and all; only the NF4 layers are patched.
    """
    for module in model.modules():
        if linear4bit and _is_bnb_linear4bit(module):
            _install(module, _linear4bit_forward, {})
    if loss:
        _load_output_class()
        for module in _causal_lm_heads(model):
            _install(module, _causal_lm_forward, {"keep_logits": bool(keep_logits)})
    _patch_unsloth()
    from .trl import supply_trl_kernel

    supply_trl_kernel()
    return model


def unpatch(model):
    """Undo `patch`: every patched module gets back the forward it had (and Unsloth
    its own fast_dequantize). Only what patch installed is removed: a forward another
    library put on top of slothai's (TRL's fused LM head) stays, and slothai's,
    inside it, is turned off."""
    for module in model.modules():
        fwd = module.__dict__.pop(_PATCH, None)
        if fwd is None:
            continue
        fwd.active = False
        if module.__dict__.get("forward") is fwd:
            if fwd.inner is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = fwd.inner
    _unpatch_unsloth()
    return model


def is_patched(module):
    return _PATCH in module.__dict__


def _unsloth_fast_dequantize(W, quant_state=None, out=None, use_global_buffer=False):
    """Unsloth's fast_dequantize signature on top of slothai's op."""
    if quant_state is None:
        return W
    if isinstance(quant_state, list):  # Unsloth's compressed-statistics list form: not handled, defer
        return _UNSLOTH_ORIGINAL["fast_dequantize"](W, quant_state, out, use_global_buffer)
    w = dequantize_nf4(W, quant_state)
    if out is not None:
        out.copy_(w)
        w = out
    return w.t() if W.shape[0] == 1 else w


_UNSLOTH_ORIGINAL = {}


def _patch_unsloth():
    """If Unsloth is loaded, send its fast_dequantize (and the modules that
    imported it by name) to slothai's op. Not verified against a real Unsloth."""
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
