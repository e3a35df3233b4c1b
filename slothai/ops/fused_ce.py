"""slothai::fused_ce: linear + cross-entropy without the [tokens x vocab] logits.

The op (schema in library.py, its kernel, the chunk loop, in fused_ce_chunks.py)
returns (loss, d hidden, d weight, d bias, z loss, token accuracy, predicted
tokens) and forms exactly the gradients its grad_* flags ask for, for the per-row
upstream factors grad_rows or, with reduction sum / mean, for the reduced loss
itself, and exactly the outputs its return_* flags ask for (none of them
differentiable). With sum / mean the user function asks for the gradients in the
forward (3 GEMMs, nothing recomputed) and backward only scales them (in place,
unless the graph is kept: the op's gradient outputs are what autograd saved); with
none, backward calls the op again with grad_rows.

The gradients cannot be differentiated again: a backward with create_graph=True
raises (RuntimeError) rather than return gradients without a graph, which a
gradient penalty would silently take as constants. Supporting it would mean
keeping hidden for backward, which the sum / mean path does not (its gradients are
formed in the forward); chunked_linear_loss, which recomputes, supports it.
"""
import dataclasses
import math
import operator
from typing import Optional

import torch

from .fused_ce_chunks import check_reduction
from .library import register_autograd
from .scale import scale_
from .schema import Arguments

_fused_ce = torch.ops.slothai.fused_ce.default
_ARGS = Arguments(_fused_ce)
_OPTIONS = ("ignore_index", "label_smoothing", "softcap", "z_loss", "reduction", "chunk_size", "fp32_weight_grad",
            "use_token_scaling")
_RETURNS = ("return_z_loss", "return_token_accuracy", "return_predicted_tokens")


@dataclasses.dataclass
class CrossEntropyOutput:
    """What `fused_linear_cross_entropy` returns when an extra output is asked for: the
    fields of Liger-Kernel's `CrossEntropyOutput` (None where not asked for)."""
    loss: torch.Tensor
    z_loss: Optional[torch.Tensor] = None
    token_accuracy: Optional[torch.Tensor] = None
    predicted_tokens: Optional[torch.Tensor] = None


@torch.library.register_fake("slothai::fused_ce")
def _fake(*args):
    a = _ARGS.bind(args)
    n, h = a.hidden.shape
    v = a.weight.shape[0]
    per_row = (n,) if a.reduction == "none" else ()
    loss = a.hidden.new_empty(per_row, dtype=torch.float32)
    dh = a.hidden.new_empty((n, h) if a.grad_hidden else (0, 0))
    dw = a.hidden.new_empty((v, h) if a.grad_weight else (0, 0))
    db = a.hidden.new_empty((v,) if a.grad_bias else (0,))
    z = a.hidden.new_empty(per_row if a.return_z_loss else (0,), dtype=torch.float32)
    acc = a.hidden.new_empty(per_row if a.return_token_accuracy else (0,), dtype=torch.float32)
    pred = a.hidden.new_empty((n,) if a.return_predicted_tokens else (0,), dtype=torch.int64)
    return loss, dh, dw, db, z, acc, pred


def _setup_context(ctx, inputs, output):
    a = _ARGS.bind(inputs)
    ctx.options = {name: getattr(a, name) for name in _OPTIONS}
    ctx.formed = (a.grad_hidden, a.grad_weight, a.grad_bias)
    _, dh, dw, db, z, acc, pred = output
    ctx.mark_non_differentiable(dh, dw, db, z, acc, pred)
    # Else autograd hands backward zeros for dh, dw and db, the size of the
    # gradients themselves (measured: 1.2 GB more at N16384 H4096 V128256).
    ctx.set_materialize_grads(False)
    if a.reduction == "none":  # backward recomputes with per-row factors
        ctx.save_for_backward(a.hidden, a.weight, a.bias, a.target, a.ce_weight)
    else:  # sum / mean: the forward already formed the gradients for an upstream 1
        ctx.save_for_backward(dh, dw, db)


def _graph_kept():
    """Whether the running backward keeps the graph (retain_graph): if not, what it
    saved is read once, and can be scaled in place. True where torch cannot say."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else keep()


def _scaled(t, g):
    """t * g with the product formed in fp32 and rounded once (g is an fp32 scalar
    tensor: casting it to bf16 first would scale every gradient by up to 2^-8), in
    place when the graph is not kept (t, saved by forward, is not read again).
    An element that is exactly 0 stays 0 whatever g is: an ignored row's gradient,
    and every gradient when no row counts (sum / num_items_in_batch with a count
    of 0 hands backward g = inf), stays 0 as torch's cross-entropy leaves it."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        # traced (Dynamo, or AOTAutograd's fake / functional tensors): one
        # out-of-place expression, which inductor fuses; an exact 0 stays 0, as scale_
        return torch.where(t == 0, t, (t.float() * g).to(t.dtype))
    if t.numel() == 0:
        return t
    return scale_(t if not _graph_kept() else t.clone(), g.float().reshape(()))


def _backward(ctx, g_loss, *_):
    if g_loss is None:  # no gradient reached the loss
        return _ARGS.gradients()
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # a backward with create_graph=True
        raise RuntimeError(
            "fused_linear_cross_entropy has no double backward: its gradients cannot be differentiated, so a "
            "backward with create_graph=True (a gradient penalty, a Hessian, torch.func.grad) is refused rather "
            "than answered with gradients taken as constants; chunked_linear_loss with a cross-entropy loss_fn "
            "supports it")
    need = _ARGS.bind(ctx.needs_input_grad)
    if ctx.options["reduction"] == "none":
        hidden, weight, bias, target, ce_weight = ctx.saved_tensors
        wanted = (need.hidden, need.weight, need.bias and bias is not None)
        _, dh, dw, db, _, _, _ = _fused_ce(hidden, weight, bias, target, g_loss.float().reshape(-1), **ctx.options,
                                           grad_hidden=wanted[0], grad_weight=wanted[1], grad_bias=wanted[2],
                                           ce_weight=ce_weight)
    else:
        wanted = ctx.formed
        dh, dw, db = (_scaled(t, g_loss) for t in ctx.saved_tensors)
    return _ARGS.gradients(hidden=dh if wanted[0] else None, weight=dw if wanted[1] else None,
                           bias=db if wanted[2] else None)


register_autograd("fused_ce", _backward, setup_context=_setup_context)


def check_chunk_size(chunk_size):
    """chunk_size: None (the default) or a positive int that fits int64."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    try:
        n = operator.index(chunk_size)
    except TypeError:
        raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__} "
                        f"{chunk_size!r}") from None
    if not 1 <= n < 2**63:
        raise ValueError(f"chunk_size must be a positive number of tokens below 2**63 or None, got {chunk_size!r}")


def check_tokens(hidden, target):
    if hidden.dim() < 1 or tuple(target.shape[: hidden.dim() - 1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target's leading dims {tuple(target.shape)} must match hidden's "
                         f"{tuple(hidden.shape[:-1])} (hidden is (..., H))")


def check_ce_weight(ce_weight):
    if ce_weight is None:
        return
    if not isinstance(ce_weight, torch.Tensor):
        raise TypeError(f"ce_weight must be a tensor of class weights (V,) or None, got {type(ce_weight).__name__}")
    if ce_weight.requires_grad and torch.is_grad_enabled():
        # torch's cross_entropy refuses it too: the loss has no gradient for the weights
        raise ValueError("ce_weight requires grad, but the loss is not differentiable with respect to the class "
                         "weights (neither is torch's cross_entropy): pass ce_weight.detach()")


def fused_linear_cross_entropy(hidden, weight, target, bias=None, *, ce_weight=None, ignore_index=-100,
                               reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0, chunk_size=None,
                               fp32_weight_grad=True, use_token_scaling=False, return_z_loss=False,
                               return_token_accuracy=False, return_predicted_tokens=False):
    """Cross-entropy of `hidden @ weight.T + bias` against `target`, chunk by chunk.

    Equals `F.cross_entropy(z.float().view(-1, V), target.view(-1), weight=ce_weight,
    ignore_index=..., reduction=..., label_smoothing=...)` with z softcapped as
    `softcap * tanh(z / softcap)` when given, plus `z_loss * lse**2` per counted row.
    hidden (..., H) fp16/bf16/fp32, weight (V, H), bias (V,) or None, target integer
    with hidden's leading shape. Returns an fp32 scalar, or per-token losses (0 where
    ignored) for reduction="none".

    The options and outputs Liger-Kernel's fused loss has, under its names:
    - ce_weight (V,), any float dtype: per-class weights with torch's semantics — a
      row's loss times w[target] (label smoothing: eps / V * sum_j w_j (-log p_j)),
      and mean divides by the sum of w[target] over the counted rows. The z-loss
      term is not weighted (mean divides it by the count of counted rows), as Liger's.
    - use_token_scaling: each row's loss (z-loss term included) and gradient times
      its predicted probability of the target, p_t, taken as a constant.
    - return_z_loss, return_token_accuracy, return_predicted_tokens: then the result
      is a `CrossEntropyOutput(loss, z_loss, token_accuracy, predicted_tokens)`, the
      fields not asked for None. z_loss: the z-loss term alone (`z_loss * lse**2`,
      token-scaled), reduced as the loss (mean: over the counted rows), fp32.
      token_accuracy: the fraction of counted rows whose argmax is the target (with
      reduction sum too, as Liger's; per row, 0 where ignored, with "none"), fp32.
      predicted_tokens: each row's argmax, int64 in target's shape, -1 where ignored.
      The argmax is torch.argmax's on the (softcapped) logits: the lowest index among
      equal maxima, a NaN above everything. None of them is differentiable; all come
      out of the pass that forms the loss, and cost nothing when not asked for.

    Gradients go only to the inputs that require them; a frozen weight costs no dW
    work or memory. A trained half-precision weight's gradient is summed over the
    chunks in fp32 and rounded once, as eager's one GEMM (the default: a V x H fp32
    buffer, 2.1 GB at 128K x 4096); fp32_weight_grad=False sums it in the weight's
    dtype instead, rounding once per chunk (unsloth_zoo's default: no buffer, a
    little less accurate; measured in benchmarks/results/fused_ce*.txt).

    Rows whose target is ignore_index are not computed (counting them waits for the
    GPU once; while a CUDA graph is captured every row is computed instead). Their
    gradient is exactly 0 whatever the upstream gradient, as torch's: a summed loss
    with no counted row divided by its count of 0 (a gradient-accumulation window
    of ignored labels) gives NaN loss and zero gradients, not NaN ones. On CUDA
    a target outside [0, V) that is not ignore_index makes its row's loss NaN (not
    checked on the host); on the CPU it raises ValueError.

    Infinite logits give torch's answers: a -inf logit (a masked token) is a
    probability of 0 (loss inf if it is the target, or with label smoothing, which
    averages over every token); a +inf logit makes its row NaN. softcap must be
    finite (None for no cap). chunk_size: a positive int (tokens per chunk) or None.

    Double backward is not supported: a backward with create_graph=True raises
    RuntimeError (chunked_linear_loss supports it).
    """
    check_reduction(reduction)
    check_tokens(hidden, target)
    if target.dim() != hidden.dim() - 1:
        raise ValueError(f"target must have shape {tuple(hidden.shape[:-1])}, got {tuple(target.shape)}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        # inf would be softcap * tanh(z / softcap) = inf * 0 = NaN: pass None for no cap
        raise ValueError(f"softcap must be a positive finite number or None (no cap), got {softcap!r}")
    check_chunk_size(chunk_size)
    check_ce_weight(ce_weight)
    # With reduction none the gradients need the upstream one per row: backward forms them.
    grad = torch.is_grad_enabled() and reduction != "none"
    returns = dict(return_z_loss=bool(return_z_loss), return_token_accuracy=bool(return_token_accuracy),
                   return_predicted_tokens=bool(return_predicted_tokens))
    loss, _, _, _, z, acc, pred = _fused_ce(
        hidden=hidden.reshape(target.numel(), hidden.shape[-1]), weight=weight, bias=bias, target=target.reshape(-1),
        grad_rows=None, ignore_index=int(ignore_index), label_smoothing=float(label_smoothing),
        softcap=float(softcap or 0.0), z_loss=float(z_loss), reduction=reduction,
        chunk_size=operator.index(chunk_size or 0),
        grad_hidden=grad and hidden.requires_grad, grad_weight=grad and weight.requires_grad,
        grad_bias=grad and bias is not None and bias.requires_grad, fp32_weight_grad=bool(fp32_weight_grad),
        ce_weight=ce_weight, use_token_scaling=bool(use_token_scaling), **returns,
    )
    per_row = (lambda t: t.view(target.shape)) if reduction == "none" else (lambda t: t)  # noqa: E731
    if not any(returns.values()):
        return per_row(loss)
    return CrossEntropyOutput(loss=per_row(loss), z_loss=per_row(z) if return_z_loss else None,
                              token_accuracy=per_row(acc) if return_token_accuracy else None,
                              predicted_tokens=pred.view(target.shape) if return_predicted_tokens else None)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Module form of `fused_linear_cross_entropy`: `loss_fn(hidden, weight, target, bias=None)`
    (Liger-Kernel's module takes the weight first: slothai.ops.liger has that form)."""

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0,
                 chunk_size=None, fp32_weight_grad=True, *, ce_weight=None, use_token_scaling=False,
                 return_z_loss=False, return_token_accuracy=False, return_predicted_tokens=False):
        super().__init__()
        check_reduction(reduction)
        check_chunk_size(chunk_size)
        check_ce_weight(ce_weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.softcap, self.z_loss, self.chunk_size = softcap, z_loss, chunk_size
        self.fp32_weight_grad, self.ce_weight, self.use_token_scaling = fp32_weight_grad, ce_weight, use_token_scaling
        self.return_z_loss, self.return_token_accuracy = return_z_loss, return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens

    def forward(self, hidden, weight, target, bias=None):
        return fused_linear_cross_entropy(
            hidden, weight, target, bias, ce_weight=self.ce_weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, softcap=self.softcap, z_loss=self.z_loss,
            chunk_size=self.chunk_size, fp32_weight_grad=self.fp32_weight_grad,
            use_token_scaling=self.use_token_scaling, return_z_loss=self.return_z_loss,
            return_token_accuracy=self.return_token_accuracy, return_predicted_tokens=self.return_predicted_tokens)

    def extra_repr(self):
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
