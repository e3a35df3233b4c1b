"""`slothai.warm_up(model, lengths)`: a compiled model's first steps at each length,
taken before training.

Under `slothai.compile`'s CUDA graphs a new length bucket costs two slow steps: the
first runs its layers' graphs outside a graph once (CUDA-graph trees' warm-up), the
second records them, and only the third replays (1B shape, H100: ~0.3-0.45 s and
~0.55-0.65 s against 0.066 s replayed; README). `warm_up` takes those two steps,
forward and backward on random tokens, for the bucket of every length given, so that
training at those lengths replays from its first step: the cost moves to set-up, as
a serving engine captures its graphs before it serves. The first call also compiles.

The model is left as it was: no optimizer step; each trainable parameter's `.grad`
and the random number generators (CPU and the model's GPU) are put back; its
training mode too.
"""
import time

import torch

from .regional import compiled_layers, padded_length


def warm_up(model, lengths, batch_size=1):
    """Take the first two training steps' forward and backward (no optimizer step) at
    the bucket of each of `lengths` (sequence lengths, tokens), `batch_size` rows of
    random token ids each, through `model(input_ids=ids, labels=ids).loss`: the call
    HF Trainer and TRL make. Run it under the autocast you train under, if any.
    Returns {tokens run: seconds} (the first includes compiling). Lengths that pad to
    one bucket (`padded_length`) are run once, at the bucket's length."""
    lengths = list(lengths)
    if not lengths or not all(isinstance(n, int) and n >= 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    regions = [layer.forward for layer in compiled_layers(model)]
    if not regions:
        raise ValueError("warm_up needs a model compiled by slothai.compile (mode='regional'): none of its "
                         "layers is")
    bucket = regions[0].options["bucket"]
    runs = sorted({padded_length(n) if bucket else n for n in lengths}, reverse=True)
    embeddings = model.get_input_embeddings()
    device, vocab = embeddings.weight.device, embeddings.num_embeddings
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    was_training = model.training
    seconds = {}
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            for n in runs:
                ids = torch.randint(0, vocab, (batch_size, n), device=device)
                start = time.perf_counter()
                for _ in range(2):  # warm-up, then recording
                    for p in params:
                        p.grad = None
                    model(input_ids=ids, labels=ids).loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[n] = time.perf_counter() - start
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        model.train(was_training)
    return seconds
