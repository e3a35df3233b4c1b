"""TRL's trainers on tiny 4-bit QLoRA models (CPU), built as users build them
(from_pretrained with a BitsAndBytesConfig, get_peft_model with task_type="CAUSAL_LM"):
the same losses and logged metrics with `slothai.patch` + `slothai.compile` as without.

TRL's fused LM head has no CPU kernel (it is Triton); `slothai.patch` supplies one
(slothai.trl.ChunkedLogProbs, checked against full logits below). The unpatched run
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
import slothai.trl
from slothai import qlora

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _trl_has_its_own_kernel():
    """TRL's Triton kernel, where Triton is installed (PyTorch's CUDA wheels): it takes
    CUDA tensors only, so these CPU trainers fail inside TRL there, patched or not."""
    kernel = getattr(importlib.import_module("trl.trainer.utils"), "_ChunkedLogProbFunction", None)
    return kernel is not None and kernel is not slothai.trl.ChunkedLogProbs


pytestmark = pytest.mark.skipif(_trl_has_its_own_kernel(), reason="CPU trainers; TRL's own kernel here is "
                                "Triton (CUDA tensors only): benchmarks/bench_trl.py runs TRL on the GPU")


@pytest.fixture(scope="module", autouse=True)
def _trl_kernel():
    assert slothai.trl.supply_trl_kernel()


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


def _train(kind, model, tmp_path, ref_model=None, steps=2, **config):
    common = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                  report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0)
    data, tok = _dataset(kind), _tokenizer()
    if kind == "sft":
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common, **config), train_dataset=data,
                                 processing_class=tok)
    elif kind == "dpo":
        trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=trl.DPOConfig(**common, **config),
                                 train_dataset=data, processing_class=tok)
    elif kind == "kto":
        trainer = trl.KTOTrainer(model=model, ref_model=ref_model, args=trl.KTOConfig(**common, **config),
                                 train_dataset=data, processing_class=tok)
    else:
        trainer = trl.GRPOTrainer(model=model, reward_funcs=_length_reward, train_dataset=data, processing_class=tok,
                                  args=trl.GRPOConfig(**common, num_generations=2, max_completion_length=4, beta=0.1,
                                                      **config))
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


def _assert_same_logs(got, want, rel_tol=2e-4):
    assert [sorted(g) for g in got] == [sorted(w) for w in want]
    for g, w in zip(got, want):
        for key in w:
            assert math.isclose(g[key], w[key], rel_tol=rel_tol, abs_tol=2e-5), (key, got, want)


def _assert_compiled_without_eager_fallback(report):
    # One compilation of the decoder layer; PEFT's adapter toggling (the reference
    # passes) re-binds each layer's active-adapter object, which costs at most one more.
    assert report.graph_breaks == [] and report.recompile_limits == [] and report.eager_fallbacks == [], report
    assert report.compilations <= 2 and report.region_calls.get("compiled", 0) > 0, report
    assert not str(report).startswith("WARNING"), report


def _patched_compiled(model):
    return slothai.compile(slothai.patch(model), backend="aot_eager")


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
    _assert_same_logs(got, want, rel_tol=2 ** -7 if config.get("bf16", True) else 2e-4)
    assert {"entropy", "mean_token_accuracy"} <= set(got[0])
    _assert_compiled_without_eager_fallback(report)


@pytest.mark.parametrize("reference", ["adapter_disabled", "separate_model"])
def test_dpo_trainer(reference, tmp_path):
    def ref():  # the same base weights, 4-bit, without LoRA
        return qlora.build("tiny", task_type=None).get_base_model() if reference == "separate_model" else None

    want, _, _ = _train("dpo", qlora.build("tiny"), tmp_path, ref_model=ref(), bf16=False)
    ref_model = ref()
    if ref_model is not None:  # patched and compiled too: it only ever runs without grad
        _patched_compiled(ref_model)
    got, report, _ = _train("dpo", _patched_compiled(qlora.build("tiny")), tmp_path, ref_model=ref_model, bf16=False)
    _assert_same_logs(got, want)
    _assert_compiled_without_eager_fallback(report)
    assert report.region_calls.get("eager (no grad or eval)", 0) > 0  # the reference passes
    assert {"rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy"} <= set(got[0])


def test_kto_trainer(tmp_path):
    want, _, _ = _train("kto", qlora.build("tiny"), tmp_path, bf16=False)
    got, report, _ = _train("kto", _patched_compiled(qlora.build("tiny")), tmp_path, bf16=False)
    _assert_same_logs(got, want)
    _assert_compiled_without_eager_fallback(report)
    assert "kl" in got[0]


def test_grpo_trainer(tmp_path):
    want, _, _ = _train("grpo", qlora.build("tiny"), tmp_path, bf16=False)
    got, report, _ = _train("grpo", _patched_compiled(qlora.build("tiny")), tmp_path, bf16=False)
    _assert_same_logs(got, want)
    _assert_compiled_without_eager_fallback(report)
    assert report.region_calls.get("eager (no grad or eval)", 0) > 0  # generate() and the old log-probs
    assert {"kl", "entropy", "reward"} <= set(got[0])


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
        assert utils._ChunkedLogProbFunction is slothai.trl.ChunkedLogProbs
        assert sum(isinstance(f, slothai.trl.SupplyOnImport) for f in sys.meta_path) == 1
        logs, _, _ = test_trl._train("sft", model, {str(tmp_path)!r}, steps=1, bf16=False)
        slothai.unpatch(model)  # the kernel stays where TRL had none, and the finder
        assert utils._ChunkedLogProbFunction is slothai.trl.ChunkedLogProbs
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
    monkeypatch.setattr(slothai.trl, "_rows_per_chunk", lambda n, v: 5)
    n, h, v = 23, 16, 37
    x = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    b = torch.randn(v, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,))
    t[3] = 0
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    lp, ent, lsq, mean, top1 = slothai.trl.ChunkedLogProbs.apply(x, w, b, t, temperature, 32768, softcap, scale,
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
        got_out = slothai.trl.ChunkedLogProbs.apply(x, w, b, t, temperature, 32768, softcap, scale, outputs)[which]
        (gx,) = torch.autograd.grad((got_out * g1).sum(), [x])
        (wx,) = torch.autograd.grad((want_out * g1).sum(), [xd], retain_graph=True)
        torch.testing.assert_close(gx.double(), wx, rtol=1e-4, atol=1e-5)
    # Only log-probs asked (TRL's reference passes): the others are None.
    out = slothai.trl.ChunkedLogProbs.apply(x.detach(), w.detach(), None, t, 1.0, 32768, None, 1.0, ("log_probs",))
    assert out[0].shape == (n,) and all(o is None for o in out[1:])
