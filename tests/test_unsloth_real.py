"""slothai.patch on a model built by the real Unsloth (GPU; skipped where Unsloth is absent).

Unsloth patches transformers when it is imported, so the check runs in a fresh process
that imports Unsloth first: the same tiny Llama checkpoint through FastLanguageModel,
one training step unpatched and one patched, losses and LoRA gradients compared."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None,
    reason="needs a GPU and the real unsloth package")

SCRIPT = r"""
import json, sys, tempfile
import torch
from unsloth import FastLanguageModel
import slothai
from slothai import qlora
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

path = tempfile.mkdtemp()
config = qlora.make_config("tiny")
config.hidden_size, config.intermediate_size, config.vocab_size = 256, 512, 1000
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
vocab = {f"t{i}": i for i in range(config.vocab_size)}
PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0",
                        pad_token="t1", eos_token="t2").save_pretrained(path)
model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=256, dtype=torch.bfloat16, load_in_4bit=True)
model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                                         target_modules=qlora.PROJECTIONS, use_gradient_checkpointing=False,
                                         random_state=1)
for n, p in model.named_parameters():  # LoRA B starts at zero: make every gradient non-trivial
    if "lora_B" in n:
        torch.nn.init.normal_(p, std=0.02)
ids = torch.randint(0, config.vocab_size, (2, 100), device="cuda")

def step():
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

loss0, grads0 = step()
slothai.patch(model)
import unsloth.kernels.utils as U
routed = U.fast_dequantize.__module__.startswith("slothai")
loss1, grads1 = step()
rel = max(((grads1[n] - g).norm() / g.norm()).item() for n, g in grads0.items())
print(json.dumps(dict(loss0=loss0, loss1=loss1, grad_rel=rel, n_grads=len(grads0), routed=routed)))
"""


def test_patched_unsloth_model_matches_unpatched():
    env = dict(os.environ, UNSLOTH_DISABLE_STATISTICS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["routed"] and got["n_grads"] == 2 * 7 * 2
    assert abs(got["loss1"] - got["loss0"]) <= 1e-3 * abs(got["loss0"]), got
    assert got["grad_rel"] <= 1e-3, got
