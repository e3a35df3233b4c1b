"""slothai::dequant_nf4 against bitsandbytes and the exact fp32 formula (docs/design.md)."""
import copy

import pytest
import torch

import slothai
from nf4_reference import DTYPES, bnb, bnb_dequantize, bnbF, formula, linear4bit, quantize, to

# Awkward element counts: one element, odd, a partial last block, > 256 blocks
# (several nested scales), exact multiples.
SHAPES = [(1, 1), (1, 7), (33, 17), (3, 100), (130, 131), (64, 64)]


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
    ("absmax must be uint8 or float32, got float16", TypeError, lambda a: a.__setitem__(1, a[1].half())),
    ("absmax has 2 scales", ValueError, lambda a: a.__setitem__(1, a[1][:2])),
    ("code2 must be float32, got float64", TypeError, lambda a: a.__setitem__(2, a[2].double())),
    ("code2 must have 256 levels", ValueError, lambda a: a.__setitem__(2, a[2][:16])),
    ("absmax2 must be float32", TypeError, lambda a: a.__setitem__(3, a[3].half())),
    ("offset must hold one value", ValueError, lambda a: a.__setitem__(4, a[4].repeat(2))),
    ("code2, absmax2 and offset are required", ValueError, lambda a: a.__setitem__(4, None)),
    ("blocksize must be a power of two", ValueError, lambda a: a.__setitem__(5, 48)),
    ("blocksize must be a power of two", ValueError, lambda a: a.__setitem__(5, 16)),
    ("blocksize2 must be a power of two", ValueError, lambda a: a.__setitem__(6, 100)),
    ("shape must have non-negative sizes", ValueError, lambda a: a.__setitem__(7, [-1, 300])),
    ("dtype must be float32, float16 or bfloat16", TypeError, lambda a: a.__setitem__(8, torch.int32)),
    ("offset must be a floating-point tensor, got int32", TypeError, lambda a: a.__setitem__(4, a[4].int())),
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
    with pytest.raises(ValueError, match="offset must be on cuda:0"):
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


def test_compile_fullgraph_no_breaks_no_recompile_per_token_count(device, compile_counters):
    ws = [linear4bit(48, 64, device).weight for _ in range(4)]

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
    w = linear4bit(40, 96, device).weight
    f = torch.compile(lambda w: slothai.dequantize_nf4(w, dtype=torch.bfloat16) * 2, fullgraph=True)
    assert torch.equal(f(w), formula(w.data, w.quant_state, torch.bfloat16) * 2)
    assert compile_counters["graph_break"] == {}


def test_bad_python_arguments_are_named():
    # Wrong Python types reach the dispatcher as RuntimeErrors (or AttributeErrors)
    # unless checked first: each must be a TypeError naming the argument.
    packed, s = quantize(torch.randn(300), 64, True)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype .* got str 'float16'"):
        slothai.dequantize_nf4(packed, s, dtype="float16")
    with pytest.raises(TypeError, match="quant_state must be a bitsandbytes QuantState .* got object"):
        slothai.dequantize_nf4(packed, object())
    with pytest.raises(TypeError, match="weight must be a Params4bit or a tensor of packed NF4 codes, got list"):
        slothai.dequantize_nf4([1, 2], s)
    for name, value, msg in [("offset", 0.5, "quant_state.offset must be a tensor .* got float 0.5"),
                             ("blocksize", 64.0, "quant_state.blocksize must be an int, got float 64.0"),
                             ("absmax", None, "quant_state.absmax must be a tensor, got NoneType"),
                             ("dtype", "bfloat16", "quant_state.dtype must be a torch.dtype, got str"),
                             ("shape", (300.0,), "quant_state.shape must be a sequence of ints")]:
        bad = copy.copy(s)
        setattr(bad, name, value)
        with pytest.raises(TypeError, match=msg):
            slothai.dequantize_nf4(packed, bad)
    bad = copy.copy(s)
    bad.state2 = copy.copy(s.state2)
    bad.state2.code = [0.0] * 256
    with pytest.raises(TypeError, match="quant_state.state2.code must be a tensor, got list"):
        slothai.dequantize_nf4(packed, bad)


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**62, 4], [3, 2**62, 2]])
def test_shape_whose_element_count_overflows_int64(shape):
    # The count is checked before anything is allocated (at::empty would multiply first).
    a = _args()
    a[7] = shape
    with pytest.raises(ValueError, match="has more elements than int64 can count"):
        torch.ops.slothai.dequant_nf4(*a)
