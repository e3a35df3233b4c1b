"""Every model family `slothai.patch` claims (patch.CAUSAL_LM_FAMILIES) is tested
here: a tiny 4-bit QLoRA model of the family, patched, gives the unpatched model's
loss and LoRA gradients, with its 7 projections per layer and its head patched.
(tests/test_qlora.py adds compile and training for some of them.)"""
import pytest
import torch

import slothai
from training_checks import assert_patched_matches
from slothai import qlora
from slothai.patch import CAUSAL_LM_FAMILIES

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
