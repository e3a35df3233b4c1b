"""Every model family `slothai.patch` claims (patch.CAUSAL_LM_FAMILIES) is tested
here: a tiny 4-bit QLoRA model of the family, patched, gives the unpatched model's
loss and LoRA gradients, with its 7 projections per layer and its head patched.
(tests/test_qlora.py adds compile and training for some of them.)"""
import pytest
import torch

import slothai
from training_checks import assert_patched_matches
from slothai import qlora
from slothai.patching.causal_lm import CAUSAL_LM_FAMILIES

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

# Families with a final-logit softcap get one, so the capped loss path is exercised.
SOFTCAP = 30.0


def _checkpoint(family, path):
    from transformers import AutoModelForCausalLM

    config = qlora.make_config("tiny", family)
    if CAUSAL_LM_FAMILIES[family]:
        setattr(config, CAUSAL_LM_FAMILIES[family], SOFTCAP)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", sorted(CAUSAL_LM_FAMILIES))
def test_patched_family_matches_unpatched(family, tmp_path):
    path = _checkpoint(family, tmp_path)
    model, ref = qlora.build(path=path), qlora.build(path=path)
    assert model.config.model_type == family
    slothai.patch(model)
    patched = [type(m)._slothai_kind for m in model.modules() if slothai.is_patched(m)]
    layers = model.config.num_hidden_layers
    assert patched.count("linear4bit") == patched.count("lora_linear4bit") == layers * 7, patched
    assert patched.count("causal_lm") == 1 and len(patched) == layers * 7 * 2 + 1, patched
    if CAUSAL_LM_FAMILIES[family]:
        assert getattr(model.config, CAUSAL_LM_FAMILIES[family]) == SOFTCAP

    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100
    assert_patched_matches(model, ref, ids, labels)


# Rows in Trainer's order (sequential sampler, 2 a batch): 20 and 12 (padded), 16 and 16
# (no padding, the length equal to head_dim: second, as marking it on the first call
# hid the bug), 24 and 9 (padded).
TRAINER_LENGTHS = [20, 12, 16, 16, 24, 9]


def _tiny_with_both_attentions(family, path):
    """The family's tiny checkpoint; Gemma 3's with a sliding and a full-attention layer
    (its default pattern makes both of 2 layers sliding) and a window the lengths pass."""
    from transformers import AutoModelForCausalLM

    config = qlora.make_config("tiny", family)
    if family == "gemma3_text":
        config.layer_types, config.sliding_window = ["sliding_attention", "full_attention"], 12
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def _pad_right(rows):
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])], mask[i, :len(r["input_ids"])] = r["input_ids"], 1
    return qlora.collated(ids, mask)


def trainer_losses(model, tmp_path, lengths=TRAINER_LENGTHS):
    """Per-step losses of HF Trainer (AdamW, 4 steps of 2 rows, right-padded by a collator)."""
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 256, (n,), generator=g)} for n in lengths]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=len(lengths) // 2,
                             learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                             train_sampling_strategy="sequential", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=_pad_right)
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("family, backend", [(f, "aot_eager") for f in sorted(CAUSAL_LM_FAMILIES)] +
                         [("gemma3_text", "inductor")])  # as users compile, on the family with both attentions
def test_trainer_padded_and_not_at_the_head_size_compiles_once(family, backend, tmp_path):
    # Batches with padding (a mask) and without (transformers passes None), one at a
    # length equal to head_dim (16), and on Gemma 3 a full-attention layer next to a
    # sliding one: one graph for every layer and batch, and the unpatched model's losses.
    path = _tiny_with_both_attentions(family, tmp_path / "ckpt")
    torch._dynamo.reset()
    model, ref = qlora.build(path=path), qlora.build(path=path)
    assert model.config.head_dim == 16 and 16 in TRAINER_LENGTHS
    want = trainer_losses(ref, tmp_path)
    slothai.compile(slothai.patch(model), backend=backend)
    with slothai.compile_report() as report:
        got = trainer_losses(model, tmp_path)
    torch._dynamo.reset()
    assert got == pytest.approx(want, rel=1e-4), (got, want)
    assert report.compilations == 1 and report.recompiles == [] and report.graph_breaks == [], report
    assert report.region_calls == {"compiled": 3 * model.config.num_hidden_layers}, report
