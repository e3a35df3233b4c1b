"""slothai::nf4_linear_group: nf4_linear for several weights sharing x, one output each.
Each output must be exactly nf4_linear's for its weight (on CUDA the grouped launch
runs the same per-tile sums as the single one), whatever mix of scales, block sizes,
biases and LoRA terms the weights carry; on CUDA one launch serves a decode step's
products."""
import pytest
import torch

import slothai
from slothai.ops.dequant_nf4 import weight_args
from slothai.ops.nf4_group import nf4_linear_group
from nf4_reference import quantize, to
from test_nf4_matmul import _params

HALF = [torch.float16, torch.bfloat16]


def _weights(device, k, specs):
    """(Params4bit stand-in, whether it has a bias, LoRA rank) per (n, blocksize, nested, bias, rank)."""
    out = []
    for n, bs, nested, bias, rank in specs:
        packed, state = quantize(torch.randn(n, k) * 0.1, blocksize=bs, nested=nested)
        w = _params(packed.to(device), to(state, device))
        out.append((w, bias, rank))
    return out


# q/k/v- and gate/up-like groups at awkward sizes: a partial 16-feature tile, a weight of
# fewer features than one tile, plain and double-quantized scales, block sizes 64 and 128,
# a bias on some, LoRA ranks 0 / 3 / 8 with their own scales.
GROUPS = {
    "qkv": (128, [(40, 64, True, False, 8), (8, 64, True, False, 8), (8, 128, False, True, 3)]),
    "gate_up": (192, [(70, 64, True, False, 8), (70, 64, True, False, 8)]),
    "mixed": (64, [(17, 64, True, True, 0), (1, 64, False, False, 3), (33, 128, True, False, 8)]),
    "odd_k": (99, [(24, 64, True, False, 4), (9, 64, True, True, 0)]),
    # K a multiple of 256, blocks of 64: the streaming decode kernel's groups
    "qkv_256": (512, [(40, 64, True, False, 8), (8, 64, True, False, 8), (24, 64, True, True, 3)]),
    "gate_up_plain": (768, [(70, 64, False, False, 8), (33, 64, False, True, 0)]),
    # a LoRA term on a later product only: the launch writes as the single launches do
    "lora_after_256": (256, [(33, 64, True, True, 0), (40, 64, True, False, 8)]),
}


def _call(device, dtype, rows, group, seed=0, low=None):
    """`low`: the low-rank operands' dtype (x's by default; fp32 over half x)."""
    torch.manual_seed(seed)
    k, specs = GROUPS[group]
    weights = _weights(device, k, specs)
    x = torch.randn(rows, k, device=device, dtype=dtype)
    low = low or dtype
    bias, lora_x, lora_b, scale = [], [], [], []
    for i, (w, has_bias, rank) in enumerate(weights):
        n = w.quant_state.shape[0]
        bias.append(torch.randn(n, device=device, dtype=dtype) if has_bias else None)
        lora_x.append(torch.randn(rows, rank, device=device, dtype=low) if rank else None)
        lora_b.append(torch.randn(n, rank, device=device, dtype=low) * 0.1 if rank else None)
        scale.append(0.37 + i if rank else 1.0)
    ws = [w for w, _, _ in weights]
    got = nf4_linear_group(x, ws, bias, lora_x=lora_x, lora_b=lora_b, lora_scale=scale)
    want = [slothai.nf4_linear(x, w, b, lora_x=lx, lora_b=lb, lora_scale=s)
            for w, b, lx, lb, s in zip(ws, bias, lora_x, lora_b, scale)]
    return got, want


@pytest.mark.parametrize("dtype,low", [(d, d) for d in HALF + [torch.float32]] + [(d, torch.float32) for d in HALF])
@pytest.mark.parametrize("rows", [1, 5, 16, 17])
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_output_is_nf4_linears_bit_for_bit(device, dtype, low, rows, group):
    got, want = _call(device, dtype, rows, group, low=low)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w), (g - w).abs().max()


def test_leading_dims_and_one_weight(device):
    torch.manual_seed(1)
    (w, _, _), = _weights(device, 64, [(24, 64, True, False, 0)])
    x = torch.randn(2, 1, 64, device=device, dtype=torch.bfloat16)
    got, = nf4_linear_group(x, [w])
    assert got.shape == (2, 1, 24)
    assert torch.equal(got, slothai.nf4_linear(x, w))


def test_refuses_inputs_that_require_grad(device):
    torch.manual_seed(8)
    ws = [w for w, _, _ in _weights(device, 64, [(16, 64, True, False, 0), (8, 64, True, False, 0)])]
    x = torch.randn(2, 64, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        nf4_linear_group(x, ws)
    with torch.no_grad():
        assert all(not y.requires_grad for y in nf4_linear_group(x, ws))


def test_opcheck(device):
    torch.manual_seed(2)
    args = [weight_args(w) for w, _, _ in _weights(device, 128, [(20, 64, True, True, 3), (12, 128, False, False, 0)])]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 128, device=device, dtype=dtype)
        lists = [list(column) for column in zip(*(a[:7] for a in args))]
        shapes = [s for a in args for s in a[7]]
        extra = [[torch.randn(20, device=device, dtype=dtype), None],
                 [torch.randn(3, 3, device=device, dtype=dtype), None],
                 [torch.randn(20, 3, device=device, dtype=dtype), None], [0.5, 1.0]]
        torch.library.opcheck(torch.ops.slothai.nf4_linear_group.default, (x, *lists, shapes, *extra),
                              atol=1e-2 if dtype != torch.float32 else None,
                              rtol=1e-2 if dtype != torch.float32 else None)


def test_compiles_once_for_every_row_count(device, compile_counters):
    torch.manual_seed(3)
    ws = [w for w, _, _ in _weights(device, 128, [(40, 64, True, False, 0), (8, 64, True, False, 0)])]
    f = torch.compile(lambda x: [y * 2 for y in nf4_linear_group(x, ws)], fullgraph=True, dynamic=True)
    for m in (2, 3, 7, 16):
        x = torch.randn(m, 128, device=device, dtype=torch.bfloat16)
        for got, w in zip(f(x), ws):
            torch.testing.assert_close(got, slothai.nf4_linear(x, w) * 2, rtol=0, atol=0)
    assert compile_counters["graph_break"] == {}
    assert compile_counters["stats"]["unique_graphs"] == 1


BAD = [
    ("absmax must hold one entry per weight", ValueError, lambda a: a.__setitem__(2, a[2][:1])),
    ("shapes must hold", ValueError, lambda a: a.__setitem__(8, a[8][:3])),
    ("packed must hold 1 to 3 weights", ValueError,
     lambda a: [a.__setitem__(i, a[i] * 3) for i in range(1, 13) if i != 8] and a.__setitem__(8, a[8] * 3)),
    ("x must end in in_features = 128", ValueError, lambda a: a.__setitem__(0, a[0][:, :100])),
    ("bias must be bfloat16, got float16", TypeError,
     lambda a: a[9].__setitem__(1, torch.zeros_like(a[0][0, :12]).half())),
    ("lora_x and lora_b must be given together", ValueError, lambda a: a[10].__setitem__(0, a[0][:, :4])),
]


@pytest.mark.parametrize("msg,exc,mutate", BAD, ids=[b[0][:30] for b in BAD])
def test_bad_input_raises_named_error(device, msg, exc, mutate):
    torch.manual_seed(4)
    per = [weight_args(w) for w, _, _ in _weights(device, 128, [(20, 64, True, False, 0), (12, 64, True, False, 0)])]
    a = [torch.randn(4, 128, device=device, dtype=torch.bfloat16)]
    a += [list(column) for column in zip(*(p[:7] for p in per))]
    a += [[size for p in per for size in p[7]], [None, None], [None, None], [None, None], [1.0, 1.0]]
    mutate(a)
    with pytest.raises(exc, match=msg):
        torch.ops.slothai.nf4_linear_group(*a)


def test_one_launch_for_a_decode_steps_products():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(5)
    ws = [w for w, _, _ in _weights("cuda", 2048, [(2048, 64, True, False, 0), (512, 64, True, False, 0),
                                                   (512, 64, True, False, 0)])]
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    nf4_linear_group(x, ws)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        nf4_linear_group(x, ws)
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "nf4" in e.name]
    assert len(launches) == 1, [e.name for e in launches]


def test_in_a_cuda_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(6)
    ws = [w for w, _, _ in _weights("cuda", 1024, [(1024, 64, True, False, 0), (256, 64, True, False, 0)])]
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    nf4_linear_group(x, ws)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = nf4_linear_group(x, ws)
    x.copy_(torch.randn_like(x))
    graph.replay()
    for out, w in zip(outs, ws):
        assert torch.equal(out, slothai.nf4_linear(x, w))


def test_graph_pass_groups_the_calls_sharing_x_and_no_other():
    # group_products (the decode step's post-grad pass) on a traced graph: the two
    # calls on x that depend on nothing but x become one group; a third call on x whose
    # LoRA input comes from the first call's output (it cannot run beside it) stays as
    # it is; the two calls on the first call's output become a group of their own, on
    # the first group's output; the outputs are unchanged.
    from torch.fx.experimental.proxy_tensor import make_fx

    from slothai.generation.grouping import group_products

    torch.manual_seed(7)
    ws = [w for w, _, _ in _weights("cpu", 64, [(64, 64, True, False, 0), (16, 64, False, False, 0),
                                               (24, 64, True, False, 0), (8, 64, True, False, 0),
                                               (12, 64, False, False, 0)])]
    lora_b = torch.randn(24, 4) * 0.1

    def f(x):
        a = slothai.nf4_linear(x, ws[0])
        b = slothai.nf4_linear(x, ws[1])
        c = slothai.nf4_linear(x, ws[2], lora_x=a[..., :4], lora_b=lora_b, lora_scale=0.5)
        d = slothai.nf4_linear(a, ws[3])
        e = slothai.nf4_linear(a, ws[4])
        return a, b, c, d, e

    x = torch.randn(3, 64)
    group, linear = torch.ops.slothai.nf4_linear_group.default, torch.ops.slothai.nf4_linear.default
    with torch.no_grad():
        gm = make_fx(f)(x)
        assert group_products(gm.graph) == 2
        gm.graph.lint()
        gm.recompile()
        ops = [n.target for n in gm.graph.nodes if n.op == "call_function" and "slothai" in str(n.target)]
        assert sorted(map(str, ops)) == sorted(map(str, [group, group, linear])), ops
        for got, want in zip(gm(x), f(x)):
            assert torch.equal(got, want)


def test_the_cores_group_entry_is_each_products_reference():
    # _C.nf4_matmul_group on the CPU (the reference per product; the op's own CPU route
    # is nf4_linear's) against nf4_matmul per weight, and its count check.
    from slothai import _C
    from slothai.ops import kernels
    from slothai.ops.nf4_matmul import product_fields

    torch.manual_seed(9)
    ws = [w for w, _, _ in _weights("cpu", 128, [(40, 64, True, False, 0), (8, 128, False, False, 0),
                                                (17, 64, True, False, 0)])]
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    b = torch.randn(8, dtype=torch.bfloat16)
    launches = [product_fields(x, *weight_args(w), b if i == 1 else None) for i, w in enumerate(ws)]
    kernels.launch(_C.nf4_matmul_group, x.device, *(fields for fields, _, _ in launches))
    for (_, out, _), w, bias in zip(launches, ws, [None, b, None]):
        assert torch.equal(out, slothai.nf4_matmul(x, w, bias))
    with pytest.raises(ValueError, match="a group holds 1 to 3 products, got 4"):
        kernels.launch(_C.nf4_matmul_group, x.device, *[fields for fields, _, _ in launches * 2][:4])
