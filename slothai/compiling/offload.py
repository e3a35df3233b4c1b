"""Low-memory training: each decoder layer keeps only its input, and keeps it in
pinned host memory; backward brings it back and recomputes the layer.

The compiled layer runs under a save policy that recomputes everything
(`saving.with_saves(fn, "inputs")`), so what its forward saves for backward is its
inputs; of those, the hidden states (the only activation) go to the host through
saved-tensor hooks, on a side stream that overlaps compute:

  forward,  layer i:  the compiled forward (saves nothing of its own); copy its
                      input to the host on the copy stream; the compute stream
                      waits for that copy one layer later, before the input's
                      memory can be reused.
  backward, layer i:  wait for layer i's input on the device; start copying
                      layer i-1's input back on the copy stream; the compiled
                      backward recomputes the layer and takes its gradients.

One compiled variant of the layer (the forward no longer runs apart without
grad). Inputs come back into two landing buffers (`_Landing`), so each layer's
input is at the same address every step: a backward CUDA graph replays the
addresses of the saved tensors it recorded (with fresh tensors it re-recorded
every layer every step: 0.51 s/step against 0.18 without graphs). The cost:
one more forward of every layer (about a third more layer compute) and
2 x (tokens x hidden x 2 bytes) of PCIe traffic per layer, hidden behind the
layer's own compute when the link is fast enough.

`compile(saves="offload")` uses the same copies without the recompute: the layer
keeps what saves="matmuls" keeps, but one of its MLP's two tokens x
intermediate_size activations goes to the host and back (`widest_to_host`), where
"lean" recomputes the up projection instead. That pays where a layer's forward
takes longer than the copy: tokens x intermediate x 2 bytes over PCIe against
2 x tokens x (the layer's weights) FLOPs, a ratio that does not depend on the
length — Llama-3.1-8B's layer, 14336 against 218M weights, copies in about 0.8x
its GEMM time at 55 GB/s and 700 TFLOP/s (H100); Llama-3.2-1B's, 8192 against
61M, in about 1.7x, so there the compute stream would wait for the copies.
"""
import collections
import contextlib
import weakref

import torch

from ..patching.classes import install, kind_of, register_kind, uninstall


class _HostCopy:
    """One layer input on its way to the host and back. `prev` (a weak reference)
    is the input saved just before this one: the next to be needed in backward.

    The device tensor is held until the compute stream has waited for the copy
    (at the next copy, or backward's first load), rather than handed to the
    allocator with record_stream: its memory is then free at the same point of
    every step. It comes back into one of two landing buffers (`_Landing`), the
    other one than `prev`'s, so that the same layer's input lands at the same
    address every step (what a CUDA graph of its backward replays)."""

    last = None  # weak reference to the copy made most recently
    pending = None  # the copy whose device tensor is still held

    def __init__(self, t):
        _HostCopy.release_pending()
        self.device, self.dev, self.ready, self.loaded = t.device, None, None, False
        self.prev = _HostCopy.last
        prev = self.prev() if self.prev is not None else None
        self.parity = 1 - prev.parity if prev is not None else 0
        _HostCopy.last = weakref.ref(self)
        if t.device.type != "cuda":  # nothing to gain on the CPU: keep the tensor
            self.host, self.dev = None, t
            return
        stream = _copy_stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            self.pinned = _Pinned.take(t.device, t.dtype, t.numel())
            self.host = self.pinned[: t.numel()].view(t.shape)
            self.host.copy_(t, non_blocking=True)
            self.d2h = torch.cuda.Event()
            self.d2h.record(stream)
        self.src = t
        _HostCopy.pending = self

    def __del__(self):
        if getattr(self, "host", None) is not None:
            _Pinned.free[self.device, self.pinned.dtype].append(self.pinned)

    @staticmethod
    def release_pending():
        copy, _HostCopy.pending = _HostCopy.pending, None
        if copy is not None:
            torch.cuda.current_stream(copy.device).wait_event(copy.d2h)
            copy.src = None

    def prefetch(self):
        """Start the copy back to the device ahead of `load` (once; not after a `load`,
        which can come first when several forwards share one backward)."""
        if not self.loaded:
            self._to_device()

    def _to_device(self):
        if self.dev is not None or self.host is None:
            return
        stream = _copy_stream(self.device)
        # The landing buffer's last reader, a backward already queued, goes first.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            stream.wait_event(self.d2h)
            self.dev = _Landing.take(self)
            self.dev.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def load(self):
        """The tensor on its device, usable on the current stream; then prefetch the
        input saved before this one, which backward needs next. The host copy stays
        until autograd drops this object: a second backward (retain_graph=True)
        loads it again."""
        self.loaded = True
        if self.host is None:  # kept on its device (CPU)
            return self.dev
        _HostCopy.release_pending()
        self._to_device()
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        prev = self.prev() if self.prev is not None else None
        if prev is not None:
            prev.prefetch()
        t, self.dev = self.dev, None
        return t


class _Pinned:
    """Pinned host buffers that `_HostCopy`s copy into, kept for the next copies.
    torch's caching host allocator made a new one for every copy in a run's first
    three steps (it reuses a freed block only once it has seen the block's stream
    events complete): on the Llama-3.2-1B shape with saves="offload", 55 pinned
    allocations in three steps, most of them 67 MB, 1.35 s (H100, torch 2.11,
    2026-11-27); with these buffers, 19 in the first step and 4 more after.

    No events are needed here: every copy into or out of these buffers runs on its
    device's one copy stream, so a copy into a buffer taken again runs after the
    last copy out of it. A buffer serves any copy no larger than it; when none
    fits, the smaller free ones are dropped (back to torch's allocator)."""

    free = collections.defaultdict(list)  # (device, dtype) -> [flat pinned tensor]; _HostCopy gives back

    @classmethod
    def take(cls, device, dtype, n):
        """A flat pinned buffer of at least n elements: the smallest free one that fits."""
        bufs = cls.free[device, dtype]
        fits = [i for i, b in enumerate(bufs) if b.numel() >= n]
        if fits:
            return bufs.pop(min(fits, key=lambda i: bufs[i].numel()))
        bufs.clear()
        return torch.empty(n, dtype=dtype, pin_memory=True)


class _Landing:
    """Two device buffers per (device, dtype), parity 0 and 1, that inputs come back
    into: layer i's input lands in the one of parity i % 2 (counted from the step's
    first layer) at its start, so at the same address every step, and backward holds
    two inputs at a time, as it did with fresh tensors. A buffer grows to the largest
    input seen (a new address: each graph recorded before it re-records once).

    Correct in any order of loads: a buffer's occupant that another copy displaces
    before it was loaded is copied again at its load. The memory, two inputs' worth,
    stays allocated for the process (`release()` frees it)."""

    buffers = {}  # (device, dtype, parity) -> flat tensor
    occupants = {}  # (device, dtype, parity) -> weak reference to the _HostCopy whose data it holds

    @classmethod
    def take(cls, copy):
        key = (copy.device, copy.host.dtype, copy.parity)
        buf = cls.buffers.get(key)
        if buf is None or buf.numel() < copy.host.numel():
            buf = cls.buffers[key] = torch.empty(copy.host.numel(), dtype=copy.host.dtype, device=copy.device)
        occupant = cls.occupants[key]() if key in cls.occupants else None
        if occupant is not None and occupant is not copy and occupant.dev is not None:
            occupant.dev = None  # displaced before its load: its load copies it again
        cls.occupants[key] = weakref.ref(copy)
        return buf[: copy.host.numel()].view(copy.host.shape)

    @classmethod
    def release(cls):
        cls.buffers.clear()
        cls.occupants.clear()


def release_landing_buffers():
    """Free what host copies keep between steps: the two landing buffers on the
    device and the pinned host buffers (`_Pinned`)."""
    _Landing.release()
    _Pinned.free.clear()


_STREAMS = {}


def _copy_stream(device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def _unpack(saved):
    return saved.load() if isinstance(saved, _HostCopy) else saved


@contextlib.contextmanager
def inputs_to_host(hidden):
    """Within: a tensor autograd saves that is `hidden` (same storage, same size)
    goes to pinned host memory and comes back when backward unpacks it; every
    other saved tensor (weights, position embeddings) is kept as it is."""
    key = (hidden.untyped_storage().data_ptr(), hidden.shape)

    def pack(t):
        if (t.untyped_storage().data_ptr(), t.shape) == key:
            return _HostCopy(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        yield


@contextlib.contextmanager
def widest_to_host(tokens, width):
    """Within (one compiled layer call, saves="offload"): the first tensor autograd
    saves that holds `tokens` x `width` floating-point values, `width` being the
    layer's widest matmul output (a gated MLP's intermediate size: its gate's or its
    up projection's output), goes to pinned host memory as `inputs_to_host`'s do and
    comes back when backward unpacks it. The compiled layer saves the same tensors in
    the same order every call, so it is the same one each time. Weights never match:
    their element count does not follow the tokens (LoRA's A of the down projection,
    r x width, would only at r tokens; a floating-point `Parameter` is skipped). It comes
    back contiguous, so only a contiguous tensor is sent."""
    left = [1]

    def pack(t):
        if left[0] and t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == width and \
                t.numel() == tokens * width and t.is_contiguous() and not isinstance(t, torch.nn.Parameter):
            left[0] = 0
            return _HostCopy(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        yield


SLICES_ATTR = "slothai_token_slices"  # the instance attribute sliced_forward reads n from


def sliced_forward(self, x, *args, **kwargs):
    """A per-token module's forward (an MLP) over n (its SLICES_ATTR) slices of the
    tokens in turn, in training mode under autograd: what its backward holds at
    once shrinks to a slice's. Installed by `patch.slice_tokens` as a class-level
    forward, shared by every layer (a per-layer object would be guarded by
    identity: a recompile per layer).

    Why (low-memory mode): backward recomputes the layer, and the MLP's compiled
    backward keeps ~10 tensors of tokens x intermediate_size alive together
    (inductor fuses the activation's backward with recomputing what LoRA's
    gradients read) — on the Llama-3.2-1B shape, bsz 2 x 2048, 10 x 67 MB at the
    step's peak (H100, torch.cuda.memory history). Exact: each token's output
    depends on that token alone. Tokens are zero-padded to a multiple of n and the
    padding's outputs dropped, so a slice's size is one expression in the length,
    not a guard on the length modulo n. Whole without grad and in eval mode
    (generation)."""
    forward = type(self)._slothai_base.forward
    n = getattr(self, SLICES_ATTR)
    if not self.training or x.dim() != 3 or not torch.is_grad_enabled():
        return forward(self, x, *args, **kwargs)
    batch, tokens, width = x.shape
    per = (tokens + n - 1) // n
    slices = torch.nn.functional.pad(x, (0, 0, 0, per * n - tokens)).view(batch, n, per, width)
    out = torch.stack([forward(self, slices[:, i], *args, **kwargs) for i in range(n)], dim=1)
    return out.view(batch, per * n, out.shape[-1])[:, :tokens]


def slice_tokens(module, n):
    """Run `module` (per-token: an MLP) over n token slices in training mode under
    autograd (sliced_forward; what compile(low_memory=True) does to each layer's
    MLP); n=None undoes it."""
    if n:
        install(module, "token_slices")
        setattr(module, SLICES_ATTR, n)
    elif kind_of(module) == "token_slices":
        uninstall(module)


register_kind("token_slices", sliced_forward, attrs=(SLICES_ATTR,))
