"""`slothai.warm_up(model, lengths)`: a compiled model's first steps at each length,
taken before training.

Under `slothai.compile`'s CUDA graphs a new length bucket costs two slow steps: the
first runs its layers' graphs outside a graph once (CUDA-graph trees' warm-up), the
second records them, and only the third replays (1B shape, H100: ~0.3-0.45 s and
~0.55-0.77 s against 0.069 s replayed; README). `warm_up` takes those two steps,
forward and backward on random tokens, for the bucket of every length given, so that
training at those lengths replays from its first step: the cost moves to set-up, as
a serving engine captures its graphs before it serves. The first call also compiles.
Training pads a length whose bucket was not recorded into a larger one that was (see
buckets.RECORD_COST_STEPS), so warming up the longest length alone already spares
every shorter one its slow steps, at the price of running it padded.

The model is left as it was: no optimizer step; each trainable parameter's `.grad`
and the random number generators (CPU and the model's GPU) are put back; its
training mode too.
"""
import numbers
import time

import torch

from .buckets import own_buckets, padded_length
from .regions import compiled_layers


def _positive_int(n):
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1


def _runs(lengths, bucket):
    """{tokens the layers run: the longest length given that runs them}: one run per
    length bucket, which is one CUDA-graph path whatever the real length in it
    (buckets._pad_tokens)."""
    runs = {}
    for n in lengths:
        run = padded_length(n) if bucket else n
        runs[run] = max(n, runs.get(run, n))
    return runs


def warm_up(model, lengths, batch_size=1, padded=False):
    """Take the first two training steps' forward and backward (no optimizer step) at
    the bucket of each of `lengths` (sequence lengths, tokens), `batch_size` rows of
    random token ids each, through `model(input_ids=ids, labels=ids).loss`: the call
    HF Trainer and TRL make. Run it under the autocast you train under, if any.
    padded: each warm-up batch as a padding collator makes it (an attention mask, its
    last token padding, and labels -100 there). Under SDPA attention (the default),
    once the model has seen a mask, a batch without padding reaches the compiled
    layers with the same form of mask (regions._CompiledForward._with_causal_mask):
    padded=True then warms up the one variant padded and unpadded batches share. For
    training without padding (packing, fixed lengths) leave it False: those batches
    keep the mask-free causal kernel.
    Returns {length run: seconds} (the first includes compiling). With length buckets
    on (`compile`'s default with CUDA graphs) one length runs per bucket
    (`padded_length`), each at its own bucket (training would pad a length into a
    larger bucket already recorded, buckets.RECORD_COST_STEPS); without, each length
    given runs."""
    lengths = list(lengths)
    if not lengths or not all(_positive_int(n) for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths!r}")
    if not _positive_int(batch_size):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    lengths = [int(n) for n in lengths]
    regions = [layer.forward for layer in compiled_layers(model)]
    if not regions:
        raise ValueError("warm_up needs a model compiled by slothai.compile (mode='regional'): none of its "
                         "layers is")
    for region in regions:  # CUDA graphs (and buckets) off where the layer checkpoints or FSDP2 shards
        region._settle_cudagraphs(model)
    runs = sorted(_runs(lengths, regions[0].options["bucket"]).values(), reverse=True)
    embeddings = model.get_input_embeddings()
    device, vocab = embeddings.weight.device, embeddings.num_embeddings
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    was_training = model.training
    seconds = {}
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad(), \
                own_buckets():
            for n in runs:
                ids = torch.randint(0, vocab, (batch_size, n), device=device)
                batch = dict(input_ids=ids, labels=ids)
                if padded:
                    mask = torch.ones_like(ids)
                    mask[:, -1] = 0  # each row's last token padding
                    batch = collated(ids, mask)
                start = time.perf_counter()
                for _ in range(2):  # warm-up, then recording
                    for p in params:
                        p.grad = None
                    loss = model(**batch).loss
                    if loss is None:
                        raise ValueError("warm_up calls model(input_ids=ids, labels=ids) and needs the loss it "
                                         "returns; this model returned none")
                    loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[n] = time.perf_counter() - start
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        model.train(was_training)
    return seconds


def collated(ids, mask):
    """What a padding collator hands the model: ids with the padding (mask 0) zeroed,
    the mask, and labels -100 at the padding."""
    return dict(input_ids=ids * mask, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
