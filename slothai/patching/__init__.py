"""Model surgery: `slothai.patch` puts a Hugging Face / PEFT / bitsandbytes QLoRA model
on slothai's ops (patch.py), one module per kind of module it changes, plus the TRL and
Unsloth integrations and the hooks FSDP2 and DDP need. Imports slothai.ops only."""
