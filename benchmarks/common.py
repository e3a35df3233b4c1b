"""Shared benchmark plumbing: CUDA-event medians, the card's copy bandwidth,
result files (JSON + printed table) under benchmarks/results/."""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def median_ms(fn, reps=100, warmup=10):
    """Median of per-call CUDA-event timings, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth_gbs(nbytes=1 << 30):
    """Device-to-device copy bandwidth, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps=30, warmup=5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def environment():
    return {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
    }


def write(name, payload, table_lines, keep=True):
    """Writes <name>.json and <name>.txt (the printed table) to results/ (unless not
    `keep`: a smoke run) and to $OUT."""
    text = "\n".join(table_lines) + "\n"
    print(text, end="")
    for folder in filter(None, [RESULTS if keep else None, os.environ.get("OUT")]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name + ".json"), "w") as f:
            json.dump(payload, f, indent=1)
        with open(os.path.join(folder, name + ".txt"), "w") as f:
            f.write(text)


def table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join("{:>%d}" % w for w in widths)
    return [fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows]


def subplots(rows=1, cols=1, size=(7, 3.2)):
    """A matplotlib figure (Agg backend) with rows x cols axes, each row `size` big."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(size[0], size[1] * rows), squeeze=False)
    return fig, axes.ravel()


def save_figure(fig, name, title, keep=True):
    """Title, tight layout, <name>.png to results/ (unless not `keep`) and to $OUT."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    for folder in filter(None, [RESULTS if keep else None, os.environ.get("OUT")]):
        os.makedirs(folder, exist_ok=True)
        fig.savefig(os.path.join(folder, f"{name}.png"), dpi=110)


def kernel_times(prof, kinds):
    """GPU kernel time of a finished torch.profiler run: ({kind: ms}, {kernel: [calls, ms]}),
    each kernel put in the first kind of `kinds` ([(kind, name substrings)]) that matches
    its lower-cased name, "other" if none. Kernels only: CPU ops repeat their kernels'
    time, and a record_function region shows up as a GPU span over its kernels."""
    by_kind, by_kernel = {}, {}
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        ms = e.self_device_time_total / 1e3
        name = e.key.lower()
        kind = next((k for k, pats in kinds if any(p in name for p in pats)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
        calls, total = by_kernel.get(e.key[:90], (0, 0.0))
        by_kernel[e.key[:90]] = [calls + e.count, total + ms]
    return by_kind, by_kernel


def run_worker(script, worker_args, out, timeout, label, **env):
    """`python script *worker_args` in its own process, with cold inductor and Triton caches
    (compile times are cold: a run does not find the kernels an earlier run built) and `env`
    added; the worker writes its record to `out` as JSON. Returns (record, None), or
    (None, why) after printing that `label` failed."""
    cold = tempfile.mkdtemp(prefix="slothai-bench-caches-")
    run_env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cold, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cold, "triton"), **env)
    try:
        rc = subprocess.run([sys.executable, os.path.abspath(script), *worker_args], env=run_env,
                            timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if rc == 0 and os.path.exists(out):
        with open(out) as f:
            return json.load(f), None
    print(f"[{label}] failed: exit {rc}", flush=True)
    return None, f"exit {rc}"
