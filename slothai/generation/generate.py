"""The `generate` a patched causal-LM head carries: transformers' own preparation of
the call (generation config and keyword arguments, special tokens, attention mask,
lengths, logits processors and stopping criteria — its `GenerationMixin` helpers, so
the defaults are the release's), then slothai's decode (decode.py) for greedy and
sampled generation; transformers' own `generate`, with one warning naming what it
does not cover, for anything else. Reached as users and TRL call it: through
`PeftModelForCausalLM.generate`, which calls the base model's."""
import inspect

import torch

from ..patching.fsdp import is_fully_sharded
from .decode import CALLS, Engine, warn_once
from .sampling import Sampler

ENGINE = "_slothai_generation"  # the head's attribute holding its Engine

# generate() arguments slothai's decode does not serve, when given (None / empty / False are fine).
_NOT_COVERED = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask",
                "custom_generate")

# Keyword arguments that are not generation-config fields and are fine to take.
_MODEL_KWARGS = ("input_ids", "attention_mask", "use_cache", "logits_to_keep", "return_dict")

# Generation-config fields that ask for what the decode does not return.
_CONFIG_NOT_COVERED = ("output_attentions", "output_hidden_states", "token_healing")

_CACHES = (None, "static", "dynamic", "hybrid", "sliding_window")


def engine_of(head):
    engine = head.__dict__.get(ENGINE)
    if engine is None:
        engine = head.__dict__[ENGINE] = Engine()
    return engine


class Request:
    """A call slothai's decode serves: prompt ids and mask (rows repeated for
    `num_return_sequences`), how many new tokens at most, the sampler, the output form."""

    def __init__(self, ids, mask, max_new, sampler, return_dict):
        self.ids, self.mask, self.max_new, self.sampler, self.return_dict = ids, mask, max_new, sampler, return_dict


def prepare(head, original, args, kwargs):
    """(Request, None) for a call slothai's decode serves, else (None, why not)."""
    try:
        bound = inspect.signature(original).bind(head, *args, **kwargs)
    except TypeError as e:
        return None, f"arguments transformers' generate would refuse ({e})"
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    extra = arguments.pop("kwargs", {})
    for name in _NOT_COVERED:
        value = arguments.pop(name, None)
        if value is not None and value is not False and not (isinstance(value, (list, tuple)) and not value):
            return None, f"{name}="
    inputs, generation_config = arguments.pop("inputs", None), arguments.pop("generation_config", None)
    if arguments:
        return None, f"argument {sorted(arguments)[0]}="
    extra = dict(extra)
    extra.pop("trust_remote_code", None)
    if "tokenizer" in extra:
        return None, "tokenizer= (stop strings)"
    def default(name):  # transformers' generate: no length given anywhere
        return extra.get(name) is None and getattr(generation_config, name, None) is None and \
            getattr(head.generation_config, name, None) is None

    has_default_max_length, has_default_min_length = default("max_length"), default("min_length")
    config, model_kwargs = head._prepare_generation_config(generation_config, **extra)
    mode = config.get_generation_mode(None)
    if getattr(mode, "value", mode) not in ("greedy_search", "sample"):
        return None, f"generation mode {getattr(mode, 'value', mode)}"
    for name in _CONFIG_NOT_COVERED:
        if getattr(config, name, None):
            return None, f"{name}=True"
    if getattr(config, "cache_implementation", None) not in _CACHES:
        return None, f"cache_implementation={config.cache_implementation!r}"
    unknown = sorted(k for k, v in model_kwargs.items() if k not in _MODEL_KWARGS and v is not None)
    if unknown:
        return None, f"model argument {unknown[0]}="
    devices = {str(p.device) for p in head.parameters()}
    if len(devices) > 1:
        return None, f"a model split across devices ({sorted(devices)})"
    if is_fully_sharded(head):
        return None, "a model FSDP2 shards (its weights move every step; no CUDA graph can hold them)"
    ids = inputs if inputs is not None else model_kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int) or \
            ids.shape[1] == 0:
        return None, "no 2D input_ids (inputs_embeds, or no prompt)"
    device = head.get_input_embeddings().weight.device
    ids = ids.to(device=device, dtype=torch.long)
    mask = model_kwargs.get("attention_mask")
    head._prepare_special_tokens(config, mask is not None, device=device)
    if mask is None:
        mask = head._prepare_attention_mask_for_generation(ids, config, {})
    if mask.shape != ids.shape:
        return None, "an attention mask not of input_ids' shape"
    mask = mask.to(device=device, dtype=torch.long)
    repeat = int(config.num_return_sequences or 1)
    if repeat > 1:
        ids, mask = ids.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
    prompt = ids.shape[1]
    config = head._prepare_generated_length(generation_config=config, has_default_max_length=has_default_max_length,
                                            has_default_min_length=has_default_min_length,
                                            model_input_name="input_ids", inputs_tensor=ids, input_ids_length=prompt)
    max_new = int(config.max_length) - prompt
    if max_new < 1:
        return None, "max_length not past the prompt"
    from transformers.generation.logits_process import LogitsProcessorList
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    processors = head._get_logits_processor(generation_config=config, input_ids_seq_length=prompt,
                                            encoder_input_ids=ids, prefix_allowed_tokens_fn=None,
                                            logits_processor=LogitsProcessorList(), device=device,
                                            model_kwargs={"attention_mask": mask})
    criteria = head._get_stopping_criteria(generation_config=config, stopping_criteria=StoppingCriteriaList())
    want = bool(config.return_dict_in_generate)
    vocab = head.get_output_embeddings().weight.shape[0]
    sampler, why = Sampler.build(processors, criteria, config, vocab, device, want and bool(config.output_scores),
                                 want and bool(config.output_logits))
    if sampler is None:
        return None, why
    return Request(ids, mask, max_new, sampler, want), None


def fast_generate(head, original, args, kwargs):
    """slothai's decode for this call, or `original` (transformers' generate)."""
    engine = engine_of(head)
    try:
        request, why = prepare(head, original, args, kwargs)
    except Exception as e:  # transformers' own generate raises the user's error, if it is one
        if engine.options.strict:
            raise
        request, why = None, f"preparing the call failed ({type(e).__name__}: {e})"
    if request is None:
        return _fallback(head, original, args, kwargs, why)
    try:
        sequences, scores, logits = engine.generate(head, request.ids, request.mask, request.max_new, request.sampler)
    except Exception as e:
        if engine.options.strict:
            raise
        return _fallback(head, original, args, kwargs, f"slothai's decode failed: {type(e).__name__}: {e}")
    if not request.return_dict:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(scores) if request.sampler.want_scores else None,
                                     logits=tuple(logits) if request.sampler.want_logits else None)


def _fallback(head, original, args, kwargs, why):
    CALLS[f"transformers: {why}"] += 1
    warn_once(f"slothai: generate() runs transformers' own generate for {why}; slothai's decode serves greedy and "
              "sampled generation (temperature, top-k, top-p, min-p, repetition penalty, EOS and pad ids, "
              "num_return_sequences, scores and logits): see docs/generation.md")
    return original(head, *args, **kwargs)
