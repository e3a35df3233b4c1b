"""Attention masks over the static cache's slots, and the attention a decode step runs.

Masks. `generate` hands the model ready-made 4D masks, which transformers' mask
builders return as they are: one for every decoder layer (Llama, Gemma, Mistral, whose
single mask is a sliding-window one when the config has a window), or one per layer
type (`config.layer_types`: Qwen2/3, Gemma 2/3) as the mapping those models accept.
A key slot is visible to the query at slot q when it holds a real token (the prompt's
attention mask, then ones), is not after q, and (sliding layers) is within the window:
`kv > q - sliding_window`, transformers' rule. A prompt's padding slot sees itself,
so that no query row is fully masked (its output would be NaN under SDPA's math and
reach every later layer through the padding slot's keys and values; real tokens never
see those slots). Boolean for SDPA; additive (0 / dtype min) for eager attention.

Attention. During `generate` a model whose config says "sdpa" runs `slothai_sdpa`
(registered with transformers' AttentionInterface): a decode step's single query per
row attends with its query heads grouped under their key/value head ([rows, kv heads,
groups, head dim] against the cache's [rows, kv heads, slots, head dim]), so the cache
is read once, where transformers' SDPA path repeats every key and value `groups` times
first (a copy of the whole cache per layer per token when compiled, and in
transformers < 5.20 always). Anything else (prefill, no grouping) is transformers'
SDPA attention.

Compiled (the decode step on CUDA), that grouped attention is two batched products and a
softmax (`_grouped_decode_matmul32`: fp32 scores, as flash attention keeps them) rather
than the SDPA call: a decode step is one query a row, so flash / cuDNN tiles are mostly
empty (inside the 1B decode step cuDNN took 11.7 us a layer, 16 at 8B, for 0.7 and 2.6 MB
of keys and values). Measured (H100, 2026-12-06, one machine, docs/measurements.md,
Generation), decode tokens/s against SDPA: 1B batch 1 740 against 678, batch 8 4698 against
4670; 8B batch 1 254 against 226, batch 8 1531 against 1496. SLOTHAI_DECODE_ATTENTION=sdpa
(read once) keeps the SDPA call instead. A form with bf16 scores (transformers' eager
arithmetic, 745 at 1B batch 1) was measured and taken out: no faster, less exact.
"""
import os

import torch
import torch.nn.functional as F

DECODE_ATTENTION = "slothai_sdpa"
DECODE_FORMS = ("matmul32", "sdpa")
DECODE_FORM = os.environ.get("SLOTHAI_DECODE_ATTENTION", "matmul32")  # read once
if DECODE_FORM not in DECODE_FORMS:
    raise ValueError(f"SLOTHAI_DECODE_ATTENTION={DECODE_FORM!r}: one of {DECODE_FORMS}")

# What each attention implementation takes as a mask.
MASK_FORMS = {"sdpa": "bool", DECODE_ATTENTION: "bool", "eager": "additive"}


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or heads == kv_heads or kwargs.get("softcap") is not None or \
            kwargs.get("position_bias") is not None or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, query.shape[-1])
    if DECODE_FORM != "sdpa" and torch.compiler.is_compiling() and not (module.training and dropout):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = _grouped_decode_matmul32(grouped, key, value, attention_mask, scale)
    else:
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling)
    return out.reshape(rows, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _masked(scores, mask):
    if mask is None:
        return scores
    return scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()


def _grouped_decode_matmul32(q, k, v, mask, scale):
    """softmax(q k^T scale + mask) v, one query a row, with flash attention's arithmetic: q
    [rows, kv heads, groups, d] against k, v [rows, kv heads, slots, d], mask [rows, 1, 1,
    slots] (True: seen) or additive; the scores the fp32 sums of the bf16 / fp16 products,
    unrounded (cuBLAS's bmm with an fp32 output on CUDA; fp32 operands elsewhere, the same
    products), the softmax in fp32, the probabilities rounded to the input dtype for their
    product with v (an fp32 sum, one rounding)."""
    rows, kv, groups, d = q.shape
    slots = k.shape[2]
    q3, k3 = q.reshape(rows * kv, groups, d), k.reshape(rows * kv, slots, d).transpose(1, 2)
    if q.is_cuda:
        scores = torch.bmm(q3, k3, out_dtype=torch.float32)
    else:  # (bmm's out_dtype is CUDA's alone)
        scores = torch.bmm(q3.float(), k3.float())
    scores = scores.reshape(rows, kv, groups, slots) * scale
    p = torch.softmax(_masked(scores, mask), dim=-1).to(q.dtype)
    return torch.matmul(p, v)


_REGISTERED = []


def register_decode_attention():
    """Make `slothai_sdpa` a name transformers' attention (and mask) lookups accept."""
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _REGISTERED.append(True)


def mask_layout(config):
    """How this model takes its masks, or (None, why) when `generate` cannot build
    them: ({layer type or None: sliding window or None}, form)."""
    implementation = getattr(config, "_attn_implementation", None)
    form = MASK_FORMS.get(implementation)
    if form is None:
        return None, f"attention implementation {implementation!r} (slothai's decode builds masks for sdpa and eager)"
    if getattr(config, "use_bidirectional_attention", False):
        return None, "use_bidirectional_attention"
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:
        return ({None: window}, form), None
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        return None, f"layer types {unknown}"
    if "sliding_attention" in types and window is None:
        return None, "sliding_attention layers without config.sliding_window"
    return ({"full_attention": None, "sliding_attention": window}, form), None


def _form(ok, form, dtype):
    if form == "bool":
        return ok
    return (~ok).to(dtype) * torch.finfo(dtype).min


def prefill_masks(layout, mask, dtype):
    """Masks [rows, 1, n, n] for a prefill of the n prompt slots; `mask` [rows, n] the
    prompt's attention mask."""
    windows, form = layout
    n = mask.shape[1]
    q = torch.arange(n, device=mask.device)
    causal = (q[None, :] <= q[:, None]) & mask.bool()[:, None, :]  # [rows, q, kv]
    causal = causal | torch.eye(n, dtype=torch.bool, device=mask.device)
    out = {}
    for kind, window in windows.items():
        ok = causal if window is None else causal & (q[None, :] > q[:, None] - window)
        out[kind] = _form(ok[:, None], form, dtype)
    return out[None] if None in out else out


def decode_masks(layout, mask, slots, cur, dtype):
    """Masks [rows, 1, 1, slots] for a decode step whose query sits at slot `cur`
    (0-dim tensor); `mask` [rows, slots] the attention mask over the cache."""
    windows, form = layout
    seen = mask.bool() & (slots <= cur)
    out = {}
    for kind, window in windows.items():
        ok = seen if window is None else seen & (slots > cur - window)
        out[kind] = _form(ok[:, None, None, :], form, dtype)
    return out[None] if None in out else out
