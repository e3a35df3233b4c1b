"""slothai.patch / slothai.compile / compile_report on tiny 4-bit QLoRA models (CPU).

Each family's tiny config is built with random weights, saved, and loaded back through
from_pretrained with a bitsandbytes NF4 config; PEFT LoRA on all 7 projections; AdamW.
"""
import copy
import json

import pytest
import torch

import slothai
from training_checks import assert_losses_close, draw_lora_b
from slothai import qlora

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

SEQS = [64, 20, 64]  # 3 steps at two sequence lengths, one equal to the hidden size (duck shaping)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every transformers decoder layer runs through one shared code object
    # (GradientCheckpointingLayer); keep one family's cache entries from the next's.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mask_kinds(model):
    """Hooks recording, per decoder layer, whether each call got an attention mask."""
    kinds = {}
    for i, layer in enumerate(model.base_model.model.model.layers):
        layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: kinds.setdefault(i, set()).add(kw.get("attention_mask") is None), with_kwargs=True)
    return kinds


@pytest.mark.parametrize("family", qlora.FAMILIES)
def test_patched_compiled_matches_eager_without_graph_breaks(family):
    batches = list(qlora.batches(256, 2, SEQS, len(SEQS), "cpu"))
    eager = qlora.build("tiny", family)
    kinds = _mask_kinds(eager)
    want = qlora.train(eager, batches)
    model = slothai.compile(slothai.patch(qlora.build("tiny", family)), backend="aot_eager")
    with slothai.compile_report() as report:
        got = qlora.train(model, batches)
    assert_losses_close(got, want, 1e-3)
    assert report.graph_breaks == []
    # One graph for every decoder layer; a new sequence length recompiles nothing, nor
    # does a sliding-window layer that gets no mask within its window and one beyond it
    # (Gemma-2 under transformers <= 5.17's SDPA masks): the layers get one form of mask.
    assert report.compilations == 1 and report.recompiles == [], (kinds, report)


def test_patch_routes_through_slothai_and_unpatch_restores():
    model = qlora.build("tiny", "llama")
    ref = qlora.build("tiny", "llama")
    ids = torch.randint(0, 256, (2, 10))
    slothai.patch(model)
    patched = [(type(m).__name__, type(m)._slothai_kind) for m in model.modules() if slothai.is_patched(m)]
    # 2 layers x 7 NF4 layers, their 14 PEFT LoRA wrappers, and the head
    assert patched.count(("Linear4bit", "linear4bit")) == patched.count(("Linear4bit", "lora_linear4bit")) == 2 * 7
    assert patched.count(("LlamaForCausalLM", "causal_lm")) == 1 and len(patched) == 2 * 7 * 2 + 1
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None  # the fused loss never builds them
    want = ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    slothai.unpatch(model)
    assert not any(slothai.is_patched(m) for m in model.modules())
    again = model(input_ids=ids, labels=ids)
    assert torch.equal(again.logits, want.logits) and torch.equal(again.loss, want.loss)


def test_patched_forward_without_labels_keeps_logits():
    model = slothai.patch(qlora.build("tiny", "qwen2"))
    ids = torch.randint(0, 256, (1, 7))
    out = model(input_ids=ids)
    assert out.logits.shape == (1, 7, 256)


def test_num_items_in_batch_and_lora_disable():
    model = slothai.patch(qlora.build("tiny", "mistral"))
    ref = qlora.build("tiny", "mistral")
    ids = torch.randint(0, 256, (2, 9))
    n = torch.tensor(11)
    got = model(input_ids=ids, labels=ids, num_items_in_batch=n).loss
    want = ref(input_ids=ids, labels=ids, num_items_in_batch=n).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with model.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss,
                                   rtol=1e-5, atol=1e-6)


def test_gemma2_softcap_is_applied():
    model = slothai.patch(qlora.build("tiny", "gemma2"))
    ref = qlora.build("tiny", "gemma2")
    assert ref.config.final_logit_softcapping
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_patch_and_compile(reentrant):
    batches = list(qlora.batches(256, 2, [32, 20, 32], 3, "cpu"))
    want = qlora.train(qlora.build("tiny"), batches)
    model = qlora.build("tiny")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    slothai.compile(slothai.patch(model), backend="aot_eager")
    with slothai.compile_report() as report:
        got = qlora.train(model, batches)
    assert_losses_close(got, want, 1e-3)
    assert report.graph_breaks == [] and report.compilations == 1 and report.recompiles == [], report


def test_static_regional_compile_recompiles_once_per_new_size():
    # dynamic=False: torch's default, static first, then one dynamic recompile. The
    # contrast with dynamic=True (one compilation in the tests above) is what the marking buys.
    # Compiling again replaces the first compile rather than nesting inside it.
    model = slothai.compile(slothai.patch(qlora.build("tiny")), backend="aot_eager")
    model = slothai.compile(model, backend="aot_eager", dynamic=False)
    with slothai.compile_report() as report:
        qlora.train(model, list(qlora.batches(256, 2, [16, 24, 40], 3, "cpu")))
    assert report.graph_breaks == [] and report.compilations == 2 and len(report.recompiles) == 1, report


def test_compile_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be"):
        slothai.compile(torch.nn.Linear(2, 2), mode="fast")


def test_report_cli_json(tmp_path, capsys):
    from slothai.__main__ import main

    out = tmp_path / "r.json"
    main(["report", "--model", "tiny", "--steps", "3", "--seq", "12", "20", "--backend", "aot_eager",
          "--baseline", "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"baseline (unpatched, eager)", "slothai"}
    run = data["runs"]["slothai"]
    assert set(run["compile"]) == {"graph_breaks", "recompiles", "recompile_limits", "eager_fallbacks", "region_calls",
                                   "compilations", "compile_seconds", "wall_seconds"}
    assert run["compile"]["recompile_limits"] == [] and run["compile"]["eager_fallbacks"] == []
    assert run["compile"]["graph_breaks"] == [] and run["compile"]["compilations"] == 1
    assert len(run["losses"]) == 3 and run["tokens_per_second"] > 0 and run["peak_memory_gb"] > 0
    printed = capsys.readouterr().out
    assert "torch.compile report" in printed and "max relative loss difference" in printed


def test_report_cli_warm_up(tmp_path, capsys):
    # --warm-up: the compile happens in warm_up, inside the report; the steps compile nothing more.
    from slothai.__main__ import main

    out = tmp_path / "r.json"
    main(["report", "--model", "tiny", "--steps", "3", "--seq", "12", "20", "--backend", "aot_eager", "--warm-up",
          "--json", str(out)])
    run = json.loads(out.read_text())["runs"]["slothai"]
    assert list(run["warm_up_seconds"]) == ["20", "12"] and run["compile"]["compilations"] == 1
    assert "warm_up: 20 tokens" in capsys.readouterr().out


def test_compile_report_names_graph_breaks_and_recompiles():
    def f(x):
        y = torch.sin(x).sum()
        return y.item() + 1  # a graph break

    g = torch.compile(f, backend="eager")
    with slothai.compile_report() as report:
        g(torch.randn(3))
        g(torch.randn(3, 2))  # a new rank: a recompile
    assert report.compilations >= 2
    (brk,) = report.graph_breaks
    assert "item()" in brk["reason"] and brk["count"] >= 1 and "test_qlora.py" in brk["where"]
    assert report.recompiles and "rank mismatch" in report.recompiles[0]["reason"]
    assert "graph break" in str(report) and report.to_dict()["compilations"] == report.compilations


def test_hf_trainer_with_patch_and_compile(tmp_path):
    # transformers' Trainer passes num_items_in_batch; the patched loss honours it.
    from transformers import Trainer, TrainingArguments

    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager")
    data = [{"input_ids": ids[0], "labels": ids[0]} for ids in qlora.batches(256, 1, [24], 8, "cpu")]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                             gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True,
                             logging_steps=1, save_strategy="no")
    with slothai.compile_report() as report:
        result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3 and result.training_loss > 0
    assert report.graph_breaks == [] and report.compilations == 1


def test_a_model_prepared_for_kbit_training_trains_like_eager():
    # The QLoRA tutorials' path: prepare_model_for_kbit_training (norms, embeddings and the
    # head to fp32 next to a bf16 compute dtype; gradient checkpointing on), then LoRA.
    ref = qlora.build("tiny", "llama", dtype=torch.bfloat16, prepare_kbit=True)
    assert ref.base_model.model.lm_head.weight.dtype == torch.float32 and ref.is_gradient_checkpointing
    draw_lora_b(ref)
    model = slothai.compile(slothai.patch(copy.deepcopy(ref)), backend="aot_eager")
    batches = list(qlora.batches(256, 2, SEQS, len(SEQS), "cpu"))
    with slothai.compile_report() as report:
        got = qlora.train(model, batches)
    assert_losses_close(got, qlora.train(ref, batches), 1e-3)
    assert report.graph_breaks == [] and report.compilations == 1, report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_hf_trainer_gradient_accumulation_with_cuda_graphs_logs_eager_losses(tmp_path):
    # compile's default on a GPU replays each layer as a CUDA graph; under Trainer's
    # gradient accumulation the first micro-batch's gradients must survive the second's
    # graphs (they crashed it before regions._OwnGrad).
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": ids[0], "labels": ids[0]} for ids in qlora.batches(256, 1, [24], 12, "cpu")]

    def logged_losses(model):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                                 gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], logging_steps=1,
                                 save_strategy="no", seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    eager, model = (slothai.patch(qlora.build("tiny", "llama", device="cuda")) for _ in range(2))
    draw_lora_b(eager, model)
    want = logged_losses(eager)
    with slothai.compile_report() as report:
        got = logged_losses(slothai.compile(model))
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-3), (got, want)
    assert report.graph_breaks == [] and report.compilations == 1, report


def test_full_model_compile_without_graph_breaks():
    batches = list(qlora.batches(256, 2, SEQS, len(SEQS), "cpu"))
    want = qlora.train(qlora.build("tiny", "llama"), batches)
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), mode="full", backend="aot_eager")
    with slothai.compile_report() as report:
        got = qlora.train(model, batches)
    assert report.graph_breaks == [] and report.compilations == 1, report
    assert_losses_close(got, want, 1e-3)


def test_a_length_equal_to_head_dim_does_not_recompile():
    # head_dim is 16: the rotary tables' last dim. Marked dynamic by its size when the
    # sequence was 16 long, it made a second compilation ("_dynamo_weak_dynamic_indices
    # not a subset"); token dims are marked by position now.
    model = slothai.compile(slothai.patch(qlora.build("tiny", "llama")), backend="aot_eager")
    assert model.config.head_dim == 16
    batches = list(qlora.batches(256, 2, [20, 16, 40], 3, "cpu"))
    with slothai.compile_report() as report:
        got = qlora.train(model, batches)
    assert_losses_close(got, qlora.train(qlora.build("tiny", "llama"), batches), 1e-4)
    assert report.compilations == 1 and report.recompiles == [] and report.graph_breaks == [], report


def _rank_changes(g):
    """Calls of a compiled function at ranks 1, 2 (a recompile, inside an inner block) and 3 (another, after it)."""
    g(torch.randn(3))
    with slothai.compile_report() as inner:
        g(torch.randn(3, 2))
    g(torch.randn(3, 2, 2))
    return inner


def test_compile_report_blocks_nest():
    g = torch.compile(lambda x: torch.sin(x) + 1, backend="eager")
    with slothai.compile_report() as outer:
        inner = _rank_changes(g)
    assert inner.compilations == 1 and len(inner.recompiles) == 1, inner
    # The outer block sees all three compilations and both recompiles, the inner block's and the one after it.
    assert outer.compilations == 3 and len(outer.recompiles) == 2, outer
    assert all("rank mismatch" in r["reason"] for r in outer.recompiles), outer
    with slothai.compile_report() as after:  # and the logs are back to one block's listening
        g(torch.randn(3, 2, 2, 2))
    assert after.compilations == 1 and len(after.recompiles) == 1, after


def _guarded(x, scale):
    return x * 2 if scale is None else x * scale


def test_recompile_reason_is_the_guard_and_the_user_frame():
    # Dynamo's message carries the whole user stack under the guard (1-2 kB through a
    # transformers layer); the reason is the guard and the line it came from.
    g = torch.compile(_guarded, backend="eager")
    with slothai.compile_report() as report:
        g(torch.randn(4), None)
        g(torch.randn(4), torch.tensor(3.0))  # a tensor where None was: a recompile
    (r,) = report.recompiles
    assert r["guards"] == ["0/0: scale is None"], r
    assert r["where"].endswith(f"test_qlora.py:{_guarded.__code__.co_firstlineno + 1} in _guarded"), r
    assert r["reason"] == f"0/0: scale is None (at {r['where']})", r
    assert len(r["full"]) > len(r["reason"])  # (torch >= 2.11 adds the user stack trace; 2.10 a source line)
    assert "User stack trace" not in str(report)
    assert all(line.strip() in report.text(full=True) for line in r["full"].splitlines())


def _tiny_moe(family, path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **qlora.SHAPES["tiny"], max_position_embeddings=512, num_experts=4,
                                  num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return qlora.build(path=path)


def test_mixture_of_experts_is_refused_loudly_and_its_eager_calls_are_not_counted_compiled(tmp_path):
    # On Qwen3-MoE PEFT wraps the fused expert weights in a ParamWrapper, whose
    # parametrization Dynamo cannot trace: compile says so, naming the family, and the
    # report counts the layers' calls as eager with the reason, and warns, instead of "compiled".
    model = _tiny_moe("qwen3_moe", tmp_path)
    with pytest.warns(UserWarning, match="does not support qwen3_moe.*ParamWrapper.*parametriz"):
        slothai.compile(slothai.patch(model), backend="aot_eager")
    batches = list(qlora.batches(256, 2, [12, 20], 2, "cpu"))
    with pytest.warns(RuntimeWarning, match="ran EAGER"), slothai.compile_report() as report:
        got = qlora.train(model, batches)
    assert_losses_close(got, qlora.train(_tiny_moe("qwen3_moe", tmp_path), batches), 1e-4)
    assert "compiled" not in report.region_calls, report
    (key,) = report.region_calls
    assert key.startswith("EAGER (graph break: ") and report.region_calls[key] == 2 * 2, report
    assert str(report).startswith("WARNING: 4 call(s) of layers slothai.compile compiled ran EAGER"), report


def _moe_cpu_fallback_traceable():
    # transformers' grouped-mm fallback (the CPU's) reads the group offsets on the host
    # in its backward (offs.tolist()); from some release after 5.17 that backward is a
    # custom op with a fake, which Dynamo traces. Before it, the graph breaks there.
    import transformers.integrations.moe as moe
    return hasattr(moe, "_grouped_mm_fallback_backward_fake")


def test_mixtral_with_lora_on_attention_compiles_once(tmp_path, recwarn):
    # Mixtral's experts get no LoRA from the 7 projection names (no ParamWrapper): its
    # layers compile, one graph, no warning; the experts stay frozen and unquantized.
    # With a transformers whose CPU expert fallback Dynamo cannot trace (5.17, as on the
    # lent GPU's image), the layers run eager, and compile_report must say so.
    model = _tiny_moe("mixtral", tmp_path)
    slothai.compile(slothai.patch(model), backend="aot_eager")
    assert not [w for w in recwarn if "does not support" in str(w.message)]
    batches = list(qlora.batches(256, 2, [12, 20], 2, "cpu"))
    with slothai.compile_report() as report:
        got = qlora.train(model, batches)
    assert_losses_close(got, qlora.train(_tiny_moe("mixtral", tmp_path), batches), 1e-4)
    if _moe_cpu_fallback_traceable():
        assert report.compilations == 1 and report.region_calls == {"compiled": 4}, report
    else:
        assert "compiled" not in report.region_calls, report
        assert all(k.startswith("EAGER (") for k in report.region_calls), report
        assert str(report).startswith("WARNING: "), report


@pytest.mark.parametrize("num_items", [None, 13])
def test_patched_head_gives_token_accuracy_without_logits(num_items):
    # Liger-Kernel's head contract, which trainers that log token accuracy without the
    # logits use: return_token_accuracy / return_predicted_tokens on the forward, and
    # use_token_scaling (DFT: each token's loss times its detached probability).
    ref = qlora.build("tiny")
    model = slothai.patch(qlora.build("tiny"))
    ids = torch.randint(0, 256, (2, 9))
    logits = ref(input_ids=ids).logits.detach()
    labels = ids.clone()
    labels[:, 1:5] = logits[:, :4].argmax(-1)  # some hits
    labels[0, :3] = -100
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    counted = shift != -100
    kw = {} if num_items is None else dict(num_items_in_batch=torch.tensor(num_items))
    out = model(input_ids=ids, labels=labels, return_token_accuracy=True, return_predicted_tokens=True, **kw)
    assert out.logits is None
    pred = logits.argmax(-1).masked_fill(~counted, -1)
    assert torch.equal(out.predicted_tokens, pred)
    want_acc = ((pred == shift) & counted).sum() / counted.sum()
    assert want_acc > 0
    torch.testing.assert_close(out.token_accuracy, want_acc.float())
    want = ref(input_ids=ids, labels=labels, **kw)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    plain = model(input_ids=ids, labels=labels, **kw)
    assert "token_accuracy" not in plain.keys() and plain.token_accuracy is None
    # token scaling: the mean (or the sum over num_items) of p_t.detach() * nll_t
    scaled = model(input_ids=ids, labels=labels, use_token_scaling=True, **kw).loss
    lp = logits.float().log_softmax(-1).gather(-1, shift.clamp_min(0)[..., None])[..., 0]
    per_token = -(lp.exp() * lp) * counted
    want_scaled = per_token.sum() / (counted.sum() if num_items is None else num_items)
    torch.testing.assert_close(scaled, want_scaled, rtol=1e-5, atol=1e-6)
