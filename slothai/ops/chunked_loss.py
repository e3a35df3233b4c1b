"""chunked_linear_loss: the memory saving of fused_linear_cross_entropy for any
per-token loss of the logits, in plain torch (an autograd.Function, no custom op)."""
import torch

from .fused_ce import CrossEntropyOutput, check_chunk_size, check_reduction, check_tokens


def _default_chunk(n, v):
    # fp32 logits plus autograd's copies live per chunk: keep a chunk near 256 MiB.
    return max(1, min(n, (256 << 20) // max(1, v * 4)))


class _ChunkedLinearLoss(torch.autograd.Function):
    """Per chunk of tokens: logits = x_c W^T (+b) in fp32, per-token losses by
    `loss_fn`; nothing but the inputs is kept. Backward recomputes each chunk's
    logits, takes d loss / d logits by autograd on `loss_fn`, multiplies in the
    upstream gradient, and forms dx_c = dz W, dW += dz^T x_c, db += sum dz in fp32.
    Rows where `mask` is False (ignored labels) get loss 0 and a gradient of exactly
    0, by selection (torch.where), not by multiplying: an inf or NaN upstream
    gradient (an empty accumulation window's 1/0) cannot reach them.
    Under create_graph=True the same steps run with autograd recording them (the
    logits not detached, sums out of place), so the gradients differentiate again;
    that graph holds every chunk's logits.
    With `argmax`, also each row's argmax of the logits (-1 where `mask` is False),
    taken from the chunk's logits while they exist; else an empty tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, mask, loss_fn, chunk, argmax):
        n = x.shape[0]
        losses = torch.empty(n, dtype=_acc_dtype(x), device=x.device)
        predicted = torch.empty(n if argmax else 0, dtype=torch.int64, device=x.device)
        for s in range(0, n, chunk):
            z = _logits(x[s:s + chunk], weight, bias)
            if argmax:
                predicted[s:s + chunk] = z.argmax(-1)
            losses[s:s + chunk] = _per_token(loss_fn, z, target[s:s + chunk])
        if mask is not None:
            losses = torch.where(mask, losses, 0.0)
            if argmax:
                predicted = predicted.masked_fill(~mask, -1)
        ctx.save_for_backward(x, weight, bias, target, mask)
        ctx.loss_fn, ctx.chunk = loss_fn, chunk
        ctx.mark_non_differentiable(predicted)
        return losses, predicted

    @staticmethod
    def backward(ctx, g, _predicted):
        x, weight, bias, target, mask = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        graph = torch.is_grad_enabled()  # create_graph=True: the gradients get a graph of their own
        acc = _acc_dtype(x)
        dx = ([] if graph else torch.empty_like(x)) if need_x else None  # graph: a list of chunks, joined at the end
        dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=x.device) if need_b else None
        for s in range(0, x.shape[0], ctx.chunk):
            xc = x[s:s + ctx.chunk]
            with torch.enable_grad():
                z = _logits(xc, weight, bias)
                if not graph:
                    z = z.detach().requires_grad_()
                per_token = _per_token(ctx.loss_fn, z, target[s:s + ctx.chunk])
                if not per_token.requires_grad:
                    raise ValueError("loss_fn's output does not depend on the logits (it has no gradient to "
                                     "them): loss_fn must return per-token losses computed from its logits")
                gc = g[s:s + ctx.chunk].to(per_token.dtype)
                if mask is not None:
                    gc = torch.where(mask[s:s + ctx.chunk], gc, 0.0)
                (dz,) = torch.autograd.grad(per_token, z, gc, create_graph=graph)
                if mask is not None:  # loss_fn may give an ignored row inf/NaN partials: 0 * inf
                    dz = torch.where(mask[s:s + ctx.chunk, None], dz, 0.0)
            if need_x:
                if graph:
                    dx.append(dz.to(x.dtype) @ weight)
                else:
                    dx[s:s + ctx.chunk] = dz.to(x.dtype) @ weight
            if need_w:
                dw = dw + dz.t() @ xc.to(acc) if graph else dw.addmm_(dz.t(), xc.to(acc))
            if need_b:
                db = db + dz.sum(0) if graph else db.add_(dz.sum(0))
        if graph and need_x:
            dx = torch.cat(dx) if dx else torch.zeros_like(x)
        return (dx, dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None,
                None, None, None, None, None)


def _per_token(loss_fn, z, target):
    """loss_fn(z, target), checked against its contract: one floating-point loss per row of z."""
    out = loss_fn(z, target)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor of per-token losses, got {type(out).__name__}")
    if out.shape != z.shape[:1] or not out.is_floating_point():
        raise ValueError(f"loss_fn must return one floating-point loss per token, shape ({z.shape[0]},) for "
                         f"logits of shape {tuple(z.shape)}, got {out.dtype} of shape {tuple(out.shape)} "
                         "(reduction='none' for torch's losses)")
    return out.to(z.dtype)


def _acc_dtype(x):
    """fp32 for half inputs (and fp32), fp64 for fp64: the loss and dW/db sums."""
    return torch.promote_types(x.dtype, torch.float32)


def _logits(x, weight, bias):
    z = x @ weight.t()
    if bias is not None:
        z = z + bias
    return z.to(_acc_dtype(x))


def chunked_linear_loss(hidden, weight, target, loss_fn, *, bias=None, chunk_size=None, reduction="mean",
                        ignore_index=-100, return_token_accuracy=False, return_predicted_tokens=False):
    """Memory-efficient `loss_fn(hidden @ weight.T + bias, target)` for any per-token loss.

    The loss_fn contract: `loss_fn(logits, target_chunk)` gets logits (T, V) of a
    chunk of T tokens, in fp32 (fp64 for fp64 inputs), and the matching rows of
    `target`; it returns the per-token losses, a floating-point tensor of shape (T,)
    computed from those logits (for torch's losses: reduction="none"). Anything
    else (a scalar, (T, V), (T - 1,)) raises ValueError, and so does, in backward,
    an output that does not depend on the logits. loss_fn is called again on each
    chunk in backward (the logits are recomputed, not kept), so it must be a pure
    function of its arguments.

    `target` is anything whose leading dims match hidden's tokens (labels, teacher
    logits, advantages...), sliced along with hidden. When it is an integer tensor
    of hidden's leading shape (labels), rows equal to `ignore_index` reach loss_fn
    with the label 0 in its place (so `z.gather(1, t[:, None])` works), and their
    loss is then replaced by 0 and their gradient by exactly 0, whatever loss_fn or
    the upstream gradient gives them; mean does not count them (all ignored: mean is
    0 / 0 = NaN with zero gradients, as F.cross_entropy). No host sync: which rows
    count stays on the device.

    Only one chunk of logits (and its gradient) exists at a time. chunk_size: tokens
    per chunk, a positive int (default: about 256 MiB of fp32 logits). The gradients
    can be differentiated again (create_graph=True); that graph holds every chunk's
    logits.

    return_token_accuracy / return_predicted_tokens, as fused_linear_cross_entropy's:
    the result is then a `CrossEntropyOutput(loss, None, token_accuracy,
    predicted_tokens)`. predicted_tokens: each token's argmax of its logits (as
    loss_fn receives them, torch.argmax's ties), int64 in the tokens' shape, -1 where
    the label is ignore_index; token_accuracy: the fraction of labelled tokens whose
    argmax is the label (per token with reduction "none", 0 where ignored), which
    needs integer labels as target. Both come from each chunk's logits in the forward
    (no pass of their own) and carry no gradient.
    """
    check_reduction(reduction)
    check_tokens(hidden, target)
    check_chunk_size(chunk_size)
    x = hidden.reshape(hidden.shape[:-1].numel(), hidden.shape[-1])  # (-1, H) fails for H = 0
    n = x.shape[0]
    t = target.reshape(n, *target.shape[hidden.dim() - 1:])
    labels = not t.is_floating_point() and not t.is_complex() and t.dim() == 1
    mask = (t != ignore_index) if labels else None
    if mask is not None:
        t = t.masked_fill(~mask, 0)  # a label every loss_fn can index with; its loss is dropped
    if return_token_accuracy and mask is None:
        raise ValueError("return_token_accuracy needs integer labels as target (one per token, hidden's leading "
                         f"shape), got {target.dtype} of shape {tuple(target.shape)}")
    chunk = min(chunk_size or _default_chunk(n, weight.shape[0]), max(1, n))
    argmax = bool(return_token_accuracy or return_predicted_tokens)
    losses, predicted = _ChunkedLinearLoss.apply(x, weight, bias, t, mask, loss_fn, chunk, argmax)
    count = mask.sum() if mask is not None else torch.tensor(n, device=x.device)
    if reduction == "none":
        loss = losses.view(hidden.shape[:-1])
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses.sum() / count.to(losses.dtype)
    if not argmax:
        return loss
    accuracy = None
    if return_token_accuracy:
        hits = (predicted == t).float()  # ignored rows: predicted -1, never a label here
        accuracy = hits.view(hidden.shape[:-1]) if reduction == "none" else hits.sum() / count
    return CrossEntropyOutput(loss=loss, token_accuracy=accuracy,
                              predicted_tokens=predicted.view(hidden.shape[:-1]) if return_predicted_tokens else None)
