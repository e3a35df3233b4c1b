"""The static KV cache and the decode state of one (rows, length) bucket: every tensor
a decode step reads or writes, allocated once and reused across `generate` calls, so
that a CUDA graph recorded over the step replays on the same addresses.

Cache slot i holds the token at sequence index i of every row (a left-padded prompt's
padding included), so a row's slots and its token ids (`Session.ids`) line up, and
the attention mask over the slots is the prompt's mask followed by ones.
"""
import torch

# Rows are padded up to one of these (then to a multiple of the last): a batch size
# `generate` sees again (GRPO's fixed batch) reuses the cache and graphs of its bucket.
ROW_BUCKETS = (1, 2, 4, 8)
ROW_MULTIPLE = 8

# Cache slots (prompt + new tokens) are rounded up to a multiple of this: prompts of
# neighbouring lengths share a cache and its graphs.
LENGTH_MULTIPLE = 128


def row_bucket(rows):
    for b in ROW_BUCKETS:
        if rows <= b:
            return b
    return -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE


def length_bucket(tokens):
    return -(-tokens // LENGTH_MULTIPLE) * LENGTH_MULTIPLE


class LayerKV:
    """One decoder layer's view of the cache, with transformers' `Cache.update`
    signature (the layer index is not needed: the view is the layer's).

    Prefill (`start` the int 0) copies the prompt's keys and values into slots
    [0, n) and returns those n slots; a decode step (`start` a 0-dim tensor, the slot
    of the one new token) writes it there in place and returns every slot: static
    shapes, no host read of the position."""

    is_compileable = True

    def __init__(self, keys, values, start):
        self.keys, self.values, self.start = keys, values, start

    def update(self, key_states, value_states, *args, **kwargs):
        if isinstance(self.start, int):
            n = key_states.shape[2]
            self.keys[:, :, :n].copy_(key_states)
            self.values[:, :, :n].copy_(value_states)
            return self.keys[:, :, :n], self.values[:, :, :n]
        self.keys.index_copy_(2, self.start.view(1), key_states)
        self.values.index_copy_(2, self.start.view(1), value_states)
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs):
        return 0  # never asked: `generate` passes position ids and ready-made 4D masks


class StaticKV:
    """The cache object the model's forward is handed (as `past_key_values` or
    `cache`): per layer, keys and values [rows, kv heads, length, head dim], allocated
    at the first prefill from the layer's own key states (their heads, head dim and
    dtype), zeros; `start` says where the current call writes (see LayerKV)."""

    is_compileable = True

    def __init__(self, layers, rows, length):
        self.keys, self.values = [None] * layers, [None] * layers
        self.rows, self.length = rows, length
        self.start = 0

    def allocated(self, index):
        return self.keys[index] is not None

    def view(self, index):
        return LayerKV(self.keys[index], self.values[index], self.start)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys[layer_idx] is None:
            shape = (self.rows, key_states.shape[1], self.length, key_states.shape[3])
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape[:3] + (value_states.shape[3],))
        return self.view(layer_idx).update(key_states, value_states)

    def get_seq_length(self, *args, **kwargs):
        return 0

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class Session:
    """The buffers of one (rows, length) bucket: the cache, every token id so far
    (`ids`, [rows, length]: the prompt, then each new token at its slot), the attention
    mask over the slots, and the decode state a step advances in place — the token fed
    next and its position id, `cur` (the slot of the token fed next: 0-dim), which rows
    are unfinished and the slot at which each finished. `graphs` holds the CUDA graphs
    recorded over this session's buffers, by the state they were recorded in."""

    STATE = ("ids", "next_ids", "position", "cur", "unfinished", "finish_at", "scores", "logits")

    def __init__(self, layers, rows, length, device):
        long = dict(dtype=torch.long, device=device)
        self.rows, self.length, self.device = rows, length, device
        self.kv = StaticKV(layers, rows, length)
        self.ids = torch.zeros(rows, length, **long)
        self.mask = torch.zeros(rows, length, **long)
        self.slots = torch.arange(length, **long)
        self.next_ids = torch.zeros(rows, 1, **long)
        self.position = torch.zeros(rows, 1, **long)
        self.cur = torch.zeros((), **long)
        self.prompt_length = torch.zeros((), **long)
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        self.finish_at = torch.zeros(rows, **long)
        self.ignore = torch.zeros(rows, **long)  # leading slots a repetition penalty leaves out
        self.scores = self.logits = None  # [rows, vocab] fp32, when the call asks for them
        self.graphs = {}

    def scores_buffers(self, vocab, scores, logits):
        """Allocate (once) the buffers a step copies the scores / raw logits into."""
        f32 = dict(dtype=torch.float32, device=self.device)
        if scores and self.scores is None:
            self.scores = torch.zeros(self.rows, vocab, **f32)
        if logits and self.logits is None:
            self.logits = torch.zeros(self.rows, vocab, **f32)

    def snapshot(self):
        return {name: getattr(self, name).clone() for name in self.STATE if getattr(self, name) is not None}

    def restore(self, saved):
        for name, value in saved.items():
            getattr(self, name).copy_(value)

    def nbytes(self):
        own = sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))
        return own + self.kv.nbytes()

    def release(self):
        for graph in self.graphs.values():
            if graph.graph is not None:
                graph.graph.reset()
        self.graphs.clear()
        self.kv = None
