"""`slothai.compile(model)`: torch.compile for QLoRA training, regional by default.

Regional: each decoder layer is compiled on its own and, since the layers share
their code and their guards, the first layer's compiled code serves them all.
What keeps it that way on Hugging Face models: the KV cache is turned off
(training does not need it; a cache object per layer and its `layer_idx` are what
pushed naive per-layer compilation over the recompile limit), every layer's input
requires grad (as the first one's otherwise would not), and the batch and
sequence sizes are dynamic from the first call while the model's own sizes stay
static, so a new sequence length does not recompile and the kernels are compiled
for the model's real hidden sizes.
"""
import collections
import inspect
import weakref

import torch
from torch.utils._pytree import tree_leaves


def decoder_layers(model):
    """The repeated blocks: members of ModuleLists whose class name ends in 'DecoderLayer'."""
    layers = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            layers += [m for m in module if type(m).__name__.endswith("DecoderLayer")]
    return layers


def _disable_kv_cache(model):
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False


def mark_token_dims_dynamic(hidden, *others):
    """Mark hidden's leading dims (batch, sequence) dynamic, and every dim of the
    other tensors (position embeddings, masks, ids: nested anywhere in `others`)
    whose size is one of those. The last dim of hidden (the model's width) stays
    static: marking it too — what dynamic=True does — compiled every kernel for a
    symbolic width, made compiling slower and let a sequence length equal to the
    width be specialised. Sizes 0 and 1 are specialised by torch regardless."""
    sizes = set(hidden.shape[:-1])
    for d in range(hidden.dim() - 1):
        torch._dynamo.maybe_mark_dynamic(hidden, d)
    for t in tree_leaves(others):
        if isinstance(t, torch.Tensor):
            for d, n in enumerate(t.shape):
                if n in sizes:
                    torch._dynamo.maybe_mark_dynamic(t, d)


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

    def __init__(self, layer, original, dynamic, kwargs):
        self.layer, self.original, self.dynamic, self.kwargs = layer, original, dynamic, kwargs
        self._compiled = None
        _REGIONS.add(self)

    def __getstate__(self):
        return {**self.__dict__, "_compiled": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        _REGIONS.add(self)

    def _uncompiled(self, *args, **kw):
        if self.original is not None:
            return self.original(*args, **kw)
        return type(self.layer).forward(self.layer, *args, **kw)

    def __call__(self, *args, **kw):
        if kw.get("past_key_values", kw.get("past_key_value")) is not None or kw.get("use_cache"):
            REGION_CALLS["eager (KV cache)"] += 1
            return self._uncompiled(*args, **kw)
        if not (self.layer.training and torch.is_grad_enabled()):
            REGION_CALLS["eager (no grad or eval)"] += 1
            return self._uncompiled(*args, **kw)
        REGION_CALLS["compiled"] += 1
        if self._compiled is None:
            # The class's forward, compiled once: every layer passes itself, so all
            # share the code object and its cache entries (as bound methods did).
            fn = self.original if self.original is not None else type(self.layer).forward
            self._compiled = torch.compile(fn, **self.kwargs)
        hidden = args[0] if args else kw.get("hidden_states")
        if self.dynamic and isinstance(hidden, torch.Tensor) and hidden.dim() >= 2:
            mark_token_dims_dynamic(hidden, args[1:], kw)
        if self.original is not None:
            return self._compiled(*args, **kw)
        return self._compiled(self.layer, *args, **kw)

    @property
    def __signature__(self):
        return inspect.signature(self.original or type(self.layer).forward.__get__(self.layer))


REGION_CALLS = collections.Counter()  # calls of compiled layers by path taken, read by compile_report
_REGIONS = weakref.WeakSet()  # every _CompiledForward made, for regions_at_recompile_limit


def regions_at_recompile_limit():
    """[{"function", "variants", "limit"}] for each compiled code object of a
    `slothai.compile`d layer that holds as many variants as Dynamo's recompile limit."""
    limit = torch._dynamo.config.recompile_limit
    seen, out = set(), []
    for region in list(_REGIONS):
        fn = region.original if region.original is not None else type(region.layer).forward
        code = getattr(fn, "__code__", None)
        if code is None or code in seen:
            continue
        seen.add(code)
        n = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))
        if n >= limit:
            out.append(dict(function=f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})", variants=n,
                            limit=limit))
    return out


def _compile_layer(layer, dynamic, kwargs):
    """Compile the layer's forward in place; the marking runs outside the compiled
    region (inside it, marking is not allowed). A second call recompiles from the
    forward the layer had before the first."""
    current = layer.__dict__.get("forward")
    original = current.original if isinstance(current, _CompiledForward) else current
    layer.forward = _CompiledForward(layer, original, dynamic, kwargs)


def compiled_layers(model):
    """The decoder layers `compile` put a compiled forward on."""
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), _CompiledForward)]


def _inputs_require_grad(module, inputs, output):
    output.requires_grad_(True)


def _enable_input_require_grads(model):
    """transformers' `enable_input_require_grads`, with a module-level hook: theirs is a
    local function, and a model holding it no longer pickles or torch.saves."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    if embeddings is not None and _inputs_require_grad not in embeddings._forward_hooks.values():
        embeddings.register_forward_hook(_inputs_require_grad)


def compile(model, mode="regional", *, backend="inductor", dynamic=True, fullgraph=False, **options):
    """Compile `model` in place for training and return it.

    mode: "regional" (each decoder layer, compiled once and reused), "full"
    (the whole model, as `model.compile()`), or "none".
    dynamic: True makes batch and sequence sizes dynamic from the first call (no
    recompile for a new length); False leaves torch's default (static first,
    then dynamic where a size changed: one recompile).
    """
    if mode not in ("regional", "full", "none"):
        raise ValueError(f"mode must be 'regional', 'full' or 'none', got {mode!r}")
    if mode == "none":
        return model
    _disable_kv_cache(model)
    kwargs = dict(backend=backend, fullgraph=fullgraph, **options)
    if mode == "full":
        # The model's inputs are ids, labels and masks: every size of them is a
        # batch or sequence size; the weights' sizes stay static (parameters).
        model.compile(dynamic=True if dynamic else None, **kwargs)
        return model
    if any(p.requires_grad for p in model.parameters()):
        # The first layer's input would otherwise need no grad and the others' would:
        # two compiled variants of the same layer. One, and half the compile time.
        _enable_input_require_grads(model)
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("no decoder layers found (ModuleList members named *DecoderLayer); use mode='full'")
    for layer in layers:
        _compile_layer(layer, dynamic, kwargs)
    return model
