"""bitsandbytes' NF4 `Linear4bit` and PEFT's LoRA wrapper of it, on slothai's op.

- Every bitsandbytes NF4 `Linear4bit` (bare, or the base layer inside PEFT's
  LoRA wrapper) computes through `slothai::nf4_linear` (dequantize into a
  temporary, one GEMM), and its backward dequantizes again instead of keeping the
  dense weight. Its weight stays bitsandbytes' own `Params4bit`, so every library
  that recognises a 4-bit weight by that class (PEFT's DoRA, merging and
  `dequantize_module_weight`, transformers' `dequantize`, ...) still does; only
  FSDP2's `fully_shard` turns it into an `NF4Weight` (slothai/ops/nf4_weight.py),
  which it can shard (see fsdp.py).
- PEFT's LoRA wrapper of such a layer computes base + LoRA in that one op: the
  rank-r term first, then the base GEMM accumulating onto it, so their sum is
  written once (`_lora_linear4bit_forward`; PEFT's own forward for what it does not
  cover: DoRA, merged or disabled adapters, ...). Its `merge` / `unmerge` (PEFT's)
  copy PEFT's requantized weight back into the layer's Params4bit, in place
  (`_in_place`)."""
import functools

import torch

from ..ops import nf4_linear
from ..ops.nf4_matmul import low_rank_dtype
from ..ops.nf4_weight import copy_params4bit_
from .classes import kind_of, register_kind


def is_bnb_linear4bit(module):
    cls = type(module)
    return cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes") and \
        getattr(getattr(module.weight, "quant_state", None), "quant_type", None) == "nf4"


def standard_layout(module):
    """bitsandbytes (>= 0.49) repacks CPU weights into its own inference layout on
    an eval-mode forward without grad; put them back as bitsandbytes itself does
    before saving, so the codes are NF4 as stored."""
    if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, module.weight.quant_state)


def _linear4bit_forward(self, x):
    """bitsandbytes Linear4bit.forward, with slothai's one-launch dequant."""
    standard_layout(self)
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


def is_peft_lora_linear4bit(module):
    """PEFT's LoRA wrapper of an NF4 Linear4bit: its bitsandbytes class (models loaded
    in 4 bit) or its generic Linear (other modules holding a Linear4bit)."""
    cls = type(module)
    return cls.__name__ in ("Linear4bit", "Linear") and cls.__module__.startswith("peft.tuners.lora") and \
        is_bnb_linear4bit(getattr(module, "base_layer", None))


def _plain_lora_adapter(self, args, kwargs):
    """The one active adapter of PEFT LoRA layer `self` when its forward is base +
    B(A(dropout(x))) * scaling over a slothai-patched NF4 base; None otherwise
    (adapters disabled or merged, none or several active, DoRA or another variant,
    a LoRA bias, extra forward arguments such as mixed-batch `adapter_names`)."""
    base = self.base_layer
    if args or kwargs or self.disable_adapters or self.merged or \
            not (kind_of(base) == "linear4bit"):
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


def _fp32_adapter_for_inference(lora_a, lora_b, dtype):
    """Whether the op takes fp32 adapter weights over an fp16 / bf16 base as they are:
    PEFT's default adapter dtype, without gradients (generation, evaluation). The op's
    low-rank term is then formed in fp32 from A(x) in fp32 (as PEFT forms it) and enters
    the base's fp32 sum unrounded -- PEFT rounds it to the compute dtype, then rounds the
    sum again. With gradients (training) such adapters keep PEFT's own forward."""
    return not torch.is_grad_enabled() and lora_a.dtype == lora_b.dtype == torch.float32 and \
        dtype != torch.float32 and low_rank_dtype(dtype, torch.float32) == torch.float32  # (the op's own rule)


def _lora_down(lora_a, x, dtype):
    """A(x), LoRA's first projection, in `dtype`. Compiled for one token a row without
    gradients (a decode step), it is written as the sum over x's features of x * A's rows
    in fp32 (a GEMV's arithmetic: r outputs a row, fp32 accumulation, one rounding), which
    inductor fuses across the projections that share x — one reduction kernel each for
    q/k/v, o, gate/up and down, 4 a decoder layer, where `nn.Linear` is a GEMM launch per
    projection, 7 a layer. (Not into the norm that produces x, as once hoped: the H100
    profiles show the 4 apart, ~300 us of an 8B step; docs/measurements.md.) Elsewhere
    (training, prefill, eager) it is the layer's own `nn.Linear`."""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.dim() == 3 and x.shape[1] == 1 and \
            lora_a.bias is None:
        return (x.unsqueeze(-2).float() * lora_a.weight.float()).sum(-1).to(dtype)
    return lora_a(x)  # in `dtype` already: autocast's, or the adapter's that x was cast to


def _lora_linear4bit_forward(self, x, *args, **kwargs):
    """PEFT's LoRA Linear4bit forward as one slothai::nf4_linear: A(dropout(x)) first
    (r columns), then the base GEMM accumulates B's term, times the scaling, with its
    own (the scaling inside the op: PEFT's order, scaled after B, and no kernel of its own).

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
    low = None  # the low-rank operands' dtype in the op: the compute dtype, or fp32 adapters' own
    if autocast:
        dtype = low = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = getattr(base, "compute_dtype", None) or x.dtype
        if name is not None:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            low = dtype if _adapter_converts_exactly(a, b, dtype) else \
                torch.float32 if _fp32_adapter_for_inference(a, b, dtype) else None
    if name is None or low is None:
        return type(self)._slothai_base.forward(self, x, *args, **kwargs)
    standard_layout(base)
    # A reads x through its own cast (autocast's, or PEFT's to the adapter dtype), as in
    # PEFT: x's gradients from A and from the base then add up in x's dtype.
    lora_a = self.lora_A[name]
    lora_x = _lora_down(lora_a, self.lora_dropout[name](x if autocast else x.to(lora_a.weight.dtype)),
                        dtype if autocast else lora_a.weight.dtype)
    bias = None if base.bias is None else base.bias.to(dtype)
    y = nf4_linear(x.to(dtype), base.weight, bias, lora_x=lora_x.to(low), lora_b=self.lora_B[name].weight.to(low),
                   lora_scale=self.scaling[name])
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


def own_active_adapters(module):
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
        own_active_adapters(self)
        return out
    return set_adapter


register_kind("linear4bit", _linear4bit_forward)
register_kind("lora_linear4bit", _lora_linear4bit_forward,
              {"merge": _in_place("merge"), "unmerge": _in_place("unmerge"), "set_adapter": _set_adapter_own_list})
