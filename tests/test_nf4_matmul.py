"""slothai::nf4_matmul: x @ W^T (+ bias) (+ lora_x @ lora_b^T) with the NF4 weight read
4-bit. Against float64 math on the weight as the contract defines it (each level in x's
dtype, times its block scale: slothai.h), on awkward sizes; against dequantize + GEMM's
own error; and nf4_linear's switch to it on CUDA."""
import pytest
import torch

import slothai
from nf4_reference import bnbF, codes_and_scales, linear4bit, quantize, to

HALF = [torch.float16, torch.bfloat16]
EPS = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}


def contract_weight(packed, state, dtype):
    """W in float64 as the op's contract has it: T(level) * block scale."""
    codes, s = codes_and_scales(packed, state)
    levels = bnbF.get_4bit_type("nf4", device=packed.device).float().to(dtype).double()
    return (levels[codes] * s.double()).reshape(state.shape)


def exact_weight(packed, state):
    """W in float64 as dequantization means it: level * block scale, neither rounded."""
    codes, s = codes_and_scales(packed, state)
    return (bnbF.get_4bit_type("nf4", device=packed.device).double()[codes] * s.double()).reshape(state.shape)


def op_args(x, packed, state, bias=None, lora_x=None, lora_b=None, lora_scale=1.0):
    nested = state.nested
    return [x, packed, state.absmax, state.state2.code if nested else None, state.state2.absmax if nested else None,
            state.offset if nested else None, state.blocksize, state.state2.blocksize if nested else 256,
            list(state.shape), bias, lora_x, lora_b, lora_scale]


def check_against_contract(y, x, w64, bias=None, lora_x=None, lora_b=None, lora_scale=1.0):
    """|y - exact| within one rounding of y plus fp32 summation error, element by element."""
    x64 = x.double()
    exact = x64 @ w64.t()
    size = x64.abs() @ w64.abs().t()
    if lora_x is not None:
        exact = exact + lora_scale * (lora_x.double() @ lora_b.double().t())
        size = size + abs(lora_scale) * (lora_x.double().abs() @ lora_b.double().abs().t())
    if bias is not None:
        exact, size = exact + bias.double(), size + bias.double().abs()
    bound = EPS[y.dtype] * exact.abs() + 1e-5 * size + 1e-30
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"


SIZES = [  # (m, n, k, blocksize, nested): primes, one row, odd and partial-block k, > 64 rows
    (1, 17, 99, 64, True), (3, 37, 130, 64, True), (7, 64, 128, 64, False), (13, 100, 320, 128, True),
    (1, 48, 4096, 64, True), (17, 33, 192, 256, True), (61, 16, 64, 64, True), (67, 24, 256, 64, False),
    (5, 8, 96, 32, True), (2, 3, 1, 64, True),
    # K a multiple of 256 with blocks of 64 (the streaming decode kernel's): plain and double-quantized
    # scales, one and two tiles of tokens, partial feature tiles
    (3, 40, 512, 64, False), (11, 35, 768, 64, False), (5, 70, 1024, 64, True), (16, 17, 256, 64, True),
]


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("m,n,k,bs,nested", SIZES)
def test_nf4_matmul_matches_contract_in_float64(device, dtype, m, n, k, bs, nested):
    packed, state = quantize(torch.randn(n, k) * 0.1, blocksize=bs, nested=nested)
    packed, state = packed.to(device), to(state, device)
    x = torch.randn(m, k, device=device, dtype=dtype)
    y = slothai.nf4_matmul(x, _params(packed, state))
    assert y.shape == (m, n) and y.dtype == dtype
    check_against_contract(y, x, contract_weight(packed, state, dtype))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("fp32_lora", [False, True])
def test_nf4_matmul_bias_and_lora_term(device, dtype, scale, fp32_lora):
    m, n, k, r = 5, 40, 192, 7
    packed, state = quantize(torch.randn(n, k) * 0.1)
    packed, state = packed.to(device), to(state, device)
    x, b = torch.randn(3, m, k, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)
    low = torch.float32 if fp32_lora else dtype  # fp32 low-rank operands: PEFT's fp32 adapters
    lx, lb = torch.randn(3, m, r, device=device, dtype=low), torch.randn(n, r, device=device, dtype=low)
    y = slothai.nf4_matmul(x, _params(packed, state), b, lora_x=lx, lora_b=lb, lora_scale=scale)
    assert y.shape == (3, m, n)
    check_against_contract(y.reshape(-1, n), x.reshape(-1, k), contract_weight(packed, state, dtype), b,
                           lx.reshape(-1, r), lb, scale)


# The streaming kernel's low-rank term (K a multiple of 256, blocks of 64), fp32 and 16-bit
# ranks, odd and even. More 16-feature tiles than an H100 / H200 holds CTAs (264 at up to 8 rows,
# 396 at 9-16), so that CTAs sum several tiles, their copies running across tile ends; warps
# with no batch of K (K = 256, 1024), one, and two. One row and 2-16 rows take its two writes
# (low_in_sums in csrc/core/nf4_matmul_cuda.cu); the odd ranks carry a bias.
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m,k,n,rank,fp32", [
    (1, 256, 6500, 32, True), (16, 256, 6500, 8, True), (7, 1024, 6500, 64, False), (16, 1024, 6500, 32, True),
    (3, 2048, 4500, 32, True), (8, 4096, 4500, 32, True), (9, 2048, 6500, 16, False),
    (5, 2048, 700, 33, True), (16, 4096, 300, 7, False)])
def test_nf4_matmul_lora_term_on_the_streaming_kernel(device, dtype, m, k, n, rank, fp32):
    torch.manual_seed(m * rank + n)
    packed, state = quantize(torch.randn(n, k) * 0.05, blocksize=64, nested=True)
    packed, state = packed.to(device), to(state, device)
    low = torch.float32 if fp32 else dtype
    x = torch.randn(m, k, device=device, dtype=dtype)
    lx, lb = torch.randn(m, rank, device=device, dtype=low), torch.randn(n, rank, device=device, dtype=low)
    b = torch.randn(n, device=device, dtype=dtype) if rank % 2 else None  # (the write's bias, on some)
    y = slothai.nf4_matmul(x, _params(packed, state), b, lora_x=lx, lora_b=lb, lora_scale=0.37)
    check_against_contract(y, x, contract_weight(packed, state, dtype), b, lora_x=lx, lora_b=lb, lora_scale=0.37)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m,n,k", [(1, 512, 2048), (8, 256, 1024), (16, 300, 4096)])
def test_nf4_matmul_error_no_larger_than_dequantize_then_gemm(device, dtype, m, n, k):
    # The accuracy bar: against the exactly dequantized weight (level * scale
    # in float64), no more error than today's route (dequantize into x's dtype, GEMM
    # accumulating in fp32, one rounding) -- on average, and at the worst element
    # give or take that element's own output rounding.
    packed, state = quantize(torch.randn(n, k) * 0.02)
    packed, state = packed.to(device), to(state, device)
    x = torch.randn(m, k, device=device, dtype=dtype)
    exact = x.double() @ exact_weight(packed, state).t()
    ours = slothai.nf4_matmul(x, _params(packed, state)).double()
    dense = slothai.dequantize_nf4(packed, state, dtype=dtype)
    route = (x.float() @ dense.float().t()).to(dtype).double()
    e_ours, e_route = (ours - exact).abs(), (route - exact).abs()
    assert e_ours.mean() <= 1.02 * e_route.mean(), (e_ours.mean().item(), e_route.mean().item())
    assert e_ours.max() <= e_route.max() + EPS[dtype] * exact.abs().max(), (e_ours.max().item(), e_route.max().item())


def test_nf4_matmul_cuda_matches_cpu_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for dtype in HALF:
        for m, n, k in [(1, 4096, 4096), (9, 1000, 1472), (33, 77, 640), (64, 128, 2048), (100, 50, 130)]:
            packed, state = quantize(torch.randn(n, k) * 0.05)
            x = torch.randn(m, k, dtype=dtype)
            b = torch.randn(n, dtype=dtype)
            cpu = slothai.nf4_matmul(x, _params(packed, state), b)
            gpu = slothai.nf4_matmul(x.cuda(), _params(packed.cuda(), to(state, "cuda")), b.cuda())
            # the same fp32 sum in another order, then one rounding: one ulp apart at most
            torch.testing.assert_close(gpu.cpu().double(), cpu.double(), rtol=2 * EPS[dtype], atol=1e-3)


def test_nf4_linear_reads_4bit_for_few_rows_on_cuda(device):
    # nf4_linear takes nf4_matmul's route for few rows on CUDA (bit for bit the same
    # result), dequantize + GEMM for more rows, and on the CPU always.
    lin = linear4bit(96, 256, device)
    w = lin.weight
    for rows in (1, 16, 17, 200):
        x = torch.randn(rows, 256, device=device, dtype=torch.bfloat16)
        via_linear = slothai.nf4_linear(x, w)
        four_bit = torch.equal(via_linear, slothai.nf4_matmul(x, w))
        dense = torch.equal(via_linear, x @ slothai.dequantize_nf4(w, dtype=torch.bfloat16).t())
        if device == "cuda" and rows <= 16:
            assert four_bit
        else:
            assert dense or not four_bit


@pytest.mark.parametrize("rank", [0, 3])
def test_nf4_matmul_opcheck(device, rank):
    # (bf16 x with fp32 low-rank operands too: PEFT's fp32 adapters at generation)
    for dtype, low in ((torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)):
        packed, state = quantize(torch.randn(12, 128))
        packed, state = packed.to(device), to(state, device)
        x = torch.randn(4, 128, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(12, device=device, dtype=dtype, requires_grad=True)
        lora = [torch.randn(4, rank, device=device, dtype=low, requires_grad=True),
                torch.randn(12, rank, device=device, dtype=low, requires_grad=True)] if rank else [None, None]
        torch.library.opcheck(torch.ops.slothai.nf4_matmul.default, op_args(x, packed, state, b, *lora, 0.37),
                              atol=1e-2 if dtype != torch.float32 else None, rtol=1e-2 if dtype != torch.float32 else None)


def test_nf4_matmul_gradients_are_nf4_linears(device):
    lin = linear4bit(24, 64, device)
    x = torch.randn(3, 64, device=device, requires_grad=True)
    b = torch.randn(24, device=device, requires_grad=True)
    g = torch.randn(3, 24, device=device)
    grads = []
    for f in (slothai.nf4_matmul, slothai.nf4_linear):
        f(x, lin.weight, b).backward(g)
        grads.append((x.grad.clone(), b.grad.clone()))
        x.grad = b.grad = None
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_nf4_matmul_compiles_once_for_every_row_count(device, compile_counters):
    lin = linear4bit(40, 128, device)
    f = torch.compile(lambda x: slothai.nf4_matmul(x, lin.weight) * 2, fullgraph=True, dynamic=True)
    for m in (2, 3, 7, 16):
        x = torch.randn(m, 128, device=device, dtype=torch.bfloat16)
        torch.testing.assert_close(f(x), slothai.nf4_matmul(x, lin.weight) * 2)
    assert compile_counters["graph_break"] == {}
    assert compile_counters["stats"]["unique_graphs"] == 1


BAD = [
    ("x must end in in_features = 128", ValueError, lambda a: a.__setitem__(0, a[0][:, :100])),
    ("x must be float32, float16 or bfloat16, got int32", TypeError, lambda a: a.__setitem__(0, a[0].int())),
    ("bias must be bfloat16, got float16", TypeError, lambda a: a.__setitem__(9, a[9].half())),
    ("absmax has", ValueError, lambda a: a.__setitem__(2, a[2][:1])),
    ("packed holds", ValueError, lambda a: a.__setitem__(1, a[1][:10])),
    ("blocksize must be a power of two", ValueError, lambda a: a.__setitem__(6, 48)),
    ("lora_x and lora_b must be given together", ValueError, lambda a: a.__setitem__(10, a[0][:, :4])),
]


@pytest.mark.parametrize("msg,exc,mutate", BAD, ids=[b[0][:30] for b in BAD])
def test_nf4_matmul_bad_input_raises_named_error(device, msg, exc, mutate):
    packed, state = quantize(torch.randn(12, 128))
    packed, state = packed.to(device), to(state, device)
    a = op_args(torch.randn(4, 128, device=device, dtype=torch.bfloat16), packed, state,
                torch.randn(12, device=device, dtype=torch.bfloat16))
    mutate(a)
    with pytest.raises(exc, match=msg):
        torch.ops.slothai.nf4_matmul(*a)


def test_nf4_matmul_in_a_cuda_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lin = linear4bit(1024, 2048, "cuda")
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    want = slothai.nf4_linear(x, lin.weight)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = slothai.nf4_linear(x, lin.weight)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, slothai.nf4_matmul(x, lin.weight), rtol=0, atol=0)
    assert not torch.equal(out, want)


def test_nf4_matmul_reads_a_weight_written_by_the_kernel_just_before(device):
    # On sm_90 at 1-8 rows the 4-bit kernel is launched programmatic-dependent: it may start while
    # the kernel before it still runs, and prefetches its first weight bytes into L2 before it
    # waits for that kernel. A weight which that very kernel writes must still be read as written:
    # one weight's buffers take A's and B's codes and scales in turn, each buffer written by an
    # elementwise kernel (not a copy engine), the codes last, then the product -- eager and in a
    # CUDA graph, against each weight's own product.
    n, k = 4500, 2048  # (the streaming kernel's shape: blocks of 64, K a multiple of 256; 282 tiles)
    wa, wb = torch.randn(n, k) * 0.05, torch.randn(n, k) * 0.05
    quantized = [quantize(w, blocksize=64, nested=True) for w in (wa, wb, wa)]
    a, b, live = [(p.to(device), to(s, device)) for p, s in quantized]
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    want = [slothai.nf4_matmul(x, _params(*a)), slothai.nf4_matmul(x, _params(*b))]
    assert not torch.equal(want[0], want[1])

    def written(src):
        (sp, ss), (lp, ls) = src, live
        for s_, d in [(ss.state2.code, ls.state2.code), (ss.state2.absmax, ls.state2.absmax),
                      (ss.offset, ls.offset), (ss.absmax, ls.absmax), (sp, lp)]:
            torch.add(s_, 0, out=d)
        return slothai.nf4_matmul(x, _params(*live))

    for i in range(4):
        assert torch.equal(written((a, b)[i % 2]), want[i % 2]), f"eager, round {i}"
    if device == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [written(b), written(a)]
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(outs[0], want[1]) and torch.equal(outs[1], want[0])


def _params(packed, state):
    """A stand-in for Params4bit: the packed codes carrying their quant_state."""
    t = packed.view(packed.shape)
    t.quant_state = state
    return t


def test_benchmark_tables_are_written_again_from_a_result_json():
    # bench_nf4_matmul.py --render rebuilds a run's tables from its JSON alone (a GPU call may
    # bring back only the JSON): the committed run of 1c4e7cd, whose table the benchmark wrote
    # there, comes out byte for byte.
    import importlib.util
    import json
    import os

    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    spec = importlib.util.spec_from_file_location("bench_nf4_matmul", os.path.join(bench, "bench_nf4_matmul.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open(os.path.join(bench, "results", "nf4_matmul_h100_cold.json")) as f:
        res = json.load(f)
    with open(os.path.join(bench, "results", "nf4_matmul_h100_cold.txt")) as f:
        assert "\n".join(mod.table_lines(res)) + "\n" == f.read()
