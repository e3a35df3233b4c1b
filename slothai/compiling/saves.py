"""What a compiled decoder layer keeps for backward: `slothai.compile(saves=...)`.

A selective-activation-checkpointing policy, applied inside the compiled layer
(torch.utils.checkpoint with a `context_fn` traces into AOTAutograd, whose
partitioner honours the tags): the outputs that cost matmul FLOPs to make are
kept, everything between them is recomputed in backward, where it fuses into the
backward's own kernels.

  kept        the 4-bit projections' outputs with their LoRA terms added (the sum
              `base(x) + B(A(x)) * s`, not the base output, so that backward
              does not redo the rank-r expansion and the add; under slothai.patch
              the op's own output), attention's outputs (and its log-sum-exp),
              and LoRA's A(x) (r columns);
  recomputed  norms, RoPE, activations, the residual adds, LoRA's B(.) * s, casts;
              with saves="lean" also the MLP's up projection (its GEMM, its LoRA
              term and the product with act(gate)). Per token and layer that is
              intermediate_size elements less: Llama-3.2-1B, bsz 2 x 2048: 4.13 GB
              peak against 5.12 GB for "matmuls", 0.068 s/step against 0.062
              (H100, 2026-11-27, README). Why up: per byte freed, redoing o_proj or attention
              costs about as many FLOPs (at 2048 tokens, a quarter of the bytes
              for a quarter of the FLOPs; attention's share grows with length),
              but in smaller, less efficient kernels.
  offloaded   with saves="offload", what "matmuls" keeps, but one of the MLP's
              tokens x intermediate_size outputs (the first saved: gate's, on
              Llama) goes to pinned host memory and back (offload.py,
              `widest_to_host`, at the layer's call) instead of staying on the GPU.

The policy reads the op stream in forward order: the up projection is the second
expanding (out > in features) nf4_linear on the same input tensor as the one
before it, which is how gated MLPs call gate and up (`down(act(gate(x)) * up(x))`).
"""
import functools
import logging
import warnings

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..ops.schema import Arguments

SAVES = ("lean", "matmuls", "offload")

_NF4_LINEAR = torch.ops.slothai.nf4_linear.default
_NF4_LINEAR_ARGS = Arguments(_NF4_LINEAR)

aten = torch.ops.aten
_ATTENTION = frozenset(getattr(aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward") if hasattr(aten, name))
_MATMULS = frozenset((aten.mm.default, aten.addmm.default, aten.bmm.default))
# A matmul whose inner dimension is at least this costs 2 * K FLOPs per output
# element to redo: kept. Below it (LoRA's B at rank <= 64): recomputed.
KEEP_MATMUL_INNER = 128


class _Policy:
    """The SAC policy of one checkpointed call. The forward and a recompute (eager
    SAC calls the policy in both) each walk the same op stream: one state each."""

    def __init__(self, recompute_up):
        self.recompute_up = recompute_up
        self.state = {}

    def __call__(self, ctx, op, *args, **kwargs):
        s = self.state.setdefault(ctx.is_recompute, dict(expanding_input=None, in_up=False, width=None))
        if op is _NF4_LINEAR:
            a = _NF4_LINEAR_ARGS.bind(args)
            out_features, in_features = a.shape
            expanding = out_features > in_features
            s["in_up"] = self.recompute_up and expanding and s["expanding_input"] is a.x
            s["expanding_input"] = a.x if expanding and not s["in_up"] else None
            # Its LoRA sum, if any, comes next, unless the op adds the LoRA term itself.
            s["width"] = out_features if a.lora_x is None else None
            return CheckpointPolicy.MUST_RECOMPUTE if s["in_up"] else CheckpointPolicy.MUST_SAVE
        if _is_lora_a(op, args):
            # LoRA's A(x): kept, r columns. Under slothai.patch it comes before its
            # projection (the op takes it), in PEFT's forward after: down's A(h) falls
            # in up's span below, and up's A(x) too.
            return CheckpointPolicy.MUST_SAVE
        if s["in_up"]:  # up's LoRA term and act(gate) * up, until the next projection
            return CheckpointPolicy.MUST_RECOMPUTE
        if op in _ATTENTION:
            return CheckpointPolicy.MUST_SAVE
        # Sizes are compared only where they are plain ints: a comparison with a symbolic
        # (token-count) size would put a guard on it, and a new length could recompile.
        if op in _MATMULS and _inner_is_costly(args[-2].shape[-1]):
            return CheckpointPolicy.MUST_SAVE
        if op is aten.add.Tensor and s["width"] is not None and all(
                isinstance(a, torch.Tensor) and a.dim() >= 2 and isinstance(a.shape[-1], int)
                and a.shape[-1] == s["width"] for a in args[:2]):
            s["width"] = None  # base(x) + LoRA term: keep the sum; the base output is then not needed
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


def _is_lora_a(op, args):
    """A 2-D matmul from a model width (a plain int, at least KEEP_MATMUL_INNER) down to
    fewer than KEEP_MATMUL_INNER columns: LoRA's A at rank r < KEEP_MATMUL_INNER."""
    if op not in (aten.mm.default, aten.addmm.default):
        return False
    k, n = args[-2].shape[-1], args[-1].shape[-1]
    return isinstance(k, int) and k >= KEEP_MATMUL_INNER and isinstance(n, int) and n < KEEP_MATMUL_INNER


def _inner_is_costly(k):
    """A model width (a plain int) of at least KEEP_MATMUL_INNER, or a token count
    (symbolic: attention's probabilities @ values in eager attention)."""
    return not isinstance(k, int) or k >= KEEP_MATMUL_INNER


def _keep_inputs_only(ctx, op, *args, **kwargs):
    """saves="inputs" (low_memory): recompute every op in backward, so the forward
    keeps only its inputs. Random ops excepted: recomputed, they would draw new
    numbers; the partitioner keeps what they drew."""
    if torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_RECOMPUTE


def _contexts(saves):
    policy = _keep_inputs_only if saves == "inputs" else _Policy(recompute_up=saves == "lean")
    return create_selective_checkpoint_contexts(policy)


def check_saves(saves, memory_budget):
    if saves is not None and saves not in SAVES:
        raise ValueError(f"saves must be one of {SAVES} or None, got {saves!r}")
    if saves is not None and memory_budget is not None:
        raise ValueError(f"memory_budget={memory_budget!r} is AOTAutograd's partitioner's knob, used with saves=None; "
                         f"saves={saves!r} decides what is kept itself")


def with_saves(fn, saves):
    """fn, run so that its compiled graph keeps what `saves` says (module docstring;
    "inputs": nothing but its inputs, for low_memory; "offload" keeps what "matmuls"
    does: the copy to the host is made at the call, outside the graph)."""
    contexts = functools.partial(_contexts, saves)
    if saves in SAVES and not getattr(torch._functorch.config, "donated_buffer", True):
        # With donated buffers on, torch refuses a second backward through the compiled
        # graph; off, it runs one, and SAC (which allows one backward per region: eager
        # SAC raises) gave wrong LoRA gradients there (docs/design.md).
        warnings.warn(f"saves={saves!r} with torch._functorch.config.donated_buffer=False: a second backward "
                      "through a compiled layer (retain_graph=True) gives wrong gradients under selective "
                      "checkpointing; compile with saves=None (or low_memory=True) if you need one")

    @functools.wraps(fn)
    def run(*args, **kw):
        return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kw)

    return run


class _DropInPlaceWarning(logging.Filter):
    """torch warns, once per process, that a context_fn under torch.compile must not
    wrap in-place ops: a caution to users of SAC, not about anything they did. The
    layers this wraps are checked against eager (tests/test_saving.py)."""

    def filter(self, record):
        return "context_fn is passed to torch.utils.checkpoint under torch.compile" not in record.getMessage()


logging.getLogger("torch._higher_order_ops.wrap").addFilter(_DropInPlaceWarning())
