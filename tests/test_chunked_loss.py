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
