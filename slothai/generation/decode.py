"""The decode loop of slothai's `generate`: prefill the prompt into a static cache,
then one step per new token, each a fixed sequence of tensor operations on a
session's buffers (cache.py) — the model's own forward over the token fed next
(every 4-bit projection through `slothai::nf4_linear`, its LoRA term in the same op),
then the choice of the next token (sampling.py) — that writes its results back into
those buffers. Nothing in a step reads a device value on the host, so on CUDA the
step is recorded once as a CUDA graph and each token is one `graph.replay()`; the
host looks at the device only every `check_every` tokens, to stop once every row has
finished.

Compilation (`Options.compile`):
- "regional" (the default on CUDA): each decoder layer's call runs through one
  `torch.compile`d function shared by every layer (its cache slots are arguments, not
  the layer's index, so one compilation serves all layers), the rest of the step
  (embedding, rotary tables, final norm, LM head, masks, sampling) eager. Recorded as
  one CUDA graph, the eager parts cost nothing on the host either. Prefills run the
  layers eager (a first call compiles the decode step alone); `compile_prefill=True`
  gives them a compiled function of their own (their prompt length dynamic).
- "full": the whole step under `torch.compile(fullgraph=True)` (what the CPU tests
  use to show the step holds no graph break, that is, no host synchronisation).
- None: eager (the default on the CPU, where there are no graphs).
Compiled by inductor, the 4-bit products that share x (q/k/v, gate/up) become one op
each, one launch on CUDA (grouping.py).

One graph is recorded per session (rows bucket x cache length) and per state that a
graph bakes in, the key of `_state_key`: the sampling rule, the adapters' switches
(enabled or disabled, merged, which are active, their scaling), autocast, and the
address of every parameter, buffer and 4-bit scale the step reads. An optimizer
updating LoRA weights in place changes none of these (the graph reads the new values
at its next replay); a new Parameter, a dtype cast, `disable_adapter()` or
`set_adapter` does, and gets (or finds) a graph of its own. Graphs are recorded after
a warm-up of two steps on a side stream (compiling, allocator and cuBLAS set-up
happen there); the session's state is put back before recording.

Memory: the caches, buffers and graphs of at most MAX_SESSIONS sessions (and
MAX_GRAPHS graphs each, the least recently used given back first) stay between calls;
`release()` gives all of it back (then `torch.cuda.empty_cache()` returns it to the
device).
"""
import collections
import contextlib
import dataclasses
import functools
import inspect
import warnings

import torch
from torch.utils._pytree import tree_leaves

from ..patching.causal_lm import decoder_layers
from ..patching.linear4bit import is_bnb_linear4bit
from .attention import (DECODE_ATTENTION, decode_masks, mask_layout, prefill_masks,
                        register_decode_attention)
from .cache import LayerKV, Session, StaticKV, length_bucket, row_bucket
from .grouping import inductor_options

MAX_SESSIONS = 2
MAX_GRAPHS = 4
WARMUP_STEPS = 2

# Dynamo variants the shared layer function may hold: a decode and a prefill per
# session shape, times adapters on / off and autocast states.
RECOMPILE_LIMIT = 32


@dataclasses.dataclass
class Options:
    compile: str | None = "auto"  # "regional", "full", None; "auto": regional on CUDA, None on the CPU
    backend: str = "inductor"
    # Regional mode: True runs prefills through a compiled function of their own. False since
    # 2026-12-06: TRL GRPO at 8B (H100, 8 x 256 new tokens, fresh compile caches) spent the same
    # sampling time a step either way (1.335 against 1.336 s) and 7.3 against 10.3 s more on its
    # first step (benchmarks/results/grpo_llama-8b_h100_cold_*.txt).
    compile_prefill: bool = False
    cudagraphs: bool | None = None  # None: on CUDA
    check_every: int = 16  # decode steps between host checks that every row finished
    strict: bool = False  # raise instead of falling back to transformers' generate on an error

    def compile_mode(self, device):
        if self.compile == "auto":
            return "regional" if device.type == "cuda" else None
        return self.compile


def _layer_step(forward, layer, cache_key, keys, values, start, args, kwargs):
    """A decoder layer's forward over its own cache slots for one decode step: what the
    regional mode compiles, once for every layer (the layer, its slots and the slot
    written, a 0-dim tensor, are arguments)."""
    return forward(layer, *args, **{**kwargs, cache_key: LayerKV(keys, values, start)})


def _layer_prefill(forward, layer, cache_key, keys, values, args, kwargs):
    """The same for a prefill (slots from 0, the prompt's length dynamic): a function of
    its own, so that Dynamo keeps its compilation apart from the decode step's rather
    than counting one as a recompile of the other."""
    return forward(layer, *args, **{**kwargs, cache_key: LayerKV(keys, values, 0)})


def _mark_prefill_dynamic(args, kwargs):
    """A prefill's batch and prompt dims dynamic, by position: dims 0 and 1 of the
    hidden states, rotary tables and position ids, dims 0, 2 and 3 of a 4D mask."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return
    sizes = {s for s in hidden.shape[:2] if s > 1}
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor):
            for d in (0, 2, 3) if t.dim() == 4 else (0, 1)[:t.dim()]:
                if t.shape[d] in sizes:
                    torch._dynamo.maybe_mark_dynamic(t, d)


class _RegionalLayer:
    """The forward a decoder layer has while `generate` runs in regional mode: calls
    with slothai's cache go through the shared compiled function; any other call, a
    session's first prefill (which allocates the cache from the layer's own key
    states) and, with `compile_prefill=False`, every prefill run the layer's previous
    forward."""

    def __init__(self, engine, layer, index, previous):
        self.engine, self.layer, self.index, self.previous = engine, layer, index, previous

    def __call__(self, *args, **kwargs):
        key = "cache" if "cache" in kwargs else "past_key_values"
        kv = kwargs.get(key)
        if not isinstance(kv, StaticKV) or not kv.allocated(self.index) or \
                (isinstance(kv.start, int) and not self.engine.options.compile_prefill):
            if self.previous is not None:
                return self.previous(*args, **kwargs)
            return type(self.layer).forward(self.layer, *args, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k != key}
        # no grad here, but `compile` makes the embeddings' output require grad (one
        # variant for the first layer, another for the rest): the same values, detached
        args = tuple(a.detach() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)
        keys, values = kv.keys[self.index], kv.values[self.index]
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            if isinstance(kv.start, int):
                _mark_prefill_dynamic(args, rest)
                return self.engine.compiled(_layer_prefill)(type(self.layer).forward, self.layer, key, keys, values,
                                                            args, rest)
            return self.engine.compiled(_layer_step)(type(self.layer).forward, self.layer, key, keys, values,
                                                     kv.start, args, rest)


def _regional_ok(layer):
    """A layer whose forward is its class's (or slothai.compile's training wrapper
    around it): regional mode compiles that. Another library's instance forward is left
    to run as it is."""
    previous = layer.__dict__.get("forward")
    return previous is None or (type(previous).__name__ == "_CompiledForward" and previous.original is None)


class _Recorded:
    """A CUDA graph over one decode step, or None where recording failed (`why`); the
    sampler it was recorded with is kept alive with it (the graph reads its tensors)."""

    def __init__(self, graph, sampler, why=None):
        self.graph, self.sampler, self.why = graph, sampler, why


_WARNED = set()


def warn_once(message):
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


# How generate() calls ran: "slothai", "slothai, graph replayed", "slothai, no graph", "transformers: <why>"
CALLS = collections.Counter()


class CudaRecorder:
    """What recording a CUDA graph takes from torch.cuda, in one place (a test stands
    in for it on the CPU to run the recording and replaying logic without a GPU)."""

    def __init__(self):
        self._streams = {}  # device -> the warm-ups' side stream

    def available(self, device):
        return device.type == "cuda"

    @contextlib.contextmanager
    def on(self, device):
        self.device = device
        with torch.cuda.device(device):
            yield

    def synchronize(self):
        torch.cuda.synchronize(self.device)

    def rng_state(self):
        return torch.cuda.get_rng_state(self.device)

    def set_rng_state(self, state):
        torch.cuda.set_rng_state(state, self.device)

    def _side(self):
        # One side stream a device for every warm-up and recording: cuBLAS keeps a workspace
        # (32 MiB on Hopper) per stream it ran on, for the process's life, so a new stream
        # each recording held 32 MiB more each time (seen on an H100: 64 MiB after two), and
        # recording on torch.cuda.graph's own capture stream held a third (H100: 98 MiB kept
        # after the first generate of a process that had run no cuBLAS before).
        side = self._streams.get(self.device)
        if side is None:
            side = self._streams[self.device] = torch.cuda.Stream(self.device)
        return side

    def warm_up(self, step, n):
        side = self._side()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(n):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, step):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._side()):  # a private memory pool of its own
            step()
        return graph


class Engine:
    """slothai's decode for one causal-LM head (kept on the head by `patch`; deep
    copies and pickles of the model get a new, empty one)."""

    recorder = CudaRecorder()

    def __init__(self, options=None):
        self.options = options or Options()
        self.sessions = collections.OrderedDict()  # rows -> Session
        self._compiled = {}  # function -> its torch.compile wrapper

    def __deepcopy__(self, memo):
        return Engine(dataclasses.replace(self.options))

    def __reduce__(self):
        return (Engine, (self.options,))

    # -- memory ------------------------------------------------------------

    def release(self):
        """Give back every session's cache, buffers and CUDA graphs."""
        for s in self.sessions.values():
            s.release()
        self.sessions.clear()

    def nbytes(self):
        return sum(s.nbytes() for s in self.sessions.values())

    def _session(self, head, rows, length, device, dtype):
        s = self.sessions.get(rows)
        if s is not None and (s.length < length or s.device != device or s.dtype != dtype):
            s.release()
            del self.sessions[rows]
            s = None
        if s is None:
            while len(self.sessions) >= MAX_SESSIONS:
                self.sessions.popitem(last=False)[1].release()
            s = Session(head.config.num_hidden_layers, rows, length, device)
            s.dtype = dtype
            self.sessions[rows] = s
        self.sessions.move_to_end(rows)
        return s

    # -- compiled pieces ---------------------------------------------------

    def compiled(self, fn):
        """torch.compile(fn) with this engine's backend, made once."""
        compiled = self._compiled.get(fn)
        if compiled is None:
            compiled = self._compiled[fn] = torch.compile(fn, backend=self.options.backend,
                                                          options=inductor_options(self.options.backend))
        return compiled

    def _stepper(self, device):
        if self.options.compile_mode(device) == "full":
            full = self._compiled.get("full")
            if full is None:
                full = self._compiled["full"] = torch.compile(self.decode_step, backend=self.options.backend,
                                                              fullgraph=True,
                                                              options=inductor_options(self.options.backend))
            return full
        return self.decode_step

    # -- the call ----------------------------------------------------------

    def generate(self, head, ids, mask, max_new, sampler):
        """Sequences [rows, prompt + new tokens] (and the per-step scores / logits, when
        the sampler copies them out) for prompt `ids` [rows, prompt] with attention mask
        `mask`, `max_new` tokens at most."""
        device = ids.device
        rows, prompt = ids.shape
        layout, why = mask_layout(head.config)
        if layout is None:
            raise NotImplementedError(why)
        dtype = head.get_input_embeddings().weight.dtype
        s = self._session(head, row_bucket(rows), length_bucket(prompt + max_new), device, dtype)
        vocab = head.get_output_embeddings().weight.shape[0]
        s.scores_buffers(vocab, sampler.want_scores, sampler.want_logits)
        scores, logits = [], []
        positions = self._load(s, ids, mask, sampler)
        with self._decoding(head, device):
            fresh = not s.kv.allocated(0)
            cache_kw = self._cache_kw(head)
            last = self._prefill(head, s, positions, layout, dtype, cache_kw)
            if fresh and self.options.compile_mode(device) == "regional" and self.options.compile_prefill:
                # the first prefill ran eager to allocate the cache from the layers' own key
                # states; compile the prefill now (same result), not at the next call
                last = self._prefill(head, s, positions, layout, dtype, cache_kw)
            sampler.advance(s, last)
            self._collect(s, rows, sampler, scores, logits)
            s.kv.start = s.cur
            step = functools.partial(self._stepper(device), head, s, sampler, layout, dtype, cache_kw)
            replay, how = self._replay(head, s, sampler, step) if max_new > 1 else (None, "slothai, prefill only")
            CALLS[how] += 1
            every = max(1, int(self.options.check_every))
            for k in range(1, max_new):
                replay()
                self._collect(s, rows, sampler, scores, logits)
                if sampler.has_eos and k % every == 0 and not bool(s.unfinished[:rows].any()):
                    break
        new = max_new
        if sampler.has_eos:
            finish = s.finish_at[:rows]
            new = int(torch.where((finish >= 0).all(), finish.max() - prompt + 1, max_new))
        return s.ids[:rows, :prompt + new].clone(), scores[:new], logits[:new]

    def _load(self, s, ids, mask, sampler):
        """The prompt into the session's buffers; rows past the call's (the bucket's
        padding) copy its first row and count as finished. Returns the prefill's
        position ids (transformers': the attention mask's cumulative sum - 1, 0 at
        padding)."""
        rows, prompt = ids.shape
        s.ids[:rows, :prompt].copy_(ids)
        s.ids[rows:, :prompt].copy_(ids[:1].expand(s.rows - rows, prompt))
        s.mask[:rows, :prompt].copy_(mask)
        s.mask[rows:, :prompt].copy_(mask[:1].expand(s.rows - rows, prompt))
        s.mask[:, prompt:].fill_(1)
        m = s.mask[:, :prompt]
        positions = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
        s.position.copy_(positions[:, -1:])
        s.cur.fill_(prompt - 1)
        s.prompt_length.fill_(prompt)
        s.unfinished.fill_(True)
        s.unfinished[rows:] = False
        s.finish_at.fill_(-1)
        if sampler.ignore == "padding":  # transformers >= 5.20 leaves a row's left padding out of the penalty
            s.ignore.copy_((m != 0).int().argmax(1))
        else:
            s.ignore.fill_(int(sampler.ignore or 0))
        return positions

    @staticmethod
    def _collect(s, rows, sampler, scores, logits):
        """Copy this step's scores / raw logits out of the session (asked for only)."""
        if sampler.want_scores:
            scores.append(s.scores[:rows].clone())
        if sampler.want_logits:
            logits.append(s.logits[:rows].clone())

    @staticmethod
    def _cache_kw(head):
        """The name the model's forward takes its cache by: `cache` (transformers >= 5.20,
        which still accepts the old name with a deprecation) or `past_key_values`."""
        params = inspect.signature(head.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _prefill(self, head, s, positions, layout, dtype, cache_kw):
        prompt = positions.shape[1]
        s.kv.start = 0
        masks = prefill_masks(layout, s.mask[:, :prompt], dtype)
        out = head(input_ids=s.ids[:, :prompt], attention_mask=masks, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **{cache_kw: s.kv})
        return out.logits[:, -1]

    def decode_step(self, head, s, sampler, layout, dtype, cache_kw):
        """One new token for every row: the model over `s.next_ids` at slot `s.cur`,
        then `sampler.advance`. Tensor operations on the session's buffers only."""
        masks = decode_masks(layout, s.mask, s.slots, s.cur, dtype)
        out = head(input_ids=s.next_ids, attention_mask=masks, position_ids=s.position, use_cache=True,
                   logits_to_keep=1, **{cache_kw: s.kv})
        sampler.advance(s, out.logits[:, -1])

    @contextlib.contextmanager
    def _decoding(self, head, device):
        """While generating: no grad, every module in eval mode (no dropout: the policy's
        own distribution, as vLLM and Unsloth sample), the grouped-query decode attention
        in place of transformers' SDPA, and, in regional mode, the layers' forwards
        routed through the shared compiled function. All put back after."""
        modes = [(m, m.training) for m in head.modules()]
        config = head.config
        implementation = getattr(config, "_attn_implementation_internal", None)
        routed = []
        try:
            head.train(False)
            if implementation == "sdpa":
                register_decode_attention()
                config._attn_implementation_internal = DECODE_ATTENTION
            if self.options.compile_mode(device) == "regional":
                for layer in decoder_layers(head):
                    if _regional_ok(layer):
                        previous = layer.__dict__.get("forward")
                        index = getattr(getattr(layer, "self_attn", None), "layer_idx", None)
                        if index is None:
                            continue
                        routed.append((layer, previous))
                        layer.forward = _RegionalLayer(self, layer, index, previous)
            with torch.no_grad():
                yield
        finally:
            for layer, previous in routed:
                if previous is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = previous
            if implementation is not None:
                config._attn_implementation_internal = implementation
            for m, training in modes:
                m.training = training

    # -- CUDA graphs -------------------------------------------------------

    def _replay(self, head, s, sampler, step):
        """What runs one decode step, and how: the recorded graph's replay, or the step."""
        if not (self.options.cudagraphs is not False and self.recorder.available(s.device)):
            return step, "slothai, no graph (CPU)" if s.device.type == "cpu" else "slothai, no graph"
        key = self._state_key(head, sampler)
        recorded = s.graphs.get(key)
        how = "slothai, graph replayed"
        if recorded is None:
            while len(s.graphs) >= MAX_GRAPHS:
                old = s.graphs.pop(next(iter(s.graphs)))
                if old.graph is not None:
                    old.graph.reset()
            recorded = s.graphs[key] = self._record(s, sampler, step)
            how = "slothai, graph recorded"
        s.graphs[key] = s.graphs.pop(key)  # most recently used last
        if recorded.graph is None:
            return step, f"slothai, no graph ({recorded.why})"
        return recorded.graph.replay, how

    def _record(self, s, sampler, step):
        """Warm the step up (WARMUP_STEPS on a side stream), put the session's state and
        the random generator back, record one step; the state and generator are put back
        again after, so that the replays that follow start where the warm-up did."""
        cuda = self.recorder
        with cuda.on(s.device):
            cuda.synchronize()
            saved, rng = s.snapshot(), cuda.rng_state()
            try:
                cuda.warm_up(step, WARMUP_STEPS)
                s.restore(saved)
                cuda.set_rng_state(rng)
                graph = cuda.capture(step)
                cuda.set_rng_state(rng)
            except Exception as e:  # a step that cannot be captured still runs, uncaptured
                if self.options.strict:
                    raise
                cuda.synchronize()
                s.restore(saved)
                cuda.set_rng_state(rng)
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warn_once(f"slothai.generate: the decode step could not be recorded as a CUDA graph ({why}); it "
                          "runs without one (correct, slower)")
                return _Recorded(None, sampler, why)
        return _Recorded(graph, sampler)

    def _state_key(self, head, sampler):
        """What a recorded graph bakes in besides the session (see the module docstring)."""
        adapters, tensors = [], []
        for m in head.modules():
            if hasattr(m, "lora_A") and hasattr(m, "disable_adapters"):
                adapters.append((bool(m.disable_adapters), bool(getattr(m, "merged", False)),
                                 tuple(m.active_adapters), tuple(sorted(getattr(m, "scaling", {}).items())),
                                 tuple(sorted((k for k, v in getattr(m, "use_dora", {}).items() if v)))))
            if is_bnb_linear4bit(m):
                qs = m.weight.quant_state
                state2 = getattr(qs, "state2", None)
                tensors += [qs.absmax, getattr(qs, "offset", None), getattr(state2, "absmax", None),
                            getattr(state2, "code", None)]
        tensors += list(head.parameters()) + list(head.buffers())
        pointers = tuple((t.data_ptr(), t.dtype) for t in tensors if isinstance(t, torch.Tensor))
        dev = head.get_input_embeddings().weight.device.type
        autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return sampler.key, tuple(adapters), hash(pointers), autocast
