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
"""
import contextlib
import weakref

import torch


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
        self.device, self.dev, self.ready = t.device, None, None
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
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.d2h = torch.cuda.Event()
            self.d2h.record(stream)
        self.src = t
        _HostCopy.pending = self

    @staticmethod
    def release_pending():
        copy, _HostCopy.pending = _HostCopy.pending, None
        if copy is not None:
            torch.cuda.current_stream(copy.device).wait_event(copy.d2h)
            copy.src = None

    def prefetch(self):
        """Start the copy back to the device (once; not after `load`, which can come
        first when several forwards share one backward)."""
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
        input saved before this one, which backward needs next."""
        if self.device.type == "cuda":
            _HostCopy.release_pending()
            self.prefetch()
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            prev = self.prev() if self.prev is not None else None
            if prev is not None:
                prev.prefetch()
        t, self.dev, self.host = self.dev, None, None
        return t


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
    """Free the two input-sized device buffers low-memory training keeps between steps."""
    _Landing.release()


_STREAMS = {}


def _copy_stream(device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


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

    def unpack(saved):
        return saved.load() if isinstance(saved, _HostCopy) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
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
