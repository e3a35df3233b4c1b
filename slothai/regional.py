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
import functools

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


def _compile_layer(layer, dynamic, kwargs):
    """Compile the layer's forward in place; the marking runs outside the compiled
    region (inside it, marking is not allowed). A second call recompiles from the
    forward the layer had before the first."""
    original = layer.__dict__.get("_slothai_uncompiled_forward", layer.forward)
    compiled = torch.compile(original, **kwargs)

    @functools.wraps(original)
    def forward(*args, **kw):
        hidden = args[0] if args else kw.get("hidden_states")
        if dynamic and isinstance(hidden, torch.Tensor) and hidden.dim() >= 2:
            mark_token_dims_dynamic(hidden, args[1:], kw)
        return compiled(*args, **kw)

    layer._slothai_uncompiled_forward = original
    layer.forward = forward


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
    if any(p.requires_grad for p in model.parameters()) and hasattr(model, "enable_input_require_grads"):
        # The first layer's input would otherwise need no grad and the others' would:
        # two compiled variants of the same layer. One, and half the compile time.
        model.enable_input_require_grads()
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("no decoder layers found (ModuleList members named *DecoderLayer); use mode='full'")
    for layer in layers:
        _compile_layer(layer, dynamic, kwargs)
    return model
