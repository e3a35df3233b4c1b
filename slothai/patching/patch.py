"""`slothai.patch(model)`: route a Hugging Face / PEFT / bitsandbytes QLoRA model
through slothai's ops, in place; `slothai.unpatch(model)` undoes it.

What each kind of module becomes: linear4bit.py (bitsandbytes NF4 layers and
PEFT's LoRA over them), causal_lm.py (the loss head), unsloth.py (an Unsloth
model), trl.py (TRL's fused LM head on the CPU), fsdp.py (FSDP2 and DDP); how a
module is patched: classes.py."""
from . import fsdp
from .causal_lm import _FP32_HEAD_GRAD, _KEEP_LOGITS, _LOSS, GENERATE, _causal_lm_heads, _load_output_class
from .classes import install, is_patched, uninstall
from .linear4bit import is_bnb_linear4bit, is_peft_lora_linear4bit, own_active_adapters, standard_layout
from .trl import supply_trl_kernel
from .unsloth import _is_unsloth, _patch_unsloth, _unpatch_unsloth


def patch(model, *, linear4bit=True, lora=True, loss=True, keep_logits=False, fp32_head_grad=True, generate=True):
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
    generate: the head's `generate()` (reached through PEFT's, as TRL calls it) runs
    slothai's decode — a static KV cache, the step replayed as a CUDA graph — for
    greedy and sampled generation, and transformers' own for anything else
    (docs/generation.md). False keeps transformers' `generate`.
    Patching again with other values changes them.
    """
    fsdp.check_not_sharded(model, "slothai.patch")  # FSDP2: patch comes before fully_shard
    if _is_unsloth(model):
        # A FastLanguageModel computes its own chunked fused loss from the hidden
        # states and generates its own way; slothai leaves its head alone and serves
        # its NF4 dequantization.
        loss = generate = False
    for module in model.modules():
        if linear4bit and is_bnb_linear4bit(module):
            standard_layout(module)
            install(module, "linear4bit")
            fsdp.let_fully_shard_take_nf4_weights()  # FSDP2 shards it as an NF4Weight
        elif linear4bit and is_peft_lora_linear4bit(module) and not _is_unsloth(model):
            if lora:  # (an Unsloth model keeps its own LoRA paths)
                install(module, "lora_linear4bit")
                own_active_adapters(module)
            elif is_patched(module):
                uninstall(module)
    if loss or generate:
        _load_output_class()
        for module in _causal_lm_heads(model):
            install(module, "causal_lm")
            setattr(module, _LOSS, bool(loss))
            setattr(module, _KEEP_LOGITS, bool(keep_logits))
            setattr(module, _FP32_HEAD_GRAD, bool(fp32_head_grad))
            setattr(module, GENERATE, bool(generate))
    fsdp.skip_4bit_weights_in_ddp_broadcast(model)
    fsdp.let_accelerate_shard_nf4_weights()
    _patch_unsloth()
    supply_trl_kernel()
    return model


def unpatch(model):
    """Undo `patch`: every patched module gets its own class back (and Unsloth its
    own fast_dequantize). Only what patch installed is removed: a forward another
    library put in a module's instance dict (TRL's fused LM head) stays, and if it
    kept slothai's forward to call, that now runs the module's own."""
    fsdp.check_not_sharded(model, "slothai.unpatch")
    for module in model.modules():
        uninstall(module)
    _unpatch_unsloth()
    return model
