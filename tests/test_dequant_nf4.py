"""slothai::dequant_nf4 against bitsandbytes and the exact fp32 formula (docs/design.md)."""
import copy

import pytest
import torch

import slothai

bnb = pytest.importorskip("bitsandbytes")
bnbF = bnb.functional

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Awkward element counts: one element, odd, a partial last block, > 256 blocks
# (several nested scales), exact multiples.
SHAPES = [(1, 1), (1, 7), (33, 17), (3, 100), (130, 131), (64, 64)]


def quantize(w, blocksize=64, nested=True, storage=torch.uint8):
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4",
                              quant_storage=storage)


def bnb_dequantize(packed, state):
    # bitsandbytes' CPU path wraps itself in torch.compile per shape; keep it eager.
    with torch._dynamo.config.patch(disable=True):
        return bnbF.dequantize_4bit(packed, state)


def formula(packed, state, dtype):
    """DESIGN.md §3 written out in torch fp32, from bitsandbytes' own tables."""
    n = state.shape.numel()
    b = packed.view(torch.uint8).reshape(-1).long()
    codes = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]
    levels = bnbF.get_4bit_type("nf4", device=packed.device).float()
    if state.nested:
        blocks = torch.arange(state.absmax.numel(), device=packed.device)
        s = state.state2.code[state.absmax.long()] * state.state2.absmax[blocks // state.state2.blocksize]
        s = s + state.offset
    else:
        s = state.absmax
    idx = torch.arange(n, device=packed.device) // state.blocksize
    return (levels[codes] * s[idx]).to(dtype).reshape(state.shape)


def to(state, device):
    state.to(device)
    return state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("nested", [True, False])
def test_bit_identical_to_bitsandbytes(device, dtype, shape, blocksize, nested):
    w = torch.randn(shape, dtype=dtype) * 3
    packed, state = quantize(w, blocksize, nested)
    want = bnb_dequantize(packed, state)
    packed, state = packed.to(device), to(state, device)
    got = slothai.dequantize_nf4(packed, state)
    assert got.dtype == dtype and got.shape == torch.Size(shape) and got.is_contiguous()
    assert got.device.type == device
    assert torch.equal(got, formula(packed, state, dtype))
    # bitsandbytes 0.50's native CPU kernel scales by row, not by flat block, so it
    # is wrong when an even-width row is shorter than a block; its other paths agree.
    if not (shape[-1] % 2 == 0 and blocksize > shape[-1] and w.numel() > blocksize):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dtype_override_and_bf16_storage(device, out_dtype):
    # FSDP-QLoRA stores the same bytes in a bfloat16 tensor.
    w = torch.randn(96, 130, dtype=torch.bfloat16)
    packed, state = quantize(w, 64, True, storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    packed, state = packed.to(device), to(state, device)
    got = slothai.dequantize_nf4(packed, state, dtype=out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, formula(packed, state, out_dtype))


def test_params4bit(device):
    lin = bnb.nn.Linear4bit(80, 48, bias=False, quant_type="nf4", compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(torch.randn(48, 80), requires_grad=False, quant_type="nf4")
    lin = lin.to(device)
    got = slothai.dequantize_nf4(lin.weight)
    assert torch.equal(got, formula(lin.weight.data, lin.weight.quant_state, got.dtype))
    assert got.shape == (48, 80)


def test_rounding_edges(device):
    # Plain fp32 scales chosen to hit fp16 overflow, fp16/bf16 subnormals and
    # ties: the output conversion must round exactly like torch's.
    scales = torch.tensor([1e-40, 3e-8, 6.1e-5, 1.0, 65519.0, 65520.0, 1e5, 3.4e38], dtype=torch.float32)
    n = scales.numel() * 64
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8)
    levels = slothai.nf4_levels()
    b = packed.long()
    codes = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]
    exact = levels[codes] * scales.repeat_interleave(64)
    for dtype in DTYPES:
        got = torch.ops.slothai.dequant_nf4(packed.to(device), scales.to(device), None, None, None, 64, 256,
                                            [n], dtype)
        assert torch.equal(got.cpu(), exact.to(dtype)), dtype


def test_nf4_levels_match_bitsandbytes():
    assert torch.equal(slothai.nf4_levels(), bnbF.get_4bit_type("nf4", device="cpu").float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_equals_cpu_reference_large_and_unaligned(dtype):
    w = torch.randn(1000, 4099, dtype=dtype)  # 4.1M elements, odd
    packed, state = quantize(w, 64, True)
    cpu = slothai.dequantize_nf4(packed, state)
    # Shift the packed bytes off 4-byte alignment: the kernel's byte-load path.
    buf = torch.empty(packed.numel() + 1, dtype=torch.uint8)
    buf[1:] = packed.reshape(-1)
    unaligned = buf.cuda()[1:]
    state = to(state, "cuda")
    assert torch.equal(slothai.dequantize_nf4(packed.cuda(), state).cpu(), cpu)
    assert torch.equal(slothai.dequantize_nf4(unaligned, state).cpu(), cpu)
    with torch.cuda.device(0), torch.cuda.stream(torch.cuda.Stream()):
        side = slothai.dequantize_nf4(packed.cuda(), state)
    torch.cuda.synchronize()
    assert torch.equal(side.cpu(), cpu)


def _args(device="cpu", n=300, bs=64):
    w = torch.randn(n)
    packed, s = quantize(w, bs, True)
    s = to(s, device)
    return [packed.to(device), s.absmax, s.state2.code, s.state2.absmax, s.offset, bs, 256, [n], torch.bfloat16]


BAD = [
    ("packed holds 100 bytes but shape \\[300\\] needs 150", ValueError, lambda a: a.__setitem__(0, a[0][:100])),
    ("absmax must be uint8 or float32, got Half", TypeError, lambda a: a.__setitem__(1, a[1].half())),
    ("absmax has 2 scales", ValueError, lambda a: a.__setitem__(1, a[1][:2])),
    ("code2 must be Float, got Double", TypeError, lambda a: a.__setitem__(2, a[2].double())),
    ("code2 must have 256 levels", ValueError, lambda a: a.__setitem__(2, a[2][:16])),
    ("absmax2 must be Float", TypeError, lambda a: a.__setitem__(3, a[3].half())),
    ("offset must hold one value", ValueError, lambda a: a.__setitem__(4, a[4].repeat(2))),
    ("code2, absmax2 and offset are required", ValueError, lambda a: a.__setitem__(4, None)),
    ("blocksize must be a power of two", ValueError, lambda a: a.__setitem__(5, 48)),
    ("blocksize must be a power of two", ValueError, lambda a: a.__setitem__(5, 16)),
    ("blocksize2 must be a power of two", ValueError, lambda a: a.__setitem__(6, 100)),
    ("shape must have non-negative sizes", ValueError, lambda a: a.__setitem__(7, [-1, 300])),
    ("dtype must be float32, float16 or bfloat16", TypeError, lambda a: a.__setitem__(8, torch.int32)),
    ("offset must be a floating-point tensor, got Int", TypeError, lambda a: a.__setitem__(4, a[4].int())),
]


@pytest.mark.parametrize("msg,exc,mutate", BAD, ids=[b[0][:30] for b in BAD])
def test_bad_input_raises_named_error(device, msg, exc, mutate):
    a = _args(device)
    mutate(a)
    with pytest.raises(exc, match=msg):
        torch.ops.slothai.dequant_nf4(*a)


@pytest.mark.parametrize("offset_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_offset_as_bitsandbytes(device, offset_dtype):
    # Some saved checkpoints hold the nested offset in half precision (bitsandbytes'
    # test_gemm_4bit_non_float32_offset): bitsandbytes widens it and adds in fp32.
    w = torch.randn(64, 130)
    packed, state = quantize(w, 64, True)
    state.offset = state.offset.to(offset_dtype)
    want = bnb_dequantize(packed, state)
    state32 = copy.deepcopy(state)
    state32.offset = state.offset.float()
    assert torch.equal(want, bnb_dequantize(packed, state32))  # what "widen, then add" means
    packed, state = packed.to(device), to(state, device)
    got = slothai.dequantize_nf4(packed, state)
    assert torch.equal(got.cpu(), want)


def test_half_precision_offset_linear_as_bitsandbytes(device):
    lin = _linear4bit(24, 130, "cpu")
    lin.weight.quant_state.offset = lin.weight.quant_state.offset.half()
    x = torch.randn(5, 130)
    with torch._dynamo.config.patch(disable=True):
        want = lin(x)
    lin = lin.to(device)
    got = slothai.nf4_linear(x.to(device), lin.weight)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_strided_inputs_are_read_in_logical_order(device, storage):
    # A view whose elements are not adjacent in memory (every other element of a
    # wider buffer) means the same codes and scales as its contiguous copy.
    w = torch.randn(20, 33)  # 660 elements: 330 bytes, whole bf16 storage elements
    packed, state = quantize(w, 32, True, storage=storage)
    want = bnb_dequantize(packed, state)

    def every_other(t):
        buf = torch.zeros(t.numel(), 2, dtype=t.dtype)
        buf[:, 0] = t.reshape(-1)
        view = buf[:, 0].view(t.shape) if t.dim() == 1 else buf[:, 0].unsqueeze(1)
        assert view.numel() == 1 or not view.is_contiguous()
        return view.to(device)

    s = to(state, device)
    got = torch.ops.slothai.dequant_nf4(every_other(packed), every_other(state.absmax), every_other(s.state2.code),
                                        every_other(s.state2.absmax), s.offset, 32, s.state2.blocksize,
                                        list(state.shape), torch.float32)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got, formula(packed.to(device), s, torch.float32))


def test_plain_absmax_rejects_nested_tensors():
    a = _args()
    a[1] = torch.rand(5)
    with pytest.raises(ValueError, match="must be None"):
        torch.ops.slothai.dequant_nf4(*a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_devices_raise():
    a = _args("cuda")
    a[4] = a[4].cpu()
    with pytest.raises(RuntimeError, match="offset must be on cuda:0"):
        torch.ops.slothai.dequant_nf4(*a)


def test_fp4_state_is_rejected():
    packed, state = bnbF.quantize_4bit(torch.randn(64, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type must be 'nf4', got 'fp4'"):
        slothai.dequantize_nf4(packed, state)


def test_missing_quant_state():
    with pytest.raises(TypeError, match="no .quant_state"):
        slothai.dequantize_nf4(torch.zeros(8, dtype=torch.uint8))


def test_empty_weight(device):
    out = torch.ops.slothai.dequant_nf4(torch.empty(0, dtype=torch.uint8, device=device),
                                        torch.empty(0, device=device), None, None, None, 64, 256, [0, 5],
                                        torch.float16)
    assert out.shape == (0, 5)


def test_opcheck(device):
    for n, bs, nested in [(300, 64, True), (17, 32, False), (4099, 128, True)]:
        w = torch.randn(n)
        packed, s = quantize(w, bs, nested)
        s = to(s, device)
        extra = [s.state2.code, s.state2.absmax, s.offset] if nested else [None, None, None]
        torch.library.opcheck(torch.ops.slothai.dequant_nf4.default,
                              (packed.to(device), s.absmax, *extra, bs, 256, [n], torch.bfloat16))


def _linear4bit(o, i, device):
    lin = bnb.nn.Linear4bit(i, o, bias=False, quant_type="nf4", compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(torch.randn(o, i), requires_grad=False, quant_type="nf4")
    return lin.to(device)


def test_compile_fullgraph_no_breaks_no_recompile_per_token_count(device, compile_counters):
    ws = [_linear4bit(48, 64, device).weight for _ in range(4)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w):
        return x @ slothai.dequantize_nf4(w, dtype=x.dtype).t()

    for w, n in zip(ws, [5, 7, 9, 11]):
        x = torch.randn(n, 64, device=device)
        torch.testing.assert_close(f(x, w), x @ formula(w.data, w.quant_state, torch.float32).t())
    assert compile_counters["graph_break"] == {}
    # First call static, second marks the token dimension dynamic, then no more.
    assert compile_counters["stats"]["unique_graphs"] == 2


def test_compile_inductor(device, compile_counters):
    w = _linear4bit(40, 96, device).weight
    f = torch.compile(lambda w: slothai.dequantize_nf4(w, dtype=torch.bfloat16) * 2, fullgraph=True)
    assert torch.equal(f(w), formula(w.data, w.quant_state, torch.bfloat16) * 2)
    assert compile_counters["graph_break"] == {}


# --------------------------------------------------------------------------
# slothai::nf4_linear: x @ W^T + b with W dequantized on the fly, forward and backward.

def _nf4_linear_ref(x, w, b):
    """The same product through a dense W from the formula, differentiated by autograd."""
    wd = formula(w.data, w.quant_state, x.dtype)
    return torch.nn.functional.linear(x, wd, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("o,i,lead,bias", [(10, 24, (3, 5), True), (33, 17, (7,), False), (1, 64, (2, 1, 3), True)])
def test_nf4_linear_matches_dense(device, dtype, o, i, lead, bias):
    w = _linear4bit(o, i, device).weight
    x = torch.randn(*lead, i, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(o, device=device, dtype=dtype, requires_grad=True) if bias else None
    y = slothai.nf4_linear(x, w, b)
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if bias else None
    y2 = _nf4_linear_ref(x2, w, b2)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else {}
    torch.testing.assert_close(y, y2, **tol)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    if bias:
        torch.testing.assert_close(b.grad, b2.grad, **tol)


def _nf4_linear_args(device, o=12, i=20, bias=True):
    w = _linear4bit(o, i, device).weight
    s = w.quant_state
    x = torch.randn(4, i, device=device, requires_grad=True)
    b = torch.randn(o, device=device, requires_grad=True) if bias else None
    return [x, w.data, s.absmax, s.state2.code, s.state2.absmax, s.offset, s.blocksize, s.state2.blocksize,
            list(s.shape), b]


def test_nf4_linear_opcheck(device):
    for bias in (True, False):
        torch.library.opcheck(torch.ops.slothai.nf4_linear.default, _nf4_linear_args(device, bias=bias))


BAD_LINEAR = [
    ("x must end in in_features = 20", ValueError, lambda a: a.__setitem__(0, a[0][:, :19])),
    ("x must be float32, float16 or bfloat16, got Int", TypeError, lambda a: a.__setitem__(0, a[0].int())),
    ("shape must be \\[out_features, in_features\\]", ValueError, lambda a: a.__setitem__(8, [240])),
    ("bias must have shape \\[12\\]", ValueError, lambda a: a.__setitem__(9, a[9][:5])),
    ("bias must be Float, got Half", TypeError, lambda a: a.__setitem__(9, a[9].half())),
    ("absmax has", ValueError, lambda a: a.__setitem__(2, a[2][:1])),
]


@pytest.mark.parametrize("msg,exc,mutate", BAD_LINEAR, ids=[b[0][:30] for b in BAD_LINEAR])
def test_nf4_linear_bad_input_raises_named_error(device, msg, exc, mutate):
    a = _nf4_linear_args(device)
    a[0] = a[0].detach()
    mutate(a)
    with pytest.raises(exc, match=msg):
        torch.ops.slothai.nf4_linear(*a)


def test_nf4_linear_compiled_keeps_no_dense_weight(device, compile_counters):
    # Under torch.compile the backward's dequantization must stay a recomputation:
    # nothing of the dense weight's shape may be saved for backward.
    o, i = 72, 40
    w = _linear4bit(o, i, device).weight
    f = torch.compile(lambda x: slothai.nf4_linear(x, w).sum(), fullgraph=True, dynamic=True)
    saved = []
    x = torch.randn(6, i, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = f(x)
    loss.backward()
    assert saved and (o, i) not in saved and (i, o) not in saved, saved
    torch.testing.assert_close(x.grad, formula(w.data, w.quant_state, torch.float32).sum(0).expand(6, i))
    assert compile_counters["graph_break"] == {}
