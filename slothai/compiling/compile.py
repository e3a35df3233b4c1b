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
import warnings

from ..patching.causal_lm import decoder_layers
from ..patching.classes import is_patched
from ..patching.fsdp import is_fully_sharded
from .cudagraphs import install as install_graph_trees
from .regions import _compile_layer, _guarding_requires_grad, own_grads
from .saves import check_saves


# Low-memory mode: the loss head's chunk of logits (and their gradient, in place).
# 128 MiB is 512 tokens at a 128K vocabulary in bf16: GEMMs still large enough.
LOW_MEMORY_LOGITS_BYTES = 128 << 20


def _disable_kv_cache(model):
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False


def _runs_eager(layers):
    """Why these layers will run eager though compiled, or None: PEFT's DoRA forward
    (`use_dora=True`, QDoRA) clears a cache of its own inside the layer
    (`_dora_cache.clear()` in peft/tuners/lora/dora.py), a side effect Dynamo refuses
    inside the checkpointed region `compile` makes: the layer runs eager, with the
    same numbers (compile_report counts those calls as EAGER, with the reason)."""
    dora = sorted({name for layer in layers for m in layer.modules()
                   for name, on in (getattr(m, "use_dora", None) or {}).items() if on})
    if not dora:
        return None
    return (f"slothai.compile: the decoder layers hold DoRA adapters ({', '.join(dora)}); PEFT's DoRA forward "
            "clears a cache inside the layer (peft/tuners/lora/dora.py), a side effect torch.compile does not trace "
            "there, so those layers run EAGER (same results; compile_report counts their calls as EAGER)")


def _unsupported(model, layers):
    """Why `compile` cannot compile these layers, or None: PEFT's ParamWrapper (LoRA on a
    parameter rather than a module: a mixture of experts' fused expert weights under
    transformers 5, which PEFT targets on Qwen3-MoE from the projection names, and on
    Mixtral when asked to by target_parameters) registers a torch parametrization
    around each forward, which Dynamo does not trace — a graph break in
    torch/nn/utils/parametrize.py, after which the whole layer runs eager."""
    wrapped = sorted({str(getattr(m, "parameter_name", "?")) for layer in layers for m in layer.modules()
                      if type(m).__name__ == "ParamWrapper" and type(m).__module__.startswith("peft")})
    if not wrapped:
        return None
    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return (f"slothai.compile does not support {family}: its decoder layers hold PEFT ParamWrapper modules "
            f"({', '.join(wrapped)}: LoRA on the parameters of a mixture of experts), whose forward registers a "
            "torch parametrization that torch.compile cannot trace (a graph break in torch/nn/utils/parametrize.py): "
            "those layers run EAGER (compile_report counts their calls as such). Their experts are not in 4-bit "
            "either (bitsandbytes quantizes Linear modules only)")


def _inputs_require_grad(module, inputs, output):
    output.requires_grad_(True)


def _enable_input_require_grads(model):
    """transformers' `enable_input_require_grads`, with a module-level hook: theirs is a
    local function, and a model holding it no longer pickles or torch.saves."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    if embeddings is not None and _inputs_require_grad not in embeddings._forward_hooks.values():
        embeddings.register_forward_hook(_inputs_require_grad)


def compile(model, mode="regional", *, backend="inductor", dynamic=True, fullgraph=False, adapters="compute",
            saves="lean", memory_budget=None, cudagraphs=None, bucket_lengths=None, low_memory=False, **options):
    """Compile `model` in place for training and return it.

    mode: "regional" (each decoder layer, compiled once and reused), "full"
    (the whole model, as `model.compile()`: saves and memory_budget do not
    apply), or "none".
    dynamic: True makes batch and sequence sizes dynamic from the first call (no
    recompile for a new length); False leaves torch's default (static first,
    then dynamic where a size changed: one recompile).
    adapters: "compute" runs the LoRA matmuls of each compiled layer in the
    model's compute dtype (fp16/bf16; fp32 master weights kept); "float32" keeps
    PEFT's fp32 adapter math.
    saves: what each compiled layer keeps for backward (saves.py).
    "lean": its matmul and attention outputs, except the MLP's up projection,
    which backward recomputes with the elementwise work between them (1B shape,
    H100, 2026-11-27: 4.13 GB, 0.068 s/step); "matmuls": the up projection's too
    (5.12 GB, 0.062 s); "offload": as "matmuls", but one of the MLP's two
    tokens x intermediate_size outputs (gate's, on Llama) goes to pinned host
    memory and back on a side stream, overlapping compute: "lean"'s memory without
    its recompute, for layers whose forward outlasts that copy, as at 8B
    (offload.py);
    None: AOTAutograd's partitioner decides, under memory_budget.
    memory_budget: with saves=None, the partitioner's activation-memory budget
    (1.0 saves what is fastest, 0 recomputes all it can); None leaves torch's.
    cudagraphs: replay each compiled layer as a CUDA graph (inductor, CUDA only),
    removing the per-kernel launch cost. A graph is recorded per sequence length,
    once (0.55-0.77 s for the 1B shape, on the second step at a length), so lengths
    are padded into 8 buckets per octave (`padded_length`; exact, see
    `_pad_tokens`), and a length whose bucket has no graphs yet runs in a larger
    bucket that has them until recording its own pays (RECORD_COST_STEPS). The
    gradient that would become a parameter's .grad is copied out of the graphs'
    memory first (_OwnGrad), so gradient accumulation works.
    None: on for a regional compile of a model on CUDA with inductor, not on a
    model FSDP2 shards or whose layers
    checkpoint activations (transformers' gradient checkpointing) — before this
    call, or after it, as Trainer, TRL and accelerate do: then at a layer's next call.
    bucket_lengths: pad sequence lengths as described; None: as cudagraphs.
    low_memory: each layer keeps only its input, in pinned host memory, and is
    recomputed in backward (copies overlap compute on a side stream; `saves` does
    not apply; inputs come back into two fixed buffers, so CUDA graphs replay; by
    default a call of more than LOW_MEMORY_CUDAGRAPH_TOKENS tokens runs without them);
    its MLP runs over token slices (LOW_MEMORY_MLP_SLICES) and the patched loss
    head takes smaller chunks of logits (LOW_MEMORY_LOGITS_BYTES).
    """
    if mode not in ("regional", "full", "none"):
        raise ValueError(f"mode must be 'regional', 'full' or 'none', got {mode!r}")
    if adapters not in ("compute", "float32"):
        raise ValueError(f"adapters must be 'compute' or 'float32', got {adapters!r}")
    check_saves(saves, memory_budget)
    if mode == "none":
        return model
    _disable_kv_cache(model)
    kwargs = dict(backend=backend, fullgraph=fullgraph, **options)
    sharded = is_fully_sharded(model)  # FSDP2 frees and reallocates the gathered weights every step
    if cudagraphs and sharded:
        raise ValueError("cudagraphs=True on a model sharded by fully_shard: a CUDA graph replays the addresses "
                         "of the weights it recorded, and FSDP2 frees and reallocates them every step")
    cudagraphs_default, bucket_default = cudagraphs is None, bucket_lengths is None
    if cudagraphs is None:
        cudagraphs = mode == "regional" and backend == "inductor" and not sharded and \
            any(p.is_cuda for p in model.parameters())
    if cudagraphs:
        if backend != "inductor":
            raise ValueError(f"cudagraphs needs backend='inductor', got {backend!r}")
        kwargs["options"] = {"triton.cudagraphs": True, **kwargs.get("options", {})}
        install_graph_trees()  # cheaper bookkeeping when a graph is recorded (one per length bucket)
    if mode == "full":
        # The model's inputs are ids, labels and masks: every size of them is a
        # batch or sequence size; the weights' sizes stay static (parameters).
        model.compile(dynamic=True if dynamic else None, **kwargs)
        model._compiled_call_impl = _guarding_requires_grad(model._compiled_call_impl)
        if cudagraphs:
            own_grads(model)
        return model
    if any(p.requires_grad for p in model.parameters()):
        # The first layer's input would otherwise need no grad and the others' would:
        # two compiled variants of the same layer. One, and half the compile time.
        _enable_input_require_grads(model)
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("no decoder layers found (ModuleList members named *DecoderLayer); use mode='full'")
    for why in (_unsupported(model, layers), _runs_eager(layers)):
        if why is not None:
            warnings.warn(why, UserWarning, stacklevel=2)
    if low_memory:
        for module in model.modules():
            if is_patched(module) and hasattr(module, "lm_head"):
                module.slothai_loss_chunk_bytes = LOW_MEMORY_LOGITS_BYTES
    options = dict(adapters=adapters, saves=saves, memory_budget=memory_budget, low_memory=low_memory,
                   bucket=bool(cudagraphs) if bucket_default else bucket_lengths, bucket_default=bucket_default,
                   cudagraphs="default" if cudagraphs_default else bool(cudagraphs))
    for layer in layers:
        _compile_layer(layer, dynamic, kwargs, options, model)
    return model
