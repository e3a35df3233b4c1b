"""Linear + cross-entropy, forward + backward: slothai vs torch eager, torch.compile
of eager, Liger-Kernel's fused linear CE, Apple's Cut Cross-Entropy and the bare
GEMMs, on one card, in one run.

    python benchmarks/bench_fused_ce.py [--quick]

Fresh random bf16 inputs, 10% of targets ignored. Per case: median fwd+bwd time
(CUDA events), peak memory above the inputs (gradients included), and at the
accuracy cases the loss difference and relative gradient errors against an fp32
reference (fp32 inputs, fp32 math). Table + JSON + PNG under benchmarks/results/.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import slothai  # noqa: E402


def eager(x, w, y):
    return F.cross_entropy((x @ w.t()).float(), y, ignore_index=-100)


_compiled = torch.compile(eager, dynamic=False)


def impls():
    ce_rows = lambda z, t: F.cross_entropy(z, t, ignore_index=-100, reduction="none")  # noqa: E731
    out = {"slothai": lambda x, w, y: slothai.fused_linear_cross_entropy(x, w, y),
           "chunked": lambda x, w, y: slothai.chunked_linear_loss(x, w, y, ce_rows),
           "eager": eager, "torch.compile": _compiled}
    out["slothai-1k"] = lambda x, w, y: slothai.fused_linear_cross_entropy(x, w, y, chunk_size=1024)
    # dW summed in bf16 across chunks (unsloth_zoo's default), not in an fp32 buffer
    out["slothai-bf16dW"] = lambda x, w, y: slothai.fused_linear_cross_entropy(x, w, y, fp32_weight_grad=False)
    try:
        import unsloth  # noqa: F401  (unsloth_zoo refuses to import before it)
        from unsloth_zoo.fused_losses.fused_linear import fused_linear_cross_entropy as zoo_flce
        out["unsloth_zoo"] = lambda x, w, y: zoo_flce(x, w, None, y, divisor=(y != -100).sum())
    except ImportError as e:
        print("unsloth_zoo unavailable:", e)
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        out["liger"] = lambda x, w, y: liger(w, x, y)
    except Exception as e:  # noqa: BLE001
        print("liger unavailable:", e)
    try:
        from cut_cross_entropy import linear_cross_entropy
        out["cce"] = lambda x, w, y: linear_cross_entropy(x, w, y, ignore_index=-100)
    except Exception as e:  # noqa: BLE001
        print("cut-cross-entropy unavailable:", e)
    return out


def gemms(x, w, y, trained):
    """The GEMMs any exact method must do: z = x W^T, dx = dz W, (dW = dz^T x)."""
    z = x @ w.t()
    dx = z @ w
    if trained:
        dw = z.t() @ x
        return dx, dw
    return dx


def inputs(n, h, v, trained):
    x = (torch.randn(n, h, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(trained)
    y = torch.randint(0, v, (n,), device="cuda")
    y[torch.rand(n, device="cuda") < 0.1] = -100
    return x, w, y


def step(fn, x, w, y):
    x.grad = None
    w.grad = None
    fn(x, w, y).backward()


def measure(fn, x, w, y, reps):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(fn, x, w, y)  # warm-up (and compile), then the peak of one clean step
    torch.cuda.synchronize()
    x.grad = w.grad = None
    torch.cuda.reset_peak_memory_stats()
    step(fn, x, w, y)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    ms = common.median_ms(lambda: step(fn, x, w, y), reps=reps, warmup=2)
    return ms, peak


def accuracy(fns, x, w, y):
    """Loss and gradients of each implementation against fp32 inputs in fp32 math."""
    trained = w.requires_grad
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_(trained)
    ref = F.cross_entropy(xr @ wr.t(), y, ignore_index=-100)
    ref.backward()
    out = {}
    for name, fn in fns.items():
        step(fn, x, w, y)
        loss = fn(x, w, y).item()
        rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
        out[name] = dict(loss_diff=abs(loss - ref.item()), grad_x_err=rel(x.grad, xr.grad),
                         grad_w_err=rel(w.grad, wr.grad) if trained else None)
        x.grad = w.grad = None
    return out


def run_case(fns, n, h, v, trained, reps, want_accuracy):
    torch.manual_seed(0)
    x, w, y = inputs(n, h, v, trained)
    rec = dict(n=n, h=h, v=v, trained=trained, ms={}, peak_gb={})
    gx = x.detach()
    rec["ms"]["gemms"] = common.median_ms(lambda: gemms(gx, w.detach(), y, trained), reps=reps, warmup=2)
    for name, fn in fns.items():
        try:
            rec["ms"][name], rec["peak_gb"][name] = measure(fn, x, w, y, reps)
        except torch.OutOfMemoryError:
            rec["ms"][name] = rec["peak_gb"][name] = None
        x.grad = w.grad = None
        torch.cuda.empty_cache()
    if want_accuracy:
        rec["accuracy"] = accuracy(fns, x, w, y)
    rec["grads_gb"] = (x.numel() + (w.numel() if trained else 0)) * 2 / 1e9
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="reference cases only")
    ap.add_argument("--name", default="fused_ce", help="results file name")
    args = ap.parse_args()
    env = common.environment()
    print(f"{env['card']}  torch {env['torch']}")
    fns = impls()
    no_compile = {k: f for k, f in fns.items() if k not in ("torch.compile", "chunked")}
    cases = [(16384, 4096, 128256, True, fns, True), (16384, 4096, 128256, False, fns, True),
             (4096, 1024, 50257, True, no_compile, True)]
    if not args.quick:
        cases += [(16384, 4096, v, tr, no_compile, False) for v in (32000, 151936, 256000) for tr in (True, False)]
        cases += [(n, 4096, 128256, False, no_compile, False) for n in (1024, 4096, 65536)]
    records = []
    for n, h, v, trained, f, acc in cases:
        rec = run_case(f, n, h, v, trained, reps=10, want_accuracy=acc)
        records.append(rec)
        if os.environ.get("OUT"):  # keep what is done if the run is cut short
            import json
            with open(os.path.join(os.environ["OUT"], "fused_ce_partial.json"), "w") as fh:
                json.dump(records, fh)
        print(f"  N={n} H={h} V={v} {'trained' if trained else 'frozen'}: " +
              ", ".join(f"{k} {t:.1f} ms / {rec['peak_gb'].get(k, 0) or 0:.2f} GB" if t else f"{k} OOM"
                        for k, t in rec["ms"].items()), flush=True)

    common.write(args.name, dict(env, cases=records), report(records, env))
    if not args.quick:
        plot(records, env, args.name)


def report(records, env):
    """The printed table and accuracy lines of a run (also rebuilt from its .json)."""
    names = ["slothai", "slothai-1k", "slothai-bf16dW", "unsloth_zoo", "chunked", "eager", "torch.compile", "liger",
             "cce", "gemms"]
    rows = []
    for r in records:
        fmt = lambda d, k, p: "-" if d.get(k) is None else f"{d[k]:.{p}f}"  # noqa: E731
        rows.append([f"{r['n']}x{r['h']}x{r['v']}", "W" if r["trained"] else "frozen"] +
                    [fmt(r["ms"], k, 1) for k in names] + [fmt(r["peak_gb"], k, 2) for k in names[:-1]] +
                    [f"{r['grads_gb']:.2f}"])
    lines = [f"Linear + CE fwd+bwd, bf16, 10% ignored: median ms | peak GB above inputs. {env['card']}, "
             f"torch {env['torch']}, {env['date']}"]
    lines += common.table(["N x H x V", "weight"] + [f"{k} ms" for k in names] + [f"{k} GB" for k in names[:-1]] +
                          ["grads GB"], rows)
    for r in records:
        if "accuracy" in r:
            lines.append(f"accuracy vs fp32 reference, N={r['n']} H={r['h']} V={r['v']} "
                         f"{'trained' if r['trained'] else 'frozen'}:")
            for k, a in r["accuracy"].items():
                gw = "-" if a["grad_w_err"] is None else f"{a['grad_w_err']:.2e}"
                lines.append(f"    {k:14s} |loss diff| {a['loss_diff']:.2e}  grad x rel err {a['grad_x_err']:.2e}"
                             f"  grad W rel err {gw}")
    return lines


def plot(records, env, name="fused_ce"):
    """Top: a frozen head over the token count; bottom: a trained head over the vocabulary
    (N=16384). Time and peak memory, log scales, one line per implementation measured."""
    try:
        fig, (a1, a2, a3, a4) = common.subplots(2, 2, size=(11, 3.6))
    except ImportError:  # plots are optional
        return
    lines = ["slothai", "slothai-bf16dW", "unsloth_zoo", "torch.compile", "eager", "liger", "cce", "gemms"]
    frozen = sorted((r for r in records if r["v"] == 128256 and r["h"] == 4096 and not r["trained"]),
                    key=lambda r: r["n"])
    trained = sorted((r for r in records if r["n"] == 16384 and r["h"] == 4096 and r["trained"]),
                     key=lambda r: r["v"])
    for (t_ax, m_ax), recs, x, xlab in (((a1, a2), frozen, "n", "tokens N (H=4096, V=128256, frozen head)"),
                                         ((a3, a4), trained, "v", "vocabulary V (N=16384, H=4096, trained head)")):
        for k in lines:
            style = "--" if k == "gemms" else "o-"
            for ax, field in ((t_ax, "ms"), (m_ax, "peak_gb")):
                pts = [(r[x], r[field].get(k)) for r in recs if r[field].get(k)]
                if pts:
                    ax.plot(*zip(*pts), style, label="bare GEMMs" if k == "gemms" else k)
        for ax, lab in ((t_ax, "fwd+bwd ms"), (m_ax, "peak GB above inputs")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlab)
            ax.set_ylabel(lab)
            ax.legend(fontsize=7)
    common.save_figure(fig, name, f"Linear + CE, bf16, 10% ignored, {env['card']}, torch {env['torch']}, {env['date']}")


if __name__ == "__main__":
    main()
