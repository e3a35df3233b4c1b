"""Build 4-bit QLoRA models (random weights, no download) and run training steps, for
users trying slothai without a checkpoint: what `make demo` and `python -m slothai
report` run, and what the tests and benchmarks/bench_qlora.py build on. The library
itself does not import it."""
import contextlib
import resource
import tempfile
import time

import torch

from .compiling.warmup import collated

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Shapes by name. "tiny" exists for every family; the others are Llama shapes.
SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_theta=500000.0),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
}
FAMILIES = ("llama", "mistral", "qwen2", "gemma2")


def make_config(name="tiny", family="llama"):
    from transformers import AutoConfig

    if name not in SHAPES:
        return AutoConfig.from_pretrained(name)
    if name != "tiny" and family != "llama":
        raise ValueError(f"{name} is a Llama shape; family must be 'llama'")
    kw = dict(SHAPES[name], max_position_embeddings=8192)
    if family == "gemma2":
        kw.update(final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=32,
                  query_pre_attn_scalar=16)
    return AutoConfig.for_model(family, **kw)


def build(name="tiny", family="llama", *, device="cpu", dtype=torch.float32, lora_r=8, seed=0, path=None,
          task_type="CAUSAL_LM", prepare_kbit=False):
    """A bitsandbytes NF4 (double-quantized) model with PEFT LoRA on all 7 projections.

    Random weights are drawn with `seed`, saved, and loaded back through
    `from_pretrained` with a BitsAndBytesConfig, as a user would load a checkpoint;
    `path` (or a `name` that is not a known shape) loads that checkpoint instead.
    `task_type="CAUSAL_LM"` (what tutorials and TRL use) makes `get_peft_model` return a
    PeftModelForCausalLM; None gives the bare PeftModel. `prepare_kbit` calls PEFT's
    `prepare_model_for_kbit_training` first, as QLoRA tutorials do (every weight that is
    not 4-bit to fp32, input gradients on, transformers' gradient checkpointing on).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    with contextlib.ExitStack() as stack:
        if path is None and name in SHAPES:
            path = stack.enter_context(tempfile.TemporaryDirectory())
            torch.manual_seed(seed)
            AutoModelForCausalLM.from_config(make_config(name, family), dtype=dtype).save_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path or name, quantization_config=quant, dtype=dtype,
                                                     device_map=device)
    if prepare_kbit:
        model = prepare_model_for_kbit_training(model)
    torch.manual_seed(seed + 1)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                             target_modules=PROJECTIONS, task_type=task_type))
    model.config.use_cache = False
    return model.train()


def batches(vocab, batch, seqs, steps, device, seed=0, padded=0):
    """Random token ids [batch, seqs[i]] per step; with `padded`, the batch a padding
    collator makes: model kwargs whose last row is `padded` tokens shorter (attention
    mask 0 and labels -100 there)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        ids = torch.randint(0, vocab, (batch, seqs[i % len(seqs)]), generator=g).to(device)
        if not padded:
            yield ids
            continue
        mask = torch.ones_like(ids)
        mask[-1, ids.shape[1] - padded:] = 0
        yield collated(ids, mask)


def peak_memory_gb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB, process peak so far


def model_inputs(batch):
    """A batch of `batches`: token ids (labels = ids) or the model's keyword arguments."""
    return batch if isinstance(batch, dict) else dict(input_ids=batch, labels=batch)


def train_step(model, opt, ids):
    """One AdamW step on (ids -> labels=ids), or on a batch of model kwargs, timed to
    the device's end; returns (loss, seconds)."""
    inputs = model_inputs(ids)
    ids = inputs["input_ids"]
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    value = loss.item()
    if cuda:
        torch.cuda.synchronize()
    return value, time.perf_counter() - t


def train(model, batch_list, *, lr=1e-3, log=None):
    """AdamW steps on (ids -> labels=ids); returns [(loss, seconds, tokens)]."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    out = []
    for i, batch in enumerate(batch_list):
        inputs = model_inputs(batch)
        value, dt = train_step(model, opt, inputs)
        ids = inputs["input_ids"]
        out.append((value, dt, ids.numel()))
        if log:
            log(f"  step {i + 1}/{len(batch_list)}  seq {ids.shape[1]:5d}  loss {value:.4f}  "
                f"{dt:7.3f} s  {ids.numel() / dt:9.0f} tok/s")
    return out
