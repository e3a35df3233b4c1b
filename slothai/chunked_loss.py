"""chunked_linear_loss: the memory saving of fused_linear_cross_entropy for any
per-token loss of the logits, in plain torch (an autograd.Function, no custom op)."""
import torch

from .ops.fused_ce import check_reduction, check_tokens


def _default_chunk(n, v):
    # fp32 logits plus autograd's copies live per chunk: keep a chunk near 256 MiB.
    return max(1, min(n, (256 << 20) // max(1, v * 4)))


class _ChunkedLinearLoss(torch.autograd.Function):
    """Per chunk of tokens: logits = x_c W^T (+b) in fp32, per-token losses by
    `loss_fn`; nothing but the inputs is kept. Backward recomputes each chunk's
    logits, takes d loss / d logits by autograd on `loss_fn`, multiplies in the
    upstream gradient, and forms dx_c = dz W, dW += dz^T x_c, db += sum dz in fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, mask, loss_fn, chunk):
        n = x.shape[0]
        losses = torch.empty(n, dtype=_acc_dtype(x), device=x.device)
        for s in range(0, n, chunk):
            z = _logits(x[s:s + chunk], weight, bias)
            losses[s:s + chunk] = loss_fn(z, target[s:s + chunk]).reshape(-1)
        if mask is not None:
            losses = losses.masked_fill(~mask, 0.0)
        ctx.save_for_backward(x, weight, bias, target, mask)
        ctx.loss_fn, ctx.chunk = loss_fn, chunk
        return losses

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, target, mask = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = torch.empty_like(x) if need_x else None
        acc = _acc_dtype(x)
        dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=x.device) if need_b else None
        if mask is not None:
            g = g.masked_fill(~mask, 0.0)
        for s in range(0, x.shape[0], ctx.chunk):
            xc = x[s:s + ctx.chunk]
            with torch.enable_grad():
                z = _logits(xc, weight, bias).detach().requires_grad_()
                per_token = ctx.loss_fn(z, target[s:s + ctx.chunk]).to(acc).reshape(-1)
                (dz,) = torch.autograd.grad(per_token, z, g[s:s + ctx.chunk].to(per_token.dtype))
            if need_x:
                dx[s:s + ctx.chunk] = dz.to(x.dtype) @ weight
            if need_w:
                dw.addmm_(dz.t(), xc.to(acc))
            if need_b:
                db += dz.sum(0)
        return (dx, dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None,
                None, None, None, None)


def _acc_dtype(x):
    """fp32 for half inputs (and fp32), fp64 for fp64: the loss and dW/db sums."""
    return torch.promote_types(x.dtype, torch.float32)


def _logits(x, weight, bias):
    z = x @ weight.t()
    if bias is not None:
        z = z + bias
    return z.to(_acc_dtype(x))


def chunked_linear_loss(hidden, weight, target, loss_fn, *, bias=None, chunk_size=None, reduction="mean",
                        ignore_index=-100):
    """Memory-efficient `loss_fn(hidden @ weight.T + bias, target)` for any per-token loss.

    loss_fn(logits_chunk (T, V), target_chunk) returns per-token losses (T,); the logits
    come in fp32 (fp64 for fp64 inputs).
    `target` is anything whose leading dims match hidden's tokens (labels, teacher
    logits, advantages...), sliced along with hidden. When it is an integer tensor
    of hidden's leading shape, rows equal to `ignore_index` are not counted by mean
    and get no gradient. Only one chunk of logits (and its gradient) exists at a time.
    """
    check_reduction(reduction)
    check_tokens(hidden, target)
    x = hidden.reshape(hidden.shape[:-1].numel(), hidden.shape[-1])  # (-1, H) fails for H = 0
    t = target.reshape(x.shape[0], *target.shape[hidden.dim() - 1:])
    labels = not t.is_floating_point() and t.dim() == 1
    mask = (t != ignore_index) if labels else None
    chunk = int(chunk_size or _default_chunk(x.shape[0], weight.shape[0]))
    losses = _ChunkedLinearLoss.apply(x, weight, bias, t, mask, loss_fn, chunk)
    if reduction == "none":
        return losses.view(hidden.shape[:-1])
    if reduction == "sum":
        return losses.sum()
    count = mask.sum() if mask is not None else torch.tensor(x.shape[0], device=x.device)
    return losses.sum() / count
