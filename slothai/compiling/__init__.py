"""`slothai.compile`: regional torch.compile for QLoRA training (compile.py), the
compiled region (regions.py), length buckets, CUDA-graph bookkeeping, what a layer
saves for backward (saves.py), low-memory offload, warm-up and `compile_report`.
Imports slothai.ops and slothai.patching only."""
