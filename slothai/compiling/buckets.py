"""Length buckets: with CUDA graphs, a layer call's tokens are padded up to a few
recorded lengths (exact for a causal layer: see `_pad_tokens`), so a new length
reuses a recorded graph instead of recording its own."""
import collections
import contextlib

import torch
from torch.utils._pytree import tree_map


def padded_length(n):
    """The bucket a sequence of n tokens is padded to under CUDA graphs: 8 buckets
    per octave (multiples of 2^(k-3) for n in [2^k, 2^(k+1)), at least 64), so at
    most 1/8 of the tokens are padding and a few dozen graphs cover every length."""
    step = max(64, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


# A length whose own bucket has no CUDA graphs yet runs padded into the smallest
# larger bucket that has them (a replay: no slow step) until the padding run that way
# adds up to RECORD_COST_STEPS steps (a step of B tokens run for b real ones wastes
# 1 - b/B of it); then its own bucket is warmed up and recorded. That is about the cost
# of recording, measured (1B shape, H100): a warm-up and a recording step, 0.39-0.42 s
# and 0.73-0.77 s, against 0.069 s replayed: 16-17 steps' time, 14-15 more than two
# replays. Paying rent until it adds up to the price, then buying, never costs more
# than twice the better choice.
RECORD_COST_STEPS = 16


class LengthBuckets:
    """The bucket each training call of one compiled layer runs at, under CUDA graphs
    (see RECORD_COST_STEPS). Every layer sees the same calls, so all choose alike."""

    def __init__(self):
        self.calls = collections.Counter()  # (kind, bucket) -> calls run at it; 2: warmed up and recorded
        self.padding = collections.Counter()  # (kind, bucket) -> steps' worth of padding run in a larger one

    def choose(self, kind, n, reuse=True):
        """The tokens to run n at; `kind`: what else tells graphs apart (batch size, mask)."""
        own = padded_length(n)
        key = (kind, own)
        larger = [b for (k, b), calls in self.calls.items() if k == kind and b > own and calls >= 2]
        if reuse and larger and self.calls[key] < 2 and self.padding[key] < RECORD_COST_STEPS:
            run = min(larger)
            self.padding[key] += 1 - own / run
        else:
            run = own
        self.calls[kind, run] += 1
        return run


_OWN_BUCKETS = [False]  # set by own_buckets()


@contextlib.contextmanager
def own_buckets():
    """Every length runs at its own bucket, recording it (what `warm_up` asks for)."""
    _OWN_BUCKETS.append(True)
    try:
        yield
    finally:
        _OWN_BUCKETS.pop()


# The attribute by which a layer output sliced back to its real tokens names the
# padded output it views (see _pad_tokens).
_PADDED_FROM = "_slothai_padded_from"


def _paddable_mask(mask, n):
    """Whether a layer's attention mask lets its tokens be padded: none (causal), or
    the [batch or 1, heads or 1, n, n] mask transformers builds for padded batches
    (bool: True attends; float: added to the scores)."""
    return mask is None or isinstance(mask, torch.Tensor) and mask.dim() == 4 and tuple(mask.shape[-2:]) == (n, n) \
        and (mask.dtype == torch.bool or mask.dtype.is_floating_point)


def _pad_mask(mask, n, padded):
    """`mask` grown to [..., padded, padded]: a real token sees what it saw and no
    padding; a padding token sees every token up to itself (causal), so its row of
    the softmax is finite though no real token reads it."""
    allowed, masked = (True, False) if mask.dtype == torch.bool else (0.0, torch.finfo(mask.dtype).min)
    out = torch.nn.functional.pad(mask, (0, padded - n, 0, padded - n), value=masked)
    rows = torch.arange(n, padded, device=mask.device)[:, None]
    out[..., n:, :] = torch.where(torch.arange(padded, device=mask.device) <= rows, allowed, masked).to(mask.dtype)
    return out


def _pad_tokens(args, kw, n, padded):
    """Right-pad every tensor whose dim 1 is the token dim (hidden states, rotary
    cos/sin, position ids; their dim 0 is the batch or 1) and every 1-D tensor of n
    (cache positions) with zeros to `padded` tokens, and the attention mask, if
    any, with `_pad_mask`. Exact for a causal layer: a token attends only to those
    before it, and none to the padding, so the padding, all after the real tokens,
    changes nothing of theirs, forward or back.

    The previous layer's output, sliced back to n tokens, is not copied: the padded
    output it views goes on (its padding rows are that layer's finite outputs for
    the padding, which no real token reads, and whose gradient is zero). So each
    layer takes the previous one's graph output, as at the bucket's own length: one
    CUDA-graph path per bucket, whatever the real length."""

    def pad(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.dim() >= 2 and t.shape[1] == n:
            full = getattr(t, _PADDED_FROM, None)
            if full is not None and full.shape[1] == padded:
                return full
            return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, padded - n))
        if t.dim() == 1 and t.shape[0] == n:
            return torch.nn.functional.pad(t, (0, padded - n))
        return t

    kw = {k: _pad_mask(v, n, padded) if k == "attention_mask" and v is not None else tree_map(pad, v)
          for k, v in kw.items()}
    return tree_map(pad, args), kw


def _real_tokens(t, n, padded):
    """A padded layer output's first n tokens, naming the output it views (_PADDED_FROM)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[1] != padded:
        return t
    view = t[:, :n]
    setattr(view, _PADDED_FROM, t)
    return view
