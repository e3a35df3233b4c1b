"""TRL's fused LM head, and where slothai stands beside it.

TRL (1.15) gives every trainer's model its own fused LM head
(`trl.trainer.utils.add_fused_lm_head`): the trainer calls
`model(..., labels=labels, fused_lm_head=True)` and reads per-token `log_probs`,
`entropy`, `is_top1` (token accuracy), `mean_logits`, `log_sum_sq_probs` and
`label_mask` — without building the [tokens x vocab] logits, through TRL's
`ChunkedLogProbFunction` (cuBLAS tiles folded by a Triton kernel, fp32
accumulation).

slothai stands aside from that head: `patch` passes `fused_lm_head=True` calls to
it unchanged (whichever of the two was installed first), never wraps its output,
and `unpatch` leaves it in place. Why not serve the contract from slothai's loss:
TRL's head already avoids the logits and accumulates in fp32, the same work and
memory traffic slothai's fused pass has, and computes exactly the fields TRL's
losses and logged metrics are defined on (plus temperature, logit scale and
softcap, set per trainer); replacing it would buy nothing on a GPU and would tie
slothai to a private TRL interface that changes between releases. slothai's part
under TRL is the backbone: NF4 layers through `dequant_nf4`, decoder layers
compiled by `slothai.compile`.

Where TRL has no kernel — Triton ships with PyTorch's CUDA wheels on Linux only,
so on a CPU `trl.trainer.utils._ChunkedLogProbFunction` is None and every TRL
trainer fails on its first step — `patch` supplies `ChunkedLogProbs` below, with
the same arguments and outputs, computed chunk by chunk in plain torch (no Triton,
no [tokens x vocab] logits beyond one chunk). It is only ever put where TRL has
None, and left there (taking it out again would only bring the failure back).
"""
import importlib
import sys

import torch

# The per-token fields TRL's kernel computes besides the log-probabilities.
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _rows_per_chunk(n, vocab):
    # fp32 logits, their softmax and their gradient live per chunk: ~64 MiB each.
    return max(1, min(n, (64 << 20) // max(1, vocab * 4)))


def _transformed_logits(x, weight, bias, logit_scale, softcap, inv_t):
    """TRL's logits: (x W^T + b) in the inputs' dtype, then fp32, scaled,
    softcapped (c * tanh(z / c)) and divided by the temperature."""
    z = x @ weight.t().to(x.dtype)
    if bias is not None:
        z = z + bias.to(z.dtype)
    z = z.float() * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z * inv_t


class ChunkedLogProbs(torch.autograd.Function):
    """`trl.kernels.ChunkedLogProbFunction`'s contract without Triton.

    apply(hidden (N, H), weight (V, H), bias (V,) or None, targets (N,), temperature,
    chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=OPTIONAL_OUTPUTS)
    -> (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each (N,) or None
    when not in `outputs`; log_probs and entropy carry gradients, the others none.

    Work is split by tokens (TRL's `chunk_size` is a vocabulary tile width for its
    kernel; here every chunk spans the whole vocabulary). Backward recomputes each
    chunk's logits, takes d(log_probs, entropy)/d logits by autograd on the chunk,
    and forms dx = dz W, dW += dz^T x, db += sum dz in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        params = (float(logit_scale), final_logit_softcapping, 1.0 / temperature)
        f32 = dict(dtype=torch.float32, device=hidden.device)
        log_probs = torch.empty(n, **f32)
        entropy = torch.empty(n, **f32) if "entropy" in outputs else None
        log_sum_sq = torch.empty(n, **f32) if "log_sum_sq_probs" in outputs else None
        mean_logits = torch.empty(n, **f32) if "mean_logits" in outputs else None
        is_top1 = torch.empty(n, dtype=torch.bool, device=hidden.device) if "is_top1" in outputs else None
        rows = _rows_per_chunk(n, vocab)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            z = _transformed_logits(hidden[s:e], weight, bias, *params)
            t = targets[s:e]
            log_z = torch.logsumexp(z, -1)
            log_probs[s:e] = z.gather(-1, t[:, None]).squeeze(-1) - log_z
            if entropy is not None:
                entropy[s:e] = log_z - (torch.softmax(z, -1) * z).sum(-1)
            if log_sum_sq is not None:
                log_sum_sq[s:e] = torch.logsumexp(2 * (z - log_z[:, None]), -1)
            if mean_logits is not None:
                mean_logits[s:e] = z.mean(-1)
            if is_top1 is not None:
                is_top1[s:e] = z.argmax(-1) == t  # the first maximum, as TRL's kernel counts ties
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.params, ctx.rows = params, rows
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None,) * 6
        if grad_log_probs is None and grad_entropy is None:
            return (None, None, None) + none
        f32 = dict(dtype=torch.float32, device=hidden.device)
        dx = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_x else None
        dw = torch.zeros(weight.shape, **f32) if need_w else None
        db = torch.zeros(weight.shape[0], **f32) if need_b else None
        scale, softcap, inv_t = ctx.params
        for s in range(0, hidden.shape[0], ctx.rows):
            e = min(hidden.shape[0], s + ctx.rows)
            x = hidden[s:e]
            with torch.enable_grad():
                raw = _transformed_logits(x, weight.detach(), None if bias is None else bias.detach(), 1.0, None, 1.0)
                raw = raw.detach().requires_grad_()
                z = raw * scale
                if softcap:
                    z = softcap * torch.tanh(z / softcap)
                z = z * inv_t
                log_z = torch.logsumexp(z, -1)
                terms = []
                if grad_log_probs is not None:
                    terms.append(((z.gather(-1, targets[s:e, None]).squeeze(-1) - log_z) * grad_log_probs[s:e]).sum())
                if grad_entropy is not None:
                    ent = log_z - (torch.softmax(z, -1) * z).sum(-1)
                    terms.append((ent * grad_entropy[s:e]).sum())
                (dz,) = torch.autograd.grad(sum(terms), raw)
            if need_x:
                dx[s:e] = (dz @ weight.float()).to(hidden.dtype)
            if need_w:
                dw.addmm_(dz.t(), x.float())
            if need_b:
                db += dz.sum(0)
        return (dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype)) + none


def supply_trl_kernel():
    """If TRL is loaded and has no kernel for its fused LM head here, give it
    ChunkedLogProbs. Returns True when TRL's head has a kernel after the call."""
    if "trl" not in sys.modules:
        return False
    try:
        utils = importlib.import_module("trl.trainer.utils")
    except Exception:  # noqa: BLE001  (a TRL we do not know: leave it alone)
        return False
    if not hasattr(utils, "_ChunkedLogProbFunction"):
        return False
    if utils._ChunkedLogProbFunction is None:
        utils._ChunkedLogProbFunction = ChunkedLogProbs
    return True
