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
under TRL is the backbone: NF4 layers through `nf4_linear`, decoder layers
compiled by `slothai.compile`.

Where TRL has no kernel — Triton ships with PyTorch's CUDA wheels on Linux only,
so on a CPU `trl.trainer.utils._ChunkedLogProbFunction` is None and every TRL
trainer fails on its first step — `patch` supplies `ChunkedLogProbs` below, with
the same arguments and outputs, computed chunk by chunk in plain torch (no Triton,
no [tokens x vocab] logits beyond one chunk). It is only ever put where TRL has
None, and left there (taking it out again would only bring the failure back).

Whatever the import order: TRL's `_fused_forward` looks the kernel up as a global of
`trl.trainer.utils` on every call, and that module sets it to None when it runs. If
the module is loaded when `patch` runs, the kernel goes in then; if not (a script
that patches first and imports trl after), `patch` leaves a finder on
`sys.meta_path` that finds nothing itself but, when `trl.trainer.utils` is imported
(or reloaded), has the module's own loader put the kernel in right after the
module's code ran. Like the kernel, the finder stays after `unpatch`.
"""
import sys

import torch

# The per-token fields TRL's kernel computes besides the log-probabilities.
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _rows_per_chunk(n, vocab):
    # A few fp32 [rows x vocab] temporaries live per chunk: ~32 MiB each.
    return max(1, min(n, (32 << 20) // max(1, vocab * 4)))


def _logits(x, weight, bias, logit_scale, softcap, inv_t):
    """TRL's logits: (x W^T + b) in the inputs' dtype, then fp32, scaled,
    softcapped (c * tanh(z / c)) and divided by the temperature. Also returns
    dz/d(x W^T + b), a scalar or, with a softcap, a tensor."""
    z = x @ weight.t().to(x.dtype)
    if bias is not None:
        z = z + bias.to(z.dtype)
    z = z.float().mul_(logit_scale)
    if not softcap:
        return z.mul_(inv_t), logit_scale * inv_t
    z = z.div_(softcap).tanh_()
    slope = (1 - z * z).mul_(logit_scale * inv_t)
    return z.mul_(softcap * inv_t), slope


class ChunkedLogProbs(torch.autograd.Function):
    """`trl.kernels.ChunkedLogProbFunction`'s contract without Triton.

    apply(hidden (N, H), weight (V, H), bias (V,) or None, targets (N,), temperature,
    chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=OPTIONAL_OUTPUTS)
    -> (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each (N,) or None
    when not in `outputs`; log_probs and entropy carry gradients, the others none.

    Work is split by tokens (TRL's `chunk_size` is a vocabulary tile width for its
    kernel; here every chunk spans the whole vocabulary), so only one chunk's logits
    exist at a time. Backward recomputes each chunk's logits and applies
    d log p_t / dz = onehot(t) - p and d H / dz = -p (log p + H), times the upstream
    gradients and the transform's slope; dx = dz W, dW += dz^T x, db += sum dz in fp32.
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
            z, _ = _logits(hidden[s:e], weight, bias, *params)
            t = targets[s:e, None]
            if mean_logits is not None:
                mean_logits[s:e] = z.mean(-1)
            if is_top1 is not None:
                is_top1[s:e] = z.argmax(-1) == t[:, 0]  # the first maximum, as TRL's kernel counts ties
            log_p = z.sub_(torch.logsumexp(z, -1, keepdim=True))  # in place: z is not needed again
            log_probs[s:e] = log_p.gather(-1, t)[:, 0]
            if entropy is not None or log_sum_sq is not None:
                p = log_p.exp()
                if entropy is not None:
                    entropy[s:e] = -(p * log_p).sum(-1)
                if log_sum_sq is not None:
                    log_sum_sq[s:e] = p.mul_(p).sum(-1).log_()
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
        for s in range(0, hidden.shape[0], ctx.rows):
            e = min(hidden.shape[0], s + ctx.rows)
            x = hidden[s:e]
            z, slope = _logits(x, weight, bias, *ctx.params)
            log_p = z.sub_(torch.logsumexp(z, -1, keepdim=True))
            p = log_p.exp()
            dz = torch.zeros_like(p)
            if grad_entropy is not None:  # dH/dz = -p (log p + H)
                ent = -(p * log_p).sum(-1, keepdim=True)
                dz = log_p.add_(ent).mul_(p).mul_(-grad_entropy[s:e, None].float())
            if grad_log_probs is not None:  # d log p_t / dz = onehot(t) - p
                g = grad_log_probs[s:e, None].float()
                dz.sub_(p.mul_(g)).scatter_add_(-1, targets[s:e, None], g)
            dz = dz.mul_(slope)
            if need_x:
                dx[s:e] = (dz @ weight.float()).to(hidden.dtype)
            if need_w:
                dw.addmm_(dz.t(), x.float())
            if need_b:
                db += dz.sum(0)
        return (dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype)) + none


_TRL_UTILS = "trl.trainer.utils"  # where TRL 1.15 imports its kernel, or sets None


def _supply(utils):
    """Put ChunkedLogProbs in module `utils` where TRL has no kernel. Returns True when
    TRL's head has a kernel after the call; False for a TRL we do not know."""
    if not hasattr(utils, "_ChunkedLogProbFunction"):
        return False
    if utils._ChunkedLogProbFunction is None:
        utils._ChunkedLogProbFunction = ChunkedLogProbs
    return True


class SupplyOnImport:
    """A `sys.meta_path` finder for `trl.trainer.utils` only. It asks the finders after
    it for the module's spec and returns that spec, with the spec's loader told to
    supply the kernel once the module's code has run; the module keeps its own loader
    (`__loader__`, sources, resources). Every other import passes through untouched."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRL_UTILS:
            return None
        for finder in sys.meta_path:
            find = None if finder is self else getattr(finder, "find_spec", None)
            spec = find and find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None or getattr(exec_module, "_slothai_supplies", False):
            return spec

        def exec_then_supply(module):
            exec_module(module)
            if module.__name__ == _TRL_UTILS:
                _supply(module)

        exec_then_supply._slothai_supplies = True
        try:  # on this loader object only: a file loader is made for one spec
            loader.exec_module = exec_then_supply
        except (AttributeError, TypeError):  # a loader that takes no attributes: TRL as it is
            pass
        return spec


def supply_trl_kernel():
    """Give TRL's fused LM head ChunkedLogProbs where it has no kernel: now if
    `trl.trainer.utils` is loaded, else when it is imported (a `SupplyOnImport`
    finder, put on `sys.meta_path` once). Returns True when TRL's head has a kernel
    after the call (False also while trl is not imported yet)."""
    if not any(isinstance(finder, SupplyOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, SupplyOnImport())
    utils = sys.modules.get(_TRL_UTILS)
    return utils is not None and _supply(utils)
