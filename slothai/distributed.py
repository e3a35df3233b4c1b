"""More than one GPU: slothai under PyTorch's FSDP2 and DDP.

The order of calls (each rank, after `init_process_group`):

    model = slothai.patch(model)             # 1. slothai's ops (the weights stay bitsandbytes' Params4bit)
    fully_shard_layers(model)                # 2. FSDP2: each decoder layer, then the root (whose
                                             #    frozen weights stay whole: see fully_shard_layers)
    slothai.compile(model)                   # 3. regional compile (FSDP's hooks stay outside the graphs;
                                             #    no CUDA graphs: FSDP reallocates the gathered weights)

or, for DDP, `patch` -> `compile` -> `DistributedDataParallel(model)`.

What `patch` installs so that FSDP2 and DDP take a patched model (the 4-bit
weights taken as `NF4Weight`s at sharding, DDP's broadcast skipping them) is in
slothai/patching/fsdp.py.
"""
from .patching.causal_lm import decoder_layers
from .patching.fsdp import dtensor_type, unshardable_4bit_weights


def fully_shard_layers(model, **kwargs):
    """FSDP2 for a QLoRA model: `fully_shard` on each decoder layer, then on the
    root. kwargs go to every call (mesh, reshard_after_forward, mp_policy, ...),
    except that the root

    - leaves its frozen parameters (the embeddings, the final norm, a frozen head)
      out of FSDP (`ignored_params`): whole on every rank, never all-gathered. They
      are needed whole by the first op of forward and the first of backward, where
      no compute hides an all-gather (the Llama-3.1-8B shape's 2.1 GB of bf16
      embeddings and head took ~25 ms to gather, twice a step, on 2 H100s); and as
      the root is not resharded after forward, they were held whole at the step's
      peak anyway. A trained head or embedding (PEFT's `modules_to_save`) is
      sharded as usual;
    - keeps FSDP2's own rule for a root (not resharded after forward) whatever
      `reshard_after_forward` says for the layers.

    A 4-bit weight whose rows do not split into whole blocks (in_features not a
    multiple of its blocksize; see `unshardable_4bit_weights`) is left out of its
    layer's FSDP unit the same way: whole on every rank, so training is correct (it
    costs that weight's 4-bit size on each rank instead of a shard of it).

    The weights left out go to the device fully_shard put the layers on, as FSDP
    would have moved them (a 4-bit weight with its quantization state).

    Returns the model."""
    from torch.distributed.fsdp import fully_shard  # not at import: a torch built without distributed

    layers = decoder_layers(model)
    if not layers:
        raise ValueError("no decoder layers found (ModuleList members named *DecoderLayer)")
    whole = set(unshardable_4bit_weights(model))
    for layer in layers:
        fully_shard(layer, **{**kwargs, "ignored_params": set(kwargs.get("ignored_params") or ()) | whole})
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    frozen = {p for p in model.parameters() if not p.requires_grad and id(p) not in in_layers}
    dtensor = dtensor_type()
    sharded = [p for layer in layers for p in layer.parameters() if dtensor and isinstance(p, dtensor)]
    device = (sharded or list(layers[0].parameters()))[0].device  # where fully_shard put the layers
    for p in frozen | whole:  # FSDP moves only what it manages (a model loaded on the CPU, sharded onto
        if p.device != device and p.device.type != "meta":  # GPUs); as FSDP does (meta: initialised later)
            p.data = p.to(device).data  # a Params4bit's .to moves its quant_state too
    root = {k: v for k, v in kwargs.items() if k != "reshard_after_forward"}
    root["ignored_params"] = set(kwargs.get("ignored_params") or ()) | frozen | whole
    fully_shard(model, **root)
    return model


def adapter_state_dict(model):
    """The trainable parameters (the LoRA adapter) as full, unsharded CPU tensors,
    on every rank: FSDP2's sharded DTensors are all-gathered (a collective: call
    it on every rank). Rank 0 then saves with PEFT:
    `model.save_pretrained(path, state_dict=adapter_state_dict(model))`."""
    dtensor = dtensor_type()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            if dtensor and isinstance(t, dtensor):
                t = t.full_tensor()
            out[name] = t.cpu()
    return out
