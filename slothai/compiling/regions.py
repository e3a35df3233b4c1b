"""A compiled decoder layer: `_CompiledForward` replaces the layer's forward and
runs it through torch.compile, keeping one compilation for every length (token
dims dynamic by position, one form of attention mask, length buckets under CUDA
graphs), and counts how each call ran for `compile_report` (`REGION_CALLS`)."""
import collections
import contextlib
import functools
import inspect
import weakref

import torch
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_leaves, tree_map

from ..patching.classes import is_patched
from .buckets import (_OWN_BUCKETS, LengthBuckets, _pad_tokens, _paddable_mask, _real_tokens, padded_length)
from .cudagraphs import has_cudagraphs, why_no_cudagraphs, without_cudagraphs
from .offload import inputs_to_host, slice_tokens, widest_to_host
from .saves import with_saves


# Low-memory mode: each layer's MLP runs over this many slices of the tokens under
# autograd (offload.sliced_forward), so that its backward holds a slice's temporaries.
LOW_MEMORY_MLP_SLICES = 4


# Low-memory mode with CUDA graphs by default: a layer call of more tokens than this
# runs compiled without them (a second variant, compiled at the first such call).
# A long call is GPU-bound, and a graph costs there without paying back (8B shape,
# bsz 1 x 65536, H100: the recording step 24.9 s against 14.5 s, peak 22.0 GB
# against 20.2); at 1B bsz 2 x 2048 (4096 tokens) graphs made the step 2.5x faster.
LOW_MEMORY_CUDAGRAPH_TOKENS = 32768


# A layer call without an attention mask gets an explicit causal one (see
# _CompiledForward._with_causal_mask) while it takes at most this much memory:
# 256 MiB is batch 1 x 16384 tokens, batch 16 x 4096.
CAUSAL_MASK_BYTES = 256 << 20


_MASKED = weakref.WeakSet()  # models (or lone layers) a compiled layer has been called with a mask: see _with_causal_mask


def mark_token_dims_dynamic(hidden, *others):
    """Mark hidden's leading dims (batch, sequence) dynamic, and the token dims of
    the other tensors (nested anywhere in `others`), by position: dims 0 and 1
    (batch or 1, tokens: rotary cos/sin, position ids; a 1-D tensor's only dim:
    cache positions) and, of a 4-D tensor (an attention mask [batch, 1, tokens,
    tokens]), dims 2 and 3, each where its size is the batch or sequence size. Never
    a feature dim: marked by size alone, the rotary tables' last dim (head_dim) was
    marked whenever the sequence length equalled it, a second compilation.
    The last dim of hidden (the model's width) stays static: marking it too — what
    dynamic=True does — compiled every kernel for a symbolic width, made compiling
    slower and let a sequence length equal to the width be specialised. Sizes 0 and
    1 are specialised by torch regardless."""
    sizes = set(hidden.shape[:-1])
    for d in range(hidden.dim() - 1):
        torch._dynamo.maybe_mark_dynamic(hidden, d)
    for t in tree_leaves(others):
        if isinstance(t, torch.Tensor):
            for d in (0, 2, 3) if t.dim() == 4 else (0, 1)[:t.dim()]:  # a mask's dim 1: heads (1)
                if t.shape[d] in sizes:
                    torch._dynamo.maybe_mark_dynamic(t, d)


def _hidden_of(args, kw):
    hidden = args[0] if args else kw.get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


def _in_compute_dtype(fn, skip=0):
    """fn under autocast to the dtype of its hidden states when those are fp16/bf16:
    PEFT keeps LoRA weights in fp32, and without autocast their matmuls (and the
    casts around them) run in fp32; with it they run in the compute dtype, as under
    HF Trainer's bf16=True. The fp32 weights stay the optimizer's master copy.
    Traced by Dynamo, so it is part of the compiled region, not a guard on it."""

    @functools.wraps(fn)
    def run(*args, **kw):
        hidden = _hidden_of(args[skip:], kw)
        if hidden is not None and hidden.dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(hidden.device.type, dtype=hidden.dtype):
                return fn(*args, **kw)
        return fn(*args, **kw)

    return run


class _CompiledForward:
    """The forward `compile` puts on a decoder layer: its compiled forward while the
    layer trains, its own forward otherwise.

    Compiled only for training calls (layer in training mode, autograd on, no KV
    cache): those are the calls a QLoRA run spends its time in, and they share one
    compiled graph across the layers. Reference passes without grad (DPO, KTO, GRPO's
    old and reference log-probs), evaluation and `generate()` run the layer's own
    forward: compiled, each would add its own variant — and generation with a cache
    one per layer (the cache object and `layer_idx` are guarded), which on a 4-layer
    model already passed Dynamo's recompile limit, after which Dynamo runs the layer
    eager anyway, silently. Measured (README): compiling the no-grad passes too (keyed
    on training mode alone) made a no-grad pass 3x faster on the CPU, but the
    variants multiply with each trainer's states — grad mode, whether the input
    requires grad, mask or none, PEFT switching adapters — and in 4 steps KTO reached
    8 compilations (the limit), GRPO 6 and DPO 4, against 1 or 2 this way.

    An object rather than a closure so that `copy.deepcopy` and pickle rebind it to
    the copy (it holds the layer; the compiled function is rebuilt on first use, as
    torch.compile's wrappers neither copy nor pickle).
    """

    def __init__(self, layer, original, dynamic, kwargs, options, model=None):
        self.layer, self.original, self.dynamic, self.kwargs = layer, original, dynamic, kwargs
        self.options = options  # adapters, saves, memory_budget, low_memory, bucket, cudagraphs: see `compile`
        self._model = weakref.ref(model) if model is not None else None  # for _settle_cudagraphs
        self._compiled = self._compiled_long = None
        self._widest = None  # the layer's widest matmul output, for saves="offload"
        self.buckets = LengthBuckets()  # new with each compiled function (its graphs are recorded anew)
        _REGIONS.add(self)

    def __getstate__(self):
        return {**self.__dict__, "_compiled": None, "_compiled_long": None, "_code": None, "_model": None,
                "buckets": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        _REGIONS.add(self)

    def _uncompiled(self, *args, **kw):
        if self.original is not None:
            return self.original(*args, **kw)
        return type(self.layer).forward(self.layer, *args, **kw)

    def __call__(self, *args, **kw):
        if torch.compiler.is_compiling():  # inside another compiled function (generate's whole decode step)
            return self._uncompiled(*args, **kw)
        if kw.get("past_key_values", kw.get("past_key_value", kw.get("cache"))) is not None or kw.get("use_cache"):
            REGION_CALLS["eager (KV cache)"] += 1
            return self._uncompiled(*args, **kw)
        if not (self.layer.training and torch.is_grad_enabled()):
            REGION_CALLS["eager (no grad or eval)"] += 1
            return self._uncompiled(*args, **kw)
        return self._run_compiled(*args, **kw)

    def _compile(self, kwargs=None):
        # The class's forward, compiled once: every layer passes itself, so all
        # share the code object and its cache entries (as bound methods did).
        fn = self.original if self.original is not None else type(self.layer).forward
        skip = 0 if self.original is not None else 1
        target = _in_compute_dtype(fn, skip) if self.options["adapters"] == "compute" else fn
        if self.options["low_memory"]:
            target = with_saves(target, "inputs")  # and inputs_to_host at the call
        elif self.options.get("saves") is not None:
            target = with_saves(target, self.options["saves"])
        self._code = target.__code__  # what Dynamo caches variants on, for regions_at_recompile_limit
        compiled = torch.compile(target, **(self.kwargs if kwargs is None else kwargs))
        if self.options["memory_budget"] is not None:
            # AOTAutograd's partitioner reads this when the layer compiles (inside the
            # call): recompute cheap work in backward instead of saving it. Scoped to
            # our layers' calls, not set for the user's process.
            compiled = torch._functorch.config.patch(activation_memory_budget=self.options["memory_budget"])(compiled)
        return _guarding_requires_grad(compiled)

    def _settle_cudagraphs(self, model=None):
        """CUDA graphs cannot run on a layer under transformers' gradient checkpointing
        (the recomputation in backward replays the graph over outputs the backward
        still reads) nor on a model FSDP2 shards (a graph replays the weight addresses
        it recorded; FSDP2 reallocates them every step). Trainer, TRL and accelerate
        turn those on after the user compiled, so this runs at the layer's calls (the
        whole model is looked at on the first only): CUDA graphs by `compile`'s default
        go off for the layer, with the length buckets that serve them, and it compiles
        again if it had; asked for explicitly, they are refused."""
        if not has_cudagraphs(self.kwargs):
            return
        why = why_no_cudagraphs(self.layer, model)
        if why is None:
            return
        if self.options.get("cudagraphs") != "default":
            raise RuntimeError(f"cudagraphs=True, but {why}. Compile with cudagraphs=False, or leave cudagraphs to "
                               "slothai.compile's default, which turns them off here")
        self.kwargs = without_cudagraphs(self.kwargs)
        if self.options.get("bucket_default"):
            self.options = {**self.options, "bucket": False}
        self._compiled = self._compiled_long = None

    def _long_call(self, hidden):
        """A low-memory call too long for CUDA graphs by default (LOW_MEMORY_CUDAGRAPH_TOKENS)."""
        return self.options["low_memory"] and self.options.get("cudagraphs") == "default" and \
            hidden is not None and has_cudagraphs(self.kwargs) and \
            hidden.numel() // max(1, hidden.shape[-1]) > LOW_MEMORY_CUDAGRAPH_TOKENS

    def _run_compiled(self, *args, **kw):
        first = self._compiled is None and self._compiled_long is None
        self._settle_cudagraphs(self._model() if first and self._model is not None else None)
        hidden = _hidden_of(args, kw)
        if self._long_call(hidden):
            if self._compiled_long is None:
                self._compiled_long = self._compile(without_cudagraphs(self.kwargs))
            compiled, bucket = self._compiled_long, False
        else:
            if self._compiled is None:
                self._compiled, self.buckets = self._compile(), LengthBuckets()
                if has_cudagraphs(self.kwargs):
                    own_grads(self.layer)
            compiled, bucket = self._compiled, self.options["bucket"]
        n = hidden.shape[1] if hidden is not None and hidden.dim() == 3 else None
        if n:
            kw = self._with_causal_mask(kw, hidden)
        run = None
        mask = kw.get("attention_mask")
        if bucket and n and _paddable_mask(mask, n):
            reuse = has_cudagraphs(self.kwargs) and not _OWN_BUCKETS[-1]
            run = self.buckets.choose((hidden.shape[0], mask is not None), n, reuse)
            if run > padded_length(n):
                REGION_CALLS["of those, in a larger recorded bucket"] += 1
        if run is not None and run != n:
            args, kw = _pad_tokens(args, kw, n, run)
            hidden = _hidden_of(args, kw)
        else:
            n = None
        if self.dynamic and hidden is not None and hidden.dim() >= 2:
            mark_token_dims_dynamic(hidden, args[1:], kw)
        graphs, before = counters["stats"]["unique_graphs"], _dynamo_counts()
        with self._to_host(hidden):
            out = compiled(*args, **kw) if self.original is not None else compiled(self.layer, *args, **kw)
        REGION_CALLS[_how_it_ran(self._code, before)] += 1
        if counters["stats"]["unique_graphs"] != graphs and has_cudagraphs(self.kwargs):
            self._own_grads_of_model()
        return out if n is None else tree_map(functools.partial(_real_tokens, n=n, padded=run), out)

    def _with_causal_mask(self, kw, hidden):
        """kw with its attention mask in one form, so that calls with padding and
        without — and Gemma 3's full-attention and sliding layers — share one compiled
        graph (Dynamo guards on the argument's type and strides: else a second
        compilation, and a second set of CUDA graphs).

        Once a layer of this model has been called with a mask (a padded batch, a
        sliding window), `None` becomes the causal mask transformers' SDPA path builds
        for a padded batch (bool [batch, 1, n, n], True: attends): the same attention,
        SDPA with that mask instead of is_causal=True. Before that, None stays None: a
        model trained without padding (packing, fixed lengths) keeps SDPA's causal
        kernels, which skip the masked half of the scores (with a mask they compute it;
        on a GPU no flash kernel takes a mask). So a run whose first batch has no
        padding and a later one has compiles twice, where `warm_up(..., padded=True)`
        first, or a padded first batch, gives one compilation. A mask transformers
        expanded over the batch (stride 0: a sliding window, no padding) is made
        contiguous, as a padded batch's is. None stays None but for a causal SDPA
        attention, and while the mask is at most CAUSAL_MASK_BYTES: a longer call
        keeps None (and, padded, compiles a variant of its own)."""
        mask = kw.get("attention_mask")
        model = self._model() if self._model is not None else None
        owner = model if model is not None else self.layer  # (a Module's truth is its len(), if it has one)
        if isinstance(mask, torch.Tensor):
            _MASKED.add(owner)
            return kw if mask.is_contiguous() else {**kw, "attention_mask": mask.contiguous()}
        if "attention_mask" not in kw or mask is not None or owner not in _MASKED:
            return kw
        attn = getattr(self.layer, "self_attn", None)
        config = getattr(attn, "config", None)
        if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(attn, "is_causal", None) is not True:
            return kw
        batch, n = hidden.shape[:2]
        if batch * n * n > CAUSAL_MASK_BYTES:
            return kw
        return {**kw, "attention_mask": _causal_mask(batch, n, hidden.device)}

    def _to_host(self, hidden):
        """What of this call's saved tensors goes to pinned host memory (offload.py)."""
        if hidden is None:
            return contextlib.nullcontext()
        if self.options["low_memory"]:
            return inputs_to_host(hidden)
        if self.options.get("saves") == "offload":
            if self._widest is None:
                self._widest = max(m.out_features for m in self.layer.modules()
                                   if isinstance(getattr(m, "out_features", None), int))
            return widest_to_host(hidden.numel() // hidden.shape[-1], self._widest)
        return contextlib.nullcontext()

    def _own_grads_of_model(self):
        """A layer compiled again: a guard failed, maybe because a parameter was unfrozen
        since the first call (`requires_grad` is guarded on). The new variant serves every
        layer of the model that compiles alike, so each one's trainable parameters get
        their `_OwnGrad`; the backward that follows runs the hooks."""
        model = self._model() if self._model is not None else None
        for region in list(_REGIONS) if model is not None else [self]:
            same = region is self or (region._model is not None and region._model() is model)
            if same and has_cudagraphs(region.kwargs):
                own_grads(region.layer)

    @property
    def __signature__(self):
        return inspect.signature(self.original or type(self.layer).forward.__get__(self.layer))


@functools.lru_cache(maxsize=1)
def _causal_mask(batch, n, device):
    """[batch, 1, n, n] bool, True where a token attends (itself and those before it):
    the layout of transformers' sdpa_mask for a padded batch. One, kept: every layer
    of a step, and every step of that shape, takes it."""
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return causal.expand(batch, 1, n, n).contiguous()


class _OwnGrad:
    """A gradient hook on a trainable parameter of a layer replayed as a CUDA graph.

    The gradients the layer's backward graph returns live in the graphs' memory
    pool, which torch's CUDA-graph trees hand out again when the next step's
    forward starts. AccumulateGrad makes an unshared gradient the parameter's
    `.grad` as it is, so a `.grad` kept past that point — gradient accumulation
    (the next micro-batch's backward adds into it), or `zero_grad(set_to_none=False)`
    — would be memory the graphs overwrite: torch raises 'accessing tensor output
    of CUDAGraphs that has been overwritten' (pytorch/pytorch#169545; the 1-GPU
    run of bench_distributed.py, which accumulates two rows, crashed at its second
    backward). So the gradient that would become `.grad` is copied first, one copy
    of the LoRA gradients per step (later micro-batches add into it in place)."""

    __torch_unserializable__ = True  # not pickled with the parameter: compile adds it again

    def __init__(self, param):
        self.param = weakref.ref(param)

    def __call__(self, grad):
        param = self.param()
        return grad.clone() if param is not None and param.grad is None else grad


def own_grads(module):
    """Put `_OwnGrad` on each trainable parameter of `module` that has none yet."""
    for param in module.parameters():
        hooks = param._backward_hooks or {}
        if param.requires_grad and not any(isinstance(h, _OwnGrad) for h in hooks.values()):
            param.register_hook(_OwnGrad(param))


# torch.compile's guard shortcuts that skip a parameter whose module dicts did not change;
# each is turned off in our compiled calls where this torch has it and has it on.
_GUARD_SHORTCUTS = ("use_recursive_dict_tags_for_guards", "skip_tensor_guards_with_matching_dict_tags")


def _guarding_requires_grad(compiled):
    """`compiled`, building its guards without the shortcuts that skip a parameter whose
    module dicts did not change: there a parameter unfrozen (or frozen) after the first
    call reused the graph compiled without its gradient — silently no .grad. Under torch
    2.10-2.11 (the GPU image) the recursive dict-tag guards (on by default there;
    pytorch/pytorch#139476) did it to a compiled layer, and the matching-dict-tag tensor
    guards (on by default through 2.13) to a whole compiled model; 2.13 checks
    requires_grad on that path itself (pytorch/pytorch#177158). Off in our compiled calls
    only: a parameter's guard is a few C++ checks, against a layer's or a model's call
    (no step-time cost measured at 1B on an H100 for the first; the second not measured)."""
    config = torch._dynamo.config
    off = {name: False for name in _GUARD_SHORTCUTS if getattr(config, name, False)}
    return config.patch(off)(compiled) if off else compiled


REGION_CALLS = collections.Counter()  # calls of compiled layers by path taken, read by compile_report


_EAGER_WHY = {}  # compiled code object -> how its calls run since Dynamo broke its graph


def _dynamo_counts():
    return counters["frames"]["total"], counters["stats"]["unique_graphs"], dict(counters["graph_break"])


def _how_it_ran(code, before):
    """The REGION_CALLS key of a call of a compiled layer, from Dynamo's counters
    before it: "compiled", or "EAGER ..." with the reason — Dynamo broke the graph
    (the layer runs eager, or split into pieces with eager code between), or was
    asked to compile (no variant matched) and compiled nothing (the recompile limit).
    A call that matched a compiled variant leaves the counters as they were."""
    frames, graphs, breaks = _dynamo_counts()
    if frames == before[0]:
        why = _EAGER_WHY.get(code)
        if why is None and code is not None and not torch._dynamo.eval_frame._debug_get_cache_entry_list(code):
            # Dynamo left nothing to run for this code (its backend failed, and it
            # skips the frame since): every call runs eager without reaching Dynamo
            why = _EAGER_WHY[code] = "EAGER (Dynamo compiled nothing)"
        return why or "compiled"
    new = [reason.split("\n")[0].strip() for reason, n in breaks.items() if n > before[2].get(reason, 0)]
    if new:
        _EAGER_WHY[code] = (f"EAGER, split by a graph break ({new[0]})" if graphs != before[1] else
                            f"EAGER (graph break: {new[0]})")
        return _EAGER_WHY[code]
    if graphs == before[1]:
        limit = torch._dynamo.config.recompile_limit
        at_limit = code is not None and len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) >= limit
        return f"EAGER (recompile limit {limit} hit)" if at_limit else "EAGER (Dynamo compiled nothing)"
    _EAGER_WHY.pop(code, None)
    return "compiled"


_REGIONS = weakref.WeakSet()  # every _CompiledForward made, for regions_at_recompile_limit


def regions_at_recompile_limit():
    """[{"function", "variants", "limit"}] for each compiled code object of a
    `slothai.compile`d layer that holds as many variants as Dynamo's recompile limit."""
    limit = torch._dynamo.config.recompile_limit
    seen, out = set(), []
    for region in list(_REGIONS):
        code = getattr(region, "_code", None)
        if code is None or code in seen:
            continue
        seen.add(code)
        n = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))
        if n >= limit:
            out.append(dict(function=f"{type(region.layer).__name__}.forward, compiled as {code.co_name} "
                                     f"({code.co_filename}:{code.co_firstlineno})", variants=n,
                            limit=limit))
    return out


def _compile_layer(layer, dynamic, kwargs, options, model):
    """Compile the layer's forward in place; the marking runs outside the compiled
    region (inside it, marking is not allowed). A second call recompiles from the
    forward the layer had before the first."""
    current = layer.__dict__.get("forward")
    original = current.original if isinstance(current, _CompiledForward) else current
    layer.forward = _CompiledForward(layer, original, dynamic, kwargs, options, model)
    if has_cudagraphs(kwargs):
        _mark_quant_states_static(layer)
    mlp = getattr(layer, "mlp", None)
    if all(isinstance(getattr(mlp, name, None), torch.nn.Module) for name in ("gate_proj", "up_proj", "down_proj")):
        # a gated MLP (tensor in, tensor out, per token): not a mixture of experts, whose router spans tokens
        slice_tokens(mlp, LOW_MEMORY_MLP_SLICES if options["low_memory"] else None)


def _mark_quant_states_static(layer):
    """A Params4bit's block scales (quant_state: absmax, and state2's absmax and code,
    offset) are plain tensors, not parameters or buffers: inductor's CUDA graph trees
    would take them as inputs that may move and copy them into the graph's own
    buffers at every replay. They stay where they are for the model's life (PEFT's
    merge / unmerge write into them in place, see slothai/patching/linear4bit.py, _in_place), so they are marked
    static, unguarded (no recompile if one is replaced: it is then copied again).
    Untested on a GPU in this tree."""
    for module in layer.modules():
        weight = module._parameters.get("weight") if is_patched(module) else None
        qs = getattr(weight, "quant_state", None) if type(weight).__name__ == "Params4bit" else None
        if qs is None:
            continue
        state2 = getattr(qs, "state2", None)
        for t in (qs.absmax, getattr(qs, "offset", None), getattr(state2, "absmax", None),
                  getattr(state2, "code", None)):
            if isinstance(t, torch.Tensor):
                torch._dynamo.mark_static_address(t, guard=False)


def compiled_layers(model):
    """The decoder layers `compile` put a compiled forward on."""
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), _CompiledForward)]
