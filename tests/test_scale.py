"""slothai::scale_ (x *= factor in place, in fp32, rounded once) against torch's
fp32 product cast back, on awkward sizes, unaligned views and bad input."""
import pytest
import torch

from slothai.ops.scale import scale_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def want(x, g):
    """The reference: torch's fp32 product of the values, rounded once into x's dtype."""
    return (x.float() * torch.tensor(g, dtype=torch.float32)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 4099, 1_000_003])
def test_matches_fp32_product_rounded_once(device, dtype, n):
    x = torch.randn(n, device=device).to(dtype)
    for g in (1.0 / 3.0, -2.5e-3, 1e30):  # the last overflows fp16 / bf16 to inf, as torch's
        got = x.clone()
        assert scale_(got, torch.tensor(g, device=device)) is got
        assert torch.equal(got, want(x, g)), (dtype, n, g)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_and_shaped_views(device, dtype):
    # Contiguous views that start off a 16-byte boundary: only the view's elements change.
    for view in (lambda b: b[1:], lambda b: b[3:3 + 7 * 400].view(400, 7), lambda b: b.view(3, 1027)[1:]):
        base = torch.randn(3 * 1027, device=device).to(dtype)
        expect = base.clone()
        view(expect).copy_(want(view(base), 0.7))
        scale_(view(base), torch.tensor([0.7], device=device))  # a one-element vector is a factor too
        assert torch.equal(base, expect)


def test_factor_one_leaves_every_bit_alone(device):
    x = torch.tensor([1.0, -0.0, float("nan"), float("inf"), 3e-41], device=device).to(torch.bfloat16)
    before = x.clone()
    scale_(x, torch.ones((), device=device))
    assert torch.equal(x.view(torch.int16), before.view(torch.int16))


def test_not_the_bf16_rounded_factor(device):
    # torch's CUDA x.mul_(g) rounds an fp32 g to bf16 first: 1/3 -> 0.333984375 (+0.2%).
    x = torch.full((4096,), 3.0, device=device, dtype=torch.bfloat16)
    scale_(x, torch.tensor(1.0 / 3.0, device=device))
    assert torch.equal(x, torch.ones_like(x))


@pytest.mark.parametrize(
    "msg,exc,make",
    [
        ("self must be float32, float16 or bfloat16", TypeError,
         lambda d: (torch.ones(4, dtype=torch.int32, device=d), torch.ones((), device=d))),
        ("self must be contiguous", ValueError,
         lambda d: (torch.ones(4, 4, device=d).t(), torch.ones((), device=d))),
        ("factor must be float32", TypeError,
         lambda d: (torch.ones(4, device=d), torch.ones((), device=d, dtype=torch.float64))),
        ("factor must hold one value", ValueError, lambda d: (torch.ones(4, device=d), torch.ones(2, device=d))),
    ],
)
def test_bad_input_raises_named_error(device, msg, exc, make):
    with pytest.raises(exc, match=msg):
        scale_(*make(device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_factor_on_another_device_raises():
    with pytest.raises(ValueError, match="factor must be on cuda"):
        scale_(torch.ones(4, device="cuda"), torch.ones(()))


def test_opcheck(device):
    for dtype in DTYPES:
        torch.library.opcheck(torch.ops.slothai.scale_.default,
                              (torch.randn(37, device=device).to(dtype), torch.tensor(0.3, device=device)))


def test_compile_fullgraph_no_breaks_no_recompile_per_size(device, compile_counters):
    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, g):
        y = x * 2
        scale_(y, g)
        return y + 1

    g = torch.tensor(0.3, device=device)
    for n in (5, 7, 9, 11):
        x = torch.randn(n, device=device, dtype=torch.bfloat16)
        assert torch.equal(f(x, g), want(x * 2, 0.3) + 1)
    assert compile_counters["graph_break"] == {}
    assert compile_counters["stats"]["unique_graphs"] == 2  # static, then the size dynamic


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_stays_zero_under_an_inf_or_nan_factor(device, dtype):
    # fused_ce's backward scales gradients formed for an upstream 1; an ignored row's
    # (every one, in an accumulation window with no target token: sum / 0) is exactly
    # 0 and must stay 0 under g = inf or NaN, as torch's cross-entropy leaves it.
    x = torch.tensor([0.0, 1.5, -0.0, -2.0] * 9, device=device).to(dtype)  # 36: vector and tail paths
    for g in (float("inf"), float("nan")):
        got = x.clone()
        scale_(got, torch.tensor(g, device=device))
        assert (got[x == 0] == 0).all()
        torch.testing.assert_close(got[x != 0], want(x, g)[x != 0], equal_nan=True)  # +-inf, or NaN
