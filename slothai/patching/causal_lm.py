"""Causal-LM heads and decoder layers: what slothai knows about model families.

Heads of the families in `CAUSAL_LM_FAMILIES` compute the training loss with
`fused_linear_cross_entropy` from the last hidden states when labels are given:
the [tokens x vocab] logits are never built, and the output's `logits` is None.
Without labels the model's own forward runs unchanged; with `keep_logits=True`
(or `loss=False`) the head's forward is left alone. The patched head also carries
slothai's `generate` (added by slothai/generation; `patch(generate=False)` leaves
transformers' own).

The head patched is the module that owns `lm_head` and the backbone (e.g.
`LlamaForCausalLM`), never a wrapper around it (PEFT's `PeftModelForCausalLM`,
whose forward calls the inner model's): one patched forward is never called
from another.

This module and linear4bit.py are the places that know about model families; the
ops know nothing about models."""
import dataclasses

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


def _causal_lm_forward(self, *args, labels=None, **kwargs):
    """The family's CausalLM forward, but the loss comes from the hidden states.

    Calls TRL makes to its own fused LM head (`fused_lm_head=True`) go to that head
    unchanged: it returns per-token log-probs, entropy and accuracy, which this loss
    path does not (see trl.py for why slothai stands aside there)."""
    head = self.lm_head
    if not kwargs.get("fused_lm_head", True):
        kwargs.pop("fused_lm_head")  # an explicit False: TRL's head would drop it too
    if labels is None or not getattr(self, _LOSS, True) or getattr(self, _KEEP_LOGITS, False) or \
            "fused_lm_head" in kwargs or len(args) > 1 or kwargs.get("return_dict") is False or \
            not isinstance(head, torch.nn.Linear):
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

    loss = as_forward_of(head, head_loss, hidden)
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


def decoder_layers(model):
    """The repeated blocks: members of ModuleLists whose class name ends in 'DecoderLayer'."""
    layers = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            layers += [m for m in module if type(m).__name__.endswith("DecoderLayer")]
    return layers


register_kind("causal_lm", _causal_lm_forward, attrs=(_LOSS, _KEEP_LOGITS, _FP32_HEAD_GRAD, GENERATE))
