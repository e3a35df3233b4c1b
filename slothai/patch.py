"""`slothai.patch(model)`: route a Hugging Face / PEFT / bitsandbytes QLoRA model
through slothai's ops, in place; `slothai.unpatch(model)` undoes it.

- Every bitsandbytes NF4 `Linear4bit` (bare, or the base layer inside PEFT's
  LoRA wrapper) computes through `slothai::nf4_linear` (dequantize into a
  temporary, one GEMM), and its backward dequantizes again instead of keeping the
  dense weight. Its weight stays bitsandbytes' own `Params4bit`, so every library
  that recognises a 4-bit weight by that class (PEFT's DoRA, merging and
  `dequantize_module_weight`, transformers' `dequantize`, ...) still does; only
  FSDP2's `fully_shard` turns it into an `NF4Weight` (slothai/nf4_weight.py), which
  it can shard (see slothai/distributed.py).
- PEFT's LoRA wrapper of such a layer computes base + LoRA in that one op: the
  rank-r term first, then the base GEMM accumulating onto it, so their sum is
  written once (`_lora_linear4bit_forward`; PEFT's own forward for what it does not
  cover: DoRA, merged or disabled adapters, ...). Its `merge` / `unmerge` (PEFT's)
  copy PEFT's requantized weight back into the layer's Params4bit, in place
  (`_in_place`).
- Causal-LM heads of the families in `CAUSAL_LM_FAMILIES` compute the training
  loss with `fused_linear_cross_entropy` from the last hidden states when labels
  are given: the [tokens x vocab] logits are never built, and the output's
  `logits` is None. Without labels the model's own forward runs unchanged; with
  `keep_logits=True` the head is left alone.
- If Unsloth is loaded, its `fast_dequantize` is routed to slothai's op for NF4
  (with Unsloth's own signature), and an Unsloth model keeps its own loss head.
- If TRL is loaded and has no kernel for its fused LM head here (no Triton: the
  CPU), slothai supplies one (see slothai/trl.py).

The head patched is the module that owns `lm_head` and the backbone (e.g.
`LlamaForCausalLM`), never a wrapper around it (PEFT's `PeftModelForCausalLM`,
whose forward calls the inner model's): one patched forward is never called
from another.

A patched module changes class, to a subclass of its own generated once per class
(same name) whose `forward` is slothai's: nothing is stored per instance but the
class, so `copy.deepcopy` gives an independent patched copy that computes with its
own weights, pickle / `torch.save` store the patch and load it back (by the base
class and the kind of patch, see `_reduce_ex`), and torch.compile sees one class,
guarded by type, not an object per layer guarded by identity (which compiled every
decoder layer apart). A forward another library puts in the instance dict (TRL's
fused LM head) is left to that library.

This module is the one place that knows about model families; the ops know
nothing about models.
"""
import dataclasses
import functools
import sys

import torch
import torch.nn.functional as F

from . import distributed
from .fused_ce import fused_linear_cross_entropy
from .nf4 import dequantize_nf4, nf4_linear
from .nf4_weight import copy_params4bit_
from .offload import SLICES_ATTR, sliced_forward

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

# Instance attributes of a patched head: patch(keep_logits=...), patch(fp32_head_grad=...).
_KEEP_LOGITS = "_slothai_keep_logits"
_FP32_HEAD_GRAD = "_slothai_fp32_head_grad"


def _patched_class(base, kind):
    """The subclass of `base` whose forward is slothai's `kind` (a key of `_KINDS`);
    one per (base, kind), made on first use."""
    cls = _PATCHED_CLASSES.get((base, kind))
    if cls is not None:
        return cls
    fn = _KINDS[kind]

    def forward(self, *args, **kwargs):
        if type(self) is not cls:  # unpatched, but called through a bound method kept by another library
            return base.forward(self, *args, **kwargs)
        return fn(self, *args, **kwargs)

    # The original's name, docs and signature (`__wrapped__`): transformers' Trainer picks
    # dataset columns from it and generate() validates its keyword arguments against it.
    functools.update_wrapper(forward, base.forward)
    methods = {name: make(base) for name, make in _KIND_METHODS.get(kind, {}).items()}
    cls = type(base.__name__, (base,), {
        "forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__,
        "__doc__": base.__doc__, "__reduce_ex__": _reduce_ex, "_slothai_base": base, "_slothai_kind": kind,
        **methods})
    _PATCHED_CLASSES[(base, kind)] = cls
    return cls


def _reduce_ex(self, protocol):
    """Pickle a patched module as its base class plus the kind of patch: the
    generated class has the base's name, so pickle could not find it by name."""
    rv = object.__reduce_ex__(self, max(2, protocol))
    cls = type(self)
    return (_new_patched, (cls._slothai_base, cls._slothai_kind)) + tuple(rv[2:])


def _new_patched(base, kind):
    obj = base.__new__(base)
    obj.__class__ = _patched_class(base, kind)
    return obj


def _is_bnb_linear4bit(module):
    cls = type(module)
    return cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes") and \
        getattr(getattr(module.weight, "quant_state", None), "quant_type", None) == "nf4"


def _standard_layout(module):
    """bitsandbytes (>= 0.49) repacks CPU weights into its own inference layout on
    an eval-mode forward without grad; put them back as bitsandbytes itself does
    before saving, so the codes are NF4 as stored."""
    if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, module.weight.quant_state)


def _linear4bit_forward(self, x):
    """bitsandbytes Linear4bit.forward, with slothai's one-launch dequant."""
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


def _is_peft_lora_linear4bit(module):
    """PEFT's LoRA wrapper of an NF4 Linear4bit: its bitsandbytes class (models loaded
    in 4 bit) or its generic Linear (other modules holding a Linear4bit)."""
    cls = type(module)
    return cls.__name__ in ("Linear4bit", "Linear") and cls.__module__.startswith("peft.tuners.lora") and \
        _is_bnb_linear4bit(getattr(module, "base_layer", None))


def _plain_lora_adapter(self, args, kwargs):
    """The one active adapter of PEFT LoRA layer `self` when its forward is base +
    B(A(dropout(x))) * scaling over a slothai-patched NF4 base; None otherwise
    (adapters disabled or merged, none or several active, DoRA or another variant,
    a LoRA bias, extra forward arguments such as mixed-batch `adapter_names`)."""
    base = self.base_layer
    if args or kwargs or self.disable_adapters or self.merged or \
            not (is_patched(base) and type(base)._slothai_kind == "linear4bit"):
        return None
    active = [name for name in self.active_adapters if name in self.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name) or \
            self.lora_B[name].bias is not None or getattr(self, "fan_in_fan_out", False):
        return None
    return name


def _adapter_converts_exactly(lora_a, lora_b, dtype):
    """Whether adapter weights `lora_a`, `lora_b` (one dtype) convert into compute
    dtype `dtype` exactly: the same dtype, or a narrower one (bf16 or fp16 adapters, as
    TRL casts them on quantized models, with fp32 compute)."""
    return lora_a.dtype == lora_b.dtype and torch.promote_types(lora_a.dtype, dtype) == dtype


def _lora_linear4bit_forward(self, x, *args, **kwargs):
    """PEFT's LoRA Linear4bit forward as one slothai::nf4_linear: A(dropout(x)) *
    scaling first (r columns), then the base GEMM accumulates B's term with its own.

    Under autocast the adapter math runs in autocast's dtype, as in PEFT. Without it,
    A runs as PEFT runs it, on x cast to the adapter dtype, and B's term is accumulated
    with the base in the base's compute dtype — when the adapter weights convert into
    it exactly: the same dtype, or bf16 adapters (TRL casts LoRA weights to bf16 on
    quantized models, `bf16=False` or not) over an fp32 compute dtype, where PEFT
    rounds B's term to bf16 before adding it and the fused sum does not. Adapters wider
    than the compute dtype (fp32 adapters over bf16, `compile(adapters="float32")`)
    run PEFT's forward, whose LoRA term keeps their precision, as does everything
    `_plain_lora_adapter` does not cover."""
    name = _plain_lora_adapter(self, args, kwargs)
    base = self.base_layer
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = getattr(base, "compute_dtype", None) or x.dtype
        if name is not None and not _adapter_converts_exactly(self.lora_A[name].weight, self.lora_B[name].weight,
                                                              dtype):
            name = None
    if name is None:
        return type(self)._slothai_base.forward(self, x, *args, **kwargs)
    _standard_layout(base)
    # A reads x through its own cast (autocast's, or PEFT's to the adapter dtype), as in
    # PEFT: x's gradients from A and from the base then add up in x's dtype.
    lora_a = self.lora_A[name]
    lora_x = lora_a(self.lora_dropout[name](x if autocast else x.to(lora_a.weight.dtype))) * self.scaling[name]
    bias = None if base.bias is None else base.bias.to(dtype)
    y = nf4_linear(x.to(dtype), base.weight, bias, lora_x=lora_x.to(dtype), lora_b=self.lora_B[name].weight.to(dtype))
    return y.to(x.dtype)


def _in_place(name):
    """PEFT's LoRA `merge` / `unmerge` over a 4-bit base (`merge_and_unload`, and TRL's
    `merge_adapter` before each vLLM weight sync) sets a new Params4bit quantized from
    the sum; its codes and scales are copied into the layer's own Params4bit instead,
    so the base keeps the same weight at the same addresses, which compiled layers and
    their CUDA graphs read (a new one every step would record the graphs again)."""
    def make(base):
        original = getattr(base, name)

        @functools.wraps(original)
        def method(self, *args, **kwargs):
            layer = self.get_base_layer()
            weight = layer._parameters.get("weight")
            out = original(self, *args, **kwargs)
            new = layer._parameters.get("weight")
            if new is not weight and type(new) is type(weight) and type(weight).__name__ == "Params4bit" and \
                    copy_params4bit_(weight, new):
                layer.weight = weight
            return out
        return method
    return make


def _own_active_adapters(module):
    """Give PEFT LoRA layer `module` a list of active adapter names of its own.

    PEFT's model-level `set_adapter` (and `get_peft_model`, `add_adapter`) hands every
    layer one shared list, its per-layer `set_adapter("name")` a new list each. Dynamo
    guards that the layers of a compiled decoder layer alias that list as they did when
    it traced them, so the first switch from one form to the other (TRL's DPO and KTO
    reference passes switch to a "ref" adapter and back every step) recompiled the
    layer once. With a list per layer the form never changes."""
    active = module.__dict__.get("_active_adapter")
    if isinstance(active, list):
        module._active_adapter = list(active)


def _set_adapter_own_list(base):
    original = base.set_adapter

    @functools.wraps(original)
    def set_adapter(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        _own_active_adapters(self)
        return out
    return set_adapter


_KIND_METHODS = {"lora_linear4bit": {"merge": _in_place("merge"), "unmerge": _in_place("unmerge"),
                                     "set_adapter": _set_adapter_own_list}}


def _causal_lm_forward(self, *args, labels=None, **kwargs):
    """The family's CausalLM forward, but the loss comes from the hidden states.

    Calls TRL makes to its own fused LM head (`fused_lm_head=True`) go to that head
    unchanged: it returns per-token log-probs, entropy and accuracy, which this loss
    path does not (see slothai/trl.py for why slothai stands aside there)."""
    head = self.lm_head
    if not kwargs.get("fused_lm_head", True):
        kwargs.pop("fused_lm_head")  # an explicit False: TRL's head would drop it too
    if labels is None or getattr(self, _KEEP_LOGITS, False) or "fused_lm_head" in kwargs or len(args) > 1 or \
            kwargs.get("return_dict") is False or not isinstance(head, torch.nn.Linear):
        return type(self)._slothai_base.forward(self, *args, labels=labels, **kwargs)
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

    def head_loss(hidden):  # reads the head's weight: under FSDP2 it may be all-gathered just for this
        return fused_linear_cross_entropy(
            hidden.to(head.weight.dtype), head.weight, shift_labels.to(hidden.device), head.bias,
            ignore_index=ignore_index, reduction="mean" if num_items is None else "sum", softcap=softcap,
            chunk_size=chunk, fp32_weight_grad=getattr(self, _FP32_HEAD_GRAD, True))

    loss = distributed.as_forward_of(head, head_loss, hidden)
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


def _is_unsloth(model):
    config = getattr(model, "config", None)
    return getattr(config, "unsloth_version", None) is not None


_KINDS = {"linear4bit": _linear4bit_forward, "lora_linear4bit": _lora_linear4bit_forward,
          "causal_lm": _causal_lm_forward, "token_slices": sliced_forward}
_PATCHED_CLASSES = {}  # (base class, kind) -> generated subclass


def _install(module, kind):
    if not is_patched(module):
        module.__class__ = _patched_class(type(module), kind)


def slice_tokens(module, n):
    """Run `module` (per-token: an MLP) over n token slices in training mode under
    autograd (offload.sliced_forward; what compile(low_memory=True) does to each layer's
    MLP); n=None undoes it."""
    if n:
        _install(module, "token_slices")
        setattr(module, SLICES_ATTR, n)
    elif is_patched(module) and type(module)._slothai_kind == "token_slices":
        module.__class__ = type(module)._slothai_base
        module.__dict__.pop(SLICES_ATTR, None)


def patch(model, *, linear4bit=True, lora=True, loss=True, keep_logits=False, fp32_head_grad=True):
    """Patch `model` in place (idempotent) and return it. See the module docstring.

    linear4bit: route bitsandbytes NF4 layers through slothai's dequant.
    lora: with linear4bit, PEFT's LoRA layers over them add their LoRA term inside
    the base layer's op (written once with it); False leaves PEFT's LoRA forward
    (the LoRA term computed and added apart).
    loss: compute the causal-LM loss without the logits when labels are given.
    keep_logits: for code that reads `outputs.logits` of a labelled call (e.g.
    TRL 1.0's SFTTrainer computes entropy and token accuracy from them): the
    head's own forward runs, logits and all; only the NF4 layers are patched.
    fp32_head_grad: a trained lm_head's gradient is summed over the loss' chunks in
    fp32 (eager's accuracy, a vocab x hidden fp32 buffer); False sums it in the
    head's dtype (Unsloth's default: 1.3 GB less at a 128K vocabulary, a little
    less accurate; see fused_linear_cross_entropy). No effect on a frozen head.
    Patching again with other values changes them.
    """
    distributed.check_not_sharded(model, "slothai.patch")  # FSDP2: patch comes before fully_shard
    if _is_unsloth(model):
        # A FastLanguageModel computes its own chunked fused loss from the hidden
        # states; slothai leaves its head alone and serves its NF4 dequantization.
        loss = False
    for module in model.modules():
        if linear4bit and _is_bnb_linear4bit(module):
            _standard_layout(module)
            _install(module, "linear4bit")
            distributed.let_fully_shard_take_nf4_weights()  # FSDP2 shards it as an NF4Weight
        elif linear4bit and _is_peft_lora_linear4bit(module) and not _is_unsloth(model):
            if lora:  # (an Unsloth model keeps its own LoRA paths)
                _install(module, "lora_linear4bit")
                _own_active_adapters(module)
            elif is_patched(module):
                module.__class__ = type(module)._slothai_base
    if loss:
        _load_output_class()
        for module in _causal_lm_heads(model):
            _install(module, "causal_lm")
            setattr(module, _KEEP_LOGITS, bool(keep_logits))
            setattr(module, _FP32_HEAD_GRAD, bool(fp32_head_grad))
    distributed.skip_4bit_weights_in_ddp_broadcast(model)
    distributed.let_accelerate_shard_nf4_weights()
    _patch_unsloth()
    from .trl import supply_trl_kernel

    supply_trl_kernel()
    return model


def unpatch(model):
    """Undo `patch`: every patched module gets its own class back (and Unsloth its
    own fast_dequantize). Only what patch installed is removed: a forward another
    library put in a module's instance dict (TRL's fused LM head) stays, and if it
    kept slothai's forward to call, that now runs the module's own."""
    distributed.check_not_sharded(model, "slothai.unpatch")
    for module in model.modules():
        if is_patched(module):
            module.__class__ = type(module)._slothai_base
            module.__dict__.pop(_KEEP_LOGITS, None)
            module.__dict__.pop(_FP32_HEAD_GRAD, None)
            module.__dict__.pop(SLICES_ATTR, None)
    _unpatch_unsloth()
    return model


def is_patched(module):
    return "_slothai_base" in type(module).__dict__


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
