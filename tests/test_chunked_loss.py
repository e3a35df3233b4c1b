"""chunked_linear_loss against the same losses computed on the whole logits."""
import math

import pytest
import torch
import torch.nn.functional as F

import slothai


def _xent(z, t):
    return F.cross_entropy(z, t, ignore_index=-100, reduction="none")


def _zloss_ce(z, t):
    return _xent(z, t) + 1e-2 * torch.logsumexp(z, -1) ** 2


def _kl_distill(z, teacher):
    return F.kl_div(F.log_softmax(z, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1)


def _grpo(z, target):
    ids, adv = target[:, 0].long(), target[:, 1]
    return -adv * torch.log_softmax(z, -1).gather(-1, ids[:, None]).squeeze(-1)


def _unchunked(x, w, b, t, fn, reduction, labels):
    z = (x @ w.t() + (b if b is not None else 0)).reshape(-1, w.shape[0])
    per = fn(z, t.reshape(z.shape[0], *t.shape[x.dim() - 1:]))
    if labels:
        per = per * (t.reshape(-1) != -100)
    if reduction == "none":
        return per.view(x.shape[:-1])
    if reduction == "sum":
        return per.sum()
    return per.sum() / ((t.reshape(-1) != -100).sum() if labels else z.shape[0])


@pytest.mark.parametrize("kind", ["xent", "zloss", "kl", "grpo"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_linear_loss_matches_unchunked(kind, reduction):
    x = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(29, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(29, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 29, (2, 13))
    labels[0, :4] = -100
    fn, t, is_labels = {
        "xent": (_xent, labels, True),
        "zloss": (_zloss_ce, labels.clamp_min(0), True),
        "kl": (_kl_distill, torch.randn(2, 13, 29, dtype=torch.float64), False),
        "grpo": (_grpo, torch.stack([labels.clamp_min(0).double(), torch.randn(2, 13, dtype=torch.float64)], -1),
                 False),
    }[kind]
    got = slothai.chunked_linear_loss(x, w, t, fn, bias=b, chunk_size=5, reduction=reduction)
    want = _unchunked(x, w, b, t, fn, reduction, is_labels)
    torch.testing.assert_close(got.double(), want.float().double(), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    grads = torch.autograd.grad((got.double() * g).sum(), (x, w, b))
    want_grads = torch.autograd.grad((want * g).sum(), (x, w, b))
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_chunked_linear_loss_gradcheck_float64():
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 6, (7,))
    assert torch.autograd.gradcheck(
        lambda x, w: slothai.chunked_linear_loss(x, w, t, lambda z, tt: _xent(z.double(), tt), chunk_size=3),
        (x, w))


def test_chunked_linear_loss_hidden_size_zero():
    x = torch.randn(4, 0, requires_grad=True)
    w = torch.randn(7, 0, requires_grad=True)
    t = torch.randint(0, 7, (4,))
    got = slothai.chunked_linear_loss(x, w, t, lambda z, tt: F.cross_entropy(z, tt, reduction="none"))
    torch.testing.assert_close(got, torch.tensor(math.log(7)))


# --- issue 34: the loss_fn contract, ignored rows, double backward, empty windows ----------------


def _ce_none(z, t):
    return F.cross_entropy(z, t, reduction="none")


@pytest.mark.parametrize("returns,what", [
    (lambda z, t: _ce_none(z, t).mean(), "shape \\(5,\\) .* got torch.float32 of shape \\(\\)"),
    (lambda z, t: torch.log_softmax(z, -1), "got torch.float32 of shape \\(5, 11\\)"),
    (lambda z, t: _ce_none(z, t)[1:], "got torch.float32 of shape \\(4,\\)"),
    (lambda z, t: _ce_none(z, t)[:, None], "got torch.float32 of shape \\(5, 1\\)"),
    (lambda z, t: t, "got torch.int64 of shape \\(5,\\)"),
])
def test_loss_fn_must_return_one_loss_per_token(returns, what):
    x, w, t = torch.randn(5, 4), torch.randn(11, 4), torch.randint(0, 11, (5,))
    for reduction in ("none", "mean"):
        with pytest.raises(ValueError, match="loss_fn must return one floating-point loss per token, .*" + what):
            slothai.chunked_linear_loss(x, w, t, returns, reduction=reduction)
    with pytest.raises(TypeError, match="loss_fn must return a tensor of per-token losses, got float"):
        slothai.chunked_linear_loss(x, w, t, lambda z, tt: 1.0)


def test_loss_fn_output_must_depend_on_the_logits():
    x = torch.randn(5, 4, requires_grad=True)
    w, t = torch.randn(11, 4), torch.randint(0, 11, (5,))
    loss = slothai.chunked_linear_loss(x, w, t, lambda z, tt: torch.ones(z.shape[0]))
    with pytest.raises(ValueError, match="loss_fn's output does not depend on the logits"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_reach_loss_fn_with_a_valid_label(reduction):
    # A natural per-token loss that indexes by label: ignored rows would raise "index
    # -100 is out of bounds"; they come with label 0, and back as 0 with no gradient.
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (2, 9))
    t[0, :3], t[1, 5] = -100, -100
    seen = []

    def nll(z, y):
        seen.append(y.clone())
        return -torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1)

    got = slothai.chunked_linear_loss(x, w, t, nll, chunk_size=4, reduction=reduction)
    assert seen and all((y >= 0).all() for y in seen) and sum(y.numel() for y in seen) == t.numel()
    want = F.cross_entropy((x @ w.t()).view(-1, 13), t.view(-1), reduction=reduction)
    torch.testing.assert_close(got, want.view(got.shape))
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * g.view(got.shape)).sum(), (x, w)),
                               torch.autograd.grad((want * g).sum(), (x, w)))


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_empty_window_gives_zero_gradients(reduction):
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(9, 6, requires_grad=True)
    t = torch.full((4,), -100)
    loss = slothai.chunked_linear_loss(x, w, t, _ce_none, reduction=reduction)
    (loss.sum() / torch.tensor(0.0)).backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
    if reduction == "mean":
        assert torch.isnan(loss)


def test_double_backward_matches_float64_gradgradcheck():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 4, (5,))
    t[2] = -100

    def loss_fn(z, tt):
        return _ce_none(z, tt) + 0.1 * torch.logsumexp(z, -1) ** 2

    def fn(x, w, b, reduction="mean"):
        return slothai.chunked_linear_loss(x, w, t, loss_fn, bias=b, chunk_size=2, reduction=reduction)

    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    # the gradient penalty the issue names, d/dw of |d loss / dx|^2, for every reduction
    for reduction in ("mean", "sum", "none"):
        z = x @ w.t() + b
        per = _ce_none(z, t) + 0.1 * torch.logsumexp(z, -1) ** 2 * (t != -100)
        full = {"mean": per.sum() / (t != -100).sum(), "sum": per.sum(), "none": per}[reduction]
        (gx,) = torch.autograd.grad(fn(x, w, b, reduction).sum(), x, create_graph=True)
        (gx_want,) = torch.autograd.grad(full.sum(), x, create_graph=True)
        got, want = (torch.autograd.grad((g ** 2).sum(), w) for g in (gx, gx_want))
        torch.testing.assert_close(got, want)


def test_double_backward_with_respect_to_the_weight_alone():
    # create_graph=True when hidden takes no gradient: only the weight's is formed.
    x = torch.randn(5, 3, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 4, (5,))
    assert torch.autograd.gradgradcheck(lambda w: slothai.chunked_linear_loss(x, w, t, _ce_none, chunk_size=2), (w,))


# --- issue 33: token accuracy and predicted tokens, as fused_linear_cross_entropy returns them ------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_returns_token_accuracy_and_predicted_tokens(reduction):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-2, 3, (2, 13, 4), generator=g).double().requires_grad_()  # integer logits: ties
    w = torch.randint(-1, 2, (29, 4), generator=g).double()
    t = torch.randint(0, 29, (2, 13), generator=g)
    z = (x @ w.t()).detach()
    t[1, :6] = z[1, :6].argmax(-1)  # some hits
    t[0, :4] = -100
    out = slothai.chunked_linear_loss(x, w, t, _xent, chunk_size=5, reduction=reduction,
                                      return_token_accuracy=True, return_predicted_tokens=True)
    assert isinstance(out, slothai.CrossEntropyOutput) and out.z_loss is None
    want_pred = z.argmax(-1).masked_fill(t == -100, -1)
    assert torch.equal(out.predicted_tokens, want_pred)
    hits = ((want_pred == t) & (t != -100)).float()
    want_acc = hits if reduction == "none" else hits.sum() / (t != -100).sum()
    torch.testing.assert_close(out.token_accuracy, want_acc)
    assert hits.sum() >= 6
    plain = slothai.chunked_linear_loss(x, w, t, _xent, chunk_size=5, reduction=reduction)
    assert torch.equal(out.loss, plain)
    grads = torch.autograd.grad(out.loss.sum(), x)
    torch.testing.assert_close(grads, torch.autograd.grad(plain.sum(), x))
    # the same outputs as the fused loss's (same logits, same ties)
    fused = slothai.fused_linear_cross_entropy(x.detach().float(), w.float(), t, reduction=reduction,
                                               return_token_accuracy=True, return_predicted_tokens=True)
    assert torch.equal(fused.predicted_tokens, out.predicted_tokens)
    torch.testing.assert_close(fused.token_accuracy, out.token_accuracy.float())


def test_chunked_loss_predicted_tokens_without_labels_and_accuracy_needs_them():
    x, w = torch.randn(3, 5, 8), torch.randn(17, 8)
    teacher = torch.randn(3, 5, 17)
    out = slothai.chunked_linear_loss(x, w, teacher, _kl_distill, return_predicted_tokens=True)
    assert torch.equal(out.predicted_tokens, (x @ w.t()).argmax(-1)) and out.token_accuracy is None
    with pytest.raises(ValueError, match="return_token_accuracy needs integer labels as target"):
        slothai.chunked_linear_loss(x, w, teacher, _kl_distill, return_token_accuracy=True)
