"""The longest bsz-1 sequence a training run fits on one GPU, each run in its own
process on bench_qlora.py's checkpoint: two AdamW steps per length (--steps; the second
with the optimizer's state), lengths in the order given, stopping at the first OOM.

    python benchmarks/bench_longest.py [--model llama-8b] [--runs slothai-lowmem unsloth-offload] \
        [--lengths 16384 32768 65536] [--checkpoint DIR]

Prints each step (seconds, peak GB) and the longest length that fit, per run. The
checkpoint's max_position_embeddings is raised to Llama-3.1's 131072 (or the longest length).
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


LLAMA_31_POSITIONS = 131072  # Llama-3.1-8B's max_position_embeddings


def allow_positions(path, n):
    """Raise the checkpoint's max_position_embeddings to n: below the length asked for,
    Unsloth scales RoPE (another model than ours) and warns. The weights do not change."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    if config.get("max_position_embeddings", 0) < n:
        config["max_position_embeddings"] = n
        with open(file, "w") as f:
            json.dump(config, f, indent=1)


def worker(label, path, lengths, steps=2):
    import bench_qlora
    model = bench_qlora.build_model(label, path, types.SimpleNamespace(seq=[max(lengths)]))
    import torch

    from slothai import qlora
    model.train()  # Unsloth's models come back in eval mode, where its offloaded checkpointing is off
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    fits = None
    for n in lengths:
        try:
            for step in range(steps):
                ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
                torch.cuda.reset_peak_memory_stats()
                value, seconds = qlora.train_step(model, opt, ids)
                print(f"{label} len {n} step {step} loss {value:.4f} {seconds:.2f} s "
                      f"peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB", flush=True)
            fits = n
        except torch.cuda.OutOfMemoryError as e:
            print(f"{label} len {n}: OOM ({str(e)[:120]})", flush=True)
            break
        finally:
            ids = None
            gc.collect()
    print(f"RESULT {label} longest fitting bsz-1 length among {lengths}: {fits}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--runs", nargs="+", default=["slothai-lowmem", "unsloth-offload"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--steps", type=int, default=2, help="AdamW steps per length")
    ap.add_argument("--checkpoint", help="folder to keep the random-weight checkpoint in and reuse")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.path, args.lengths, args.steps)
    import bench_qlora
    with tempfile.TemporaryDirectory() as tmp:
        path = bench_qlora.checkpoint_path(args.model, args.checkpoint or tmp)
        allow_positions(path, max(LLAMA_31_POSITIONS, *args.lengths))
        for label in args.runs:  # own process each: Unsloth patches transformers when imported
            subprocess.run([sys.executable, __file__, "--worker", label, "--path", path, "--steps", str(args.steps),
                            "--lengths", *map(str, args.lengths)],
                           env=dict(os.environ, UNSLOTH_COMPILE_LOCATION=tempfile.mkdtemp(prefix="unsloth-")))


if __name__ == "__main__":
    main()
