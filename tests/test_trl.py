"""TRL's trainers on tiny 4-bit QLoRA models (CPU), built as users build them
(from_pretrained with a BitsAndBytesConfig, get_peft_model with task_type="CAUSAL_LM"):
the same losses and logged metrics with `slothai.patch` + `slothai.compile` as without.

TRL's fused LM head has no CPU kernel (it is Triton); `slothai.patch` supplies one
(slothai.patching.trl.ChunkedLogProbs, checked against full logits below). The unpatched run
gets the same one (fixture), so the two runs differ by patch + compile only.
"""
import importlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import slothai
import slothai.patching.trl
from slothai import qlora

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _trl_has_its_own_kernel():
    """TRL's Triton kernel, where Triton is installed (PyTorch's CUDA wheels): it takes
    CUDA tensors only, so these CPU trainers fail inside TRL there, patched or not."""
    kernel = getattr(importlib.import_module("trl.trainer.utils"), "_ChunkedLogProbFunction", None)
    return kernel is not None and kernel is not slothai.patching.trl.ChunkedLogProbs


pytestmark = pytest.mark.skipif(_trl_has_its_own_kernel(), reason="CPU trainers; TRL's own kernel here is "
                                "Triton (CUDA tensors only): benchmarks/bench_trl.py runs TRL on the GPU")


@pytest.fixture(scope="module", autouse=True)
def _trl_kernel():
    assert slothai.patching.trl.supply_trl_kernel()


@pytest.fixture(autouse=True)
def _own_compilations(request):
    """Each test counts its own compilations: Dynamo forgets the layer code earlier
    tests compiled (every model here shares the decoder layer's code, and a guard that
    fails on another test's entry reads as a recompile). The inductor tests after the
    first share its compilation (about a minute on two cores)."""
    name, previous = request.node.name, _previous_test[0]
    _previous_test[0] = name
    if not (name.startswith("test_trainer_on_inductor") and previous.startswith("test_trainer_on_inductor")):
        torch._dynamo.reset()


_previous_test = [""]


def _tokenizer():
    """A word-level tokenizer over the tiny models' 256 ids: "w0".."w252" and 3 specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(253)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def _texts(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 250, (int(k),), generator=g)) for k in lengths]


def _dataset(kind, n=8):
    if kind == "sft":
        return datasets.Dataset.from_dict({"text": _texts(n, 5, 20, 0)})
    if kind == "dpo":
        return datasets.Dataset.from_dict({"prompt": _texts(n, 3, 8, 1), "chosen": _texts(n, 2, 6, 2),
                                           "rejected": _texts(n, 2, 6, 3)})
    if kind == "kto":
        return datasets.Dataset.from_dict({"prompt": _texts(n, 3, 8, 4), "completion": _texts(n, 2, 6, 5),
                                           "label": [i % 2 == 0 for i in range(n)]})
    return datasets.Dataset.from_dict({"prompt": _texts(n, 3, 8, 6)})


def _length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _train(kind, model, tmp_path, ref_model=None, steps=2, data=None, peft_config=None, after_init=None, **config):
    """Train `steps` steps of TRL's `kind` trainer (on `data`, or 8 random examples);
    `after_init(trainer)` runs once the trainer is built (to patch and compile the model
    TRL wrapped)."""
    common = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                  report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0)
    data, tok = data or _dataset(kind), _tokenizer()
    if kind == "sft":
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common, **config), train_dataset=data,
                                 processing_class=tok)
    elif kind == "dpo":
        trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=trl.DPOConfig(**common, **config),
                                 train_dataset=data, processing_class=tok, peft_config=peft_config)
    elif kind == "kto":
        trainer = trl.KTOTrainer(model=model, ref_model=ref_model, args=trl.KTOConfig(**common, **config),
                                 train_dataset=data, processing_class=tok)
    else:
        trainer = trl.GRPOTrainer(model=model, reward_funcs=_length_reward, train_dataset=data, processing_class=tok,
                                  args=trl.GRPOConfig(**common, num_generations=2, max_completion_length=4, beta=0.1,
                                                      **config))
    if after_init is not None:
        after_init(trainer)
    torch.manual_seed(0)  # GRPO samples its completions
    with slothai.compile_report() as report:
        trainer.train()
    logs = _logged(trainer)
    assert len(logs) == steps
    return logs, report, trainer


def _logged(trainer):
    """Every number logged at each step, but timings."""
    return [{k: v for k, v in log.items() if isinstance(v, (int, float)) and "time" not in k}
            for log in trainer.state.log_history if "loss" in log]


# TRL casts the LoRA weights of a quantized model to bf16 (bf16=False or not). Patched
# LoRA layers add B's term to the base output unrounded (in fp32 without autocast, in one
# bf16 rounding with it) where PEFT rounds it to bf16 first: the logs agree to these
# tolerances (relative, absolute; others: `default`), 3-10x the largest differences
# measured over 2 steps (the report lists them). Differences of two log-probs (DPO's
# rewards, the KL terms, mean logits) are held in absolute terms; grad_norm is logged
# from bf16 gradients (one bf16 step: 2^-7).
BF16_ADAPTER_TOLERANCES = {"grad_norm": (2 ** -7, 0.0), "rewards/": (0.0, 2e-4), "logits/": (0.0, 1e-4),
                           "kl": (0.0, 1e-6)}


def _assert_same_logs(got, want, tolerances=BF16_ADAPTER_TOLERANCES, default=(2e-4, 1e-5)):
    assert [sorted(g) for g in got] == [sorted(w) for w in want]
    for g, w in zip(got, want):
        for key in w:
            rel, abs_ = next((tol for prefix, tol in tolerances.items() if key.startswith(prefix)), default)
            assert math.isclose(g[key], w[key], rel_tol=rel, abs_tol=abs_), (key, got, want)


def _assert_compiled_without_eager_fallback(report, shared=False):
    # One compilation of the decoder layer, reference passes and adapter switches included;
    # with `shared`, none where the test before compiled it (see _own_compilations).
    assert report.graph_breaks == [] and report.recompile_limits == [] and report.eager_fallbacks == [], report
    assert report.recompiles == [] and (report.compilations <= 1 if shared else report.compilations == 1), report
    assert report.region_calls.get("compiled", 0) > 0, report
    assert not str(report).startswith("WARNING"), report


def _patched_compiled(model, backend="aot_eager"):
    return slothai.compile(slothai.patch(model), backend=backend)


@pytest.mark.parametrize("config", [
    dict(gradient_accumulation_steps=2),  # bf16 autocast on (SFTConfig's default)
    dict(packing=True, bf16=False),       # best-fit packing: padding-free rows with position_ids
    dict(padding_free=True, max_length=None, bf16=False),
], ids=["grad_accum_bf16_autocast", "packing", "padding_free"])
def test_sft_trainer(config, tmp_path):
    want, _, _ = _train("sft", qlora.build("tiny"), tmp_path, **config)
    got, report, trainer = _train("sft", _patched_compiled(qlora.build("tiny")), tmp_path, **config)
    # Under bf16 autocast a patched LoRA layer rounds base + LoRA once where PEFT rounds
    # them apart: logs agree to bf16's rounding (grad_norm was one bf16 step apart), not closer.
    _assert_same_logs(got, want, default=(2 ** -7, 1e-5) if config.get("bf16", True) else (2e-4, 1e-5))
    assert {"entropy", "mean_token_accuracy"} <= set(got[0])
    _assert_compiled_without_eager_fallback(report)


@pytest.mark.parametrize("reference", ["ref_adapter", "separate_model"])
def test_dpo_trainer(reference, tmp_path):
    # ref_adapter: a PEFT model and ref_model=None. TRL 1.15 (with PEFT >= 0.20) copies the
    # adapter into one named "ref" and switches to it and back for every reference pass
    # (PEFT's set_adapter): once a second compilation, now one.
    def ref():  # the same base weights, 4-bit, without LoRA
        return qlora.build("tiny", task_type=None).get_base_model() if reference == "separate_model" else None

    want, _, _ = _train("dpo", qlora.build("tiny"), tmp_path, ref_model=ref(), bf16=False)
    ref_model = ref()
    if ref_model is not None:  # patched and compiled too: it only ever runs without grad
        _patched_compiled(ref_model)
    got, report, trainer = _train("dpo", _patched_compiled(qlora.build("tiny")), tmp_path, ref_model=ref_model,
                                  bf16=False)
    assert ("ref" in trainer.model.peft_config) == (reference == "ref_adapter")
    _assert_same_logs(got, want)
    _assert_compiled_without_eager_fallback(report)
    assert report.region_calls.get("eager (no grad or eval)", 0) > 0  # the reference passes
    assert {"rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy"} <= set(got[0])


def test_dpo_trainer_reference_with_adapter_disabled(tmp_path):
    # A plain 4-bit model and a peft_config: TRL makes the PEFT model (LoRA weights cast to
    # bf16, as on every quantized model) and computes the reference with the adapter
    # disabled (PEFT's disable_adapter). slothai patches and compiles the model TRL made.
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=qlora.PROJECTIONS, task_type="CAUSAL_LM")

    def patch_compile(trainer):
        _patched_compiled(trainer.model)

    want, _, _ = _train("dpo", qlora.build("tiny").unload(), tmp_path, peft_config=lora(), bf16=False)
    got, report, trainer = _train("dpo", qlora.build("tiny").unload(), tmp_path, peft_config=lora(), bf16=False,
                                  after_init=patch_compile)
    assert list(trainer.model.peft_config) == ["default"]
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}
    _assert_same_logs(got, want)
    _assert_compiled_without_eager_fallback(report)
    assert report.region_calls.get("eager (no grad or eval)", 0) > 0  # the reference passes


def test_kto_trainer(tmp_path):
    want, _, _ = _train("kto", qlora.build("tiny"), tmp_path, bf16=False)
    got, report, trainer = _train("kto", _patched_compiled(qlora.build("tiny")), tmp_path, bf16=False)
    assert "ref" in trainer.model.peft_config  # TRL's "ref" adapter path, as DPO's
    # KTO's KL is a batch mean of summed log-prob differences over whole completions (0.014
    # here): 1.5e-4 apart measured.
    _assert_same_logs(got, want, tolerances={**BF16_ADAPTER_TOLERANCES, "kl": (0.0, 1e-3)})
    _assert_compiled_without_eager_fallback(report)
    assert "kl" in got[0]


def _slothai_generations():
    """generate() calls slothai's decode served (slothai.generation.CALLS)."""
    return sum(n for how, n in slothai.generation.CALLS.items() if how.startswith("slothai"))


def test_grpo_trainer(tmp_path):
    # TRL's GRPO without vLLM samples through the PEFT model's generate(), which a
    # patched model serves with slothai's decode (same seed, same draws on the CPU).
    want, _, _ = _train("grpo", qlora.build("tiny"), tmp_path, bf16=False)
    before = _slothai_generations()
    got, report, _ = _train("grpo", _patched_compiled(qlora.build("tiny")), tmp_path, bf16=False)
    assert _slothai_generations() == before + 2  # one generate() a step
    _assert_same_logs(got, want)
    _assert_compiled_without_eager_fallback(report)
    assert report.region_calls.get("eager (no grad or eval)", 0) > 0  # the old and reference log-probs
    assert {"kl", "entropy", "reward"} <= set(got[0])


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_trainer_on_inductor_with_trl_defaults(kind, tmp_path):
    # What users get: `compile`'s default backend (inductor; C++ kernels on the CPU) and
    # TRL's defaults (bf16 autocast, bf16 LoRA weights, gradient checkpointing); inductor
    # also fuses and reorders fp32 reductions. One inductor compilation for the three
    # (about a minute on two cores): DPO and GRPO run the layer compiled under SFT. DPO
    # takes TRL's "ref" adapter path.
    want, _, _ = _train(kind, qlora.build("tiny"), tmp_path)
    before = _slothai_generations()
    got, report, trainer = _train(kind, slothai.compile(slothai.patch(qlora.build("tiny"))), tmp_path)
    assert _slothai_generations() == before + (2 if kind == "grpo" else 0)
    assert trainer.args.bf16 is True  # TRL's default: bf16 autocast, on the CPU too
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}
    _assert_same_logs(got, want)
    _assert_compiled_without_eager_fallback(report, shared=kind != "sft")


def test_bf16_adapters_over_fp32_compute_take_the_fused_path(monkeypatch):
    # TRL casts LoRA weights to bf16 on a quantized model even with bf16=False, where the
    # compute dtype stays fp32 and nothing autocasts. PEFT then runs A on x cast to bf16,
    # B in bf16, and adds B's bf16-rounded term to the fp32 base output. The patched layer
    # runs A as PEFT does and accumulates B's term with the base GEMM in fp32 (bf16
    # converts to fp32 exactly): no closer to PEFT than bf16's rounding of the LoRA
    # term, at least as close to the float64 sum, and never PEFT's forward (it used to
    # fall back to it for any adapter dtype but the compute dtype's).
    import bitsandbytes.functional as bnbF

    def build():
        model = qlora.build("tiny")
        torch.manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:  # B nonzero, then TRL's cast
                p.data = (torch.randn_like(p) * 0.05).to(torch.bfloat16)
        return model

    want_model, got_model = build(), slothai.patch(build())
    peft_layer = want_model.base_model.model.model.layers[0].self_attn.q_proj
    layer = got_model.base_model.model.model.layers[0].self_attn.q_proj
    peft_forward, fell_back = type(layer)._slothai_base.forward, []
    monkeypatch.setattr(type(layer)._slothai_base, "forward",
                        lambda self, *a, **k: (self is layer and fell_back.append(1), peft_forward(self, *a, **k))[1])
    x = torch.randn(3, 7, layer.in_features)
    x_want, x_got = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = peft_layer(x_want), layer(x_got)
    assert not fell_back and got.dtype == want.dtype == torch.float32

    w64 = bnbF.dequantize_4bit(peft_layer.base_layer.weight.data, peft_layer.base_layer.weight.quant_state).double()
    a64, b64 = (peft_layer.lora_A["default"].weight.double(), peft_layer.lora_B["default"].weight.double())
    term64 = peft_layer.scaling["default"] * (x.to(torch.bfloat16).double() @ a64.T) @ b64.T
    exact = x.double() @ w64.T + term64
    bf16_step = 2 ** -8 * term64.abs().max()
    assert (got.double() - want.double()).abs().max() <= bf16_step
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max()
    grad = torch.randn_like(want)
    (want * grad).sum().backward()
    (got * grad).sum().backward()
    for name in ("lora_A", "lora_B"):
        g_want, g_got = (getattr(m, name)["default"].weight.grad for m in (peft_layer, layer))
        assert g_got.dtype == torch.bfloat16
        torch.testing.assert_close(g_got.float(), g_want.float(), rtol=0, atol=2 ** -7 * g_want.abs().max().item())
    torch.testing.assert_close(x_got.grad, x_want.grad, rtol=0, atol=2 ** -7 * x_want.grad.abs().max().item())


@pytest.mark.parametrize("rows, compilations", [
    # batches of 4 rows: one padded (its mask a tensor), one not (mask None). Once the
    # model has seen a mask, None becomes the causal mask (one graph); before, None stays
    # None (SDPA's causal kernel, for runs without padding), so a first batch without
    # padding compiles that variant and the first padded one a second.
    pytest.param([7, 7, 7, 12] + [7] * 4, 1, id="padded_first"),
    pytest.param([7] * 7 + [12], 2, id="unpadded_first"),
    # a padded batch of 4, then one row (mask None, and a batch dimension of 1)
    pytest.param([7, 9, 12, 15, 10], 1, id="last_batch_of_one", marks=pytest.mark.xfail(
        strict=True, raises=AssertionError, reason="a batch of one row compiles again: Dynamo specializes a "
        "size-1 dimension ('_dynamo_weak_dynamic_indices not a subset: runtime {0, 1} is not a subset of "
        "compiled {1}')")),
])
def test_sft_padded_and_unpadded_batches_compile_once_mask_seen(rows, compilations, tmp_path):
    # transformers passes attention_mask=None for a batch without padding, a tensor
    # otherwise. backend "eager": Dynamo alone (cheap).
    data = datasets.Dataset.from_dict({"text": [" ".join(f"w{i}" for i in range(n)) for n in rows]})
    model = slothai.compile(slothai.patch(qlora.build("tiny")), backend="eager")
    _, report, _ = _train("sft", model, tmp_path, data=data, bf16=False, train_sampling_strategy="sequential")
    assert report.region_calls.get("compiled", 0) > 0 and report.compilations == compilations, report
    assert len(report.recompiles) == compilations - 1, report
    assert all("attention_mask" in r["reason"] for r in report.recompiles), report


def test_patch_after_trainer_is_built_then_unpatch_keeps_trls_head(tmp_path):
    # Patching trainer.model after TRL put its fused head on the model: TRL's head keeps
    # serving its own calls; unpatch removes slothai's classes and leaves TRL's head.
    want, _, _ = _train("sft", qlora.build("tiny"), tmp_path, bf16=False)
    model = qlora.build("tiny")
    trainer = trl.SFTTrainer(model=model, processing_class=_tokenizer(), train_dataset=_dataset("sft"),
                             args=trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                                learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1,
                                                save_strategy="no", seed=0, bf16=False))
    head = model.get_base_model()
    trl_forward = head.__dict__["forward"]
    slothai.patch(trainer.model)
    assert slothai.is_patched(head) and head.__dict__["forward"] is trl_forward
    torch.manual_seed(0)
    trainer.train()
    _assert_same_logs(_logged(trainer), want)
    slothai.unpatch(trainer.model)
    assert not any(slothai.is_patched(m) for m in model.modules())
    assert head.__dict__["forward"] is trl_forward
    ids = torch.randint(0, 256, (2, 9))
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert out.log_probs.shape == (2, 8)


def test_trl_head_over_patched_model_then_unpatch(tmp_path):
    # Patch first (the README's order), then the trainer adds its head on top of the
    # patched model: its non-fused labelled calls reach slothai's loss; unpatch leaves
    # TRL's head, and the forward TRL kept now runs the model's own.
    from trl.trainer.utils import add_fused_lm_head

    model = slothai.patch(qlora.build("tiny"))
    ref = qlora.build("tiny")
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    add_fused_lm_head(ref.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 256, (2, 9))
    got, want = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert got.logits is None and want.logits is not None  # slothai's loss under TRL's head
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    fused, fused_ref = model(input_ids=ids, labels=ids, fused_lm_head=True), ref(input_ids=ids, labels=ids,
                                                                                   fused_lm_head=True)
    for field in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(fused, field), getattr(fused_ref, field))
    slothai.unpatch(model)
    assert "forward" in model.get_base_model().__dict__  # TRL's head stays
    again = model(input_ids=ids, labels=ids)
    assert again.logits is not None
    torch.testing.assert_close(again.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_patch_before_trl_is_imported(tmp_path):
    # A fresh interpreter that builds and patches the model before importing trl (TRL
    # sets its kernel to None when trl.trainer.utils runs): the first step used to fail
    # in TRL's _fused_forward ('NoneType' object has no attribute 'apply').
    script = textwrap.dedent(f"""
        import sys
        import slothai
        from slothai import qlora
        model = slothai.patch(slothai.patch(qlora.build("tiny")))  # twice: one finder
        assert "trl.trainer.utils" not in sys.modules
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_trl  # imports trl
        from trl.trainer import utils
        assert utils._ChunkedLogProbFunction is slothai.patching.trl.ChunkedLogProbs
        assert sum(isinstance(f, slothai.patching.trl.SupplyOnImport) for f in sys.meta_path) == 1
        logs, _, _ = test_trl._train("sft", model, {str(tmp_path)!r}, steps=1, bf16=False)
        slothai.unpatch(model)  # the kernel stays where TRL had none, and the finder
        assert utils._ChunkedLogProbFunction is slothai.patching.trl.ChunkedLogProbs
        print("LOSS", logs[0]["loss"])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    loss = float(run.stdout.split("LOSS")[-1])
    assert math.isfinite(loss) and 0 < loss < 10, run.stdout


@pytest.mark.parametrize("temperature, softcap, scale, bias", [(1.0, None, 1.0, False), (0.7, 5.0, 0.5, True)])
def test_chunked_log_probs_match_full_logits(temperature, softcap, scale, bias, monkeypatch):
    # Against the full logits in float64: every field TRL reads, and the gradients of
    # log-probs and entropy, with chunks of 5 tokens over 23.
    monkeypatch.setattr(slothai.patching.trl, "_rows_per_chunk", lambda n, v: 5)
    n, h, v = 23, 16, 37
    x = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    b = torch.randn(v, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,))
    t[3] = 0
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    lp, ent, lsq, mean, top1 = slothai.patching.trl.ChunkedLogProbs.apply(x, w, b, t, temperature, 32768, softcap, scale,
                                                                 outputs)
    g1, g2 = torch.randn(n), torch.randn(n)
    grads = torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), [x, w] + ([b] if bias else []))

    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if bias else None
    z = xd @ wd.t() + (bd if bias else 0)
    z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = z.log_softmax(-1)
    want_lp = logp.gather(-1, t[:, None]).squeeze(-1)
    want_ent = -(logp.exp() * logp).sum(-1)
    want_grads = torch.autograd.grad((want_lp * g1).sum() + (want_ent * g2).sum(), [xd, wd] + ([bd] if bias else []),
                                     retain_graph=True)
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lsq.double(), torch.logsumexp(2 * logp, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), z.mean(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(top1, z.argmax(-1) == t)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # A gradient through the log-probs alone (DPO's loss), then through the entropy alone.
    for which, want_out in enumerate((want_lp, want_ent)):
        got_out = slothai.patching.trl.ChunkedLogProbs.apply(x, w, b, t, temperature, 32768, softcap, scale, outputs)[which]
        (gx,) = torch.autograd.grad((got_out * g1).sum(), [x])
        (wx,) = torch.autograd.grad((want_out * g1).sum(), [xd], retain_graph=True)
        torch.testing.assert_close(gx.double(), wx, rtol=1e-4, atol=1e-5)
    # Only log-probs asked (TRL's reference passes): the others are None.
    out = slothai.patching.trl.ChunkedLogProbs.apply(x.detach(), w.detach(), None, t, 1.0, 32768, None, 1.0, ("log_probs",))
    assert out[0].shape == (n,) and all(o is None for o in out[1:])


def _greedy_texts(model, n, length, seed):
    """Texts the tiny model itself continues greedily: a model at initialization (LoRA's B
    is 0) predicts most of their next tokens, so the token accuracy logged is far from 0."""
    ids = torch.randint(3, 256, (n, 2), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for _ in range(length):  # all n texts a token at a time
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt.clamp_min(3)[:, None]], 1)  # ids 0-2: the specials
    return [" ".join(f"w{int(i) - 3}" for i in row) for row in ids]


def _sft_asking_the_head(ask_head):
    """TRL's SFTTrainer computing its loss and `mean_token_accuracy` as it did before TRL's
    own fused LM head (TRL 0.2x): with a fused head that gives the accuracy (there: Liger's,
    use_liger_kernel=True), it passes return_token_accuracy=True and logs
    `outputs.token_accuracy`; else it measures it on `outputs.logits`."""

    class SFTAskingTheHead(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            kwargs = dict(use_cache=False)
            if ask_head:
                kwargs["return_token_accuracy"] = True
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            outputs = model(**inputs, **kwargs)
            if ask_head:
                accuracy = outputs.token_accuracy
            else:
                labels = inputs["labels"][..., 1:]
                mask = labels != -100
                accuracy = ((outputs.logits[..., :-1, :].argmax(-1) == labels) & mask).sum() / mask.sum()
            self._metrics[mode]["mean_token_accuracy"].append(accuracy.item())
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return SFTAskingTheHead


def test_sft_logs_token_accuracy_from_the_patched_head_without_logits(tmp_path):
    # The patched head (no keep_logits) answers return_token_accuracy=True from its fused
    # loss: the trainer logs the same mean_token_accuracy (far from 0 here) and loss as
    # the unpatched model's full logits give, and no logits are built (lm_head never runs).
    data = datasets.Dataset.from_dict({"text": _greedy_texts(qlora.build("tiny"), 8, 12, seed=7)})
    runs = {}
    for patched in (False, True):
        model = qlora.build("tiny")
        if patched:
            slothai.patch(model)
        head = model.get_base_model().lm_head
        calls = []
        hook = head.register_forward_hook(lambda *a: calls.append(1))
        common = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
                      report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0, bf16=False,
                      gradient_accumulation_steps=2)
        trainer = _sft_asking_the_head(patched)(model=model, args=trl.SFTConfig(**common), train_dataset=data,
                                                processing_class=_tokenizer())
        torch.manual_seed(0)
        trainer.train()
        hook.remove()
        runs[patched] = _logged(trainer), len(calls)
        assert len(runs[patched][0]) == 1
    (want, want_calls), (got, got_calls) = runs[False], runs[True]
    assert want_calls > 0 and got_calls == 0
    assert want[0]["mean_token_accuracy"] > 0.5
    _assert_same_logs(got, want)
