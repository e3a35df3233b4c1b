"""`NF4Weight`: a frozen bitsandbytes NF4 weight as a tensor subclass that
PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) can shard by rows.

After `slothai.patch`, `fully_shard` turns each bitsandbytes `Params4bit` of a
`Linear4bit` it patched into one (`to_nf4_weight`, see slothai/patching/fsdp.py) as
it takes the layer; on a single process the weight stays a `Params4bit`. The
patched forward hands its fields to `slothai::nf4_linear`. Under `fully_shard`:

- sharding: FSDP2 chunks the weight on dim 0 (output rows). The packed codes are
  laid out [out_features, in_features / 2] and the block scales
  [out_features, in_features / blocksize], so a chunk of rows is a chunk of both.
  The second level of double quantization (one fp32 scale per 256 first-level
  blocks, counted over the whole flattened weight) does not split on row
  boundaries in general, so a shard carries the first-level scales already
  recovered in fp32: `s = code2[absmax] * absmax2[b // 256]`, then `s + offset`,
  each step rounded in fp32 — the op's own first step (docs/design.md), so the weight
  it dequantizes is bit-identical to bitsandbytes'. Cost: 4 bytes of scale per 64
  weights instead of ~1 (the codes are 32).
- all-gather: `fsdp_pre_all_gather` hands FSDP the two byte tensors (codes, fp32
  scales; on a one-rank mesh both in one tensor, as FSDP2 then copies only the
  first) and `fsdp_post_all_gather` wraps the gathered rows into a whole
  `NF4Weight` that views FSDP's all-gather buffers. Only 4-bit codes and scales
  travel; nothing dense exists outside slothai's op. The backward's
  re-dequantization reads the same buffers, which FSDP all-gathers again before
  the layer's backward.

Unsharded, the weight keeps bitsandbytes' own tensors (codes, uint8 `absmax`,
`state2`, `offset`: no copy, no extra memory), and the `Params4bit` it came from.

Outer shape [out_features, in_features], dtype uint8, requires_grad False: code
that casts floating-point parameters (mixed precision, `Module.to(dtype)`) leaves
it alone, as it leaves `Params4bit` alone. Unsharded, it also answers for that
Params4bit (`quant_state`, `quant_type`, ..., and any op it does not handle itself
runs on the Params4bit's packed bytes), so code written for bitsandbytes keeps
working; a shard refuses any op it does not handle.
"""
import copy
import hashlib
import inspect

import torch

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional

NESTED = ("codes", "absmax", "code2", "absmax2", "offset")
FLAT = ("codes", "absmax")


class NF4Weight(torch.Tensor):
    """NF4 codes [rows, in/2] uint8 and block scales [rows, in/blocksize]: uint8
    with `code2`, `absmax2`, `offset` (double quantization, unsharded only), or
    fp32 (`code2` is None). `compute_dtype` is bitsandbytes' `quant_state.dtype`."""

    @staticmethod
    def __new__(cls, codes, absmax, code2=None, absmax2=None, offset=None, *, blocksize, blocksize2=256,
                compute_dtype=torch.float32, params4bit=None):
        rows, half = codes.shape
        return torch.Tensor._make_wrapper_subclass(cls, (rows, 2 * half), dtype=torch.uint8, device=codes.device,
                                                   requires_grad=False)

    def __init__(self, codes, absmax, code2=None, absmax2=None, offset=None, *, blocksize, blocksize2=256,
                 compute_dtype=torch.float32, params4bit=None):
        self.codes, self.absmax = codes, absmax
        self.code2, self.absmax2, self.offset = code2, absmax2, offset
        self.blocksize, self.blocksize2, self.compute_dtype = blocksize, blocksize2, compute_dtype
        self.params4bit = params4bit  # the bitsandbytes Params4bit it views (unsharded only)

    __torch_function__ = torch._C._disabled_torch_function_impl

    # Unsharded, the weight answers for the Params4bit it views, so code written for
    # bitsandbytes (PEFT adding or merging adapters, Unsloth, bitsandbytes' own forward)
    # keeps working after slothai.patch; a shard has no Params4bit to answer with.
    def _params4bit(self, name):
        p = self.__dict__.get("params4bit")
        if p is None:
            raise AttributeError(f"a sharded NF4Weight has no bitsandbytes {name}")
        return getattr(p, name)

    # A shard's quant_state is None (no bitsandbytes state), so `weight.quant_state.<x>`
    # checks written for Params4bit read "not there" rather than fail.
    quant_state = property(lambda self: self._params4bit("quant_state") if self.params4bit is not None else None)
    quant_type = property(lambda self: self._params4bit("quant_type"))
    compress_statistics = property(lambda self: self._params4bit("compress_statistics"))
    quant_storage = property(lambda self: self._params4bit("quant_storage"))
    bnb_quantized = property(lambda self: self._params4bit("bnb_quantized"))

    # deepcopy / pickle: an unsharded weight is rebuilt from a copy of its Params4bit,
    # so the copy's weight and the copy's Params4bit share their tensors again (code that
    # edits `weight.quant_state` moves both, as it moves the original's).
    def __deepcopy__(self, memo):
        if self.params4bit is None:
            return super().__deepcopy__(memo)
        new = _rebuild(copy.deepcopy(self.params4bit, memo), isinstance(self, torch.nn.Parameter))
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, protocol):
        if self.params4bit is None:
            return super().__reduce_ex__(protocol)
        return _rebuild, (self.params4bit, isinstance(self, torch.nn.Parameter))

    def __repr__(self):
        form = "double-quantized" if self.code2 is not None else "fp32 scales"
        return (f"NF4Weight(shape={tuple(self.shape)}, blocksize={self.blocksize}, {form}, "
                f"compute_dtype={self.compute_dtype}, device={self.device})")

    # ---- what slothai's op needs -------------------------------------------------------------
    def op_args(self):
        """`slothai::dequant_nf4`'s arguments between `packed` and `shape`, and the shape."""
        return (self.codes, self.absmax, self.code2, self.absmax2, self.offset, self.blocksize, self.blocksize2,
                list(self.shape))

    def with_fp32_scales(self):
        """The same weight with first-level scales recovered in fp32 (exact: the op's own first step)."""
        if self.code2 is None:
            return self
        blocks = torch.arange(self.absmax.numel(), device=self.absmax.device) // self.blocksize2
        s = self.code2[self.absmax.reshape(-1).long()] * self.absmax2[blocks]  # rounded to fp32 ...
        s = s + self.offset  # ... then the offset, as its own rounded step (no FMA)
        return NF4Weight(self.codes, s.view(self.absmax.shape), blocksize=self.blocksize,
                         compute_dtype=self.compute_dtype)

    def _with(self, codes, absmax, **kw):
        return NF4Weight(codes, absmax, blocksize=self.blocksize, blocksize2=self.blocksize2,
                         compute_dtype=self.compute_dtype, **kw)

    # ---- torch.compile: a traceable wrapper subclass -----------------------------------------
    def __tensor_flatten__(self):
        names = NESTED if self.code2 is not None else FLAT
        return list(names), (self.blocksize, self.blocksize2, self.compute_dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        blocksize, blocksize2, compute_dtype = meta
        return NF4Weight(inner["codes"], inner["absmax"], inner.get("code2"), inner.get("absmax2"),
                         inner.get("offset"), blocksize=blocksize, blocksize2=blocksize2,
                         compute_dtype=compute_dtype)

    def _stable_hash_for_caching(self):
        """The AOT autograd cache key of this weight's metadata (what a compiled graph
        depends on: sizes, strides, dtypes, devices, blocksizes), stable across processes."""
        names = NESTED if self.code2 is not None else FLAT
        parts = [type(self).__qualname__, str(tuple(self.shape)), str(self.blocksize), str(self.blocksize2),
                 str(self.compute_dtype)]
        parts += [f"{n}:{tuple(t.shape)}:{t.stride()}:{t.dtype}:{t.device.type}"
                  for n, t in ((n, getattr(self, n)) for n in names)]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    # ---- FSDP2 all-gather extension --------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        world = mesh.size()
        if self.shape[0] * world != outer_size[0]:
            raise ValueError(f"fully_shard of an NF4 weight needs out_features divisible by the world size: "
                             f"{outer_size[0]} rows over {world} ranks")
        flat = self.with_fp32_scales()
        if world == 1:  # FSDP2's single-rank path copies only an extension's first input: send one
            return (torch.cat([flat.codes.reshape(-1), flat.absmax.reshape(-1).view(torch.uint8)]),), None
        return (flat.codes, flat.absmax), None

    # FSDP2 reads this signature at every all-gather of every weight (inspect.signature):
    # given, it is read instead of rebuilt.
    fsdp_pre_all_gather.__signature__ = inspect.signature(fsdp_pre_all_gather)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        if out is not None:  # FSDP re-gathered into the buffers `out` already views
            return None
        if len(outputs) == 1:  # one rank: codes and fp32 scales viewed in one byte tensor, which is
            # what FSDP frees and reallocates (whole storages only); one fp32 scale per block, in
            # the shape of self's block scales (nested or not)
            codes, absmax = outputs[0].split([self.codes.numel(), self.absmax.numel() * 4])
            return self._with(codes.view(self.codes.shape),
                              absmax.view(torch.float32).view(self.absmax.shape)), tuple(outputs)
        codes, absmax = outputs
        return self._with(codes, absmax), (codes, absmax)

    # ---- the few ops FSDP2, DTensor, nn.Module and autograd apply to a parameter -----------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is None:
            return _on_params4bit(func, args, kwargs)
        return handler(func, *args, **kwargs)


def _on_params4bit(func, args, kwargs):
    """Any op NF4Weight does not handle itself acts, on an unsharded weight, on its
    Params4bit's packed bytes, as before patch (bitsandbytes' ops, `weight.t()`,
    PEFT's dequantize for a merge); a shard refuses it."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    if not all(w.params4bit is not None for w in leaves if isinstance(w, NF4Weight)):
        raise NotImplementedError(
            f"NF4Weight (a frozen 4-bit weight) does not support {func}; dequantize it with "
            "slothai.dequantize_nf4(weight) to get a dense tensor")
    args, kwargs = torch.utils._pytree.tree_map_only(NF4Weight, lambda w: w.params4bit.data, (args, kwargs))
    return func(*args, **kwargs)


_OPS = {}


def _implements(*funcs):
    def register(fn):
        for f in funcs:
            _OPS[f] = fn
        return fn
    return register


@_implements(aten.detach.default, aten.alias.default)
def _detach(func, w):
    return NF4Weight(*(getattr(w, n) for n in NESTED), blocksize=w.blocksize, blocksize2=w.blocksize2,
                     compute_dtype=w.compute_dtype, params4bit=w.params4bit)


@_implements(aten.clone.default)
def _clone(func, w, memory_format=None):
    return NF4Weight(*(None if t is None else t.clone() for t in (getattr(w, n) for n in NESTED)),
                     blocksize=w.blocksize, blocksize2=w.blocksize2, compute_dtype=w.compute_dtype)


def _dim0(dim, ndim):
    if dim % ndim != 0:
        raise NotImplementedError(f"NF4Weight is split by rows (dim 0) only, got dim={dim}")


@_implements(aten.split.Tensor, aten.split_with_sizes.default)
def _split(func, w, split, dim=0):
    """Rows in chunks of `split` (an int) or of the sizes listed."""
    _dim0(dim, w.dim())
    f = w.with_fp32_scales()
    return [f._with(c, a) for c, a in zip(f.codes.split(split), f.absmax.split(split))]


@_implements(aten.slice.Tensor)
def _slice(func, w, dim=0, start=None, end=None, step=1):
    start, end = start or 0, min(w.shape[dim] if end is None else end, w.shape[dim])
    if dim % w.dim() == 1 and start == 0 and end == w.shape[1] and step == 1:
        return _detach(None, w)
    _dim0(dim, w.dim())
    if start == 0 and end == w.shape[0] and step == 1:
        return _detach(None, w)
    f = w.with_fp32_scales()
    return f._with(f.codes[start:end:step], f.absmax[start:end:step])


@_implements(aten.new_zeros.default)
def _new_zeros(func, w, size, dtype=None, layout=None, device=None, pin_memory=None):
    rows, cols = size
    if cols != w.shape[1]:
        raise NotImplementedError(f"NF4Weight.new_zeros keeps in_features {w.shape[1]}, got {list(size)}")
    dev = device or w.device
    return w._with(torch.zeros(rows, cols // 2, dtype=torch.uint8, device=dev),
                   torch.zeros(rows, cols // w.blocksize, dtype=torch.float32, device=dev))


@_implements(aten.copy_.default)
def _copy_(func, dst, src, non_blocking=False):
    if not isinstance(src, NF4Weight) or src.shape != dst.shape:
        raise NotImplementedError(f"NF4Weight.copy_ takes an NF4Weight of the same shape, got {type(src).__name__}")
    if (dst.code2 is None) != (src.code2 is None):
        src = src.with_fp32_scales()
        if dst.code2 is not None:
            raise NotImplementedError("NF4Weight.copy_ into a double-quantized weight from fp32 scales")
    for name in NESTED:
        if getattr(dst, name) is not None:
            getattr(dst, name).copy_(getattr(src, name), non_blocking)
    return dst


@_implements(aten.view.default, aten._unsafe_view.default)
def _view(func, w, size):
    # FSDP keeps `padded.view(-1)` as a handle on the shard's storage; the handle is never
    # read as data (the all-gather goes through fsdp_pre_all_gather), so it keeps the
    # inner tensors and takes the asked shape.
    size = list(size)
    if size not in ([-1], [w.numel()], list(w.shape)):
        return _on_params4bit(func, (w, size), {})
    out = _detach(None, w)
    if size != list(w.shape):
        out = _Flat(out)
    return out


@_implements(aten.as_strided.default)
def _as_strided(func, w, size, stride, storage_offset=0):
    if list(size) != list(w.shape) or storage_offset or (w.numel() > 1 and list(stride) != [w.shape[1], 1]):
        return _on_params4bit(func, (w, size, stride, storage_offset), {})
    return _detach(None, w)


@_implements(aten._to_copy.default)
def _to_copy(func, w, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    if dtype is not None and dtype != torch.uint8:
        raise TypeError(f"NF4Weight cannot be cast to {dtype}: it holds 4-bit codes; "
                        "slothai.dequantize_nf4(weight, dtype=...) gives the dense weight")
    move = (lambda t: None if t is None else t.to(device, non_blocking=non_blocking)) if device else (lambda t: t)
    return NF4Weight(*(move(getattr(w, n)) for n in NESTED), blocksize=w.blocksize, blocksize2=w.blocksize2,
                     compute_dtype=w.compute_dtype)


@_implements(aten.is_same_size.default)
def _is_same_size(func, a, b):
    return a.shape == b.shape


# DTensor.full_tensor() (a full state dict) gathers the shards through functional collectives.
@_implements(_c10d.all_gather_into_tensor.default)
def _all_gather(func, w, group_size, group_name):
    f = w.with_fp32_scales()
    return f._with(func(f.codes, group_size, group_name), func(f.absmax, group_size, group_name))


@_implements(_c10d.wait_tensor.default)
def _wait(func, w):
    return w._with(func(w.codes), func(w.absmax)) if w.code2 is None else w


def _Flat(w):
    """`w` with a 1-D outer shape (FSDP's `_sharded_param_data` handle)."""
    flat = torch.Tensor._make_wrapper_subclass(NF4Weight, (w.numel(),), dtype=torch.uint8, device=w.device,
                                               requires_grad=False)
    flat.__dict__.update(w.__dict__)
    return flat


# ---------------------------------------------------------------------------------------------
def _rebuild(params4bit, is_param):
    w = to_nf4_weight(params4bit)
    return w if is_param else w.detach()


def to_nf4_weight(param):
    """A bitsandbytes NF4 `Params4bit` as an `NF4Weight` parameter viewing the same
    tensors, or None when its layout does not split by rows (in_features not a
    multiple of the blocksize, or a Params4bit that is not packed as expected)."""
    qs = param.quant_state
    if len(qs.shape) != 2:
        return None
    out_features, in_features = qs.shape
    bs = qs.blocksize
    data = param.data
    if in_features % bs or not data.is_contiguous() or data.numel() * data.element_size() != out_features * in_features // 2:
        return None
    codes = data.view(torch.uint8).view(out_features, in_features // 2)
    absmax = qs.absmax.view(out_features, in_features // bs)
    if getattr(qs, "nested", False):
        s2 = qs.state2
        w = NF4Weight(codes, absmax, s2.code, s2.absmax, qs.offset, blocksize=bs, blocksize2=s2.blocksize,
                      compute_dtype=qs.dtype, params4bit=param)
    else:
        w = NF4Weight(codes, absmax, blocksize=bs, compute_dtype=qs.dtype, params4bit=param)
    return torch.nn.Parameter(w, requires_grad=False)


def copy_params4bit_(dst, src):
    """Copy bitsandbytes Params4bit `src`'s codes and quant-state tensors into `dst`'s, in
    place, when both have the same layout (shape, blocksize, double quantization, sizes
    and dtypes of every tensor); return whether it did."""
    a, b = src.quant_state, dst.quant_state
    pairs = [(src.data, dst.data), (a.absmax, b.absmax)]
    if getattr(a, "nested", False) != getattr(b, "nested", False) or a.blocksize != b.blocksize or \
            list(a.shape) != list(b.shape) or a.quant_type != b.quant_type:
        return False
    if getattr(a, "nested", False):
        pairs += [(a.state2.absmax, b.state2.absmax), (a.state2.code, b.state2.code), (a.offset, b.offset)]
        if a.state2.blocksize != b.state2.blocksize:
            return False
    if not all(isinstance(s, torch.Tensor) and isinstance(d, torch.Tensor) and s.shape == d.shape and
               s.dtype == d.dtype for s, d in pairs):
        return False
    with torch.no_grad():
        for s, d in pairs:
            d.copy_(s)
    return True
