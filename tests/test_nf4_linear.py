"""slothai::nf4_linear: x @ W^T + b (+ lora_x @ lora_b^T) with W dequantized on the
fly, forward and backward, against a dense weight from the exact formula and against
bitsandbytes."""
import pytest
import torch

import slothai
from nf4_reference import DTYPES, formula, linear4bit


def test_half_precision_offset_linear_as_bitsandbytes(device):
    lin = linear4bit(24, 130, "cpu")
    lin.weight.quant_state.offset = lin.weight.quant_state.offset.half()
    x = torch.randn(5, 130)
    with torch._dynamo.config.patch(disable=True):
        want = lin(x)
    lin = lin.to(device)
    got = slothai.nf4_linear(x.to(device), lin.weight)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def _nf4_linear_ref(x, w, b):
    """The same product through a dense W from the formula, differentiated by autograd."""
    wd = formula(w.data, w.quant_state, x.dtype)
    return torch.nn.functional.linear(x, wd, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("o,i,lead,bias", [(10, 24, (3, 5), True), (33, 17, (7,), False), (1, 64, (2, 1, 3), True)])
def test_nf4_linear_matches_dense(device, dtype, o, i, lead, bias):
    w = linear4bit(o, i, device).weight
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


@pytest.mark.parametrize("dtype,low", [(d, d) for d in DTYPES] +
                         [(d, torch.float32) for d in DTYPES if d != torch.float32])
@pytest.mark.parametrize("o,i,r,lead,bias,scale", [(10, 24, 3, (3, 5), True, 1.0), (33, 17, 1, (7,), False, 0.37),
                                                   (70, 64, 16, (2, 1, 3), True, 2.0), (5, 128, 8, (0, 4), False, 4.5)])
def test_nf4_linear_with_lora_term_matches_float64(device, dtype, low, o, i, r, lead, bias, scale):
    # y = x W^T + s lora_x lora_b^T + b and its four gradients, against float64 math on
    # the formula's W; in half precision, no further from it than the same sum formed
    # apart in that precision (base, low-rank term, then their sum: what PEFT does),
    # give or take 1% of the largest value. `low`: the low-rank operands' dtype (fp32
    # over half x: PEFT's fp32 adapters, the term formed in fp32 and rounded once).
    w = linear4bit(o, i, device).weight
    wd = formula(w.data, w.quant_state, torch.float64)
    leaves = [torch.randn(*lead, i, device=device, dtype=dtype), torch.randn(*lead, r, device=device, dtype=low),
              torch.randn(o, r, device=device, dtype=low), torch.randn(o, device=device, dtype=dtype)]
    x, lx, lb, b = [t.requires_grad_() for t in leaves]
    y = slothai.nf4_linear(x, w, b if bias else None, lora_x=lx, lora_b=lb, lora_scale=scale)
    x64, lx64, lb64, b64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = x64 @ wd.t() + scale * (lx64 @ lb64.t()) + (b64 if bias else 0)
    x2, lx2, lb2, b2 = [t.detach().clone().requires_grad_() for t in leaves]
    y2 = _nf4_linear_ref(x2, w, b2 if bias else None) + ((lx2 @ lb2.t()) * scale).to(dtype)
    assert y.shape == (*lead, o) and y.dtype == dtype
    g = torch.randn_like(y)
    for out in (y, y64, y2):
        out.backward(g.to(out.dtype))
    pairs = [(y, y64, y2), (x.grad, x64.grad, x2.grad), (lx.grad, lx64.grad, lx2.grad), (lb.grad, lb64.grad, lb2.grad)]
    if bias:
        pairs.append((b.grad, b64.grad, b2.grad))
    for got, want, apart in pairs:
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        else:
            if want.numel():
                err, err_apart = [(t.double() - want).abs().max().item() for t in (got, apart)]
                assert err <= err_apart + 1e-2 * want.abs().max().item(), (err, err_apart)


def _nf4_linear_args(device, o=12, i=20, bias=True, rank=0):
    w = linear4bit(o, i, device).weight
    s = w.quant_state
    x = torch.randn(4, i, device=device, requires_grad=True)
    b = torch.randn(o, device=device, requires_grad=True) if bias else None
    args = [x, w.data, s.absmax, s.state2.code, s.state2.absmax, s.offset, s.blocksize, s.state2.blocksize,
            list(s.shape), b]
    if rank:
        args += [torch.randn(4, rank, device=device, requires_grad=True),
                 torch.randn(o, rank, device=device, requires_grad=True), 0.37]  # LoRA's alpha / r
    return args


@pytest.mark.parametrize("rank", [0, 3])
def test_nf4_linear_opcheck(device, rank):
    for bias in (True, False):
        torch.library.opcheck(torch.ops.slothai.nf4_linear.default, _nf4_linear_args(device, bias=bias, rank=rank))


BAD_LINEAR = [
    ("x must end in in_features = 20", ValueError, lambda a: a.__setitem__(0, a[0][:, :19])),
    ("x must be float32, float16 or bfloat16, got int32", TypeError, lambda a: a.__setitem__(0, a[0].int())),
    ("shape must be \\[out_features, in_features\\]", ValueError, lambda a: a.__setitem__(8, [240])),
    ("bias must have shape \\[12\\]", ValueError, lambda a: a.__setitem__(9, a[9][:5])),
    ("bias must be float32, got float16", TypeError, lambda a: a.__setitem__(9, a[9].half())),
    ("absmax has", ValueError, lambda a: a.__setitem__(2, a[2][:1])),
]


@pytest.mark.parametrize("msg,exc,mutate", BAD_LINEAR, ids=[b[0][:30] for b in BAD_LINEAR])
def test_nf4_linear_bad_input_raises_named_error(device, msg, exc, mutate):
    a = _nf4_linear_args(device)
    a[0] = a[0].detach()
    mutate(a)
    with pytest.raises(exc, match=msg):
        torch.ops.slothai.nf4_linear(*a)


BAD_LORA = [
    ("lora_x and lora_b must be given together, got lora_x alone", ValueError, lambda a: a.__setitem__(11, None)),
    ("lora_x and lora_b must be given together, got lora_b alone", ValueError, lambda a: a.__setitem__(10, None)),
    ("lora_x must be float32, got bfloat16", TypeError, lambda a: a.__setitem__(10, a[10].bfloat16())),
    ("lora_b must be float32, got float16", TypeError, lambda a: a.__setitem__(11, a[11].half())),
    # over bf16 x the pair may be fp32, both of them
    ("lora_b must be float32, got bfloat16", TypeError,
     lambda a: [a.__setitem__(i, a[i].bfloat16()) for i in (0, 9, 11)]),
    ("lora_x must be bfloat16, got float16", TypeError,
     lambda a: [a.__setitem__(i, a[i].bfloat16()) for i in (0, 9, 11)] + [a.__setitem__(10, a[10].half())]),
    ("lora_b must have shape \\[12, r\\], got \\[11, 3\\]", ValueError, lambda a: a.__setitem__(11, a[11][:11])),
    ("lora_x must have x's leading dims and end in r = 3, got shape \\[4, 2\\]", ValueError,
     lambda a: a.__setitem__(10, a[10][:, :2])),
    ("lora_x must have x's leading dims .* got shape \\[3, 3\\]", ValueError, lambda a: a.__setitem__(10, a[10][:3])),
    ("lora_x must have x's leading dims .* got shape \\[4, 1, 3\\]", ValueError,
     lambda a: a.__setitem__(10, a[10][:, None])),
]


@pytest.mark.parametrize("msg,exc,mutate", BAD_LORA, ids=[b[0][:40] for b in BAD_LORA])
def test_nf4_linear_bad_lora_term_raises_named_error(device, msg, exc, mutate):
    a = [t.detach() if isinstance(t, torch.Tensor) else t for t in _nf4_linear_args(device, rank=3)]
    mutate(a)
    with pytest.raises(exc, match=msg):
        torch.ops.slothai.nf4_linear(*a)
    with pytest.raises(exc, match=msg.split(" ")[0]), \
            torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):  # the fake function checks alike
        torch.ops.slothai.nf4_linear(*a)


def test_nf4_linear_compiled_keeps_no_dense_weight(device, compile_counters):
    # Under torch.compile the backward's dequantization must stay a recomputation:
    # nothing of the dense weight's shape may be saved for backward.
    o, i = 72, 40
    w = linear4bit(o, i, device).weight
    f = torch.compile(lambda x: slothai.nf4_linear(x, w).sum(), fullgraph=True, dynamic=True)
    saved = []
    x = torch.randn(6, i, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = f(x)
    loss.backward()
    assert saved and (o, i) not in saved and (i, o) not in saved, saved
    torch.testing.assert_close(x.grad, formula(w.data, w.quant_state, torch.float32).sum(0).expand(6, i))
    assert compile_counters["graph_break"] == {}


def test_nf4_linear_lora_rank_zero_forward_and_backward(device):
    # A LoRA term of rank 0 adds nothing; its gradients are empty, and backward must not
    # trip over reshape(-1, 0).
    w = linear4bit(10, 24, device).weight
    wd = formula(w.data, w.quant_state, torch.float64)
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    lx = torch.randn(3, 5, 0, device=device, requires_grad=True)
    lb = torch.randn(10, 0, device=device, requires_grad=True)
    y = slothai.nf4_linear(x, w, lora_x=lx, lora_b=lb)
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ wd.t()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    assert lx.grad.shape == lx.shape and lb.grad.shape == lb.shape


def test_nf4_linear_weight_must_be_a_quantized_weight(device):
    x = torch.randn(2, 24, device=device)
    with pytest.raises(TypeError, match="weight must be a bitsandbytes Params4bit .* got Tensor"):
        slothai.nf4_linear(x, torch.randn(10, 24, device=device))
    with pytest.raises(TypeError, match="weight must be a bitsandbytes Params4bit .* got Parameter"):
        slothai.nf4_linear(x, torch.nn.Parameter(torch.randn(10, 24, device=device)))


def test_nf4_linear_quant_state_must_be_a_quant_state(device):
    w = linear4bit(10, 24, device).weight
    x = torch.randn(2, 24, device=device)
    w.quant_state = object()
    with pytest.raises(TypeError, match="quant_state must be a bitsandbytes QuantState .* got object"):
        slothai.nf4_linear(x, w)
