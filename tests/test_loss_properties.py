"""Both losses (fused_linear_cross_entropy, chunked_linear_loss with a cross-entropy
loss_fn) against torch on the full logits in float64, over random shapes, options,
dtypes and extreme values (+-inf logits, fp16 overflow, every row ignored), and
through transformers' Trainer with an accumulation window that has no target token."""
import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

import slothai
from slothai import qlora
from training_checks import draw_lora_b

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-2, 3e-2), torch.float16: (5e-3, 1e-2)}


def reference(x, w, b, t, *, ignore_index, reduction, label_smoothing, softcap, z_loss, dtype):
    """torch's loss in float64 on the logits rounded once to the input dtype (as the GEMM
    writes them), over the counted rows only: an ignored row takes no part (torch's own
    log_softmax backward would hand an ignored row with a +inf logit 0 * NaN)."""
    z = x @ w.t() + (b if b is not None else 0)
    z = z.to(dtype).double()  # the rounded values; the gradient passes the rounding unchanged
    counted = t != ignore_index
    keep = counted.nonzero().squeeze(1)
    zc = z.index_select(0, keep)
    if softcap:
        zc = softcap * torch.tanh(zc / softcap)
    loss = F.cross_entropy(zc, t[keep], reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(zc, -1) ** 2
    per_row = torch.zeros(t.shape[0], dtype=torch.float64).index_copy(0, keep, loss)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / counted.sum()


def ce_loss_fn(label_smoothing, softcap, z_loss):
    """The same loss as a chunked_linear_loss loss_fn (per token, on fp32 logits)."""
    def fn(z, t):
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        loss = F.cross_entropy(z, t, reduction="none", label_smoothing=label_smoothing)
        return loss + z_loss * torch.logsumexp(z, -1) ** 2 if z_loss else loss
    return fn


def draw(rng):
    """One random case: shapes, options, dtype, and which extreme value to plant."""
    n, h, v = rng.randint(1, 12), rng.randint(1, 9), rng.randint(1, 23)
    extreme = rng.choice(["none", "minus_inf", "minus_inf", "plus_inf", "overflow", "all_ignored"])
    dtypes = [torch.float16] if extreme == "overflow" else [torch.float32, torch.bfloat16, torch.float16]
    return dict(n=n, h=h, v=v, dtype=rng.choice(dtypes), extreme=extreme,
                bias=rng.random() < 0.6, reduction=rng.choice(["mean", "sum", "none"]),
                ignore_index=rng.choice([-100, -100, 0]), label_smoothing=rng.choice([0.0, 0.0, 0.1]),
                softcap=rng.choice([None, None, 2.5]), z_loss=rng.choice([0.0, 0.0, 1e-2]),
                chunk=rng.choice([None, 1, 3]), frozen=rng.random() < 0.3)


def build(case, seed):
    g = torch.Generator().manual_seed(seed)
    n, h, v = case["n"], case["h"], case["v"]
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) if case["bias"] or case["extreme"].endswith("inf") else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.25] = case["ignore_index"]
    extreme = case["extreme"]
    if extreme == "minus_inf":  # tokens masked out of the vocabulary (one may be a target)
        b[torch.randperm(v, generator=g)[: max(1, v // 3)]] = -math.inf
        if (b == -math.inf).all():
            b[0] = 0.0
    elif extreme == "plus_inf":
        b[torch.randint(0, v, (1,), generator=g)] = math.inf
    elif extreme == "overflow":  # one row's logits 0 and 1 past fp16's range (+-90000 h): +-inf when rounded
        r, s = int(torch.randint(0, n, (1,), generator=g)), torch.randn(h, generator=g, dtype=torch.float64).sign()
        x[r], w[0] = 6e4 * s, 1.5 * s
        if v > 1:
            w[1] = -1.5 * s
    elif extreme == "all_ignored":
        t[:] = case["ignore_index"]
    return x, w, b, t


def close_with_nonfinite(got, want, rtol, atol, what):
    """Same NaN and inf positions; the finite values within tolerance (by norm)."""
    got = got.detach().double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (what, got, want)
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)) and \
        torch.equal(torch.isneginf(got), torch.isneginf(want)), (what, got, want)
    fin = torch.isfinite(want)
    err = (got[fin] - want[fin]).norm()
    assert err <= 3 * rtol * want[fin].norm() + atol, (what, err.item(), want[fin].norm().item())


CASES = 60


@pytest.mark.parametrize("loss", ["fused", "chunked"])
def test_random_cases_match_full_logit_torch_in_float64(loss):
    rng = random.Random(34)
    seen = set()
    for i in range(CASES):
        case = draw(rng)
        seen.add(case["extreme"])
        x64, w64, b64, t = build(case, i)
        dtype = case["dtype"]
        opts = dict(ignore_index=case["ignore_index"], reduction=case["reduction"],
                    label_smoothing=case["label_smoothing"], softcap=case["softcap"], z_loss=case["z_loss"])
        # inputs in the case's dtype; the reference starts from the same rounded values
        xd, wd = x64.to(dtype), w64.to(dtype)
        bd = b64.to(dtype) if b64 is not None else None
        xr, wr = xd.double().requires_grad_(), wd.double().requires_grad_(not case["frozen"])
        br = bd.double().requires_grad_() if bd is not None else None
        xd.requires_grad_(), wd.requires_grad_(not case["frozen"])
        if bd is not None:
            bd.requires_grad_()
        want = reference(xr, wr, br, t, dtype=dtype, **opts)
        if loss == "fused":
            got = slothai.fused_linear_cross_entropy(xd, wd, t, bd, chunk_size=case["chunk"], **opts)
        else:
            fn = ce_loss_fn(case["label_smoothing"], case["softcap"], case["z_loss"])
            got = slothai.chunked_linear_loss(xd, wd, t, fn, bias=bd, chunk_size=case["chunk"],
                                              reduction=case["reduction"], ignore_index=case["ignore_index"])
        rtol, atol = TOL[dtype]
        close_with_nonfinite(got, want.detach(), rtol, atol, (i, case, "loss"))
        up = torch.randn(want.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        (got.double() * up).sum().backward()
        (want * up).sum().backward()
        for mine, ref, name in ((xd, xr, "x"), (wd, wr, "w"), (bd, br, "b")):
            if ref is None or not ref.requires_grad:
                assert mine is None or mine.grad is None, name
                continue
            close_with_nonfinite(mine.grad, ref.grad, 3 * rtol, atol, (i, case, name))
    assert seen == {"none", "minus_inf", "plus_inf", "overflow", "all_ignored"}  # every kind was drawn


def test_trainer_empty_accumulation_window_trains_like_unpatched(tmp_path):
    # Batch 1, accumulation 2: the second window's two samples are all -100, so
    # transformers divides their summed loss by num_items_in_batch = 0. Unpatched, the
    # gradients of that window are 0 and training goes on; patched they were NaN and
    # AdamW wrote NaN into every adapter weight.
    from transformers import Trainer, TrainerCallback, TrainingArguments

    ids = [row[0] for row in qlora.batches(256, 1, [16], 4, "cpu")]
    data = [{"input_ids": r, "labels": r if k < 2 else torch.full_like(r, -100)} for k, r in enumerate(ids)]

    class GradNorms(TrainerCallback):
        def __init__(self):
            self.norms = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
            self.norms.append(torch.stack([g.double().norm() for g in grads]).norm().item() if grads else 0.0)

    def run(model):
        norms = GradNorms()
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True,
                                 save_strategy="no", train_sampling_strategy="sequential", seed=0)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[norms]).train()
        return norms.norms, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    ref = qlora.build("tiny", "llama")
    draw_lora_b(ref)
    model = copy.deepcopy(ref)
    want_norms, want = run(ref)
    got_norms, got = run(slothai.patch(model))
    assert want_norms[0] > 0 and want_norms[1] == 0  # the empty window, as torch gives it
    assert got_norms[1] == 0 and got_norms[0] == pytest.approx(want_norms[0], rel=1e-4), (got_norms, want_norms)
    assert got.keys() == want.keys() and len(got) > 0
    for name, p in got.items():
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, want[name], rtol=1e-4, atol=1e-6, msg=name)
