"""Causal-LM heads and decoder layers: what slothai knows about model families.

Heads of the families in `CAUSAL_LM_FAMILIES` compute the training loss with
`fused_linear_cross_entropy` from the last hidden states when labels are given:
the [tokens x vocab] logits are never built, and the output's `logits` is None.
Without labels the model's own forward runs unchanged; with `keep_logits=True`
(or `loss=False`) the head's forward is left alone. The patched head also carries
slothai's `generate` (added by slothai/generation; `patch(generate=False)` leaves
transformers' own).

What trainers that log token accuracy without the logits ask a fused head for, as
Liger-Kernel's patched heads take it: `return_token_accuracy=True` (and
`return_predicted_tokens=True`) give the output `token_accuracy` (the fraction of
counted next-token labels the argmax predicts) and `predicted_tokens` (the argmax
per position, -1 where the label is ignored), from the loss's own pass;
`use_token_scaling=True` scales each token's loss by its detached probability (DFT).
TRL >= 1.0 computes its SFT `mean_token_accuracy` in its own fused head instead
(trl.py), which `patch` leaves serving those calls.

The head patched is the module that owns `lm_head` and the backbone (e.g.
`LlamaForCausalLM`), never a wrapper around it (PEFT's `PeftModelForCausalLM`,
whose forward calls the inner model's): one patched forward is never called
from another.

This module and linear4bit.py are the places that know about model families; the
ops know nothing about models."""
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops import fused_linear_cross_entropy
from .classes import register_kind
from .fsdp import as_forward_of


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

# Instance attributes of a patched head: patch(loss=...), patch(keep_logits=...),
# patch(fp32_head_grad=...), patch(generate=...) (read by slothai/generation).
_LOSS = "_slothai_loss"

_KEEP_LOGITS = "_slothai_keep_logits"

_FP32_HEAD_GRAD = "_slothai_fp32_head_grad"

GENERATE = "_slothai_generate"


# Liger-Kernel's keyword arguments of a fused head's forward: (name, default).
_HEAD_OPTIONS = (("return_token_accuracy", False), ("return_predicted_tokens", False), ("use_token_scaling", False))


def _causal_lm_forward(self, *args, labels=None, **kwargs):
    """The family's CausalLM forward, but the loss comes from the hidden states.

    Calls TRL makes to its own fused LM head (`fused_lm_head=True`) go to that head
    unchanged: it returns per-token log-probs and entropy, which this loss path does
    not (see trl.py for why slothai stands aside there)."""
    head = self.lm_head
    if not kwargs.get("fused_lm_head", True):
        kwargs.pop("fused_lm_head")  # an explicit False: TRL's head would drop it too
    if labels is None or not getattr(self, _LOSS, True) or getattr(self, _KEEP_LOGITS, False) or \
            "fused_lm_head" in kwargs or len(args) > 1 or kwargs.get("return_dict") is False or \
            not isinstance(head, torch.nn.Linear):
        return type(self)._slothai_base.forward(self, *args, labels=labels, **kwargs)
    options = {name: bool(kwargs.pop(name, default)) for name, default in _HEAD_OPTIONS}  # not the backbone's
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
        out = fused_linear_cross_entropy(
            hidden.to(head.weight.dtype), head.weight, shift_labels.to(hidden.device), head.bias,
            ignore_index=ignore_index, reduction="mean" if num_items is None else "sum", softcap=softcap,
            chunk_size=chunk, fp32_weight_grad=getattr(self, _FP32_HEAD_GRAD, True), **options)
        if isinstance(out, torch.Tensor):
            return out, None, None
        return out.loss, out.token_accuracy, out.predicted_tokens  # a tuple: FSDP2 hooks the tensors in it

    loss, accuracy, predicted = as_forward_of(head, head_loss, hidden)
    if num_items is not None:  # gradient accumulation: transformers divides the sum by it
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    output_cls, fields = _OUTPUT
    rest = {k: v for k, v in outputs.items() if k in fields and k not in ("loss", "logits")}
    return output_cls(loss=loss, logits=None, token_accuracy=accuracy, predicted_tokens=predicted, **rest)


_OUTPUT = []  # (CausalLMOutputWithTokenAccuracy, CausalLMOutputWithPast's field names), made at patch time


def _load_output_class():
    if not _OUTPUT:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        @dataclasses.dataclass
        class CausalLMOutputWithTokenAccuracy(CausalLMOutputWithPast):
            """CausalLMOutputWithPast with the fields a fused head fills when asked (None
            otherwise, and then absent from the output's keys), named as Liger-Kernel's."""
            token_accuracy: Optional[torch.FloatTensor] = None
            predicted_tokens: Optional[torch.LongTensor] = None

        # found by pickle under this module's name (module __getattr__ below)
        CausalLMOutputWithTokenAccuracy.__qualname__ = CausalLMOutputWithTokenAccuracy.__name__
        _OUTPUT.extend([CausalLMOutputWithTokenAccuracy,
                        frozenset(f.name for f in dataclasses.fields(CausalLMOutputWithPast))])


def __getattr__(name):
    """CausalLMOutputWithTokenAccuracy, made on first use: this module imports no transformers."""
    if name == "CausalLMOutputWithTokenAccuracy":
        _load_output_class()
        return _OUTPUT[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def decoder_layers(model):
    """The repeated blocks: members of ModuleLists whose class name ends in 'DecoderLayer'."""
    layers = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            layers += [m for m in module if type(m).__name__.endswith("DecoderLayer")]
    return layers


register_kind("causal_lm", _causal_lm_forward, attrs=(_LOSS, _KEEP_LOGITS, _FP32_HEAD_GRAD, GENERATE))
