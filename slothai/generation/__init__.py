"""Fast `generate()` on patched QLoRA models: a static KV cache reused across calls,
the decode step replayed as a CUDA graph (one per batch-size bucket and adapter
state), the 4-bit projections and their LoRA terms through `slothai::nf4_linear`.

    model = slothai.patch(model)            # PEFT + bitsandbytes NF4 causal LM
    out = model.generate(**inputs, max_new_tokens=256, do_sample=True, top_p=0.9)
    slothai.generation.release(model)       # cache and graphs given back

generate.py (the call: transformers' preparation, then decode or transformers' own),
decode.py (the loop, compilation, CUDA graphs), sampling.py (the next-token rule as
tensor ops), cache.py (static cache and decode state), attention.py (masks, the
grouped decode attention). Imports slothai.ops and slothai.patching only; `patch`
(patching/) sets the switch, this package puts the method on the patched head's class.
"""
import functools

from ..patching.causal_lm import GENERATE, _causal_lm_heads
from ..patching.classes import add_methods, is_patched
from .decode import CALLS, Options
from .generate import ENGINE, engine_of, fast_generate

__all__ = ["release", "configure", "memory_bytes", "CALLS", "Options"]


def _make_generate(base):
    original = base.generate

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        if not (is_patched(self) and getattr(self, GENERATE, False)):
            return original(self, *args, **kwargs)
        return fast_generate(self, original, args, kwargs)
    return generate


add_methods("causal_lm", {"generate": _make_generate}, attrs=(ENGINE,))


def _heads(model):
    heads = [m for m in _causal_lm_heads(model) if is_patched(m)]
    if not heads:
        raise ValueError("no patched causal-LM head in this model: call slothai.patch(model) first")
    return heads


def release(model):
    """Give back the KV caches, decode buffers and CUDA graphs `generate` keeps for
    `model` between calls (`torch.cuda.empty_cache()` then returns them to the device).
    The next `generate` allocates and records again."""
    for head in _heads(model):
        engine = head.__dict__.get(ENGINE)
        if engine is not None:
            engine.release()


def memory_bytes(model):
    """Bytes of caches and decode buffers `generate` holds for `model` (CUDA graphs'
    own memory pools not counted)."""
    return sum(head.__dict__[ENGINE].nbytes() for head in _heads(model) if ENGINE in head.__dict__)


def configure(model, **options):
    """Set how `generate` decodes on `model` (decode.Options): compile ("regional",
    "full", None; "auto": regional on CUDA, eager on the CPU), compile_prefill (regional:
    False runs prefills eager, compiling the decode step alone), backend, cudagraphs
    (None: on CUDA), check_every (steps between checks that every row finished),
    strict (raise where it would fall back to transformers' generate). Returns the
    options."""
    for head in _heads(model):
        engine = engine_of(head)
        for name, value in options.items():
            if not hasattr(engine.options, name):
                raise TypeError(f"unknown generation option {name!r}; options: {sorted(vars(Options()))}")
            setattr(engine.options, name, value)
        engine.release()  # its graphs were recorded the old way
        engine._compiled.clear()
    return engine.options
