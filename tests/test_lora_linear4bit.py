"""slothai.patch on PEFT's LoRA wrapper of a bitsandbytes NF4 layer: base + LoRA as one
slothai::nf4_linear with a low-rank term, against PEFT's own forward (unpatched), and
PEFT's forward kept for every case the one-op path does not cover."""
import copy
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slothai
from nf4_reference import linear4bit

peft = pytest.importorskip("peft")


class _Net(torch.nn.Module):
    def __init__(self, o, i, device, in_4bit):
        super().__init__()
        self.proj = linear4bit(o, i, device)
        # What PEFT reads off a model loaded in 4 bit to wrap its layers in its bitsandbytes
        # LoRA class; without it PEFT's generic LoRA Linear wraps the Linear4bit.
        self.is_loaded_in_4bit = in_4bit

    def forward(self, x):
        return self.proj(x)


def lora_net(device="cpu", o=24, i=40, r=4, in_4bit=True, **config):
    """A PEFT LoRA model over one NF4 layer, B drawn non-zero (PEFT starts it at 0,
    which would leave the LoRA term out of the output and A's gradient at 0)."""
    net = peft.get_peft_model(_Net(o, i, device, in_4bit),
                              peft.LoraConfig(r=r, lora_alpha=3 * r, target_modules=["proj"], **config))
    wrapper = type(net.base_model.model.proj)
    assert (wrapper.__module__, wrapper.__name__) == (("peft.tuners.lora.bnb", "Linear4bit") if in_4bit else
                                                      ("peft.tuners.lora.layer", "Linear"))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return net


class _Calls(TorchDispatchMode):
    """Records whether each slothai::nf4_linear call had a low-rank term."""

    def __init__(self):
        super().__init__()
        self.lora = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.slothai.nf4_linear.default:
            self.lora.append(len(args) > 10 and args[10] is not None)
        return func(*args, **(kwargs or {}))


def run(net, x, **autocast):
    """Output and the gradients of x and every LoRA parameter for one backward, and
    which nf4_linear calls had the low-rank term."""
    x = x.detach().clone().requires_grad_()
    net.zero_grad(set_to_none=True)
    calls = _Calls()
    amp = torch.autocast(x.device.type, **autocast) if autocast else contextlib.nullcontext()
    with calls, amp:
        y = net(x)
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y).to(y.dtype))
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads, calls.lora


@pytest.mark.parametrize("lead,in_4bit", [((3, 5), True), ((7,), True), ((2, 3), False)])
def test_patched_lora_layer_is_one_op_and_matches_peft(device, lead, in_4bit):
    net = lora_net(device, in_4bit=in_4bit)
    patched = slothai.patch(copy.deepcopy(net))
    x = torch.randn(*lead, 40, device=device)
    y, dx, grads, lora = run(patched, x)
    want_y, want_dx, want_grads, _ = run(net, x)
    assert lora == [True]  # base + LoRA in one op, the low-rank term inside it
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys() and len(grads) == 2
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_patched_lora_layer_under_bf16_autocast_against_float64(device, x_dtype):
    # Under autocast the adapter math runs in bf16, as in PEFT: output and gradients
    # within bf16's rounding of float64 math (relative RMS error; PEFT's own errors
    # printed beside them for the record).
    net = lora_net(device, o=256, i=512, r=16)
    patched = slothai.patch(copy.deepcopy(net))
    x = torch.randn(4, 32, 512, device=device).to(x_dtype)
    got = run(patched, x, dtype=torch.bfloat16)
    peft_bf16 = run(net, x, dtype=torch.bfloat16)
    exact = run(copy.deepcopy(net).double(), x.double())
    assert got[3] == [True] and peft_bf16[3] == []  # (unpatched: bitsandbytes computes the base)
    assert got[0].dtype == peft_bf16[0].dtype == x_dtype
    errors = {}
    for name, (a, b, want) in {"y": (got[0], peft_bf16[0], exact[0]), "x": (got[1], peft_bf16[1], exact[1]),
                               **{n: (got[2][n], peft_bf16[2][n], exact[2][n]) for n in exact[2]}}.items():
        errors[name] = [((t.double() - want).norm() / want.norm()).item() for t in (a, b)]
    print({name: f"{e:.1e} (PEFT {e_peft:.1e})" for name, (e, e_peft) in errors.items()})
    assert all(e <= 2 ** -7 for e, _ in errors.values()), errors


@pytest.mark.parametrize("rslora", [False, True])
def test_the_scale_is_read_at_each_call_as_peft_sets_it(device, rslora):
    # The op takes LoRA's scaling as lora_scale: rsLoRA's alpha / sqrt(r), and a scale
    # changed after patching (PEFT's set_scale), match PEFT's forward and gradients.
    net = lora_net(device, use_rslora=rslora)
    patched = slothai.patch(copy.deepcopy(net))
    for factor in (1.0, 0.37):
        for model in (net, patched):
            model.base_model.model.proj.set_scale("default", factor)
        x = torch.randn(3, 40, device=device)
        y, dx, grads, lora = run(patched, x)
        want_y, want_dx, want_grads, _ = run(net, x)
        assert lora == [True]
        torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_dropout_draws_the_same_mask_as_peft(device):
    net = lora_net(device, lora_dropout=0.5)
    patched = slothai.patch(copy.deepcopy(net))
    x = torch.randn(4, 40, device=device)
    torch.manual_seed(1)
    y, dx, grads, lora = run(patched, x)
    torch.manual_seed(1)
    want_y, want_dx, want_grads, _ = run(net, x)
    assert lora == [True]
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-5)


def _two_adapters(net):
    net.add_adapter("other", peft.LoraConfig(r=2, target_modules=["proj"]))
    net.base_model.set_adapter(["default", "other"])


PEFT_PATHS = {
    "dora": (dict(use_dora=True), None),
    "lora bias": (dict(lora_bias=True), None),
    "two active adapters": ({}, _two_adapters),
    "merged": ({}, lambda net: net.merge_adapter()),
    "adapters disabled": ({}, lambda net: net.base_model.disable_adapter_layers()),
}


@pytest.mark.parametrize("name", PEFT_PATHS)
def test_what_the_one_op_does_not_cover_runs_peft_forward(name):
    config, prepare = PEFT_PATHS[name]
    if config.get("lora_bias") and "lora_bias" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip("this PEFT has no lora_bias")
    net = lora_net(i=128, **config)  # whole 64-blocks: the path every released model takes
    patched = slothai.patch(copy.deepcopy(net))
    if prepare:
        prepare(net)
        prepare(patched)
    x = torch.randn(5, 128)
    y, dx, _, lora = run(patched, x)
    want_y, want_dx, _, _ = run(net, x)
    assert lora == [False]  # PEFT's forward over the patched base layer
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-5)


def test_fp32_adapters_on_a_bf16_base_without_autocast_keep_peft_math():
    # PEFT computes fp32 adapters in fp32 when autocast is off (compile(adapters="float32")):
    # the one op would compute them in the base's bf16, so PEFT's forward runs.
    net = lora_net()
    net.base_model.model.proj.base_layer.compute_dtype = torch.bfloat16
    patched = slothai.patch(copy.deepcopy(net))
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    y, _, grads, lora = run(patched, x)
    want_y, _, want_grads, _ = run(net, x)
    assert lora == [False] and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want_y, rtol=1e-2, atol=1e-2)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-2, atol=1e-2, msg=name)


def test_fp32_adapters_on_a_bf16_base_without_gradients_take_the_op_in_fp32():
    # Generation and evaluation (no grad): the op takes PEFT's fp32 adapters as they are,
    # A(x) in fp32 as PEFT forms it and the low-rank term added to the base's fp32 sum
    # unrounded; PEFT rounds the term to bf16 and the sum again. Equal to bf16 rounding,
    # and nearer to the float64 result than PEFT's.
    net = lora_net()
    net.base_model.model.proj.base_layer.compute_dtype = torch.bfloat16
    patched = slothai.patch(copy.deepcopy(net))
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    calls = _Calls()
    with torch.no_grad(), calls:
        y = patched(x)
    with torch.no_grad():
        want = net(x)
    layer = net.base_model.model.proj
    lora = calls.lora == [True]
    assert lora and y.dtype == torch.bfloat16, calls.lora
    w64 = slothai.dequantize_nf4(layer.base_layer.weight, dtype=torch.float32).double()
    a64, b64 = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    exact = x.double() @ w64.t() + layer.scaling["default"] * (x.double() @ a64.t() @ b64.t())
    if layer.base_layer.bias is not None:
        exact = exact + layer.base_layer.bias.double()
    torch.testing.assert_close(y.float(), want.float(), rtol=0, atol=4 * 2 ** -8 * float(want.abs().max()))
    assert (y.double() - exact).abs().mean() <= (want.double() - exact).abs().mean()


def test_unpatch_restores_peft_forward():
    net = slothai.patch(lora_net())
    slothai.unpatch(net)
    assert not any(slothai.is_patched(m) for m in net.modules())
    assert run(net, torch.randn(2, 40))[3] == []  # bitsandbytes' own path again


def test_compiled_patched_lora_layer_has_no_graph_break_and_no_recompile(compile_counters):
    net = slothai.patch(lora_net())
    f = torch.compile(net, fullgraph=True, dynamic=True)
    for rows in (3, 7, 12):
        x = torch.randn(rows, 40)
        want_y, want_dx, _, _ = run(net, x)
        x.requires_grad_()
        y = f(x)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, want_dx, rtol=1e-5, atol=1e-5)
    assert compile_counters["graph_break"] == {}
    assert compile_counters["stats"]["unique_graphs"] == 1


def test_lora_false_leaves_peft_forward_and_switches_back():
    net = lora_net()
    x = torch.randn(3, 40)
    assert run(slothai.patch(net, lora=False), x)[3] == [False]  # PEFT's LoRA forward over the patched base
    assert run(slothai.patch(net), x)[3] == [True]
    assert run(slothai.patch(net, lora=False), x)[3] == [False]


def test_mixed_adapter_batch_runs_peft_forward():
    # adapter_names (a per-row adapter choice) is PEFT's mixed-batch path: called on the layer.
    net = lora_net()
    patched = slothai.patch(copy.deepcopy(net))
    x = torch.randn(4, 40)
    names = ["default", "__base__", "default", "__base__"]
    calls = _Calls()
    with calls:
        y = patched.base_model.model.proj(x, adapter_names=names)
    assert calls.lora == [False]
    torch.testing.assert_close(y, net.base_model.model.proj(x, adapter_names=names), rtol=1e-5, atol=1e-5)
