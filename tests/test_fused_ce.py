"""slothai::fused_ce (fused_linear_cross_entropy) against plain torch in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

import slothai

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-2, 3e-2), torch.float16: (5e-3, 1e-2)}


def reference(x, w, t, b=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None,
              z_loss=0.0):
    """The loss of docs/design.md in float64: logits rounded to the input dtype first, as the GEMM does."""
    z = x @ w.t()
    if b is not None:
        z = z + b
    z = z.to(x.dtype).double() if x.dtype != torch.float64 else z
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z.view(-1, w.shape[0])
    tt = t.reshape(-1)
    loss = F.cross_entropy(z, tt, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    counted = tt != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(z, -1) ** 2 * counted
    if reduction == "none":
        return loss.view(t.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / counted.sum()


def make(n, h, v, dtype, device, bias=False, ignore_frac=0.1, shape=None):
    x = torch.randn(*(shape or (n,)), h, dtype=torch.float64) * 0.5
    w = torch.randn(v, h, dtype=torch.float64) * 0.3
    b = torch.randn(v, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, x.shape[:-1])
    t[torch.rand(t.shape) < ignore_frac] = -100
    cast = lambda a: None if a is None else a.to(device=device, dtype=dtype)  # noqa: E731
    return (x, w, b, t), (cast(x), cast(w), cast(b), t.to(device))


def check(dtype, device, *, n=37, h=24, v=131, bias=False, shape=None, chunk=None, frozen=False, upstream=True,
          **opts):
    (x, w, b, t), (xd, wd, bd, td) = make(n, h, v, dtype, device, bias, shape=shape)
    ignore = opts.get("ignore_index", -100)
    t, td = t.masked_fill(t == -100, ignore), td.masked_fill(td == -100, ignore)
    for a in (x, w, b, xd, wd, bd):
        if a is not None:
            a.requires_grad_(True)
    if frozen:
        w.requires_grad_(False)
        wd.requires_grad_(False)
    got = slothai.fused_linear_cross_entropy(xd, wd, td, bd, chunk_size=chunk, **opts)
    want = reference(x.to(dtype), w.to(dtype), t, None if b is None else b.to(dtype), **opts)
    assert got.dtype == torch.float32 and got.shape == want.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=rtol, atol=atol)
    g = torch.randn_like(want) if upstream else torch.ones_like(want)  # never assume an upstream 1
    (got * g.to(got)).sum().backward()
    (want * g).sum().backward()
    pairs = [(xd, x), (bd, b)] + ([] if frozen else [(wd, w)])
    for mine, ref in pairs:
        if mine is None:
            continue
        ref_grad = ref.grad
        assert mine.grad is not None and mine.grad.dtype == dtype
        err = (mine.grad.double().cpu() - ref_grad).norm()
        assert err <= 3 * rtol * ref_grad.norm() + atol, f"gradient error {err:.2e} of norm {ref_grad.norm():.2e}"
    if frozen:
        assert wd.grad is None


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (token shape, H, V): one row and a vocabulary of one; odd sizes and a prime
# vocabulary; 3-D hidden with a vocabulary that is a multiple of 8 (on CUDA the
# 16-byte vector path of the row kernel; the others take the scalar path).
SHAPES = [((1,), 3, 1), ((37,), 24, 131), ((3, 11), 16, 128), ((5,), 7, 517)]
OPTIONS = [dict(), dict(label_smoothing=0.1), dict(softcap=2.5), dict(z_loss=1e-3), dict(ignore_index=7),
           dict(label_smoothing=0.2, softcap=5.0, z_loss=1e-2), dict(frozen=True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch(device, dtype, shape, opts, reduction):
    tokens, h, v = shape
    check(dtype, device, shape=tokens, h=h, v=v, chunk=8, bias=not opts, reduction=reduction, **opts)


@pytest.mark.parametrize("chunk", [1, 7, 36, 37, 1000, None])
def test_chunk_sizes_and_bias(device, chunk):
    check(torch.float32, device, chunk=chunk, bias=True)


def test_all_ignored_rows(device):
    x = torch.randn(6, 8, device=device, requires_grad=True)
    w = torch.randn(10, 8, device=device, requires_grad=True)
    t = torch.full((6,), -100, device=device)
    loss = slothai.fused_linear_cross_entropy(x, w, t)
    assert torch.isnan(loss)  # 0 / 0, as F.cross_entropy
    s = slothai.fused_linear_cross_entropy(x, w, t, reduction="sum")
    s.backward()
    assert s.item() == 0 and x.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_ignored_rows_are_not_computed():
    # 40 rows, 11 ignored: each GEMM runs over the 29 others (a GEMM with 40 rows
    # would mean the skip is gone: same answers, 40/29 of the work at 27% ignored).
    (_, _, _, _), (x, w, _, t) = make(40, 8, 17, torch.float32, "cpu", ignore_frac=0)
    t[::4] = -100
    t[1] = -100  # 11 ignored, 29 counted, in no regular pattern
    x.requires_grad_()
    w.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        loss = slothai.fused_linear_cross_entropy(x, w, t, reduction="none", chunk_size=16)
        loss.sum().backward()
    rows = {tuple(e.input_shapes[0]) for e in prof.events() if e.name in ("aten::mm", "aten::addmm") and e.input_shapes}
    assert rows and all(40 not in shape for shape in rows), rows
    assert (16, 8) in rows and (13, 8) in rows  # the counted rows, in chunks of 16
    want = reference(x.detach().double(), w.detach().double(), t, reduction="none")
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=1e-4)
    assert (loss[t == -100] == 0).all() and (x.grad[t == -100] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_graph_capture_computes_every_row(reduction):
    # Counting the ignored rows waits for the device, which capture forbids: a
    # captured call computes every row (ignored ones as zeros), with the same answers.
    (_, _, _, _), (x, w, _, t) = make(300, 64, 1000, torch.bfloat16, "cuda")
    g = torch.ones(300, device="cuda") if reduction == "none" else None

    def call():
        out = torch.ops.slothai.fused_ce.default(x, w, None, t, g, -100, 0.0, 0.0, 0.0, reduction, 64,
                                                 True, True, False, True)
        return [o.clone() for o in out]

    eager = call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up off the capture, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_hidden_size_zero(device, reduction, bias):
    # No features: every logit is the bias (or 0), so the loss is log V without one, as in torch.
    x = torch.randn(2, 3, 0, device=device, requires_grad=True)
    w = torch.randn(11, 0, device=device, requires_grad=True)
    b = torch.randn(11, device=device, requires_grad=True) if bias else None
    t = torch.randint(0, 11, (2, 3), device=device)
    t[0, 0] = -100
    got = slothai.fused_linear_cross_entropy(x, w, t, b, reduction=reduction)
    z = F.linear(x, w, b).view(-1, 11)
    want = F.cross_entropy(z, t.view(-1), reduction=reduction)
    torch.testing.assert_close(got, want.view(got.shape))
    if not bias and reduction != "sum":
        torch.testing.assert_close(got[got != 0], torch.full_like(got[got != 0], math.log(11)))
    g = torch.randn_like(got)
    grads = torch.autograd.grad((got * g).sum(), [x, w] + ([b] if bias else []))
    want_grads = torch.autograd.grad((want.view(got.shape) * g).sum(), [x, w] + ([b] if bias else []))
    for a, e in zip(grads, want_grads):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e)


def test_fp32_accumulation_across_chunks(device):
    # dW summed over many chunks must not lose bits: one chunk vs 64 chunks agree to fp32 noise.
    (_, _, _, _), (x, w, _, t) = make(256, 16, 64, torch.bfloat16, device, ignore_frac=0)
    grads = []
    for chunk in (256, 4):
        wg = w.detach().clone().requires_grad_()
        slothai.fused_linear_cross_entropy(x, wg, t, reduction="sum", chunk_size=chunk).backward()
        grads.append(wg.grad.float())
    err = (grads[0] - grads[1]).norm() / grads[0].norm()
    assert err < 4e-3, err  # one bf16 rounding of the total, not 64


def test_weight_grad_summed_in_input_dtype(device):
    # fp32_weight_grad=False rounds the dW sum once per chunk: over 64 chunks it
    # drifts further from the one-chunk GEMM than the fp32 sum does, yet stays a
    # bf16-accurate gradient; the other gradients and the loss do not change.
    (x64, w64, _, t64), (x, w, _, t) = make(256, 16, 64, torch.bfloat16, device, ignore_frac=0)
    wr = w64.to(torch.bfloat16).double().requires_grad_()
    reference(x64.to(torch.bfloat16).double(), wr, t64, reduction="sum").backward()
    got = {}
    for fp32, chunk in ((True, 256), (True, 4), (False, 4)):
        xg, wg = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss = slothai.fused_linear_cross_entropy(xg, wg, t, reduction="sum", chunk_size=chunk,
                                                  fp32_weight_grad=fp32)
        loss.backward()
        got[fp32, chunk] = loss.detach(), xg.grad, wg.grad.double().cpu()
    whole = got[True, 256][2]
    drift = {fp32: (got[fp32, 4][2] - whole).norm() / whole.norm() for fp32 in (True, False)}
    assert drift[False] > 2 * drift[True], drift
    assert (got[False, 4][2] - wr.grad).norm() / wr.grad.norm() < 2e-2
    assert torch.equal(got[False, 4][0], got[True, 4][0]) and torch.equal(got[False, 4][1], got[True, 4][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("fp32_weight_grad", [True, False])
def test_trained_chunk_logits_never_larger_than_the_weight_gradient(fp32_weight_grad):
    # At a small vocabulary the logits budget alone would hold every row in one chunk
    # (here 8192 x 32000 bf16: 524 MB, against a 33 MB dW); chunks of at most H rows
    # keep the peak to a few times dW. The answer does not depend on the chunking.
    n, h, v = 8192, 512, 32000
    x = (torch.randn(n, h, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    slothai.fused_linear_cross_entropy(x[:256], w, t[:256]).backward()  # cuBLAS' workspace, before measuring
    grads = []
    for chunk in (None, n):
        x.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        slothai.fused_linear_cross_entropy(x, w, t, chunk_size=chunk, fp32_weight_grad=fp32_weight_grad).backward()
        peak = torch.cuda.max_memory_allocated() - base
        grads.append((x.grad.float(), w.grad.float()))
        if chunk is None:
            dw_bytes = v * h * 2
            assert peak < 4 * dw_bytes + n * h * 2, (peak, dw_bytes)
    for a, b in zip(*grads):
        assert (a - b).norm() / b.norm() < 1e-2


@pytest.mark.parametrize("fp32_weight_grad", [True, False])
def test_backward_twice_with_retained_graph(device, fp32_weight_grad):
    # Backward scales the gradients the forward formed in place only when the graph
    # is not kept: a retained graph gives the same gradients every time.
    (_, _, _, _), (x, w, _, t) = make(40, 16, 70, torch.bfloat16, device)
    x.requires_grad_()
    w.requires_grad_()
    loss = slothai.fused_linear_cross_entropy(x, w, t, chunk_size=16, fp32_weight_grad=fp32_weight_grad)
    grads = [torch.autograd.grad(loss * 3, (x, w), retain_graph=True) for _ in range(2)]
    grads.append(torch.autograd.grad(loss * 3, (x, w)))
    for got in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, grads[0]))


def test_no_grad_returns_loss_only(device):
    (_, _, _, _), (x, w, _, t) = make(9, 8, 12, torch.float32, device)
    with torch.no_grad():
        loss = slothai.fused_linear_cross_entropy(x.requires_grad_(), w, t)
    assert not loss.requires_grad


def test_bad_input(device):
    x, w = torch.randn(4, 8, device=device), torch.randn(10, 8, device=device)
    t = torch.tensor([1, 2, 3, 4], device=device)
    with pytest.raises(ValueError, match="weight has 8 columns but hidden has size 9"):
        slothai.fused_linear_cross_entropy(torch.randn(4, 9, device=device), w, t)
    with pytest.raises(TypeError, match="weight must be float32, got float16"):
        slothai.fused_linear_cross_entropy(x, w.half(), t)
    with pytest.raises(TypeError, match="target must be int64 or int32, got float32"):
        slothai.fused_linear_cross_entropy(x, w, t.float())
    with pytest.raises(ValueError, match="target's leading dims"):
        slothai.fused_linear_cross_entropy(x, w, t[:3])
    with pytest.raises(ValueError, match="bias must have shape"):
        slothai.fused_linear_cross_entropy(x, w, t, torch.randn(9, device=device))
    with pytest.raises(ValueError, match="reduction must be one of"):
        slothai.fused_linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        slothai.fused_linear_cross_entropy(x, w, t, softcap=-1.0)
    with pytest.raises(TypeError, match="hidden must be float32, float16 or bfloat16, got float64"):
        slothai.fused_linear_cross_entropy(x.double(), w.double(), t)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        slothai.fused_linear_cross_entropy(x, w, t, label_smoothing=1.5)
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight must be on cpu"):
            slothai.fused_linear_cross_entropy(x, w.cuda(), t)


def test_target_out_of_range():
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"target must be in \[0, 10\) or ignore_index \(-100\), got 10"):
        slothai.fused_linear_cross_entropy(x, w, torch.tensor([1, 10, 3, -100]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_target_out_of_range_cuda_is_nan_not_a_crash():
    x, w = torch.randn(4, 8, device="cuda"), torch.randn(10, 8, device="cuda")
    loss = slothai.fused_linear_cross_entropy(x, w, torch.tensor([1, 10, 3, -7], device="cuda"), reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(loss[3]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1000, 1001, 1028])  # multiple of 8; odd; multiple of 4 (vector path in fp32 only)
def test_cuda_matches_cpu_reference(dtype, vocab):
    (_, _, _, _), (x, w, b, t) = make(300, 64, vocab, dtype, "cpu", bias=True)
    outs = []
    for dev in ("cpu", "cuda"):
        xs, ws, bs = (a.detach().to(dev).requires_grad_() for a in (x, w, b))
        loss = slothai.fused_linear_cross_entropy(xs, ws, t.to(dev), bs, label_smoothing=0.05, chunk_size=64)
        loss.backward()
        outs.append([loss.float().cpu(), xs.grad.float().cpu(), ws.grad.float().cpu(), bs.grad.float().cpu()])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(*outs):
        assert (a - b).norm() / b.norm() < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1000, 1001])  # the 16-byte vector path (fp16 / bf16) and the scalar one
def test_cuda_matches_cpu_reference_at_infinities(dtype, vocab):
    # The CUDA kernel's online (max, sum of exp) must give the C reference's answers at
    # infinities: a -inf adds 0 even while a thread's running max is still -inf (here a
    # thread's whole share of the row is -inf), a +inf or a NaN makes the row NaN.
    (_, _, _, _), (x, w, b, t) = make(64, 32, vocab, dtype, "cpu", bias=True)
    b[:600] = -math.inf  # every thread's first elements, and whole shares of the row
    b[700] = -math.inf
    t[4:] = torch.where(t[4:] == -100, -100, 600 + t[4:] % 100)  # targets among the open tokens
    t[0], t[1] = 700, 5  # targets that are masked tokens: loss inf
    x[2, 0] = math.inf  # row 2: +-inf logits (NaN)
    x[3, 0] = math.nan
    outs = []
    for dev in ("cpu", "cuda"):
        for eps in (0.0, 0.1):
            xs, ws, bs = (a.detach().to(dev).requires_grad_() for a in (x, w, b))
            loss = slothai.fused_linear_cross_entropy(xs, ws, t.to(dev), bs, label_smoothing=eps, reduction="none",
                                                      chunk_size=16)
            loss.backward(torch.ones_like(loss))
            outs.append([loss.float().cpu(), xs.grad.float().cpu(), bs.grad.float().cpu()])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for cpu, cuda in zip(outs[:2], outs[2:]):
        for a, c in zip(cpu, cuda):
            torch.testing.assert_close(c, a, rtol=tol, atol=tol, equal_nan=True)
    assert torch.isfinite(outs[0][0][4:]).all() and torch.isinf(outs[0][0][:2]).all()


def _op_args(device, reduction, grads, bias=True, grad_rows=False):
    x, w = torch.randn(13, 8, device=device), torch.randn(21, 8, device=device)
    b = torch.randn(21, device=device) if bias else None
    t = torch.randint(0, 21, (13,), device=device)
    t[3] = -100
    g = torch.randn(13, device=device) if grad_rows else None
    if grads:
        x.requires_grad_()
        w.requires_grad_()
        if b is not None:
            b.requires_grad_()
    form = grads and (reduction != "none" or grad_rows)  # the gradients the op forms in this call
    return (x, w, b, t, g, -100, 0.1, 0.0, 1e-3, reduction, 4, form, form, form and bias, True)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("grads", [True, False])
def test_opcheck(device, reduction, grads):
    torch.library.opcheck(torch.ops.slothai.fused_ce.default, _op_args(device, reduction, grads))
    if reduction == "none":
        torch.library.opcheck(torch.ops.slothai.fused_ce.default, _op_args(device, "none", grads, grad_rows=True))


BAD_OP = [
    (r"reduction must be one of \['mean', 'none', 'sum'\], got 'avg'", ValueError, dict(reduction="avg")),
    ("with reduction 'none' need grad_rows", ValueError, dict(reduction="none", grad_hidden=True)),
    ("grad_bias is set but bias is None", ValueError, dict(bias=None, grad_bias=True)),
]


@pytest.mark.parametrize("msg,exc,change", BAD_OP, ids=[b[0][:30] for b in BAD_OP])
def test_op_bad_arguments(device, msg, exc, change):
    op = torch.ops.slothai.fused_ce.default
    names = [a.name for a in op._schema.arguments]
    args = dict(zip(names, _op_args(device, "mean", False)))
    args.update(change)
    with pytest.raises(exc, match=msg):
        op(**args)


def test_compile_no_graph_breaks_no_recompile_per_token_count(device, compile_counters):
    head = torch.nn.Linear(16, 50, bias=False, device=device)
    proj = torch.nn.Linear(16, 16, device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, t):
        return slothai.fused_linear_cross_entropy(torch.relu(proj(x)), head.weight, t)

    for n in [12, 17, 30, 45]:
        x = torch.randn(2, n, 16, device=device)
        t = torch.randint(0, 50, (2, n), device=device)
        loss = step(x, t)
        loss.backward()
        want = reference(torch.relu(proj(x)).double(), head.weight.double(), t)
        torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
    assert compile_counters["graph_break"] == {}
    assert compile_counters["stats"]["unique_graphs"] <= 2  # static first, then dynamic


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_compile_other_reductions_gradients(device, compile_counters, reduction):
    # none: backward calls the op again with per-row factors; sum: backward scales.
    x = torch.randn(2, 9, 16, device=device, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(40, 16, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    t = torch.randint(0, 40, (2, 9), device=device)
    t[0, 0] = -100
    g = torch.randn(2, 9, device=device) if reduction == "none" else torch.tensor(0.7, device=device)
    f = torch.compile(lambda x, w, b: slothai.fused_linear_cross_entropy(x, w, t, b, reduction=reduction) * g,
                      fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(f(x, w, b).sum(), (x, w, b))
    xs, ws, bs = (a.detach().double().requires_grad_() for a in (x, w, b))
    want = torch.autograd.grad((reference(xs, ws, t, bs, reduction=reduction) * g.double()).sum(), (xs, ws, bs))
    for a, e in zip(grads, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-6)
    assert compile_counters["graph_break"] == {}


def test_compile_inductor_training_step(device, compile_counters):
    head = torch.nn.Linear(16, 40, bias=False, device=device)
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    t = torch.randint(0, 40, (2, 9), device=device)
    f = torch.compile(lambda x, t: slothai.fused_linear_cross_entropy(x, head.weight, t), fullgraph=True)
    f(x, t).backward()
    gx = x.grad.clone()
    x.grad = None
    reference(x.double(), head.weight.double(), t).backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-6)
    assert compile_counters["graph_break"] == {}


def test_upstream_gradient_is_applied_in_fp32(device):
    # Gradients for loss * g must be g x those for loss, rounded once: scaling a
    # bf16 gradient by a bf16-rounded g would bias every element (1/3 -> +0.2%).
    (_, _, _, _), (x, w, _, t) = make(512, 32, 97, torch.bfloat16, device)
    grads = []
    for g in (1.0, 1.0 / 3.0):
        xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        (slothai.fused_linear_cross_entropy(xs, ws, t, chunk_size=128) * g).backward()
        grads.append((xs.grad.float(), ws.grad.float()))
    for a, b in zip(*grads):
        nz = a.abs() > 1e-6
        ratio = (b[nz] * 3 / a[nz]).mean().item()
        assert abs(ratio - 1) < 3e-4, ratio


# --- issue 34: no silent wrong answers ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_empty_accumulation_window_gives_zero_gradients(device, dtype, reduction):
    # A gradient-accumulation window with no counted token: transformers divides the
    # summed loss by num_items_in_batch = 0, so backward gets an upstream inf (NaN for
    # mean's 0/0). torch's cross-entropy leaves every gradient 0; so must we.
    (x, w, b, _), (xd, wd, bd, _) = make(5, 8, 11, dtype, device, bias=True)
    t = torch.full((5,), -100)
    mine = [a.requires_grad_() for a in (xd, wd, bd)]
    ref = [a.requires_grad_() for a in (x, w, b)]
    got = slothai.fused_linear_cross_entropy(xd, wd, t.to(device), bd, reduction=reduction)
    want = F.cross_entropy(x @ w.t() + b, t, reduction=reduction)
    for loss in (got, want):
        (loss.sum() / torch.tensor(0.0, device=loss.device)).backward()
    for a, e in zip(mine, ref):
        assert e.grad.abs().max() == 0  # what torch gives
        assert torch.equal(a.grad.cpu(), torch.zeros_like(a.grad.cpu())), a.grad
    # mean with no counted token and an ordinary upstream 1: NaN loss, zero gradients
    xm = xd.detach().clone().requires_grad_()
    loss = slothai.fused_linear_cross_entropy(xm, wd.detach(), t.to(device))
    loss.backward()
    assert torch.isnan(loss) and xm.grad.abs().max() == 0


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_ignored_rows_keep_zero_gradient_under_a_nan_upstream(device, reduction):
    # torch's cross-entropy never multiplies an ignored row by the upstream gradient:
    # it stays 0 while the counted rows turn NaN.
    (x, w, _, _), (xd, wd, _, _) = make(6, 8, 11, torch.float32, device)
    t = torch.tensor([3, -100, 5, -100, 0, 1])
    xd.requires_grad_(), x.requires_grad_()
    got = slothai.fused_linear_cross_entropy(xd, wd, t.to(device), reduction=reduction)
    want = F.cross_entropy(x @ w.t(), t, reduction=reduction)
    (got.sum() * float("nan")).backward()
    (want.sum() * float("nan")).backward()
    assert (x.grad[t == -100] == 0).all() and torch.isnan(x.grad[t != -100]).all()
    torch.testing.assert_close(xd.grad.double().cpu(), x.grad, equal_nan=True)


INF_CASES = [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-2), dict(softcap=3.0),
             dict(label_smoothing=0.2, z_loss=1e-3, softcap=2.0)]


@pytest.mark.parametrize("opts", INF_CASES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_minus_inf_logits_match_torch(device, opts, reduction):
    # A token masked out of the vocabulary by a -inf bias: torch's loss is finite (inf
    # with label smoothing, which averages log p over every token) and so is every
    # gradient; 0 * inf must not turn a term that is off into NaN.
    (x, w, b, _), (xd, wd, bd, _) = make(4, 6, 8, torch.float32, device, bias=True)
    t = torch.tensor([1, 5, -100, 2])  # one row's target is the masked token: loss inf there
    for bias in (b, bd):
        with torch.no_grad():
            bias[5] = -math.inf
    ref = [a.requires_grad_() for a in (x, w, b)]
    mine = [a.requires_grad_() for a in (xd, wd, bd)]
    got = slothai.fused_linear_cross_entropy(xd, wd, t.to(device), bd, reduction=reduction, **opts)
    want = reference(x, w, t, b, reduction=reduction, **opts)
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=2e-5, atol=1e-5, equal_nan=True)
    if reduction == "none" and not opts.get("label_smoothing"):  # smoothing: inf, as torch
        assert torch.isfinite(got[[0, 3]]).all() and got[2] == 0
    g = torch.randn_like(want)
    (got * g.to(got)).sum().backward()
    (want * g).sum().backward()
    for a, e in zip(mine, ref):
        assert torch.isfinite(e.grad).all()
        torch.testing.assert_close(a.grad.double().cpu(), e.grad, rtol=1e-4, atol=1e-5)


def test_fp16_logits_overflowing_to_minus_inf_match_torch(device):
    # fp16 logits past -65504 round to -inf in the GEMM; torch's loss on those logits is finite.
    x = torch.randn(6, 8, dtype=torch.float64)
    w = torch.randn(9, 8, dtype=torch.float64)
    w[:, 0], w[4] = 0.0, 0.0
    x[:, 0], w[4, 0] = 300.0, -400.0  # logit 4 of every row: -120000 -> -inf in fp16, the others as drawn
    t = torch.tensor([0, 1, 2, 3, 5, 8])
    xh, wh = x.half(), w.half()
    assert torch.isneginf(xh @ wh.t())[:, 4].all()
    xd, wd = xh.clone().to(device).requires_grad_(), wh.clone().to(device).requires_grad_()
    got = slothai.fused_linear_cross_entropy(xd, wd, t.to(device), reduction="none")
    xr, wr = xh.double().requires_grad_(), wh.double().requires_grad_()
    z = (xr @ wr.t()).half().double()  # torch on the fp16 logits, in float64
    want = F.cross_entropy(z, t, reduction="none")
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-2, atol=1e-2)
    want.sum().backward()
    got.sum().backward()
    assert torch.isfinite(xd.grad).all() and torch.isfinite(wd.grad).all()
    torch.testing.assert_close(xd.grad.double().cpu(), xr.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_raises_instead_of_a_wrong_number(device, reduction):
    # Its gradients have no graph of their own (the sum / mean path forms them in the
    # forward): a backward asking for one (create_graph=True) raises, where before it
    # returned gradients that a gradient penalty then took as constants.
    (_, _, _, _), (x, w, b, t) = make(7, 5, 9, torch.float32, device, bias=True)
    for a in (x, w, b):
        a.requires_grad_()
    loss = slothai.fused_linear_cross_entropy(x, w, t, b, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="fused_linear_cross_entropy has no double backward.*create_graph"):
        torch.autograd.grad(loss, (x, w, b), create_graph=True)
    loss = slothai.fused_linear_cross_entropy(x, w.detach(), t, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="fused_linear_cross_entropy has no double backward"):
        loss.backward(create_graph=True)
    # retain_graph alone is fine
    loss = slothai.fused_linear_cross_entropy(x, w, t, b, reduction=reduction).sum()
    first = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    assert all(torch.equal(a, e) for a, e in zip(first, torch.autograd.grad(loss, (x, w, b))))


@pytest.mark.parametrize("chunk_size,exc", [(-1, ValueError), (0, ValueError), (2**63, ValueError),
                                            (2**64, ValueError), ("big", TypeError), (2.5, TypeError),
                                            (8.0, TypeError), (True, TypeError)])
def test_bad_chunk_size_is_named(device, chunk_size, exc):
    x, w, t = torch.randn(4, 8, device=device), torch.randn(10, 8, device=device), torch.tensor([1, 2, 3, 4])
    with pytest.raises(exc, match="chunk_size"):
        slothai.fused_linear_cross_entropy(x, w, t.to(device), chunk_size=chunk_size)
    with pytest.raises(exc, match="chunk_size"):
        slothai.chunked_linear_loss(x, w, t.to(device), lambda z, y: F.cross_entropy(z, y, reduction="none"),
                                    chunk_size=chunk_size)


def test_huge_chunk_size_is_one_chunk(device):
    (_, _, _, _), (x, w, _, t) = make(9, 8, 12, torch.float32, device)
    want = slothai.fused_linear_cross_entropy(x, w, t)
    torch.testing.assert_close(slothai.fused_linear_cross_entropy(x, w, t, chunk_size=2**63 - 1), want)
    torch.testing.assert_close(slothai.chunked_linear_loss(
        x, w, t, lambda z, y: F.cross_entropy(z, y, reduction="none"), chunk_size=2**63 - 1), want)


@pytest.mark.parametrize("softcap", [math.inf, math.nan, 0.0])
def test_softcap_must_be_finite_and_positive(device, softcap):
    x, w, t = torch.randn(4, 8, device=device), torch.randn(10, 8, device=device), torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="softcap must be a positive finite number or None"):
        slothai.fused_linear_cross_entropy(x, w, t.to(device), softcap=softcap)


BAD_OP_34 = [
    ("grad_rows must be 1-D with 1 or 13 values, got shape \\[13, 1\\]", ValueError,
     dict(reduction="none", grad_rows="2d", grad_hidden=True)),
    ("softcap must be finite and positive", ValueError, dict(softcap=math.inf)),
    ("softcap must be finite and positive", ValueError, dict(softcap=math.nan)),
    ("z_loss must be finite", ValueError, dict(z_loss=math.nan)),
]


@pytest.mark.parametrize("msg,exc,change", BAD_OP_34, ids=[b[0][:30] for b in BAD_OP_34])
def test_op_rejects_bad_scalars_and_grad_rows(device, msg, exc, change):
    op = torch.ops.slothai.fused_ce.default
    names = [a.name for a in op._schema.arguments]
    args = dict(zip(names, _op_args(device, "mean", False)))
    if change.get("grad_rows") == "2d":
        change = dict(change, grad_rows=torch.randn(13, 1, device=device))
    args.update(change)
    with pytest.raises(exc, match=msg):
        op(**args)


def test_compiled_empty_window_gives_zero_gradients(device, compile_counters):
    # Under torch.compile backward scales out of place (one traced expression): an exact
    # 0 stays 0 there too when the count it divides by is 0.
    w = torch.randn(11, 8, device=device, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, t, count):
        return slothai.fused_linear_cross_entropy(x, w, t, reduction="sum") / count

    x = torch.randn(5, 8, device=device, requires_grad=True)
    loss = step(x, torch.full((5,), -100, device=device), torch.tensor(0.0, device=device))
    loss.backward()
    assert torch.isnan(loss)
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
