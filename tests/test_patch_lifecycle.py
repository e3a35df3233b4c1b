"""What happens to a patched model around training: PEFT's CausalLM wrapper, deep
copies, pickling and torch.save, the keep_logits switch, no-grad passes and
generate() on a compiled model, and compile_report's recompile-limit warnings.
Tiny 4-bit QLoRA models built as users build them (qlora.build: from_pretrained
with a BitsAndBytesConfig, get_peft_model with task_type="CAUSAL_LM")."""
import copy
import importlib
import io
import pickle

import pytest
import torch

import slothai
from training_checks import assert_patched_matches
from slothai import qlora

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def _ids(seq=9, batch=2, seed=0):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _patched_heads(model):
    return [m for m in model.modules() if slothai.is_patched(m) and type(m).__name__.endswith("ForCausalLM")]


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_peft_wrappers_patch_the_model_that_owns_the_head(task_type):
    model = qlora.build("tiny", "llama", task_type=task_type)
    ref = qlora.build("tiny", "llama", task_type=task_type)
    assert type(model).__name__ == ("PeftModelForCausalLM" if task_type else "PeftModel")
    slothai.patch(model)
    assert _patched_heads(model) == [model.get_base_model()]  # never the PEFT wrapper
    ids = _ids()
    assert_patched_matches(model, ref, ids, ids)


def _perturb(model):
    """New LoRA B matrices and second-level NF4 scales of the first projection."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(generator=torch.Generator().manual_seed(7))
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    q.weight.quant_state.state2.absmax.mul_(1.5)
    return q


def test_deepcopy_of_patched_model_is_an_independent_patched_model():
    model = slothai.patch(qlora.build("tiny", "llama"))
    ids = _ids()
    before = model(input_ids=ids, labels=ids).loss
    twin = copy.deepcopy(model)
    assert [type(m).__name__ for m in twin.modules() if slothai.is_patched(m)] == \
        [type(m).__name__ for m in model.modules() if slothai.is_patched(m)]
    torch.testing.assert_close(twin(input_ids=ids, labels=ids).loss, before, rtol=0, atol=0)

    q = _perturb(twin)  # the copy moves; the original does not
    moved = twin(input_ids=ids, labels=ids)
    assert abs(moved.loss.item() - before.item()) > 1e-3 and moved.logits is None
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, before, rtol=0, atol=0)
    # ... and computes what bitsandbytes and transformers compute on the copy's own weights.
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), type(q)._slothai_base.forward(q, x), rtol=1e-5, atol=1e-5)
    plain = slothai.unpatch(copy.deepcopy(twin))
    torch.testing.assert_close(plain(input_ids=ids, labels=ids).loss, moved.loss, rtol=1e-5, atol=1e-6)
    assert _patched_heads(twin) and not _patched_heads(plain) and _patched_heads(model)


def test_patched_and_compiled_model_saves_pickles_and_deep_copies():
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager")
    batches = list(qlora.batches(256, 2, [16, 11], 2, "cpu"))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    pickled = pickle.loads(pickle.dumps(model))
    twin = copy.deepcopy(model)
    for other in (loaded, pickled, twin):
        assert [type(m).__name__ for m in other.modules() if slothai.is_patched(m)] == \
            [type(m).__name__ for m in model.modules() if slothai.is_patched(m)]
        layers = other.get_base_model().model.layers
        assert all(getattr(layer.forward, "layer", None) is layer for layer in layers)  # compiled, for this copy
    with slothai.compile_report() as report:
        want = [loss for loss, _, _ in qlora.train(model, batches)]
        # Each starts from the weights saved before the original trained: computing
        # with the original's (trained) weights would give other losses.
        for other in (loaded, pickled, twin):
            got = [loss for loss, _, _ in qlora.train(other, batches)]
            assert got == pytest.approx(want, rel=1e-6), (got, want)
    # At most one recompile: pickle turns bitsandbytes' Params4bit into a plain Parameter
    # (its quant_state kept), patched or not, and Dynamo guards the weight's type.
    assert report.graph_breaks == [] and report.compilations <= 2 and len(report.recompiles) <= 1, report
    assert all("Params4bit" in r["reason"] for r in report.recompiles), report


def test_keep_logits_switch():
    model = slothai.patch(qlora.build("tiny", "qwen2"), keep_logits=True)
    ref = qlora.build("tiny", "qwen2")
    ids = _ids()
    out, want = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert out.logits is not None and torch.equal(out.logits, want.logits)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=1e-6)
    # 14 NF4 layers, their 14 LoRA wrappers and the head (which runs its own forward)
    assert sum(slothai.is_patched(m) for m in model.modules()) == 2 * 7 * 2 + 1
    slothai.patch(model)  # patching again without it: the logits go
    assert model(input_ids=ids, labels=ids).logits is None


def test_no_grad_eval_and_generate_on_compiled_model_add_no_compilation():
    # DPO/KTO reference passes run without grad, GRPO generates with a KV cache: on a
    # compiled model they run the layers' own forward, so nothing is compiled for them,
    # and no layer gathers variants towards the recompile limit.
    torch._dynamo.reset()
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager")
    ids = _ids(12)
    qlora.train(model, [ids])
    with torch._dynamo.config.patch(recompile_limit=2), slothai.compile_report() as report:
        with torch.no_grad():
            model(input_ids=ids, labels=ids)
        model.eval()
        model(input_ids=ids)
        model.generate(input_ids=ids[:, :4], attention_mask=torch.ones(2, 4, dtype=torch.long), max_new_tokens=3,
                       do_sample=False, use_cache=True)
        model.train()
        qlora.train(model, [_ids(7)])
    assert report.compilations == 0 and report.recompiles == [] and report.recompile_limits == [], report
    assert report.region_calls["compiled"] == 2 and report.region_calls["eager (no grad or eval)"] >= 4, report
    assert report.eager_fallbacks == [] and not report.warnings()


class ToyDecoderLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states):
        return self.proj(hidden_states).relu()


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([ToyDecoderLayer(), ToyDecoderLayer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_compile_report_says_loudly_when_the_recompile_limit_is_hit():
    torch._dynamo.reset()
    model = slothai.compile(Toy(), backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2):
        with pytest.warns(RuntimeWarning, match="EAGER"), slothai.compile_report() as report:
            for rank in (2, 3, 4):  # a new rank is a new variant: the third passes the limit
                model(torch.randn(*(2,) * (rank - 1), 4, requires_grad=True))
        assert report.recompile_limits and report.recompile_limits[0]["limit"] == "recompile_limit (2)"
        assert report.eager_fallbacks and report.eager_fallbacks[0]["variants"] == 2
        assert str(report).startswith("WARNING: torch.compile hit recompile_limit")
        # Later blocks still name the region at its limit, though Dynamo no longer logs anything.
        with pytest.warns(RuntimeWarning, match="EAGER"), slothai.compile_report() as later:
            model(torch.randn(2, 2, 2, 4, requires_grad=True))
        assert later.recompile_limits == [] and later.eager_fallbacks, later
    torch._dynamo.reset()


def _backend_meeting_a_data_dependent_op(gm, example_inputs):
    # What aot_eager meets in transformers 5.17's CPU expert fallback (offs.tolist() in a
    # backward): an exception Dynamo answers by giving the frame up and running it eager.
    raise torch._subclasses.fake_tensor.DataDependentOutputException(torch.ops.aten._local_scalar_dense.default)


def test_layers_dynamo_gave_up_on_are_counted_eager_at_every_call():
    # Dynamo keeps nothing for the code, so later calls run eager without reaching it
    # (its counters stay still, as for a compiled call): each one must still count EAGER.
    torch._dynamo.reset()
    model = slothai.compile(Toy(), backend=_backend_meeting_a_data_dependent_op)
    with pytest.warns(RuntimeWarning, match="EAGER"), slothai.compile_report() as report:
        for _ in range(3):
            model(torch.randn(2, 4, requires_grad=True))
    assert report.region_calls == {"EAGER (Dynamo compiled nothing)": 3 * len(model.layers)}, report
    assert report.compilations == 0 and str(report).startswith("WARNING: "), report
    torch._dynamo.reset()


def test_fp32_head_grad_switch_reaches_the_loss(monkeypatch):
    patch_module = importlib.import_module("slothai.patching.causal_lm")
    seen, real = [], patch_module.fused_linear_cross_entropy
    monkeypatch.setattr(patch_module, "fused_linear_cross_entropy",
                        lambda *a, **k: seen.append(k["fp32_weight_grad"]) or real(*a, **k))
    model = slothai.patch(qlora.build("tiny", "llama"), fp32_head_grad=False)
    ids = _ids()
    model(input_ids=ids, labels=ids)
    slothai.patch(model)  # patching again with the default: fp32 again
    model(input_ids=ids, labels=ids)
    assert seen == [False, True]
    slothai.unpatch(model)
    assert not any("_slothai_fp32_head_grad" in m.__dict__ for m in model.modules())


def _nf4_weights(model):
    """(id, address of codes, address of block scales) of each 4-bit weight."""
    return [(id(m.weight), m.weight.data_ptr(), m.weight.quant_state.absmax.data_ptr()) for m in model.modules()
            if type(m._parameters.get("weight")).__name__ == "Params4bit"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: compile's defaults, CUDA graphs"))])
def test_merge_and_unmerge_on_a_patched_compiled_model_match_peft(device):
    # TRL's GRPO merges the adapter before each vLLM weight sync and unmerges it after;
    # users merge_and_unload to export. PEFT requantizes the sum through bitsandbytes'
    # Params4bit: a patched model must give what an unpatched one does, and keep its
    # Params4bits (same objects, same addresses, which compiled layers read).
    from training_checks import draw_lora_b

    ref = qlora.build("tiny", "llama", device=device)
    draw_lora_b(ref)
    model = slothai.compile(slothai.patch(copy.deepcopy(ref)), **({"backend": "aot_eager"} if device == "cpu" else {}))
    weights = _nf4_weights(model)
    assert len(weights) == 2 * 7
    batches = list(qlora.batches(256, 2, [24, 24, 24], 3, device))
    for m in (ref, model):
        m.merge_adapter()
        m.unmerge_adapter()
    assert _nf4_weights(model) == weights
    want_state, got_state = ref.state_dict(), model.state_dict()  # bitsandbytes' own entries, both
    assert got_state.keys() == want_state.keys()
    for name, tensor in want_state.items():
        torch.testing.assert_close(got_state[name], tensor, rtol=0, atol=0, msg=name)
    with slothai.compile_report() as report:
        got = qlora.train(model, batches)
    want = qlora.train(ref, batches)
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-5)
    assert report.compilations == 1, report  # the compiled layers kept their weights' types and layouts
    ids = _ids(seq=12).to(device)
    merged, merged_ref = model.merge_and_unload(), ref.merge_and_unload()
    assert _nf4_weights(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, merged_ref(input_ids=ids).logits)


def test_copy_params4bit_refuses_another_layout():
    bnb = pytest.importorskip("bitsandbytes")
    from slothai.ops.nf4_weight import copy_params4bit_

    def params4bit(rows, seed):
        w = torch.randn(rows, 128, generator=torch.Generator().manual_seed(seed))
        return bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")

    dst, same, other = params4bit(64, 0), params4bit(64, 1), params4bit(32, 2)
    before = dst.data.clone()
    assert not copy_params4bit_(dst, other) and torch.equal(dst.data, before)
    assert copy_params4bit_(dst, same) and torch.equal(dst.data, same.data)
    torch.testing.assert_close(bnb.functional.dequantize_4bit(dst.data, dst.quant_state),
                               bnb.functional.dequantize_4bit(same.data, same.quant_state), rtol=0, atol=0)
