"""slothai.compile(saves=...): what a compiled layer keeps for backward (slothai/saving.py),
on tiny 4-bit QLoRA models (CPU, and CUDA where there is one): the bytes each layer saves,
measured with autograd's saved-tensor hooks, and the same losses and LoRA gradients as the
eager model."""
import collections
import copy
import warnings

import pytest
import torch

import slothai
from slothai import qlora
from slothai.patching.causal_lm import decoder_layers
from conftest import DEVICES
from training_checks import assert_losses_close

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

TOKENS = (2, 40)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def step_saving(model, ids):
    """One forward + backward; returns (loss, LoRA grads, activation bytes saved per decoder
    layer). Only tensors made in the step count: weights, LoRA parameters and their
    casts are not activations."""
    layers, current, saved = decoder_layers(model), [None], {}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))

    def pack(t):
        if current[0] is not None and t.is_floating_point() and t.numel() % (TOKENS[0] * TOKENS[1]) == 0 \
                and not isinstance(t, torch.nn.Parameter):
            saved[current[0]] = saved.get(current[0], 0) + t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, saved


def build(dtype, device="cpu"):
    return slothai.patch(qlora.build("tiny", "llama", dtype=dtype, device=device))


@pytest.mark.parametrize("device, backend", [(d, "inductor") for d in DEVICES] + [("cpu", "eager")])
def test_lean_drops_exactly_the_up_projection_and_matches_eager(device, backend):
    # "eager" runs the policy through eager SAC (a forward and a recompute pass; what it
    # keeps is cached where autograd's hooks do not see it), inductor through AOTAutograd's
    # partitioner. Per layer, "lean" keeps the same tensors as "matmuls" but the MLP's up
    # projection: tokens x intermediate_size elements.
    ids = torch.randint(0, 256, TOKENS, device=device)
    want_loss, want, _ = step_saving(build(torch.float32, device), ids)
    got = {}
    for saves in ("lean", "matmuls"):
        torch._dynamo.reset()
        model = slothai.compile(build(torch.float32, device), backend=backend, saves=saves, cudagraphs=False)
        loss, grads, got[saves] = step_saving(model, ids)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == want.keys() and len(grads) == 2 * 7 * 2
        for name in want:
            torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=1e-6, msg=f"{saves}: {name}")
    if backend == "eager":
        return
    up_bytes = TOKENS[0] * TOKENS[1] * qlora.SHAPES["tiny"]["intermediate_size"] * 4
    assert len(got["lean"]) == len(got["matmuls"]) == 2
    for layer in got["lean"]:
        assert got["matmuls"][layer] - got["lean"][layer] == up_bytes, got


def test_lean_keeps_less_than_the_partitioner_and_bf16_trains_alike():
    # bf16, as users train: "lean" saves less than AOTAutograd's default choice (saves=None),
    # and the losses of a few steps agree with the eager model's.
    batches = list(qlora.batches(256, 2, [40, 24, 40], 3, "cpu"))
    want = qlora.train(build(torch.bfloat16), batches)
    ids = torch.randint(0, 256, TOKENS)
    saved = {}
    for saves in ("lean", None):
        torch._dynamo.reset()
        model = slothai.compile(build(torch.bfloat16), saves=saves)
        saved[saves] = sum(step_saving(model, ids)[2].values())
    assert saved["lean"] < saved[None], saved
    torch._dynamo.reset()
    model = slothai.compile(build(torch.bfloat16))
    with slothai.compile_report() as report:
        got = qlora.train(model, batches)
    assert_losses_close(got, want, 1e-3)  # inductor's bf16 kernels vs eager's: ~3e-5 seen
    assert report.graph_breaks == [] and report.compilations == 1, report


def test_eager_attention_lengths_do_not_recompile():
    # Eager attention multiplies probabilities by values over the token count, a symbolic
    # size: had the policy compared it with an int, the guard would recompile at a new
    # side of 128 (seen before the fix) or at a length equal to a model width (64, 128).
    model = qlora.build("tiny", "llama")
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    slothai.compile(slothai.patch(model), backend="aot_eager")
    batches = list(qlora.batches(256, 2, [40, 64, 128, 200, 32], 5, "cpu"))
    with slothai.compile_report() as report:
        qlora.train(model, batches)
    assert report.compilations == 1 and report.recompiles == [], report


def test_offload_sends_one_mlp_activation_per_layer_to_the_host_and_trains_like_matmuls(monkeypatch, device):
    # saves="offload" keeps what "matmuls" keeps, but one tokens x intermediate_size tensor
    # per layer call goes through offload._HostCopy (on CUDA: to pinned host memory and back
    # into a landing buffer; CUDA graphs on by default). Same compiled layer, so the same
    # losses and gradients; on CUDA the backward graphs replay from the second pass on.
    from slothai.compiling import offload
    from torch._inductor import cudagraph_trees

    copies, real_init = [], offload._HostCopy.__init__
    monkeypatch.setattr(offload._HostCopy, "__init__", lambda self, t: copies.append(t.shape) or real_init(self, t))
    recorded, real_record = [], cudagraph_trees.CUDAGraphTreeManager.record_function
    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function",
                        lambda self, *a, **k: recorded.append(1) or real_record(self, *a, **k))
    lengths = [40, 24, 40, 40, 24, 40]
    batches = list(qlora.batches(256, 2, lengths, len(lengths), device))
    base = build(torch.bfloat16, device)  # one build, copied: CPU bitsandbytes' double quant varies per build
    losses, trained, counts = {}, {}, []
    for saves in ("matmuls", "offload"):
        torch._dynamo.reset()
        model = slothai.compile(copy.deepcopy(base), saves=saves)
        losses[saves] = [loss for loss, _, _ in qlora.train(model, batches, log=lambda _: counts.append(len(recorded)))]
        trained[saves] = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert losses["offload"] == losses["matmuls"]
    assert trained["offload"].keys() == trained["matmuls"].keys() and len(trained["matmuls"]) == 2 * 7 * 2
    for name, param in trained["matmuls"].items():
        torch.testing.assert_close(trained["offload"][name], param, rtol=0, atol=0, msg=name)
    width = qlora.SHAPES["tiny"]["intermediate_size"]
    layers = qlora.SHAPES["tiny"]["num_hidden_layers"]
    # bucketed (padded) lengths under CUDA graphs: 64 tokens for both 24 and 40
    tokens = [2 * (64 if device == "cuda" else n) for n in lengths]
    assert [s.numel() for s in copies] == [n * width for n in tokens for _ in range(layers)], copies
    assert all(s[-1] == width for s in copies)
    if device == "cuda":
        offload_counts = counts[len(lengths):]
        assert offload_counts[2:] == [offload_counts[1]] * (len(lengths) - 2), counts


@pytest.mark.parametrize("saves, warns", [("lean", True), ("offload", True), (None, False)])
def test_a_second_backward_torch_would_let_through_is_warned_of(saves, warns):
    # With donated buffers off, a second backward through a layer compiled under a saves=
    # policy gives wrong gradients (docs/design.md): compile says so when it wraps the layer.
    ids = torch.randint(0, 256, TOKENS)
    model = slothai.compile(build(torch.float32), backend="aot_eager", saves=saves)
    with torch._functorch.config.patch(donated_buffer=False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, labels=ids).loss.backward()
    assert any("second backward" in str(w.message) for w in caught) == warns, [str(w.message) for w in caught]


def test_pinned_buffers_are_reused_smallest_fit_first(monkeypatch):
    # offload._Pinned: a copy takes the smallest free buffer that holds it; when none
    # does, the smaller free ones are dropped and a new one is made (pinned, on CUDA:
    # a plain tensor stands in here). Given back, a buffer serves the next copy.
    from slothai.compiling import offload

    made = []
    monkeypatch.setattr(offload._Pinned, "free", collections.defaultdict(list))
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):  # CPU-only torch cannot pin
        made.extend(args[:1] if pin_memory else ())
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    key = ("cuda:0", torch.bfloat16)
    free = offload._Pinned.free[key]
    free += [real_empty(n, dtype=torch.bfloat16) for n in (100, 30, 60)]
    got = offload._Pinned.take(*key, 50)
    assert got.numel() == 60 and [b.numel() for b in free] == [100, 30] and made == []
    free.append(got)
    assert offload._Pinned.take(*key, 60) is got
    big = offload._Pinned.take(*key, 200)
    assert big.numel() == 200 and made == [200] and free == []



def test_release_landing_buffers_frees_what_host_copies_keep(monkeypatch):
    # What host copies keep between steps, on the device (the two landing buffers) and
    # on the host (pinned buffers), is dropped by release_landing_buffers; the next
    # copy makes new ones.
    from slothai.compiling import offload

    monkeypatch.setattr(offload._Landing, "buffers", {})
    monkeypatch.setattr(offload._Landing, "occupants", {})
    monkeypatch.setattr(offload._Pinned, "free", collections.defaultdict(list))

    class Copy:  # what _Landing.take reads of a _HostCopy
        device, parity, dev = "cpu", 0, None
        host = torch.empty(6, 4)

    copy = Copy()
    landed = offload._Landing.take(copy)
    assert landed.shape == (6, 4) and offload._Landing.buffers and offload._Landing.occupants
    offload._Pinned.free[("cuda:0", torch.float32)].append(torch.empty(10))
    offload.release_landing_buffers()
    assert offload._Landing.buffers == {} and offload._Landing.occupants == {}
    assert not any(offload._Pinned.free.values())
    assert offload._Landing.take(copy).data_ptr() != landed.data_ptr() or landed.numel() == 0

def test_tensors_kept_on_the_host_serve_a_second_backward(device):
    # retain_graph=True: backward unpacks each saved tensor twice; the host copy stays
    # until autograd drops it, so the second backward gets the same tensors again.
    # low_memory only: under saves="lean" / "matmuls" / "offload" torch's selective
    # checkpointing allows one backward per region (docs/design.md).
    ids = torch.randint(0, 256, TOKENS, device=device)
    base = build(torch.float32, device)

    def twice(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(retain_graph=True)
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    want = twice(copy.deepcopy(base))
    # torch refuses a second backward through a compiled graph that donates its buffers
    with torch._functorch.config.patch(donated_buffer=False):
        got = twice(slothai.compile(copy.deepcopy(base), cudagraphs=False, low_memory=True))
    assert got.keys() == want.keys() and len(want) == 2 * 7 * 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(saves="all"), "saves must be one of"),
    (dict(saves="lean", memory_budget=0.5), "memory_budget=0.5 is AOTAutograd"),
])
def test_bad_compile_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        slothai.compile(build(torch.float32), **kwargs)
