"""The hooks `slothai.patch` installs for FSDP2 and DDP, and what the rest of
slothai asks about sharding (the user's API is slothai/distributed.py: fully_shard_layers, adapter_state_dict).

FSDP2: `patch` lets `fully_shard` (called directly, through `fully_shard_layers` or
through accelerate's FSDP2 plugin) take each 4-bit weight of a patched Linear4bit
as an `NF4Weight` (see nf4_weight.py): as fully_shard collects the parameters it
manages, the layer's `Params4bit` is replaced by an NF4Weight viewing the same
tensors, and that is what FSDP2 moves, shards and all-gathers (only ever as
4-bit codes and scales). Until then, and on a single process, the weight stays
bitsandbytes' own `Params4bit`, which PEFT, transformers and bitsandbytes
recognise by its class. A weight whose rows do not split into whole blocks
(in_features not a multiple of its blocksize) cannot be sharded by rows:
`fully_shard_layers` keeps it whole on every rank, a direct `fully_shard` over it
raises (pass it in `ignored_params`). `patch` after `fully_shard` raises: FSDP2
would already have turned bitsandbytes' `Params4bit` into a plain sharded tensor
that lost its quantization state. `fully_shard` without `patch` is bitsandbytes'
own gap (its Params4bit does not survive FSDP2); `patch` first closes it.

DDP: the frozen 4-bit weights are the same on every rank (each rank loads the
same checkpoint), and their block scales are not parameters DDP could broadcast
anyway, so `patch` lists them in `_ddp_params_and_buffers_to_ignore`: DDP's
construction-time broadcast skips them. Gradients (LoRA only) are all-reduced as usual.
"""
import contextlib
import functools
import importlib
import sys

import torch

from ..ops.nf4_weight import NF4Weight, to_nf4_weight
from .classes import kind_of


ORDER = ("slothai.patch(model) -> fully_shard(each decoder layer) -> fully_shard(model) -> "
         "slothai.compile(model)")


def dtensor_type():
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
    dtensor = dtensor_type()
    if is_fully_sharded(model) or (dtensor and any(isinstance(p, dtensor) for p in model.parameters())):
        raise RuntimeError(f"{what} must be called before torch.distributed.fsdp.fully_shard: FSDP2 has already "
                           f"turned the 4-bit weights into plain sharded tensors. Order: {ORDER}")


def _is_patched_linear4bit(module):
    return kind_of(module) == "linear4bit"


def _is_params4bit(param):
    return type(param).__name__ == "Params4bit" and getattr(param, "quant_state", None) is not None


def _patched_4bit_weights(modules):
    """(module, weight) for each slothai-patched Linear4bit among `modules` that still
    holds a bitsandbytes Params4bit."""
    for module in modules:
        weight = module._parameters.get("weight") if _is_patched_linear4bit(module) else None
        if weight is not None and _is_params4bit(weight):
            yield module, weight


def _why_unshardable(weight):
    qs = weight.quant_state
    return (f"in_features {qs.shape[-1]} is not a multiple of its blocksize {qs.blocksize}, so its rows do not "
            "split into whole blocks" if qs.shape[-1] % qs.blocksize else "its packed codes are not laid out as rows")


def unshardable_4bit_weights(model):
    """{weight: why} for the 4-bit weights of `model`'s patched Linear4bit layers that
    FSDP2 cannot shard by rows (see to_nf4_weight): their rows do not split into
    whole blocks, or their codes are not packed as rows."""
    return {weight: _why_unshardable(weight) for _, weight in _patched_4bit_weights(model.modules())
            if to_nf4_weight(weight) is None}


def _take_nf4_weights(modules, ignored_params):
    """FSDP2 is about to manage `modules` (the module fully_shard was called on and
    those in it it manages): each Params4bit of a slothai-patched Linear4bit among
    them, unless ignored, becomes an NF4Weight viewing its tensors, set on the
    module. All are checked before any is replaced: one that cannot be sharded
    raises a ValueError (torch has registered fully_shard on the module by then, so
    a second try needs a model fully_shard has not seen)."""
    if "unsloth" in sys.modules:  # Unsloth's LoRA kernels read the Params4bit's own layout (no FSDP2 there)
        return
    ignored = ignored_params or set()
    taken = []
    for module, weight in _patched_4bit_weights(modules):
        if weight in ignored:
            continue
        nf4 = to_nf4_weight(weight)
        if nf4 is None:
            raise ValueError(_refusal(modules, module, _why_unshardable(weight)))
        taken.append((module, nf4))
    for module, nf4 in taken:
        module.weight = nf4


def _refusal(modules, module, why):
    # fully_shard's own module is the one that holds all the others (named from it)
    root = max(modules, key=lambda m: sum(1 for _ in m.modules()))
    name = {id(m): n for n, m in root.named_modules()}.get(id(module)) or type(module).__name__
    return (f"fully_shard({type(root).__name__}): cannot shard the 4-bit weight of {name!r} "
            f"({type(module).__name__} {module.in_features} -> {module.out_features}): {why}. Keep it whole on "
            f"every rank: pass it in fully_shard(..., ignored_params={{...}}) (moved to the device yourself), "
            f"or shard with slothai.distributed.fully_shard_layers(model), which does both (on a freshly "
            f"loaded model: fully_shard has registered itself on this one)")


def let_fully_shard_take_nf4_weights():
    """Make FSDP2's `fully_shard` take each Params4bit of a slothai-patched Linear4bit
    as an NF4Weight, and let it set up such a parameter. Installed once (at `patch`),
    on three private steps of torch's `fully_shard` (torch 2.13:
    torch/distributed/fsdp/_fully_shard/_fsdp_init.py and _fsdp_param.py):

    - `_get_managed_states(modules, ignored_params)`, where fully_shard lists the
      parameters it will manage: the Params4bit is replaced there (`_take_nf4_weights`),
      before FSDP2 looks at it, so moving it to the device, finding its module and
      name, sizing its shards (also the post-forward ones of an int
      reshard_after_forward) and all-gathering all see the NF4Weight and its logical
      [out_features, in_features] shape, never the Params4bit's packed [n/2, 1].
    - FSDP2 makes parameters with `nn.Parameter(t)`, whose default requires_grad=True
      fails on a uint8 tensor ("only Tensors of floating point dtype can require
      gradients"), in two places: torch before 2.13 (2.11 seen on the GPU) wraps each
      shard so in `FSDPParam._init_sharded_param` and only then sets the parameter's
      own requires_grad (later releases pass it), and every release so moves a
      tensor-subclass parameter that is not on the mesh's device yet
      (`_move_states_to_device`: a model loaded on the CPU, sharded onto GPUs). During
      those two steps, for an NF4Weight, a Parameter of a non-floating tensor defaults
      to requires_grad=False: what torch does for a plain frozen parameter."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_init
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
        fully_shard_module = importlib.import_module("torch.distributed.fsdp._fully_shard._fully_shard")
    except ImportError:  # a torch built without distributed
        return
    if getattr(FSDPParam._init_sharded_param, "_slothai", False):
        return
    FSDPParam._init_sharded_param = _frozen_nf4_parameters(FSDPParam._init_sharded_param, lambda a: a[1:2])
    wrapped = {"_get_managed_states": _taking_nf4_weights(_fsdp_init._get_managed_states)}
    if hasattr(_fsdp_init, "_move_states_to_device"):
        wrapped["_move_states_to_device"] = _frozen_nf4_parameters(_fsdp_init._move_states_to_device, lambda a: a[0])
    # Where fully_shard calls them: _fsdp_init itself (torch >= 2.11), or _fully_shard's
    # own bindings of them, imported by name (torch 2.10).
    for module in (_fsdp_init, fully_shard_module):
        for name, fn in wrapped.items():
            if hasattr(module, name):
                setattr(module, name, fn)


def take_nf4_weights(model):
    """Replace each Params4bit of `model`'s slothai-patched Linear4bit layers whose rows
    split into whole blocks by an NF4Weight viewing its tensors (what fully_shard does
    as it takes a layer); the others stay Params4bit."""
    for module, weight in list(_patched_4bit_weights(model.modules())):
        nf4 = to_nf4_weight(weight)
        if nf4 is not None:
            module.weight = nf4


def let_accelerate_shard_nf4_weights():
    """accelerate's FSDP2 plugin (1.15, `fsdp2_prepare_model`) leaves every uint8
    `Params4bit` out of sharding (`ignored_params`: bitsandbytes' own does not survive
    FSDP2), so it would keep slothai's shardable 4-bit weights whole on every rank.
    If accelerate is imported, its call gets the model with those weights already
    NF4Weights (`take_nf4_weights`), which it shards; the ones whose rows do not
    split stay Params4bit, which it keeps whole, as fully_shard_layers does."""
    acc = sys.modules.get("accelerate.accelerator")
    if acc is None and "accelerate" in sys.modules:  # (PEFT and transformers' device_map load it already)
        try:
            import accelerate.accelerator as acc
        except ImportError:
            return
    prepare = getattr(acc, "fsdp2_prepare_model", None)
    if prepare is None or getattr(prepare, "_slothai", False):
        return
    acc.fsdp2_prepare_model = _with_nf4_weights(prepare)


def _with_nf4_weights(fsdp2_prepare_model):
    @functools.wraps(fsdp2_prepare_model)
    def wrapper(accelerator, model, *args, **kwargs):
        if "unsloth" not in sys.modules:
            take_nf4_weights(model)
        return fsdp2_prepare_model(accelerator, model, *args, **kwargs)

    wrapper._slothai = True
    return wrapper


def _taking_nf4_weights(get_managed_states):
    @functools.wraps(get_managed_states)
    def wrapper(modules, ignored_params=None, *args, **kwargs):
        _take_nf4_weights(list(modules), ignored_params)
        return get_managed_states(modules, ignored_params, *args, **kwargs)

    return wrapper


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


def skip_4bit_weights_in_ddp_broadcast(model):
    """List the frozen 4-bit weights of `model`'s patched Linear4bit layers in DDP's
    `_ddp_params_and_buffers_to_ignore`: each rank loaded the same ones, and DDP
    would broadcast only their codes (their scales live in the quant_state, which is
    no parameter or buffer): skipping them saves the 4-bit model's size in traffic
    at DDP's construction and claims no consistency it could not give."""
    names = {n for n, p in model.named_parameters()
             if not p.requires_grad and (isinstance(p, NF4Weight) or _is_params4bit(p))}
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
