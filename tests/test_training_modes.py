"""slothai.compile's training options on tiny 4-bit QLoRA models (CPU): adapters in the
compute dtype, the low-memory mode (layer inputs kept on the host, layers recomputed),
and the Unsloth drop-in with Unsloth's real `fast_dequantize` signature."""
import contextlib
import copy
import types

import pytest
import torch

import slothai
from training_checks import assert_losses_close, draw_lora_b
from slothai import qlora
from slothai.compiling import buckets, regions
from slothai.compiling.offload import slice_tokens
from slothai.compiling.regions import LOW_MEMORY_MLP_SLICES
from slothai.patching.causal_lm import decoder_layers
from slothai.patching.classes import is_patched

pytest.importorskip("transformers")
pytest.importorskip("peft")
bnbF = pytest.importorskip("bitsandbytes.functional")

SEQS = [40, 24, 40]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def one_step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def test_low_memory_gives_the_same_losses_and_gradients():
    # The recompute must reproduce the layer exactly: same loss, same LoRA gradients
    # (every layer's, including the first, whose input needs no grad of its own).
    ids = torch.randint(0, 256, (2, 33))
    want_loss, want = one_step(slothai.patch(qlora.build("tiny", "llama")), ids)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager", low_memory=True)
    got_loss, got = one_step(model, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_low_memory_trains_like_eager_with_dropout_and_one_graph_per_grad_mode():
    # Dropout in the LoRA path: the recompute must draw the same masks as the forward.
    batches = list(qlora.batches(256, 2, SEQS, len(SEQS), "cpu"))

    def build():
        model = qlora.build("tiny", "llama")
        for m in model.modules():
            if hasattr(m, "lora_dropout"):
                for d in m.lora_dropout.values():
                    d.p = 0.3
        return model

    # Low-memory mode runs each MLP over token slices, one dropout draw per slice: the
    # eager reference does the same (test_token_slices_are_exact checks slicing alone).
    reference = slothai.patch(build())
    for layer in decoder_layers(reference):
        slice_tokens(layer.mlp, LOW_MEMORY_MLP_SLICES)
    torch.manual_seed(7)
    want = qlora.train(reference, batches)
    model = slothai.compile(slothai.patch(build()), backend="aot_eager", low_memory=True)
    torch.manual_seed(7)
    with slothai.compile_report() as report:
        got = qlora.train(model, batches)
    assert_losses_close(got, want, 1e-4)
    assert report.graph_breaks == []
    # One compiled layer: its forward saves only its input (to the host), its backward recomputes.
    assert report.compilations == 1, report


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_low_memory_layer_saves_only_its_input(monkeypatch, backend):
    # What each compiled layer hands autograd to keep: its input (which low_memory sends
    # to the host), the rotary cos/sin and weights; no activation of its own.
    saved = []

    @contextlib.contextmanager
    def recording(hidden):
        key = hidden.untyped_storage().data_ptr()

        def pack(t):
            saved.append((t.untyped_storage().data_ptr() == key, tuple(t.shape), t.is_floating_point()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    monkeypatch.setattr(regions, "inputs_to_host", recording)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend=backend, low_memory=True)
    ids = torch.randint(0, 256, (2, 40))
    model(input_ids=ids, labels=ids).loss.backward()
    per_token = [(is_input, shape) for is_input, shape, fp in saved if fp and len(shape) >= 2 and shape[-2] == 40]
    assert any(is_input for is_input, _ in per_token)
    head_dim = model.config.head_dim
    assert all(is_input or shape[-1] == head_dim for is_input, shape in per_token), per_token


def test_token_slices_are_exact_and_leave_eval_whole():
    # Lengths below, at and past a multiple of the slice count (zero padding dropped).
    mlp = qlora.build("tiny", "llama").base_model.model.model.layers[0].mlp
    base = type(mlp)
    slice_tokens(mlp, 4)
    for tokens in (1, 3, 4, 33):
        x = torch.randn(2, tokens, 64, requires_grad=True)
        want = base.forward(mlp, x)
        (dx_want,) = torch.autograd.grad(want.sum(), x)
        got = mlp(x)
        (dx_got,) = torch.autograd.grad(got.sum(), x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx_got, dx_want, rtol=1e-5, atol=1e-6)
    calls = []
    mlp.gate_proj.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    mlp(torch.randn(1, 10, 64))
    assert calls == [(1, 3, 64)] * 4
    calls.clear()
    with torch.no_grad():  # nothing for a backward to hold: whole
        mlp(torch.randn(1, 10, 64))
    assert calls == [(1, 10, 64)]
    mlp.eval()
    calls.clear()
    mlp(torch.randn(1, 10, 64))
    assert calls == [(1, 10, 64)]  # generation: one call, no padding
    slice_tokens(mlp, None)
    assert type(mlp) is base and not hasattr(mlp, "slothai_token_slices")


def test_low_memory_slices_mlps_and_a_later_compile_or_unpatch_undoes_it():
    model = slothai.patch(qlora.build("tiny", "llama"))
    slothai.compile(model, backend="aot_eager", low_memory=True)
    mlps = [layer.mlp for layer in decoder_layers(model)]
    assert all(is_patched(m) and m.slothai_token_slices == LOW_MEMORY_MLP_SLICES for m in mlps)
    slothai.compile(model, backend="aot_eager")
    assert not any(is_patched(m) for m in mlps)
    slothai.compile(model, backend="aot_eager", low_memory=True)
    slothai.unpatch(model)
    assert not any(is_patched(m) or hasattr(m, "slothai_token_slices") for m in mlps)


def test_adapters_in_compute_dtype_stay_close_to_fp32_adapters():
    # bf16 model: the LoRA matmuls run in bf16 under "compute", in fp32 under "float32".
    batches = list(qlora.batches(256, 2, SEQS, len(SEQS), "cpu"))
    want = qlora.train(slothai.patch(qlora.build("tiny", "llama", dtype=torch.bfloat16)), batches)
    for adapters in ("compute", "float32"):
        torch._dynamo.reset()
        model = qlora.build("tiny", "llama", dtype=torch.bfloat16)
        slothai.compile(slothai.patch(model), backend="aot_eager", adapters=adapters)
        got = qlora.train(model, batches)
        assert_losses_close(got, want, 1e-2)
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_adapters_compute_runs_lora_matmuls_in_the_compute_dtype():
    seen = []

    def spy(mod, args, out):
        seen.append(out.dtype)

    model = slothai.patch(qlora.build("tiny", "llama", dtype=torch.bfloat16))
    slothai.compile(model, backend="eager", adapters="compute")
    hooks = [m.register_forward_hook(spy) for n, m in model.named_modules() if n.endswith("lora_A.default")]
    ids = torch.randint(0, 256, (1, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen and set(seen) == {torch.bfloat16}
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("bad", [dict(adapters="fp16"), dict(mode="regionl")])
def test_compile_rejects_unknown_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        slothai.compile(torch.nn.Linear(2, 2), **bad)


def test_unsloth_drop_in_has_unsloths_signature(monkeypatch):
    # A stand-in with the real Unsloth 2026.10's signature and call forms:
    # fast_dequantize(W, quant_state, out=None, use_global_buffer=False, dtype=None),
    # called as fast_dequantize(W.t(), state, use_global_buffer=True, dtype=X.dtype) by its
    # LoRA kernels. NF4 goes to slothai; anything else to the original.
    import sys

    calls = []

    def original(W, quant_state=None, out=None, use_global_buffer=False, dtype=None):
        calls.append(type(quant_state).__name__)
        return "unsloth's own"

    utils = types.ModuleType("unsloth.kernels.utils")
    utils.fast_dequantize = original
    user = types.ModuleType("unsloth.kernels.fast_lora")  # imported it by name: routed too
    user.fast_dequantize = original
    monkeypatch.setitem(sys.modules, "unsloth.kernels.utils", utils)
    monkeypatch.setitem(sys.modules, "unsloth.kernels.fast_lora", user)
    model = slothai.patch(torch.nn.Linear(2, 2))
    try:
        packed, state = bnbF.quantize_4bit(torch.randn(40, 24), quant_type="nf4", compress_statistics=True)
        want = bnbF.dequantize_4bit(packed, state)
        assert user.fast_dequantize is utils.fast_dequantize is not original
        with torch._dynamo.config.patch(disable=True):
            assert torch.equal(user.fast_dequantize(packed, state, use_global_buffer=True, dtype=torch.float16), want)
            got_t = utils.fast_dequantize(packed.t(), state, dtype=torch.float32)
            assert got_t.shape == (24, 40) and torch.equal(got_t, want.t())
            out = torch.empty_like(want)
            assert utils.fast_dequantize(packed, state, out=out) is out and torch.equal(out, want)
            assert calls == []
            fp4_packed, fp4_state = bnbF.quantize_4bit(torch.randn(8, 8), quant_type="fp4")
            assert utils.fast_dequantize(fp4_packed, fp4_state) == "unsloth's own"
            assert utils.fast_dequantize(packed, [state.absmax]) == "unsloth's own"  # legacy list form
            assert calls == ["QuantState", "list"]
    finally:
        slothai.unpatch(model)
    assert utils.fast_dequantize is original and user.fast_dequantize is original


def test_padded_length_buckets():
    from slothai.compiling.buckets import padded_length

    assert [padded_length(n) for n in (1, 64, 65, 100, 1500, 1536, 1537, 2048, 2049)] == \
        [64, 64, 128, 128, 1536, 1536, 1664, 2048, 2304]
    for n in range(1, 5000, 7):  # never shorter; padding under 64 tokens or an eighth of them
        assert 0 <= padded_length(n) - n < max(64, n // 8 + 1)


def test_bucketed_lengths_give_the_same_losses_and_gradients(monkeypatch):
    # Right-padding each layer's tokens to the bucket must change nothing for the real
    # tokens of a causal model: same loss, same LoRA gradients, and it must happen.

    pads = []
    real = regions._pad_tokens
    monkeypatch.setattr(regions, "_pad_tokens", lambda *a: pads.append(a[2:]) or real(*a))
    ids = torch.randint(0, 256, (2, 37))
    want_loss, want = one_step(slothai.patch(qlora.build("tiny", "llama")), ids)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager", bucket_lengths=True)
    got_loss, got = one_step(model, ids)
    assert pads and set(pads) == {(37, 64)}
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_each_layer_takes_the_previous_layers_padded_output_as_it_is(monkeypatch):
    # A padded layer output goes on to the next layer uncopied (its padding rows hold
    # that layer's outputs for the padding): the second layer's hidden states are the
    # first layer's padded output itself, and loss and LoRA gradients stay eager's.
    runs = []
    real = regions._pad_tokens
    monkeypatch.setattr(regions, "_pad_tokens", lambda *a: runs.append((a, real(*a))) or runs[-1][1])
    ids = torch.randint(0, 256, (2, 37))
    want_loss, want = one_step(slothai.patch(qlora.build("tiny", "llama")), ids)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager", bucket_lengths=True)
    got_loss, got = one_step(model, ids)
    assert len(runs) == 2  # one call per layer
    hidden = [regions._hidden_of(*args[:2]) for args, _ in runs]
    padded = [regions._hidden_of(*out) for _, out in runs]
    assert hidden[0].shape[1] == 37 and padded[0].shape[1] == 64  # the embeddings: padded copy
    assert padded[1] is getattr(hidden[1], buckets._PADDED_FROM)  # layer 0's graph output, uncopied
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def padded_batch(n, padded, batch=2):
    """A padding collator's batch (model kwargs): the last row `padded` tokens short."""
    return next(qlora.batches(256, batch, [n], 1, "cpu", padded=padded))


@pytest.mark.parametrize("bucket, low_memory, family", [(False, False, "llama"), (True, False, "llama"),
                                                       (True, True, "llama"), (True, False, "gemma2")])
def test_padded_batches_with_an_attention_mask_run_in_length_buckets(monkeypatch, bucket, low_memory, family):
    # A padding collator's attention mask reaches each layer as [batch, 1, n, n]; the
    # layer's tokens still pad into the bucket (the mask grown so that no real token
    # sees the padding): same loss and LoRA gradients as eager, low-memory mode too,
    # and Gemma-2's sliding-window layers (window 32 of 37 tokens).
    pads = []
    real = regions._pad_tokens
    monkeypatch.setattr(regions, "_pad_tokens", lambda *a: pads.append(a[1].get("attention_mask")) or real(*a))
    batch = padded_batch(37, padded=11, batch=3)

    def step(model):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), lora_grads(model)

    want_loss, want = step(slothai.patch(qlora.build("tiny", family)))
    model = slothai.compile(slothai.patch(qlora.build("tiny", family)), backend="aot_eager", bucket_lengths=bucket,
                            low_memory=low_memory)
    got_loss, got = step(model)
    assert len(pads) == (2 if bucket else 0) and all(m is not None and m.shape[-1] == 37 for m in pads)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_grown_mask_hides_the_padding_from_real_tokens(dtype):
    # Real rows: as given, and never the padding; padding rows: causal, never empty.
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand(2, 1, 5, 5, generator=g) < 0.6
    mask = allowed if dtype == torch.bool else torch.where(allowed, 0.0, torch.finfo(dtype).min)
    grown = buckets._pad_mask(mask, 5, 8)
    sees = grown if dtype == torch.bool else grown == 0
    assert grown.shape == (2, 1, 8, 8) and grown.dtype == dtype
    assert torch.equal(grown[..., :5, :5], mask) and not sees[..., :5, 5:].any()
    assert torch.equal(sees[..., 5:, :], torch.ones(8, 8, dtype=torch.bool).tril()[5:].expand(2, 1, 3, 8))


def test_length_buckets_pad_into_a_recorded_bucket_until_recording_pays():
    # Rent (pad into a larger recorded bucket) until the padding run adds up to the
    # price of recording (RECORD_COST_STEPS steps), then buy (warm up, record).
    lengths = buckets.LengthBuckets()
    assert [lengths.choose(2, 2048) for _ in range(3)] == [2048] * 3  # warm-up, record, replay
    assert lengths.choose(2, 1536) == 2048 and lengths.choose(2, 1800) == 2048  # recorded: no slow step
    assert lengths.choose(3, 1536) == 1536  # another kind (batch size, mask): nothing recorded for it
    assert lengths.choose(2, 4000) == 4096  # longer than any recorded bucket: its own
    assert lengths.choose(2, 100, reuse=False) == 128  # warm_up, or no CUDA graphs: its own
    runs = [lengths.choose(2, 1024) for _ in range(40)]  # 1 - 1024/2048 = half a step wasted a call
    rent = 2 * buckets.RECORD_COST_STEPS
    assert runs == [2048] * rent + [1024] * (40 - rent)
    assert lengths.choose(2, 1000) == 1024  # recorded now, for every length in it


def test_a_length_shorter_than_a_recorded_bucket_runs_in_it_and_trains_like_eager(monkeypatch):
    # Under CUDA graphs (as set up on the CPU here) a new length whose bucket was never
    # run goes into a larger bucket that has been run twice; same losses as eager.
    pads = []
    real = regions._pad_tokens
    monkeypatch.setattr(regions, "_pad_tokens", lambda *a: pads.append(a[2:]) or real(*a))
    batches = list(qlora.batches(256, 2, [100, 100, 40, 128], 4, "cpu"))
    want = qlora.train(slothai.patch(qlora.build("tiny", "llama")), batches)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager")
    _as_if_cuda_graphs(model, explicit=False)
    with slothai.compile_report() as report:
        got = qlora.train(model, batches)
    assert pads == [(100, 128)] * 4 + [(40, 128)] * 2, pads  # 2 layers a step; 128 tokens: none
    assert report.region_calls == {"compiled": 8, "of those, in a larger recorded bucket": 2}, report
    assert_losses_close(got, want, 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("masked", [False, True])
def test_a_new_length_replays_a_recorded_bucket(monkeypatch, masked):
    # A length padded into its bucket (100 into 128) or into a larger recorded one (40,
    # whose bucket is 64) and the bucket's own length are one CUDA-graph path: after the
    # first two steps nothing is warmed up or recorded again; padded batches with an
    # attention mask (one row 9 tokens short) too.
    from torch._inductor import cudagraph_trees

    calls = []
    for name in ("record_function", "run_eager"):
        real = getattr(cudagraph_trees.CUDAGraphTreeManager, name)
        monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, name,
                            lambda self, *a, _real=real, _name=name, **k: calls.append(_name) or _real(self, *a, **k))
    batches = list(qlora.batches(256, 2, [128, 128, 100, 128, 40, 128, 100], 7, "cuda", padded=9 if masked else 0))
    want = qlora.train(slothai.patch(qlora.build("tiny", "llama", device="cuda")), batches)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama", device="cuda")))
    counts = []
    got = qlora.train(model, batches, log=lambda _: counts.append(len(calls)))
    assert counts[1] > counts[0] > 0 and counts[2:] == [counts[1]] * 5, counts
    assert_losses_close(got, want, 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_with_bucketed_lengths_train_like_eager():
    # The default on a GPU: inductor, each layer a CUDA graph per length bucket.
    batches = list(qlora.batches(256, 2, SEQS, len(SEQS), "cuda"))
    want = qlora.train(slothai.patch(qlora.build("tiny", "llama", device="cuda")), batches)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama", device="cuda")))
    with slothai.compile_report() as report:
        got = qlora.train(model, batches)
    assert_losses_close(got, want, 1e-3)
    assert report.graph_breaks == [] and report.compilations == 1, report


def accumulate(model, batches, *, micro=2, set_to_none=True):
    """AdamW steps of `micro` micro-batches each (gradient accumulation, as Trainer's
    gradient_accumulation_steps); the losses and, before each step, the gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses, grads = [], []
    for i in range(0, len(batches), micro):
        for ids in batches[i:i + micro]:
            loss = model(input_ids=ids, labels=ids).loss / micro
            loss.backward()
            losses.append(loss.item())
        grads.append(lora_grads(model))
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    return losses, grads


def assert_accumulates_like_eager(got, want):
    assert_losses_close([(v, 0, 0) for v in got[0]], [(v, 0, 0) for v in want[0]], 1e-3)
    for step, (g, w) in enumerate(zip(got[1], want[1])):
        assert g.keys() == w.keys() and g
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=2e-3, atol=1e-5, msg=f"step {step}: {name}")


def test_gradient_accumulation_under_cuda_graphs_settings_trains_like_eager():
    # The compiled layers as compile's CUDA default sets them up (on the CPU, no graphs
    # are replayed): every LoRA parameter gets the hook that copies its first gradient
    # of a step, and two micro-batches per step give eager's gradients, with one
    # compilation and no graph break.
    batches = list(qlora.batches(256, 2, [40, 40, 24, 24], 4, "cpu"))
    eager, model = (slothai.patch(qlora.build("tiny", "llama")) for _ in range(2))
    draw_lora_b(eager, model)
    want = accumulate(eager, batches)
    model = slothai.compile(model, backend="aot_eager")
    _as_if_cuda_graphs(model, explicit=False)
    with slothai.compile_report() as report:
        got = accumulate(model, batches)
    assert_accumulates_like_eager(got, want)
    assert report.graph_breaks == [] and report.compilations == 1, report

    def hooked(model):
        params = [p for layer in decoder_layers(model) for p in layer.parameters() if p.requires_grad]
        return len(params) == 2 * 7 * 2 and all(
            sum(isinstance(h, regions._OwnGrad) for h in (p._backward_hooks or {}).values()) == 1 for p in params)

    assert hooked(model)
    clone = copy.deepcopy(model)  # Parameter's deepcopy drops hooks; the copy's layers compile again and add them
    assert not hooked(clone)
    accumulate(clone, batches[:2])
    assert hooked(clone)


@pytest.mark.parametrize("dict_tag_guards", [False, True])
def test_a_parameter_unfrozen_after_compile_gets_the_gradient_copy(dict_tag_guards):
    # Unfreezing a norm after the first step makes the layers compile again (requires_grad
    # is guarded on); its gradient would come from the graphs' memory too, so every layer's
    # newly trainable parameter must carry the hook before the backward, and accumulation
    # still give eager's gradients. dict_tag_guards: torch 2.11's default, whose guards
    # skipped the parameter (no recompile, no gradient) unless our layers turn it off;
    # torch 2.13 checks requires_grad on that fast path itself (pytorch/pytorch#177158), so
    # there only torch 2.11 (the GPU image: no gradient without the fix) can fail it.
    config = torch._dynamo.config
    if not hasattr(config, "use_recursive_dict_tags_for_guards"):
        pytest.skip("this torch has no recursive dict-tag guards")
    with config.patch(use_recursive_dict_tags_for_guards=dict_tag_guards):
        _unfreeze_a_norm_after_compile("regional")


def _unfreeze_a_norm_after_compile(mode, device="cpu"):
    """On the CPU the layers are set up as compile's CUDA default does; on CUDA they
    are compile's defaults (inductor, CUDA graphs)."""
    batches = list(qlora.batches(256, 2, [40, 40, 24, 24], 4, device))
    eager, model = (slothai.patch(qlora.build("tiny", "llama", device=device)) for _ in range(2))
    draw_lora_b(eager, model)
    model = slothai.compile(model, mode=mode, **({"backend": "aot_eager"} if device == "cpu" else {}))
    if mode == "regional" and device == "cpu":
        _as_if_cuda_graphs(model, explicit=False)
    accumulate(model, batches[:2])
    for m in (eager, model):
        m.zero_grad(set_to_none=True)
        for layer in decoder_layers(m):
            layer.post_attention_layernorm.weight.requires_grad_(True)
    norms = [layer.post_attention_layernorm.weight for layer in decoder_layers(model)]
    assert not any(any(isinstance(h, regions._OwnGrad) for h in (p._backward_hooks or {}).values()) for p in norms)
    for a, b in zip(eager.parameters(), model.parameters()):  # the same weights after one step each
        a.data.copy_(b.data)
    with slothai.compile_report() as report:
        got = accumulate(model, batches)
    want = accumulate(eager, batches)
    assert report.compilations >= 1, report
    if mode == "regional":
        assert report.compilations == 1, report
        assert all(sum(isinstance(h, regions._OwnGrad) for h in (p._backward_hooks or {}).values()) == 1
                   for p in norms)
    assert_accumulates_like_eager(got, want)
    assert any(name.endswith("post_attention_layernorm.weight") for name in got[1][0])


def test_a_parameter_unfrozen_after_a_whole_model_compile_gets_its_gradient():
    # A whole compiled model meets a second guard shortcut: tensor guards skipped where the
    # module dicts' tags match (torch 2.11 skips requires_grad with them, 2.13 does not; found on the
    # GPU image, reproduced on the CPU with torch 2.11: no recompile, no gradient).
    config = torch._dynamo.config
    if not hasattr(config, "use_recursive_dict_tags_for_guards"):
        pytest.skip("this torch has no recursive dict-tag guards")
    with config.patch(use_recursive_dict_tags_for_guards=True):  # torch 2.11's default
        _unfreeze_a_norm_after_compile("full")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_parameter_unfrozen_after_compile_trains_like_eager_under_cuda_graphs():
    _unfreeze_a_norm_after_compile("regional", "cuda")  # with this torch's own guard defaults


def test_a_whole_model_compiled_with_cuda_graphs_copies_its_gradients_too():
    # mode="full" with cudagraphs=True: every trainable parameter gets the hook at compile.
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), mode="full", cudagraphs=True)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(any(isinstance(h, regions._OwnGrad) for h in (p._backward_hooks or {}).values())
                          for p in params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradient_accumulation_with_cuda_graphs_trains_like_eager(set_to_none):
    # The first micro-batch's LoRA gradients, returned by the layers' backward graphs,
    # must not stay in the graphs' memory as .grad: the next micro-batch's graphs
    # write there (before the fix: a RuntimeError at the second backward). Also with
    # zero_grad(set_to_none=False), which keeps .grad across steps.
    batches = list(qlora.batches(256, 2, [64, 64, 64, 64, 40, 40, 64, 64], 8, "cuda"))
    eager, model = (slothai.patch(qlora.build("tiny", "llama", device="cuda")) for _ in range(2))
    draw_lora_b(eager, model)
    want = accumulate(eager, batches, set_to_none=set_to_none)
    got = accumulate(slothai.compile(model), batches, set_to_none=set_to_none)
    assert_accumulates_like_eager(got, want)


def _as_if_cuda_graphs(model, explicit):
    """Set the compiled layers up as compile's CUDA default does (the CPU has no CUDA graphs)."""
    from slothai.compiling.regions import compiled_layers

    regions = [layer.forward for layer in compiled_layers(model)]
    for region in regions:
        region.kwargs = {**region.kwargs, "options": {"triton.cudagraphs": True}}
        region.options = {**region.options, "bucket": True, "cudagraphs": True if explicit else "default"}
    return regions


def test_cuda_graphs_by_default_go_off_under_gradient_checkpointing():
    # TRL's configs and Trainer turn gradient checkpointing on after the model was compiled;
    # its recomputation would replay a layer's CUDA graph and overwrite outputs the backward
    # still reads (seen on an H100 under TRL's SFTTrainer). compile's default gives way.
    ids = torch.randint(0, 256, (2, 37))
    want_loss, want = one_step(slothai.patch(qlora.build("tiny")), ids)
    model = slothai.compile(slothai.patch(qlora.build("tiny")), backend="aot_eager")
    regions = _as_if_cuda_graphs(model, explicit=False)
    model.gradient_checkpointing_enable()
    got_loss, got = one_step(model, ids)
    assert [("options" in r.kwargs, r.options["bucket"]) for r in regions] == [(False, False)] * 2
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    asked = slothai.compile(slothai.patch(qlora.build("tiny")), backend="aot_eager")
    _as_if_cuda_graphs(asked, explicit=True)
    asked.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="cudagraphs=True, but the layer checkpoints its activations"):
        one_step(asked, ids)
    # Checkpointing turned on after the layers ran (and compiled) with CUDA graphs: they compile again, without.
    later = slothai.compile(slothai.patch(qlora.build("tiny")), backend="aot_eager")
    regions = _as_if_cuda_graphs(later, explicit=False)
    one_step(later, ids)
    assert all(r._compiled is not None and "options" in r.kwargs for r in regions)
    later.gradient_checkpointing_enable()
    got_loss, got = one_step(later, ids)
    assert [("options" in r.kwargs, r.options["bucket"]) for r in regions] == [(False, False)] * 2
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)


def test_warm_up_buckets_lengths_only_where_training_will():
    # Gradient checkpointing turned on after compile takes CUDA graphs and length buckets
    # away at the layers' first call; warm_up must run the lengths training will see.
    model = slothai.compile(slothai.patch(qlora.build("tiny")), backend="aot_eager")
    _as_if_cuda_graphs(model, explicit=False)
    assert list(slothai.warm_up(model, [37, 40])) == [40]  # one bucket, padded
    model = slothai.compile(slothai.patch(qlora.build("tiny")), backend="aot_eager")
    _as_if_cuda_graphs(model, explicit=False)
    model.gradient_checkpointing_enable()
    assert list(slothai.warm_up(model, [37, 40])) == [40, 37]


def test_nf4_linear_counts_its_flops():
    # The AOT partitioner's memory budget ranks recomputation by FLOPs: without a
    # formula the base GEMM would look free to recompute.
    from torch.utils.flop_counter import FlopCounterMode

    packed, state = bnbF.quantize_4bit(torch.randn(48, 64), quant_type="nf4", compress_statistics=True)
    weight = torch.nn.Parameter(packed, requires_grad=False)
    weight.quant_state = state
    with FlopCounterMode(display=False) as counter:
        slothai.nf4_linear(torch.randn(5, 7, 64), weight)
    assert counter.get_total_flops() == 2 * 5 * 7 * 48 * 64
    with FlopCounterMode(display=False) as counter:  # a rank-3 LoRA term: its GEMM too
        slothai.nf4_linear(torch.randn(5, 7, 64), weight, lora_x=torch.randn(5, 7, 3), lora_b=torch.randn(48, 3))
    assert counter.get_total_flops() == 2 * 5 * 7 * 48 * (64 + 3)


def test_warm_up_compiles_and_leaves_the_model_as_it_was():
    # After warm_up, training at those lengths compiles nothing more and trains as a
    # model never warmed up: parameters, gradients, RNG state and mode are put back.
    batches = list(qlora.batches(256, 2, SEQS, len(SEQS), "cpu"))
    want = qlora.train(slothai.patch(qlora.build("tiny", "llama")), batches)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager")
    model.eval()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}  # LoRA's
    some = next(p for p in model.parameters() if p.requires_grad)
    some.grad = torch.ones_like(some)
    given, rng = some.grad, torch.get_rng_state()
    with slothai.compile_report() as warming:
        seconds = slothai.warm_up(model, SEQS, batch_size=2)
    assert list(seconds) == [40, 24] and warming.compilations == 1  # one run per length, longest first
    assert not model.training and some.grad is given and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters() if p is not some)
    for n, p in model.named_parameters():
        assert n not in params or torch.equal(p, params[n]), n
    some.grad = None
    with slothai.compile_report() as training:
        got = qlora.train(model, batches)
    assert training.compilations == 0, training
    assert_losses_close(got, want, 1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_warm_up_padded_takes_the_variant_padded_batches_run(padded):
    # A padding collator's batches reach the layers with a mask. Without padding
    # transformers' SDPA path passes None, which stays None (the causal kernel) until the
    # model has seen a mask (see _CompiledForward._with_causal_mask): warm_up(padded=True)
    # takes the masked variant, which padded and unpadded batches then share; padded=False
    # the mask-free one, and a padded batch compiles once more.
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager", bucket_lengths=True)
    slothai.warm_up(model, [40], batch_size=2, padded=padded)
    with slothai.compile_report() as training:
        model(**padded_batch(40, padded=9)).loss.backward()
        ids = torch.randint(0, 256, (2, 40))
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()  # no padding
    assert training.compilations == (0 if padded else 1), training


def test_warm_up_then_low_memory_training_trains_like_eager():
    batches = list(qlora.batches(256, 2, SEQS, len(SEQS), "cpu"))
    want = qlora.train(slothai.patch(qlora.build("tiny", "llama")), batches)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager", low_memory=True)
    slothai.warm_up(model, SEQS, batch_size=2)
    assert_losses_close(qlora.train(model, batches), want, 1e-4)


def test_warm_up_runs_each_length_bucket_once():
    # 37, 40 and 64 run in the bucket of 64 (one CUDA-graph path, see _pad_tokens), 100
    # in 128; each at its own bucket, though 128 was recorded first.
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager")
    regions = _as_if_cuda_graphs(model, explicit=False)
    assert list(slothai.warm_up(model, [37, 40, 100, 64])) == [100, 64]
    # (batch, mask), bucket: unpadded, and no mask seen before: the layers get None
    assert regions[0].buckets.calls == {((1, False), 128): 2, ((1, False), 64): 2}


@pytest.mark.parametrize("lengths, batch_size, name", [([], 1, "lengths"), ([0], 1, "lengths"), ([8.0], 1, "lengths"),
                                                        ([True], 1, "lengths"), ([8], 0, "batch_size")])
def test_warm_up_rejects_bad_arguments(lengths, batch_size, name):
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager")
    with pytest.raises(ValueError, match=name):
        slothai.warm_up(model, lengths, batch_size=batch_size)


def test_warm_up_needs_a_compiled_model_that_returns_a_loss(monkeypatch):
    with pytest.raises(ValueError, match="slothai.compile"):
        slothai.warm_up(slothai.patch(qlora.build("tiny", "llama")), [8])
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager")
    monkeypatch.setattr(model, "forward", lambda **kw: types.SimpleNamespace(loss=None))
    with pytest.raises(ValueError, match="loss"):
        slothai.warm_up(model, [8])
    assert model.training  # put back on the way out


def test_warm_up_takes_any_integral_length():
    import numpy as np

    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager")
    assert list(slothai.warm_up(model, np.array([12, 9]))) == [12, 9]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_warm_up_records_every_bucket_before_training(monkeypatch):
    # After warm_up, the first step at each length replays its graphs: nothing more
    # is warmed up or recorded, and the losses are eager's.
    from torch._inductor import cudagraph_trees

    calls = []
    for name in ("record_function", "run_eager"):
        real = getattr(cudagraph_trees.CUDAGraphTreeManager, name)
        monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, name,
                            lambda self, *a, _real=real, _name=name, **k: calls.append(_name) or _real(self, *a, **k))
    batches = list(qlora.batches(256, 2, [40, 100, 64, 70, 64, 40], 6, "cuda"))
    want = qlora.train(slothai.patch(qlora.build("tiny", "llama", device="cuda")), batches)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama", device="cuda")))
    assert list(slothai.warm_up(model, [40, 64, 70, 100], batch_size=2)) == [100, 64]  # buckets 128, 64
    assert "record_function" in calls and "run_eager" in calls
    before = len(calls)
    got = qlora.train(model, batches)
    assert len(calls) == before, calls[before:]
    assert_losses_close(got, want, 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and host copies run on CUDA only")
def test_low_memory_cuda_graphs_record_once_per_length(monkeypatch):
    # Each layer's input comes back from the host into the landing buffer of its
    # parity: the same address every step, so the backward graphs that read it replay
    # instead of recording again (with fresh tensors they re-recorded every step).
    # A call longer than LOW_MEMORY_CUDAGRAPH_TOKENS runs without graphs.
    from torch._inductor import cudagraph_trees

    recorded, real = [], cudagraph_trees.CUDAGraphTreeManager.record_function
    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function",
                        lambda self, *a, **k: recorded.append(1) or real(self, *a, **k))
    monkeypatch.setattr(regions, "LOW_MEMORY_CUDAGRAPH_TOKENS", 2 * 200)
    # buckets of 64 and 128 tokens, then 2 x 300 tokens: a long call
    batches = list(qlora.batches(256, 2, [40] * 5 + [100] * 4 + [300] * 2, 11, "cuda"))
    want = qlora.train(slothai.patch(qlora.build("tiny", "llama", device="cuda")), batches)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama", device="cuda")), low_memory=True)
    counts = []
    got = qlora.train(model, batches, log=lambda _: counts.append(len(recorded)))
    layers = [layer.forward for layer in regions.compiled_layers(model)]
    assert all(f.kwargs["options"]["triton.cudagraphs"] and f._compiled_long is not None for f in layers)
    assert counts[1] > 0 and counts[2:5] == [counts[1]] * 3, counts  # recorded at step 2, replayed after
    assert counts[6] > counts[4] and counts[7:9] == [counts[6]] * 2, counts  # a new length: once
    assert counts[9:] == [counts[8]] * 2, counts  # long calls: no graphs
    assert_losses_close(got, want, 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host copies run on CUDA only")
@pytest.mark.parametrize("kwargs", [dict(low_memory=True), dict(saves="offload")])
def test_host_copies_on_cuda_with_two_forwards_before_one_backward(kwargs):
    # Layer inputs (low_memory) or an MLP activation per layer (saves="offload") go to
    # pinned host memory and come back on a side stream; two micro-batches share one
    # backward, so copies of both chains are in flight.
    a, b = (torch.randint(0, 256, (2, n), device="cuda") for n in (33, 40))

    def grads(model):
        loss = model(input_ids=a, labels=a).loss + model(input_ids=b, labels=b).loss
        loss.backward()
        return loss.detach(), lora_grads(model)

    want_loss, want = grads(slothai.patch(qlora.build("tiny", "llama", device="cuda")))
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama", device="cuda")), **kwargs)
    got_loss, got = grads(model)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)
