"""fused_linear_cross_entropy's options and outputs past the plain loss (issue 33): class
weights (ce_weight), token scaling, the z-loss term, token accuracy and predicted tokens,
against torch on the full logits in float64 (and the obvious formulas for the extra outputs),
gradients included; Liger-Kernel's API on top (slothai.ops.liger)."""
import ast
import importlib.util
import inspect
import math
import os

import pytest
import torch
import torch.nn.functional as F

import slothai
from slothai.ops.liger import CrossEntropyOutput, LigerFusedLinearCrossEntropyLoss, liger_fused_linear_cross_entropy

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-2, 3e-2), torch.float16: (5e-3, 1e-2)}
# How far below the row's max (relative to it) a logit rounded to the dtype by a different
# GEMM may still be its argmax: the reference's rounding and the op's can differ by an ulp.
ARGMAX_TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}
RETURNS = dict(return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True)


def reference(x, w, t, b=None, *, ce_weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              softcap=None, z_loss=0.0, use_token_scaling=False, dtype=torch.float64):
    """(loss, z loss, token accuracy, predicted tokens, the logits seen) in float64 on the full
    logits, rounded to `dtype` first as the GEMM writes them. The loss is torch's cross_entropy
    (weight=ce_weight) per row plus z_loss * lse^2 per counted row, times the detached p_t with
    token scaling; mean divides the class-weighted part by the counted rows' w_t and the z-loss
    part by their count (Liger's convention)."""
    z = x @ w.t() + (b if b is not None else 0)
    z = z.to(dtype).double()
    v = w.shape[0]
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z.reshape(-1, v)
    tt = t.reshape(-1)
    counted = tt != ignore_index
    safe = tt.masked_fill(~counted, 0)
    cw = None if ce_weight is None else ce_weight.double()
    ce = F.cross_entropy(z, tt, weight=cw, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    zl = z_loss * torch.logsumexp(z, -1) ** 2 * counted if z_loss else torch.zeros_like(ce)
    s = torch.softmax(z, -1).gather(1, safe[:, None])[:, 0].detach() if use_token_scaling else 1.0
    ce, zl = ce * s, zl * s
    pred = z.detach().argmax(-1).masked_fill(~counted, -1)
    acc = (pred == tt).double()
    n = counted.sum()
    if reduction == "none":
        return (ce + zl).view(t.shape), zl.view(t.shape), acc.view(t.shape), pred.view(t.shape), z.detach()
    if reduction == "sum":
        return ce.sum() + zl.sum(), zl.sum(), acc.sum() / n, pred.view(t.shape), z.detach()
    weighed = cw[safe][counted].sum() if cw is not None else n
    return ce.sum() / weighed + zl.sum() / n, zl.sum() / n, acc.sum() / n, pred.view(t.shape), z.detach()


def make(tokens, h, v, dtype, device, *, bias=False, ignore_index=-100, weights=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, h, generator=g, dtype=torch.float64) * 0.7
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, tokens, generator=g)
    t[torch.rand(tokens, generator=g) < 0.15] = ignore_index
    cw = torch.rand(v, generator=g, dtype=torch.float64) * 2 if weights else None
    rounded = [None if a is None else a.to(dtype) for a in (x, w, b)]  # both sides start from these values
    ref = [None if a is None else a.double() for a in rounded]
    mine = [None if a is None else a.to(device) for a in rounded]
    return ref, mine, t, cw


def check_argmax(pred, z, counted, dtype):
    """pred (the op's) against torch.argmax on the reference logits z: exact where the row's
    top two are further apart than the rounding of the two GEMMs can move them, else a
    maximum up to that rounding; -1 on ignored rows."""
    pred = pred.reshape(-1).cpu()
    assert pred.dtype == torch.int64
    assert (pred[~counted] == -1).all()
    zc, pc = z[counted], pred[counted]
    if zc.numel() == 0:
        return
    top = zc.topk(min(2, zc.shape[1]), -1).values
    tol = ARGMAX_TOL[dtype] * top[:, 0].abs().clamp_min(1)
    assert (zc.gather(1, pc[:, None])[:, 0] >= top[:, 0] - tol).all()
    clear = top[:, 0] - top[:, -1] > tol if zc.shape[1] > 1 else torch.ones_like(tol, dtype=torch.bool)
    assert torch.equal(pc[clear], zc.argmax(-1)[clear])


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [((1,), 3, 1), ((37,), 24, 131), ((3, 11), 16, 128), ((5,), 7, 517)]
OPTIONS = [dict(), dict(ce_weight=True), dict(ce_weight=True, label_smoothing=0.1), dict(ce_weight=True, z_loss=1e-2),
           dict(use_token_scaling=True), dict(use_token_scaling=True, label_smoothing=0.1, softcap=2.5, z_loss=1e-2),
           dict(ce_weight=True, label_smoothing=0.2, softcap=5.0, z_loss=1e-2, use_token_scaling=True),
           dict(ce_weight=True, ignore_index=7, frozen=True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch(device, dtype, shape, opts, reduction):
    opts = dict(opts)
    tokens, h, v = shape
    frozen, weights = opts.pop("frozen", False), opts.pop("ce_weight", False)
    ignore = opts.get("ignore_index", -100)
    (x, w, b), (xd, wd, bd), t, cw = make(tokens, h, v, dtype, device, bias=not opts, ignore_index=ignore,
                                          weights=weights)
    for a in (x, w, b, xd, wd, bd):
        if a is not None:
            a.requires_grad_()
    if frozen:
        w.requires_grad_(False), wd.requires_grad_(False)
    got = slothai.fused_linear_cross_entropy(xd, wd, t.to(device), bd, chunk_size=8, reduction=reduction,
                                             ce_weight=None if cw is None else cw.to(device, torch.float32),
                                             **opts, **RETURNS)
    want = reference(x, w, t, b, ce_weight=None if cw is None else cw.float(), reduction=reduction, dtype=dtype,
                     **opts)
    assert isinstance(got, CrossEntropyOutput)
    rtol, atol = TOL[dtype]
    for name, mine, ref in (("loss", got.loss, want[0]), ("z_loss", got.z_loss, want[1])):
        assert mine.dtype == torch.float32 and mine.shape == ref.shape, name
        torch.testing.assert_close(mine.double().cpu(), ref.detach(), rtol=rtol, atol=atol, msg=name)
    counted = t.reshape(-1) != ignore
    check_argmax(got.predicted_tokens, want[4], counted, dtype)
    assert got.predicted_tokens.shape == t.shape and got.token_accuracy.shape == want[2].shape
    # the accuracy is that of the op's own argmax (checked above against torch's)
    hits = ((got.predicted_tokens.reshape(-1).cpu() == t.reshape(-1)) & counted).double()
    own = hits.view(t.shape) if reduction == "none" else hits.sum() / counted.sum()
    torch.testing.assert_close(got.token_accuracy.double().cpu(), own, equal_nan=True)
    if dtype == torch.float32:
        torch.testing.assert_close(got.token_accuracy.double().cpu(), want[2], equal_nan=True)

    up = torch.randn(want[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (got.loss.double().cpu() * up).sum().backward()
    (want[0] * up).sum().backward()
    for mine, ref in ((xd, x), (wd, w), (bd, b)):
        if ref is None or not ref.requires_grad:
            assert mine is None or mine.grad is None
            continue
        assert mine.grad is not None and mine.grad.dtype == dtype
        err = (mine.grad.double().cpu() - ref.grad).norm()
        assert err <= 3 * rtol * ref.grad.norm() + atol, f"gradient error {err:.2e} of norm {ref.grad.norm():.2e}"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_asking_for_outputs_leaves_the_loss_and_gradients_as_they_are(device, reduction):
    (_, _, _), (x, w, b), t, _ = make((29,), 16, 97, torch.bfloat16, device, bias=True)
    results = []
    for returns in ({}, RETURNS):
        xs, ws, bs = (a.detach().clone().requires_grad_() for a in (x, w, b))
        out = slothai.fused_linear_cross_entropy(xs, ws, t.to(device), bs, reduction=reduction, chunk_size=8,
                                                 z_loss=1e-3, **returns)
        loss = out.loss if returns else out
        loss.backward(torch.ones_like(loss))
        results.append((loss.detach(), xs.grad, ws.grad, bs.grad))
    for a, e in zip(*results):
        assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("plant", ["ties", "nan", "plus_inf", "minus_inf_and_ties", "all_minus_inf"])
def test_argmax_ties_and_non_finite_logits_as_torch_argmax(device, dtype, plant):
    # Small integers: every logit is exact in every dtype and whatever the GEMM's order, so
    # the op's argmax must be torch.argmax's exactly: the lowest index among equal maxima, a
    # NaN above everything (the first NaN), +inf above the numbers, all -inf gives 0.
    g = torch.Generator().manual_seed(3)
    n, h, v = 23, 4, 19
    x = torch.randint(-2, 3, (n, h), generator=g).to(dtype)
    w = torch.randint(-1, 2, (v, h), generator=g).to(dtype)
    b = torch.zeros(v, dtype=dtype)
    w[7], w[12] = w[3], w[3]  # columns 3, 7, 12 always tie
    if plant == "nan":
        b[5], b[9], b[2] = math.nan, math.nan, math.inf
    elif plant == "plus_inf":
        b[11], b[4] = math.inf, math.inf
    elif plant == "minus_inf_and_ties":
        b[0], b[3] = -math.inf, -math.inf
    elif plant == "all_minus_inf":
        b[:] = -math.inf
    z = (x.double() @ w.double().t() + b.double())
    t = z.argmax(-1)
    t[::3] = (t[::3] + 1) % v  # some rows hit, some miss
    t[1] = -100
    got = slothai.fused_linear_cross_entropy(x.to(device), w.to(device), t.to(device), b.to(device),
                                             reduction="none", chunk_size=5, **RETURNS)
    want = z.argmax(-1).masked_fill(t == -100, -1)
    assert torch.equal(got.predicted_tokens.cpu(), want), (got.predicted_tokens, want)
    assert torch.equal(got.token_accuracy.cpu(), ((want == t) & (t != -100)).float())


def test_ignored_and_bad_rows_outputs(device):
    (_, _, _), (x, w, _), _, _ = make((6,), 8, 11, torch.float32, device)
    t = torch.full((6,), -100, device=device)
    for reduction, loss, z, acc in (("mean", math.nan, math.nan, math.nan), ("sum", 0.0, 0.0, math.nan)):
        out = slothai.fused_linear_cross_entropy(x, w, t, reduction=reduction, z_loss=1e-2, **RETURNS)
        for got, want in ((out.loss, loss), (out.z_loss, z), (out.token_accuracy, acc)):
            assert got.shape == () and (math.isnan(want) and torch.isnan(got) or got.item() == want)
        assert (out.predicted_tokens == -1).all()
    out = slothai.fused_linear_cross_entropy(x, w, t, reduction="none", z_loss=1e-2, **RETURNS)
    assert not out.loss.any() and not out.z_loss.any() and not out.token_accuracy.any()
    assert (out.predicted_tokens == -1).all()


def test_ce_weight_semantics_spelled_out(device):
    # The class weights scale a row by w[target] and mean divides by the counted rows' sum of
    # w[target]: one class weighted 0 takes its rows out of both; doubling every weight
    # changes nothing under mean and doubles sum.
    (x, w, _), (xd, wd, _), t, _ = make((40,), 8, 13, torch.float32, device)
    cw = torch.ones(13, device=device)
    cw[t[0]] = 0.0
    keep = (t != t[0]) & (t != -100)
    got = slothai.fused_linear_cross_entropy(xd, wd, t.to(device), ce_weight=cw)
    plain = slothai.fused_linear_cross_entropy(xd[keep.to(device)], wd, t[keep].to(device))
    torch.testing.assert_close(got, plain)
    for reduction, factor in (("mean", 1.0), ("sum", 2.0)):
        one = slothai.fused_linear_cross_entropy(xd, wd, t.to(device), ce_weight=cw, reduction=reduction)
        two = slothai.fused_linear_cross_entropy(xd, wd, t.to(device), ce_weight=2 * cw, reduction=reduction)
        torch.testing.assert_close(two, factor * one)


def test_bad_ce_weight_is_named(device):
    x, w, t = torch.randn(4, 8, device=device), torch.randn(10, 8, device=device), torch.tensor([1, 2, 3, 4])
    t = t.to(device)
    with pytest.raises(ValueError, match=r"ce_weight must have shape \(10,\) \(one weight per class\), got \[9\]"):
        slothai.fused_linear_cross_entropy(x, w, t, ce_weight=torch.ones(9, device=device))
    with pytest.raises(ValueError, match=r"ce_weight must have shape \(10,\).*got \[10, 1\]"):
        slothai.fused_linear_cross_entropy(x, w, t, ce_weight=torch.ones(10, 1, device=device))
    with pytest.raises(TypeError, match="ce_weight must be a floating-point tensor, got int64"):
        slothai.fused_linear_cross_entropy(x, w, t, ce_weight=torch.ones(10, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="ce_weight must be a tensor of class weights"):
        slothai.fused_linear_cross_entropy(x, w, t, ce_weight=[1.0] * 10)
    with pytest.raises(ValueError, match="ce_weight requires grad"):
        slothai.fused_linear_cross_entropy(x, w, t, ce_weight=torch.ones(10, device=device, requires_grad=True))
    with torch.no_grad():  # no gradient asked for: fine
        slothai.fused_linear_cross_entropy(x, w, t, ce_weight=torch.ones(10, device=device, requires_grad=True))
    # any float dtype is taken (as Liger's), read in fp32
    want = slothai.fused_linear_cross_entropy(x, w, t, ce_weight=torch.full((10,), 0.5, device=device))
    for dtype in (torch.float64, torch.bfloat16):
        got = slothai.fused_linear_cross_entropy(x, w, t, ce_weight=torch.full((10,), 0.5, device=device, dtype=dtype))
        torch.testing.assert_close(got, want)
    if torch.cuda.is_available():
        other = "cuda" if device == "cpu" else "cpu"
        with pytest.raises(ValueError, match=f"ce_weight must be on {device}"):
            slothai.fused_linear_cross_entropy(x, w, t, ce_weight=torch.ones(10, device=other))


def _op_args(device, reduction, grads, grad_rows=False, **change):
    x, w = torch.randn(13, 8, device=device), torch.randn(21, 8, device=device)
    b, cw = torch.randn(21, device=device), torch.rand(21, device=device)
    t = torch.randint(0, 21, (13,), device=device)
    t[3] = -100
    g = torch.randn(13, device=device) if grad_rows else None
    if grads:
        for a in (x, w, b):
            a.requires_grad_()
    form = grads and (reduction != "none" or grad_rows)
    names = [a.name for a in torch.ops.slothai.fused_ce.default._schema.arguments]
    args = dict(zip(names, (x, w, b, t, g, -100, 0.1, 3.0, 1e-3, reduction, 4, form, form, form, True, cw, True,
                            True, True, True)))
    args.update(change)
    return tuple(args.values())


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("grads", [True, False])
def test_opcheck_with_options(device, reduction, grads):
    op = torch.ops.slothai.fused_ce.default
    torch.library.opcheck(op, _op_args(device, reduction, grads))
    torch.library.opcheck(op, _op_args(device, reduction, grads, return_z_loss=False, return_predicted_tokens=False))
    if reduction == "none":
        torch.library.opcheck(op, _op_args(device, "none", grads, grad_rows=True))


def test_compile_returns_outputs_without_graph_breaks_or_recompiles(device, compile_counters):
    head = torch.nn.Linear(16, 50, bias=False, device=device)
    proj = torch.nn.Linear(16, 16, device=device)
    cw = torch.rand(50, device=device)

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=True)
    def step(x, t):  # returns the CrossEntropyOutput itself
        return slothai.fused_linear_cross_entropy(torch.relu(proj(x)), head.weight, t, ce_weight=cw, z_loss=1e-3,
                                                  use_token_scaling=True, **RETURNS)

    for n in [12, 17, 30, 45]:
        x = torch.randn(2, n, 16, device=device)
        t = torch.randint(0, 50, (2, n), device=device)
        t[0, :3] = -100
        out = step(x, t)
        assert isinstance(out, CrossEntropyOutput)
        loss, z, acc, pred = out.loss, out.z_loss, out.token_accuracy, out.predicted_tokens
        loss.backward()
        want = slothai.fused_linear_cross_entropy(torch.relu(proj(x)), head.weight, t, ce_weight=cw, z_loss=1e-3,
                                                  use_token_scaling=True, **RETURNS)
        for a, e in zip((loss, z, acc, pred), (want.loss, want.z_loss, want.token_accuracy, want.predicted_tokens)):
            torch.testing.assert_close(a, e)
        assert pred.shape == (2, n)
    assert compile_counters["graph_break"] == {}
    assert compile_counters["stats"]["unique_graphs"] == 1  # one graph for every size


def test_compile_reduction_none_backward_with_options(device, compile_counters):
    # reduction none: backward calls the op again with the class weights and token scaling.
    (x, w, b), (xd, wd, bd), t, cw = make((2, 9), 16, 40, torch.float32, device, bias=True, weights=True)
    g = torch.randn(2, 9, dtype=torch.float64)
    opts = dict(ce_weight=cw.float().to(device), use_token_scaling=True, label_smoothing=0.1, reduction="none")
    f = torch.compile(lambda x, w, b: slothai.fused_linear_cross_entropy(x, w, t.to(device), b, **opts),
                      fullgraph=True, backend="aot_eager")
    mine = [a.requires_grad_() for a in (xd, wd, bd)]
    grads = torch.autograd.grad((f(*mine) * g.float().to(device)).sum(), mine)
    ref = [a.requires_grad_() for a in (x, w, b)]
    want = torch.autograd.grad((reference(*ref[:2], t, ref[2], ce_weight=cw.float(), use_token_scaling=True,
                                          label_smoothing=0.1, reduction="none")[0] * g).sum(), ref)
    for a, e in zip(grads, want):
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-4, atol=1e-6)
    assert compile_counters["graph_break"] == {}


def test_module_form_takes_the_options(device):
    (_, _, _), (x, w, _), t, cw = make((9,), 8, 12, torch.float32, device, weights=True)
    cw = cw.float().to(device)
    loss_fn = slothai.FusedLinearCrossEntropyLoss(ce_weight=cw, use_token_scaling=True, return_token_accuracy=True)
    got = loss_fn(x, w, t.to(device))
    want = slothai.fused_linear_cross_entropy(x, w, t.to(device), ce_weight=cw, use_token_scaling=True,
                                              return_token_accuracy=True)
    assert got == want


# --- Liger-Kernel's API (slothai.ops.liger) ----------------------------------------------------

# Liger-Kernel 0.8.5's signatures (liger_kernel/transformers/functional.py and
# fused_linear_cross_entropy.py), as the names users' code passes.
LIGER_FUNCTION = ("input", "weight", "target", "bias=None", "ce_weight=None", "ignore_index=-100",
                  "lse_square_scale=0.0", "label_smoothing=0.0", "reduction='mean'", "softcap=None",
                  "return_z_loss=False", "accum_dtype=None", "use_token_scaling=False", "return_token_accuracy=False",
                  "return_predicted_tokens=False", "chunk_mem_const=1")
LIGER_MODULE_INIT = ("ce_weight=None", "ignore_index=-100", "lse_square_scale=0.0", "label_smoothing=0.0",
                     "reduction='mean'", "softcap=None", "return_z_loss=False", "accum_dtype=None",
                     "use_token_scaling=False", "return_token_accuracy=False", "return_predicted_tokens=False")
LIGER_MODULE_FORWARD = ("lin_weight", "_input", "target", "bias=None")
LIGER_OUTPUT_FIELDS = ("loss", "z_loss", "token_accuracy", "predicted_tokens")


def _params(fn, skip_self=False):
    params = list(inspect.signature(fn).parameters.values())[int(skip_self):]
    return tuple(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params)


def test_liger_api_has_liger_signatures():
    import dataclasses

    assert _params(liger_fused_linear_cross_entropy) == LIGER_FUNCTION
    assert _params(LigerFusedLinearCrossEntropyLoss.__init__, skip_self=True) == LIGER_MODULE_INIT
    assert _params(LigerFusedLinearCrossEntropyLoss.forward, skip_self=True) == LIGER_MODULE_FORWARD
    assert tuple(f.name for f in dataclasses.fields(CrossEntropyOutput)) == LIGER_OUTPUT_FIELDS


def _liger_source(relative):
    spec = importlib.util.find_spec("liger_kernel")  # finds the package without importing it (nor triton)
    if spec is None:
        pytest.skip("liger-kernel is not installed")
    with open(os.path.join(os.path.dirname(spec.origin), relative)) as f:
        return ast.parse(f.read())


def _ast_params(fn, skip_self=False):
    args = fn.args.args[int(skip_self):]
    defaults = [None] * (len(args) - len(fn.args.defaults)) + fn.args.defaults
    return tuple(a.arg if d is None else f"{a.arg}={ast.literal_eval(d)!r}" for a, d in zip(args, defaults))


def test_recorded_signatures_are_the_installed_liger_kernels():
    # Where liger-kernel is installed (its Python files are read, not imported: it needs
    # Triton), the signatures recorded above are its own.
    functional = _liger_source("transformers/functional.py")
    module = _liger_source("transformers/fused_linear_cross_entropy.py")
    fns = {n.name: n for n in ast.walk(functional) if isinstance(n, ast.FunctionDef)}
    classes = {n.name: n for n in ast.walk(module) if isinstance(n, ast.ClassDef)}
    assert _ast_params(fns["liger_fused_linear_cross_entropy"]) == LIGER_FUNCTION
    methods = {n.name: n for n in classes["LigerFusedLinearCrossEntropyLoss"].body if isinstance(n, ast.FunctionDef)}
    assert _ast_params(methods["__init__"], skip_self=True) == LIGER_MODULE_INIT
    assert _ast_params(methods["forward"], skip_self=True) == LIGER_MODULE_FORWARD
    output = next(n for n in ast.walk(functional) if isinstance(n, ast.ClassDef) and n.name == "CrossEntropyOutput")
    assert tuple(s.target.id for s in output.body if isinstance(s, ast.AnnAssign)) == LIGER_OUTPUT_FIELDS


def test_liger_api_gives_slothais_numbers(device):
    (_, _, _), (x, w, b), t, cw = make((21,), 8, 30, torch.bfloat16, device, bias=True, weights=True)
    cw, t = cw.float().to(device), t.to(device)
    opts = dict(ce_weight=cw, label_smoothing=0.1, softcap=20.0, use_token_scaling=True, **RETURNS)
    results = []
    for call in ("slothai", "function", "module"):
        xs, ws, bs = (a.detach().clone().requires_grad_() for a in (x, w, b))
        if call == "slothai":
            out = slothai.fused_linear_cross_entropy(xs, ws, t, bs, z_loss=1e-3, fp32_weight_grad=False, **opts)
        elif call == "function":
            out = liger_fused_linear_cross_entropy(xs, ws, t, bs, lse_square_scale=1e-3, **opts)
        else:
            out = LigerFusedLinearCrossEntropyLoss(lse_square_scale=1e-3, **opts)(ws, xs, t, bs)
        out.loss.backward()
        results.append([out.loss, out.z_loss, out.token_accuracy, out.predicted_tokens, xs.grad, ws.grad, bs.grad])
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert torch.equal(a, e)
    # without a return flag, the loss alone; accum_dtype float32: dW summed in fp32
    loss = liger_fused_linear_cross_entropy(x, w, t, accum_dtype=torch.float32)
    assert isinstance(loss, torch.Tensor) and torch.equal(loss, slothai.fused_linear_cross_entropy(x, w, t))


def test_liger_api_refuses_what_liger_refuses():
    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="chunk_mem_const must be a positive integer"):
        liger_fused_linear_cross_entropy(x, w, t, chunk_mem_const=0)
    with pytest.raises(TypeError, match="return_z_loss must be True or False"):
        liger_fused_linear_cross_entropy(x, w, t, return_z_loss=1)
    with pytest.raises(ValueError, match="accum_dtype must be None"):
        liger_fused_linear_cross_entropy(x, w, t, accum_dtype=torch.float64)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        LigerFusedLinearCrossEntropyLoss(label_smoothing=2.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        LigerFusedLinearCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="softcap must be positive"):
        LigerFusedLinearCrossEntropyLoss(softcap=0.0)


def _real_liger():
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
    except Exception:  # noqa: BLE001  (not installed, or no Triton)
        return None
    return liger


@pytest.mark.skipif(_real_liger() is None, reason="needs CUDA and liger-kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", [dict(), dict(ce_weight=True), dict(ce_weight=True, label_smoothing=0.1),
                                  dict(ce_weight=True, lse_square_scale=1e-3, use_token_scaling=True, softcap=20.0),
                                  dict(use_token_scaling=True, label_smoothing=0.05)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_switching_from_liger_by_import_gives_liger_answers(dtype, opts, reduction):
    # The switch the docs promise: the same call on Liger-Kernel itself and on slothai.ops.liger.
    liger = _real_liger()
    opts = dict(opts)
    (_, _, _), (x, w, _), t, cw = make((300,), 64, 1000, dtype, "cuda", weights=opts.pop("ce_weight", False))
    if cw is not None:
        opts["ce_weight"] = cw.float().cuda()
    t = t.cuda()
    outs = []
    for fn in (liger, liger_fused_linear_cross_entropy):
        xs, ws = (a.detach().clone().requires_grad_() for a in (x, w))
        out = fn(xs, ws, t, reduction=reduction, accum_dtype=torch.float32, **opts, **RETURNS)
        out.loss.backward(torch.ones_like(out.loss))
        outs.append([out.loss.float(), out.z_loss.float(), out.token_accuracy, out.predicted_tokens,
                     xs.grad.float(), ws.grad.float()])
    # The exact values (float64 on the bf16 / fp32 logits), for where the two part.
    x64, w64 = (a.detach().double().requires_grad_() for a in (x, w))
    ref = reference(x64, w64, t, ce_weight=opts.get("ce_weight"), reduction=reduction, dtype=dtype,
                    label_smoothing=opts.get("label_smoothing", 0.0), softcap=opts.get("softcap"),
                    z_loss=opts.get("lse_square_scale", 0.0), use_token_scaling=opts.get("use_token_scaling", False))
    ref[0].backward(torch.ones_like(ref[0]))
    exact = {"loss": ref[0].detach(), "z_loss": ref[1], "grad x": x64.grad, "grad w": w64.grad}
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, e in zip(("loss", "z_loss", "accuracy", "predicted", "grad x", "grad w"), outs[1], outs[0]):
        if name == "predicted":  # near-ties may round apart between the two GEMMs
            assert (a == e).float().mean() > 0.99, name
        elif name == "accuracy":  # the same, counted: at most 1% of the tokens' hits apart
            assert ((a == e).float().mean() > 0.99) if reduction == "none" else (a - e).abs() <= 0.01, name
        else:
            # Liger's answer, or, where it rounds more than we do, nearer the exact value than it.
            # (bf16 with token scaling under a softcap: Liger takes p_t from a bf16 tanh and softmax
            # of the chunk, up to ~5% off per token, ~2% in the loss vector's norm.)
            ex = exact[name].float()
            ours_nearer = (a - ex).norm() <= min(tol * ex.norm() + 1e-6, (e - ex).norm())
            assert (a - e).norm() <= tol * e.norm() + 1e-6 or ours_nearer, \
                (name, (a - e).norm(), e.norm(), (a - ex).norm(), (e - ex).norm())


# --- CUDA against the C reference ------------------------------------------------------------


# The row kernel's 16-byte vector path (a vocabulary that is a multiple of 8 for fp16 / bf16,
# of 4 for fp32) and its scalar path, for each dtype.
CUDA_CASES = [(torch.bfloat16, 1000), (torch.bfloat16, 1001), (torch.float16, 1000), (torch.float16, 1001),
              (torch.float32, 1028), (torch.float32, 1001)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,vocab", CUDA_CASES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_matches_cpu_reference_with_options(dtype, vocab, opts, reduction):
    opts = dict(opts)
    frozen, weights = opts.pop("frozen", False), opts.pop("ce_weight", False)
    ignore = opts.get("ignore_index", -100)
    (xr, wr, br), (x, w, b), t, cw = make((300,), 64, vocab, dtype, "cpu", bias=True, weights=weights,
                                          ignore_index=ignore)
    ref = reference(xr, wr, t, br, ce_weight=None if cw is None else cw.float(), reduction=reduction, dtype=dtype,
                    **opts)
    counted = t != ignore
    outs = []
    for dev in ("cpu", "cuda"):
        xs, ws, bs = (a.detach().to(dev).requires_grad_(not (frozen and a is w)) for a in (x, w, b))
        out = slothai.fused_linear_cross_entropy(xs, ws, t.to(dev), bs, chunk_size=64, reduction=reduction,
                                                 ce_weight=None if cw is None else cw.float().to(dev),
                                                 **opts, **RETURNS)
        out.loss.backward(torch.ones_like(out.loss))
        # each device's argmax against torch's on the float64 logits (the two GEMMs may round
        # a near-tie apart), and its accuracy against its own argmax
        check_argmax(out.predicted_tokens, ref[4], counted, dtype)
        hits = ((out.predicted_tokens.cpu() == t) & counted).float()
        own = hits if reduction == "none" else hits.sum() / counted.sum()
        torch.testing.assert_close(out.token_accuracy.cpu(), own)
        outs.append([out.loss.float().cpu(), out.z_loss.cpu(), xs.grad.float().cpu(), bs.grad.float().cpu()] +
                    ([] if frozen else [ws.grad.float().cpu()]))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for i, (a, c) in enumerate(zip(*outs)):
        assert (a - c).norm() <= tol * c.norm() + 1e-6, (i, (a - c).norm(), c.norm())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1000, 1001])  # the 16-byte vector path and the scalar one
@pytest.mark.parametrize("plant", ["ties", "nan"])
def test_cuda_argmax_across_threads_ties_and_nan(dtype, vocab, plant):
    # Exact (small integer) logits whose maxima sit in different threads and warps of a row's
    # block: equal maxima at columns 7, 500, 900 (and 600, 950 in some rows); with "nan", NaNs
    # late in the row (990, 995) and a +inf early (5): the first NaN wins, found by the extra
    # read of a row whose sum came out NaN.
    n = 64
    x = torch.zeros(n, 2, dtype=dtype)
    x[:, 0] = 1.0
    x[:, 1] = torch.arange(n) % 8
    w = torch.zeros(vocab, 2, dtype=dtype)
    w[:, 0] = -1.0
    w[[7, 500, 900], 0] = 3.0
    w[[600, 950], 1] = 1.0  # rows with r % 8 >= 3: as high as the three (3) or higher -> 600 above 3
    w[[600, 950], 0] = 0.0
    b = torch.zeros(vocab, dtype=dtype)
    if plant == "nan":
        b[990], b[995], b[5] = math.nan, math.nan, math.inf
    t = torch.randint(0, vocab, (n,))
    t[::4] = 7
    z = x.double() @ w.double().t() + b.double()
    got = slothai.fused_linear_cross_entropy(x.cuda(), w.cuda(), t.cuda(), b.cuda(), reduction="none", **RETURNS)
    want = z.argmax(-1)
    assert set(want.tolist()) == ({990} if plant == "nan" else {7, 600})
    assert torch.equal(got.predicted_tokens.cpu(), want)
    assert torch.equal(got.token_accuracy.cpu(), (want == t).float())


def test_extras_benchmark_runs_top_to_bottom(tmp_path):
    # benchmarks/bench_fused_ce.py --extras, at a smoke size on this machine: the script the
    # GPU run uses, its outputs checked against its fp32 reference; files only to $OUT.
    import json
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_fused_ce.py")
    run = subprocess.run([sys.executable, script, "--extras", "--tiny"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OUT=str(tmp_path)))
    assert run.returncode == 0, run.stderr[-3000:]
    rec = json.loads((tmp_path / "fused_ce_extras.json").read_text())
    assert [c["trained"] for c in rec["cases"]] == [True, False]
    for case in rec["cases"]:
        assert {"slothai", "slothai+outputs", "slothai+scaling", "slothai+all"} <= set(case["ms"])
        for name, chk in case["check"].items():
            if name.startswith("slothai"):
                # the reference's GEMM is torch's on all rows, the op's on the counted ones: a
                # near-tie may round apart, rarely
                assert chk["loss_rel_err"] < 1e-3 and chk.get("accuracy_diff", 0) < 1e-2, (name, chk)
                assert chk.get("predicted_agree", 1.0) >= 0.99, (name, chk)
    assert "slothai+outputs" in (tmp_path / "fused_ce_extras.txt").read_text()
