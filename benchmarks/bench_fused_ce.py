"""Linear + cross-entropy, forward + backward: slothai vs torch eager, torch.compile
of eager, Liger-Kernel's fused linear CE, Apple's Cut Cross-Entropy and the bare
GEMMs, on one card, in one run.

    python benchmarks/bench_fused_ce.py [--quick]
    python benchmarks/bench_fused_ce.py --extras [--tiny]

Fresh random bf16 inputs, 10% of targets ignored. Per case: median fwd+bwd time
(CUDA events), peak memory above the inputs (gradients included), and at the
accuracy cases the loss difference and relative gradient errors against an fp32
reference (fp32 inputs, fp32 math). Table + JSON + PNG under benchmarks/results/.

--extras: what the options past the plain loss cost (issue 33) at N16384 H4096
V128256, trained and frozen head: slothai's plain loss, with the three extra
outputs (z loss, token accuracy, predicted tokens), with token scaling too, and
with every option (class weights, label smoothing, z-loss); Liger-Kernel with the
same options (its dW summed in fp32, as slothai's); unsloth_zoo's plain loss.
Rounds alternate the variants; each time is the median of the rounds' medians.
The outputs are first checked against an fp32 reference on the full logits (in
chunks). Writes fused_ce_extras.{txt,json,png}. --tiny: a small case on whatever
device there is (the CPU: wall-clock medians, no memory), results only to $OUT,
to smoke-test the script.
"""
import argparse
import os
import statistics
import sys
import time

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


# --- --extras: the options past the plain loss ------------------------------------------------

OUTPUTS = dict(return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True)


def extras_options(v, device):
    """Per variant, the options given to slothai and to Liger (the same, under each one's
    names: slothai's z_loss is Liger's lse_square_scale)."""
    g = torch.Generator(device=device).manual_seed(1)
    cw = torch.rand(v, device=device, generator=g) + 0.5
    every = dict(ce_weight=cw, label_smoothing=0.1, use_token_scaling=True, **OUTPUTS)
    return {"": ({}, {}), "+outputs": (dict(OUTPUTS), dict(OUTPUTS)),
            "+scaling": (dict(use_token_scaling=True, **OUTPUTS), dict(use_token_scaling=True, **OUTPUTS)),
            "+all": (dict(every, z_loss=1e-4), dict(every, lse_square_scale=1e-4))}


def extras_impls(v, device):
    """name -> (fn(x, w, y) returning the loss or a CrossEntropyOutput, options)."""
    out = {}
    variants = extras_options(v, device)
    for suffix, (mine, _) in variants.items():
        out["slothai" + suffix] = (lambda x, w, y, o=mine: slothai.fused_linear_cross_entropy(x, w, y, **o), mine)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
        for suffix, (_, theirs) in variants.items():
            out["liger" + suffix] = (lambda x, w, y, o=theirs: liger(x, w, y, accum_dtype=torch.float32, **o),
                                     theirs)
    except Exception as e:  # noqa: BLE001
        print("liger unavailable:", e)
    try:
        import unsloth  # noqa: F401  (unsloth_zoo refuses to import before it)
        from unsloth_zoo.fused_losses.fused_linear import fused_linear_cross_entropy as zoo_flce
        out["unsloth_zoo"] = (lambda x, w, y: zoo_flce(x, w, None, y, divisor=(y != -100).sum()), {})
    except ImportError as e:
        print("unsloth_zoo unavailable:", e)
    return out


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def extras_reference(x, w, y, opts, chunk=1024):
    """(loss, z loss, token accuracy, predicted tokens) in fp32 from chunks of the full
    logits (the GEMM's, in the inputs' dtype): torch's cross_entropy with the class weights
    and smoothing, z_loss * lse^2 per counted row, both times the detached p_t with token
    scaling; mean: the weighted part over the counted rows' w_t, the z-loss over their count."""
    cw, lam = opts.get("ce_weight"), opts.get("z_loss", opts.get("lse_square_scale", 0.0))
    ce_sum = z_sum = hits = 0.0
    preds = []
    for s in range(0, x.shape[0], chunk):
        z, t = (x[s:s + chunk] @ w.t()).float(), y[s:s + chunk]
        counted = t != -100
        ce = F.cross_entropy(z, t, weight=cw, label_smoothing=opts.get("label_smoothing", 0.0), reduction="none")
        zl = lam * z.logsumexp(-1) ** 2 * counted
        if opts.get("use_token_scaling"):
            p = torch.softmax(z, -1).gather(1, t.clamp_min(0)[:, None])[:, 0]
            ce, zl = ce * p, zl * p
        ce_sum, z_sum = ce_sum + ce.sum(), z_sum + zl.sum()
        pred = z.argmax(-1).masked_fill(~counted, -1)
        hits = hits + ((pred == t) & counted).sum()
        preds.append(pred)
    n = (y != -100).sum()
    weighed = cw[y.clamp_min(0)][y != -100].sum() if cw is not None else n
    return ce_sum / weighed + z_sum / n, z_sum / n, hits / n, torch.cat(preds)


def extras_check(fns, x, w, y):
    """Each variant's outputs against extras_reference: relative loss and z-loss errors,
    the token accuracy's difference, the fraction of predicted tokens that agree."""
    out = {}
    with torch.no_grad():
        refs = {}
        for name, (fn, opts) in fns.items():
            key = name.split("+", 1)[1] if "+" in name else ""
            if key not in refs:
                refs[key] = extras_reference(x, w, y, opts)
            loss, zl, acc, pred = refs[key]
            got = fn(x, w, y)
            rec = dict(loss_rel_err=abs(_loss(got).item() - loss.item()) / abs(loss.item()))
            if not isinstance(got, torch.Tensor):
                rec["z_loss_rel_err"] = abs(got.z_loss.float().item() - zl.item()) / max(abs(zl.item()), 1e-30)
                rec["accuracy_diff"] = abs(got.token_accuracy.item() - acc.item())
                rec["predicted_agree"] = (got.predicted_tokens.view(-1) == pred).float().mean().item()
            out[name] = rec
    return out


def _time(fn, x, w, y, reps, cuda):
    if cuda:
        return measure(lambda x, w, y: _loss(fn(x, w, y)), x, w, y, reps)
    times = []
    for _ in range(reps + 1):  # the first as warm-up
        t0 = time.perf_counter()
        step(lambda x, w, y: _loss(fn(x, w, y)), x, w, y)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:]), None


def run_extras(args):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    env = common.environment()
    print(f"{env['card']}  torch {env['torch']}")
    n, h, v = (256, 64, 1000) if args.tiny else (16384, 4096, 128256)
    reps, rounds = (3, 2) if args.tiny else (10, 3)
    records = []
    for trained in (True, False):
        torch.manual_seed(0)
        g = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(n, h, device=device, generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
        w = (torch.randn(v, h, device=device, generator=g) * 0.02).to(torch.bfloat16).requires_grad_(trained)
        y = torch.randint(0, v, (n,), device=device, generator=g)
        y[torch.rand(n, device=device, generator=g) < 0.1] = -100
        fns = extras_impls(v, device)
        rec = dict(n=n, h=h, v=v, trained=trained, check=extras_check(fns, x.detach(), w.detach(), y), ms={},
                   peak_gb={}, rounds={})
        for _ in range(rounds):  # the variants alternate, so that drift spreads over them all
            for name, (fn, _) in fns.items():
                try:
                    ms, peak = _time(fn, x, w, y, reps, cuda)
                except torch.OutOfMemoryError:
                    ms, peak = None, None
                rec["rounds"].setdefault(name, []).append(ms)
                rec["peak_gb"][name] = peak
                x.grad = w.grad = None
                if cuda:
                    torch.cuda.empty_cache()
        rec["ms"] = {k: statistics.median(t) if None not in t else None for k, t in rec["rounds"].items()}
        records.append(rec)
        print(f"  N={n} H={h} V={v} {'trained' if trained else 'frozen'}: " +
              ", ".join(f"{k} {t:.2f} ms" if t else f"{k} -" for k, t in rec["ms"].items()), flush=True)
    name = args.name if args.name != "fused_ce" else "fused_ce_extras"
    common.write(name, dict(env, cases=records), extras_report(records, env), keep=not args.tiny)
    extras_plot(records, env, name, keep=not args.tiny)


def extras_report(records, env):
    variants = ["", "+outputs", "+scaling", "+all"]
    lines = [f"Linear + CE fwd+bwd with the options past the plain loss, bf16, 10% ignored: median ms over "
             f"rounds | peak GB above inputs. {env['card']}, torch {env['torch']}, {env['date']}",
             "+outputs: z loss, token accuracy, predicted tokens; +scaling: and token scaling; +all: and class "
             "weights, label smoothing 0.1, z-loss 1e-4. Liger: accum_dtype=float32 (dW in fp32, as slothai's)."]
    for r in records:
        lines.append(f"N={r['n']} H={r['h']} V={r['v']} {'trained' if r['trained'] else 'frozen'} head:")
        rows = []
        for lib in ("slothai", "liger", "unsloth_zoo"):
            for suffix in (variants if lib != "unsloth_zoo" else [""]):
                k = lib + suffix
                if k not in r["ms"]:
                    continue
                ms, base = r["ms"][k], r["ms"].get(lib)
                peak = r["peak_gb"].get(k)
                chk = r["check"].get(k, {})
                rows.append([k, "-" if ms is None else f"{ms:.2f}",
                             "-" if ms is None or not base else f"{100 * (ms / base - 1):+.1f}%",
                             "-" if peak is None else f"{peak:.2f}",
                             f"{chk.get('loss_rel_err', float('nan')):.1e}",
                             "-" if "z_loss_rel_err" not in chk else f"{chk['z_loss_rel_err']:.1e}",
                             "-" if "accuracy_diff" not in chk else f"{chk['accuracy_diff']:.1e}",
                             "-" if "predicted_agree" not in chk else f"{chk['predicted_agree']:.4f}"])
        lines += ["    " + line for line in common.table(
            ["variant", "ms", "vs own plain", "peak GB", "loss err", "z err", "acc diff", "pred agree"], rows)]
    return lines


def extras_plot(records, env, name, keep):
    try:
        fig, axes = common.subplots(1, 2, size=(11, 3.6))
    except ImportError:  # plots are optional
        return
    for ax, r in zip(axes, records):
        names = [k for k in r["ms"] if r["ms"][k]]
        ax.bar(range(len(names)), [r["ms"][k] for k in names],
               color=["C0" if k.startswith("slothai") else "C1" if k.startswith("liger") else "C2" for k in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("fwd+bwd ms")
        ax.set_title(f"N{r['n']} H{r['h']} V{r['v']}, {'trained' if r['trained'] else 'frozen'} head", fontsize=8)
    common.save_figure(fig, name, f"Linear + CE with extra outputs and options, bf16, {env['card']}, "
                                  f"torch {env['torch']}, {env['date']}", keep=keep)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="reference cases only")
    ap.add_argument("--extras", action="store_true", help="the options past the plain loss (issue 33)")
    ap.add_argument("--tiny", action="store_true", help="with --extras: a small smoke case, results only to $OUT")
    ap.add_argument("--name", default="fused_ce", help="results file name")
    args = ap.parse_args()
    if args.extras:
        return run_extras(args)
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
