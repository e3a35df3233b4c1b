"""Low-memory training: each decoder layer keeps only its input, and keeps it in
pinned host memory; backward brings it back and recomputes the layer.

Per layer and step the GPU holds one activation tensor while the layer runs
instead of everything the layer saves for backward. The copies run on a side
stream so they overlap compute:

  forward,  layer i:  run the layer without autograd; copy its input to the
                      host on the copy stream (the compute stream does not wait).
  backward, layer i:  wait for layer i's input on the device; start copying
                      layer i-1's input back on the copy stream; recompute layer
                      i with autograd and take d input and d (trainable params).

The cost: one more forward of every layer (about a third more layer compute)
and 2 x (tokens x hidden x 2 bytes) of PCIe traffic per layer, hidden behind the
layer's own compute when the link is fast enough.
"""
import weakref

import torch


class _HostCopy:
    """One layer input on its way to the host and back. `prev` (a weak reference)
    is the input saved just before this one: the next to be needed in backward."""

    last = None  # weak reference to the copy made most recently

    def __init__(self, t):
        self.device, self.dev, self.ready = t.device, None, None
        self.prev = _HostCopy.last
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
        t.record_stream(stream)  # t's memory is not reused before the copy has read it

    def prefetch(self):
        """Start the copy back to the device (once; not after `load`, which can come
        first when several forwards share one backward)."""
        if self.dev is not None or self.host is None:
            return
        stream = _copy_stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self.d2h)
            self.dev = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def load(self):
        """The tensor on its device, usable on the current stream; then prefetch the
        input saved before this one, which backward needs next."""
        if self.device.type == "cuda":
            self.prefetch()
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            self.dev.record_stream(current)
            prev = self.prev() if self.prev is not None else None
            if prev is not None:
                prev.prefetch()
        t, self.dev, self.host = self.dev, None, None
        return t


_STREAMS = {}


def _copy_stream(device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class _OffloadedLayer(torch.autograd.Function):
    """y = layer(hidden) with nothing kept on the device for backward: the input goes
    to the host, backward recomputes. `run(hidden)` calls the layer with its other
    (non-trainable) arguments bound; `params` are the layer's trainable parameters,
    passed so autograd routes their gradients through here."""

    @staticmethod
    def forward(ctx, run, hidden, *params):
        # Dropout in the layer must draw the same masks when backward recomputes it.
        ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(hidden.device)
                                          if hidden.device.type == "cuda" else None)
        with torch.no_grad():  # (no CUDA graphs here: compile refuses them with low_memory)
            out = run(hidden)
        ctx.run, ctx.copy = run, _HostCopy(hidden)
        ctx.hidden_needs_grad = hidden.requires_grad
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden = ctx.copy.load().detach().requires_grad_(ctx.hidden_needs_grad)
        params = [p for p, need in zip(ctx.run.params, ctx.needs_input_grad[2:]) if need]
        cpu_rng, cuda_rng = ctx.rng
        devices = [hidden.device] if cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"), torch.enable_grad():
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, hidden.device)
            out = ctx.run(hidden)
        wrt = ([hidden] if ctx.hidden_needs_grad else []) + params
        grads = list(torch.autograd.grad(out, wrt, grad_out, allow_unused=True)) if wrt else []
        d_hidden = grads.pop(0) if ctx.hidden_needs_grad else None
        it = iter(grads)
        d_params = [next(it) if need else None for need in ctx.needs_input_grad[2:]]
        return (None, d_hidden, *d_params)


class _Bound:
    """layer_fn(hidden, *args, **kwargs) with everything but hidden bound."""

    def __init__(self, fn, args, kwargs, params):
        self.fn, self.args, self.kwargs, self.params = fn, args, kwargs, params

    def __call__(self, hidden):
        return self.fn(hidden, *self.args, **self.kwargs)


def offloaded_call(fn, params, hidden, args, kwargs):
    """fn(hidden, *args, **kwargs), training with only `hidden` kept (on the host)."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or any(p.requires_grad for p in params)):
        return fn(hidden, *args, **kwargs)
    return _OffloadedLayer.apply(_Bound(fn, args, kwargs, params), hidden, *params)


SLICES_ATTR = "slothai_token_slices"  # the instance attribute sliced_forward reads n from


def _draws_dropout(module):
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())


def sliced_forward(self, x, *args, **kwargs):
    """A per-token module's forward (an MLP) over n (its SLICES_ATTR) slices
    of the tokens in turn, in training mode: what its backward holds at once shrinks
    to a slice's. Installed by `patch.slice_tokens` as a class-level forward, shared
    by every layer (a per-layer object would be guarded by identity: a recompile
    per layer).

    Why (low-memory mode): backward recomputes the layer, and the MLP's compiled
    backward keeps ~10 tensors of tokens x intermediate_size alive together
    (inductor fuses the activation's backward with recomputing what LoRA's
    gradients read) — on the Llama-3.2-1B shape, bsz 2 x 2048, 10 x 67 MB at the
    step's peak (H100, torch.cuda.memory history). Exact: each token's output
    depends on that token alone. Tokens are zero-padded to a multiple of n and the
    padding's outputs dropped, so a slice's size is one expression in the length,
    not a guard on the length modulo n. Without grad (low_memory's forward) it runs
    whole, unless it draws dropout masks: then sliced too, so that backward's
    recompute draws the same ones. Whole in eval mode (generation)."""
    forward = type(self)._slothai_base.forward
    n = getattr(self, SLICES_ATTR)
    if not self.training or x.dim() != 3 or not (torch.is_grad_enabled() or _draws_dropout(self)):
        return forward(self, x, *args, **kwargs)
    batch, tokens, width = x.shape
    per = (tokens + n - 1) // n
    slices = torch.nn.functional.pad(x, (0, 0, 0, per * n - tokens)).view(batch, n, per, width)
    out = torch.stack([forward(self, slices[:, i], *args, **kwargs) for i in range(n)], dim=1)
    return out.view(batch, per * n, out.shape[-1])[:, :tokens]
