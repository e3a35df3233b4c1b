"""Command line: `python -m slothai demo`, `python -m slothai report ...` and `python -m slothai info`."""
import argparse
import json
import sys


def demo(args):
    from .demo import run

    import torch

    run(device=args.device)
    print("\nQLoRA training steps, unpatched eager vs slothai.patch + slothai.compile:")
    main(["report", "--model", "tiny", "--baseline", "--steps", "4", "--seq", "64", "96", "--device", "cpu"])
    if (args.device or "cuda") == "cuda" and torch.cuda.is_available():
        print("\nAnd on the GPU, the Llama-3.2-1B shape:")
        main(["report", "--model", "llama-1b", "--baseline", "--steps", "4", "--seq", "1024", "768",
              "--device", "cuda"])


def report(args):
    import torch

    from . import compile as compile_model
    from . import compile_report, patch, qlora, warm_up

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    name, path = (args.model, None) if args.model in qlora.SHAPES else ("path", args.model)
    source = "checkpoint" if path else f"{args.family if name == 'tiny' else 'llama'} shape, random weights"
    print(f"slothai report: model {args.model} ({source}), {device}, "
          f"{dtype}, batch {args.batch}, seq {args.seq}, {args.steps} steps, compile {args.compile}, "
          f"patch {'off' if args.no_patch else 'on'}")
    runs = {}
    plans = [("baseline (unpatched, eager)", False, "none")] if args.baseline else []
    plans.append(("slothai" if not args.no_patch else "unpatched", not args.no_patch, args.compile))
    for label, do_patch, mode in plans:
        print(f"\n== {label}: patch {'on' if do_patch else 'off'}, compile {mode}")
        model = qlora.build(name, args.family, device=device, dtype=dtype, lora_r=args.lora_r, path=path)
        if do_patch:
            patch(model)
        compile_model(model, mode, backend=args.backend)
        vocab = model.config.vocab_size if hasattr(model, "config") else 256
        batch_list = list(qlora.batches(vocab, args.batch, args.seq, args.steps, device))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm = {}
        with compile_report() as rep:
            if args.warm_up and do_patch and mode == "regional":
                warm = warm_up(model, args.seq, batch_size=args.batch)
                print(f"warm_up: {', '.join(f'{n} tokens {t:.2f} s' for n, t in warm.items())} "
                      f"(the first compiles)")
            steps = qlora.train(model, batch_list, log=print)
        timed = steps[1:] or steps  # the first step carries the compile
        tok_s = sum(s[2] for s in timed) / sum(s[1] for s in timed)
        runs[label] = dict(compile=rep.to_dict(), losses=[s[0] for s in steps], step_seconds=[s[1] for s in steps],
                           tokens_per_second=tok_s, peak_memory_gb=qlora.peak_memory_gb(device), warm_up_seconds=warm,
                           memory_kind="GPU allocated" if device == "cuda" else "process resident (peak so far)")
        print(rep)
        print(f"steady {tok_s:,.0f} tokens/s (steps 2..), peak memory {runs[label]['peak_memory_gb']:.2f} GB "
              f"({runs[label]['memory_kind']})")
        del model
    if len(runs) == 2:
        (bl, b), (ol, o) = runs.items()
        rel = max(abs(x - y) / abs(y) for x, y in zip(o["losses"], b["losses"]))
        print(f"\n{ol} vs {bl}: {o['tokens_per_second'] / b['tokens_per_second']:.2f}x tokens/s, "
              f"peak memory {o['peak_memory_gb']:.2f} vs {b['peak_memory_gb']:.2f} GB, "
              f"max relative loss difference {rel:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, device=device, dtype=str(dtype), batch=args.batch, seq=args.seq,
                           steps=args.steps, runs=runs), f, indent=1)


def info(args):
    """What this install is: versions, the binaries it carries, the CUDA kernels torch's CUDA takes."""
    import os

    import torch

    from . import __version__, _C
    from .ops import kernels

    print(f"slothai {__version__} at {os.path.dirname(os.path.abspath(__file__))}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), Python {sys.version.split()[0]}")
    path, built = kernels.cuda_library()
    print(f"C module: {os.path.basename(_C.__file__)}; CUDA libraries: {', '.join(built) or 'none (a CPU build)'}")
    if torch.version.cuda is None:
        return
    chosen = f" (SLOTHAI_CUDA_VERSION={kernels.cuda_major()})" if os.environ.get("SLOTHAI_CUDA_VERSION") else ""
    missing = "" if os.path.exists(path) else " MISSING"
    print(f"for CUDA {torch.version.cuda}{chosen}: {os.path.basename(path)}{missing}")
    if torch.cuda.is_available():
        kernels._load_cuda()
        x = torch.ones(4, device="cuda")
        torch.ops.slothai.scale_(x, torch.full((1,), 2.0, device="cuda"))
        ok = torch.equal(x.cpu(), torch.full((4,), 2.0))
        print(f"GPU {torch.cuda.get_device_name()}: kernels loaded, a launch {'ran' if ok else 'gave a WRONG result'}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m slothai")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="dequantize a real bitsandbytes NF4 layer and time it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=demo)
    p = sub.add_parser("report", help="train a 4-bit QLoRA model a few steps and report what compile did")
    p.add_argument("--model", default="tiny", help="tiny, llama-1b, llama-8b (random weights) or a checkpoint PATH")
    p.add_argument("--family", default="llama", choices=["llama", "mistral", "qwen2", "gemma2"],
                   help="family of the tiny model")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, nargs="+", default=[64, 96], help="sequence lengths, cycled over the steps")
    p.add_argument("--compile", default="regional", choices=["regional", "full", "none"])
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    p.add_argument("--no-patch", action="store_true", help="leave the model unpatched")
    p.add_argument("--baseline", action="store_true", help="also run the unpatched eager model first")
    p.add_argument("--warm-up", action="store_true",
                   help="slothai.warm_up the compiled model at the --seq lengths before the steps")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--json", default=None, help="write the numbers to this file")
    p.set_defaults(func=report)
    p = sub.add_parser("info", help="versions, binaries, and whether the CUDA kernels load here")
    p.set_defaults(func=info)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
