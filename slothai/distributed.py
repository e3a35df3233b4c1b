"""More than one GPU: slothai under PyTorch's FSDP2 and DDP.

The order of calls (each rank, after `init_process_group`):

    model = slothai.patch(model)             # 1. Params4bit -> NF4Weight (shardable), slothai's ops
    fully_shard_layers(model)                # 2. FSDP2: each decoder layer, then the root (whose
                                             #    frozen weights stay whole: see fully_shard_layers)
    slothai.compile(model)                   # 3. regional compile (FSDP's hooks stay outside the graphs;
                                             #    no CUDA graphs: FSDP reallocates the gathered weights)

or, for DDP, `patch` -> `compile` -> `DistributedDataParallel(model)`.

`patch` after `fully_shard` raises: FSDP2 would already have turned bitsandbytes'
`Params4bit` into a plain sharded tensor that lost its quantization state. The
weights are only ever all-gathered as 4-bit codes and scales (see nf4_weight.py).
`fully_shard` without `patch` is bitsandbytes' own gap (its Params4bit does not
survive FSDP2); `patch` first closes it.

DDP: the frozen 4-bit weights are the same on every rank (each rank loads the
same checkpoint), so `patch` lists them in `_ddp_params_and_buffers_to_ignore`:
DDP's construction-time broadcast skips them, as it cannot flatten a tensor
subclass. Gradients (LoRA only) are all-reduced as usual.
"""
import contextlib
import functools
import sys

import torch

from .nf4_weight import NF4Weight, to_nf4_weight

ORDER = ("slothai.patch(model) -> fully_shard(each decoder layer) -> fully_shard(model) -> "
         "slothai.compile(model)")


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return ()
    return DTensor


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return ()
    return FSDPModule


def is_fsdp_module(module):
    """Whether `fully_shard` was applied to `module` itself."""
    fsdp_module = _fsdp_module_type()
    return bool(fsdp_module) and isinstance(module, fsdp_module)


def is_fully_sharded(model):
    """Whether FSDP2's fully_shard has been applied to `model` or any module in it."""
    return any(is_fsdp_module(m) for m in model.modules())


def check_not_sharded(model, what):
    """Raise if `fully_shard` already ran on `model` (any of its modules)."""
    dtensor = _dtensor_type()
    if is_fully_sharded(model) or (dtensor and any(isinstance(p, dtensor) for p in model.parameters())):
        raise RuntimeError(f"{what} must be called before torch.distributed.fsdp.fully_shard: FSDP2 has already "
                           f"turned the 4-bit weights into plain sharded tensors. Order: {ORDER}")


def use_nf4_weight(linear4bit):
    """Give a bitsandbytes NF4 Linear4bit an NF4Weight viewing its Params4bit's
    tensors (no copy). Left as is when its rows do not split (see to_nf4_weight),
    and while Unsloth is loaded (its LoRA kernels take the Params4bit's own layout)."""
    weight = linear4bit.weight
    if isinstance(weight, NF4Weight) or "unsloth" in sys.modules:
        return
    nf4 = to_nf4_weight(weight)
    if nf4 is not None:
        linear4bit.weight = nf4
        linear4bit._register_state_dict_hook(_params4bit_in_state_dict)
        _let_fully_shard_take_nf4_weights()


def _let_fully_shard_take_nf4_weights():
    """FSDP2 makes parameters with `nn.Parameter(t)`, whose default requires_grad=True
    fails on a uint8 tensor ("only Tensors of floating point dtype can require
    gradients"), in two places: torch before 2.13 (2.11 seen on the GPU) wraps each
    shard so and only then sets the parameter's own requires_grad (later releases pass
    it), and every release so moves a tensor-subclass parameter that is not on the
    mesh's device yet (a model loaded on the CPU, sharded onto GPUs). During those two
    steps, for a module holding an NF4Weight, a Parameter of a non-floating tensor
    defaults to requires_grad=False: what torch does for a plain frozen parameter.
    Installed once, at the first NF4Weight."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_init
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    except ImportError:  # a torch built without distributed
        return
    if getattr(FSDPParam._init_sharded_param, "_slothai", False):
        return
    FSDPParam._init_sharded_param = _frozen_nf4_parameters(FSDPParam._init_sharded_param, lambda a: a[1:2])
    if hasattr(_fsdp_init, "_move_states_to_device"):
        _fsdp_init._move_states_to_device = _frozen_nf4_parameters(_fsdp_init._move_states_to_device,
                                                                   lambda a: a[0])


def _frozen_nf4_parameters(fn, params_of):
    """`fn`, run under integer_parameters_default_to_no_grad when any of
    `params_of(args)` is an NF4Weight."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not any(isinstance(p, NF4Weight) for p in params_of(args)):
            return fn(*args, **kwargs)
        with integer_parameters_default_to_no_grad():
            return fn(*args, **kwargs)

    wrapper._slothai = True
    return wrapper


@contextlib.contextmanager
def integer_parameters_default_to_no_grad():
    """Within: `nn.Parameter(t)` of a tensor that cannot require grad (integer dtypes)
    gives a frozen parameter instead of raising. Not thread-safe (it swaps
    `nn.Parameter.__new__`); used only around FSDP2's set-up of one NF4Weight."""
    cls = torch.nn.Parameter
    new = cls.__dict__["__new__"]

    def __new__(c, data=None, requires_grad=True):
        if requires_grad and data is not None and not (data.is_floating_point() or data.is_complex()):
            requires_grad = False
        return new.__func__(c, data, requires_grad)

    cls.__new__ = __new__
    try:
        yield
    finally:
        cls.__new__ = new


def _params4bit_in_state_dict(module, state_dict, prefix, local_metadata):
    """An unsharded NF4Weight is saved as the Params4bit it views, so a patched
    model's state dict is bitsandbytes' own (bitsandbytes adds the quant_state
    entries itself). FSDP's sharded DTensors are left to FSDP."""
    weight = state_dict.get(prefix + "weight")
    if isinstance(weight, NF4Weight) and weight.params4bit is not None:
        p = weight.params4bit
        state_dict[prefix + "weight"] = p if isinstance(weight, torch.nn.Parameter) else p.detach()


def restore_params4bit(module):
    """`unpatch`: give the module its bitsandbytes Params4bit back."""
    weight = module.__dict__.get("_parameters", {}).get("weight")
    if isinstance(weight, NF4Weight) and weight.params4bit is not None:
        module.weight = weight.params4bit


def skip_nf4_weights_in_ddp_broadcast(model):
    names = {n for n, p in model.named_parameters() if isinstance(p, NF4Weight)}
    if names:
        model._ddp_params_and_buffers_to_ignore = sorted(set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
                                                         | names)


def as_forward_of(module, fn, *args):
    """`fn(*args)`, which reads `module`'s parameters without calling the module, run as
    a forward of `module` for FSDP2: slothai's loss reads `lm_head.weight` (it never
    builds the logits), and where the head is sharded in a unit of its own (accelerate's
    FSDP2 plugin gives it one, with the final norm where it finds it) only a forward of
    that unit all-gathers it, hooks its backward and reshards it. This goes through
    `torch.distributed.fsdp.register_fsdp_forward_method`, registered once per head.
    A module that is not its own FSDP unit: just `fn(*args)`."""
    if not is_fsdp_module(module):
        return fn(*args)
    if "_slothai_forward" not in module.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        module._slothai_forward = _call
        register_fsdp_forward_method(module, "_slothai_forward")
    return module._slothai_forward(fn, *args)


def _call(fn, *args):
    return fn(*args)


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

    The frozen root weights go to the device fully_shard put the layers on, as FSDP
    would have moved them.

    Returns the model."""
    from torch.distributed.fsdp import fully_shard

    from .regional import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        raise ValueError("no decoder layers found (ModuleList members named *DecoderLayer)")
    for layer in layers:
        fully_shard(layer, **kwargs)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    frozen = {p for p in model.parameters() if not p.requires_grad and id(p) not in in_layers}
    device = next(layers[0].parameters()).device  # where fully_shard put the layers: the mesh's device
    for p in frozen:  # FSDP moves only what it manages (a model loaded on the CPU, sharded onto GPUs);
        if p.device != device and p.device.type != "meta":  # as FSDP does (meta: initialised later)
            p.data = p.data.to(device)
    root = {k: v for k, v in kwargs.items() if k != "reshard_after_forward"}
    root["ignored_params"] = set(kwargs.get("ignored_params") or ()) | frozen
    fully_shard(model, **root)
    return model


def adapter_state_dict(model):
    """The trainable parameters (the LoRA adapter) as full, unsharded CPU tensors,
    on every rank: FSDP2's sharded DTensors are all-gathered (a collective: call
    it on every rank). Rank 0 then saves with PEFT:
    `model.save_pretrained(path, state_dict=adapter_state_dict(model))`."""
    dtensor = _dtensor_type()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            if dtensor and isinstance(t, dtensor):
                t = t.full_tensor()
            out[name] = t.cpu()
    return out
