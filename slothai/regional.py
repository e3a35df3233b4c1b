"""`slothai.compile(model)`: torch.compile for QLoRA training, regional by default.

Regional: each decoder layer is compiled on its own and, since the layers share
their code and their guards, the first layer's compiled code serves them all.
What keeps it that way on Hugging Face models: the KV cache is turned off
(training does not need it; a cache object per layer and its `layer_idx` are what
pushed naive per-layer compilation over the recompile limit), and sizes are
dynamic from the start, each with its own symbol (duck shaping off, process-wide),
so a new sequence length does not recompile.
"""
import torch
import torch.fx.experimental._config  # noqa: F401  (use_duck_shape)


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


def compile(model, mode="regional", *, backend="inductor", dynamic=True, fullgraph=False, **options):
    """Compile `model` in place for training and return it.

    mode: "regional" (each decoder layer, compiled once and reused), "full"
    (the whole model, as `model.compile()`), or "none".
    """
    if mode not in ("regional", "full", "none"):
        raise ValueError(f"mode must be 'regional', 'full' or 'none', got {mode!r}")
    if mode == "none":
        return model
    _disable_kv_cache(model)
    if dynamic:
        # Duck shaping gives equal sizes one symbol: a sequence length equal to the
        # (static) hidden size, 2048 and 2048 say, would be specialised and every
        # other length recompile. Give each dynamic size its own symbol.
        torch.fx.experimental._config.use_duck_shape = False
    kwargs = dict(backend=backend, dynamic=dynamic, fullgraph=fullgraph, **options)
    if mode == "full":
        model.compile(**kwargs)
        return model
    if any(p.requires_grad for p in model.parameters()) and hasattr(model, "enable_input_require_grads"):
        # The first layer's input would otherwise need no grad and the others' would:
        # two compiled variants of the same layer. One, and half the compile time.
        model.enable_input_require_grads()
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("no decoder layers found (ModuleList members named *DecoderLayer); use mode='full'")
    for layer in layers:
        layer.compile(**kwargs)
    return model
