"""The op schemas: the one place where slothai's operators are declared.

Each op module registers beside its Python function the op's kernel (one Python
function for the CPU and CUDA: checks, outputs, one call into the C core through
kernels.py), its fake (meta) function and, for the differentiable ones, its
autograd. Declared from Python, with no C++ torch layer under them, so the
compiled part of slothai is independent of the torch release (docs/wheel.md).
"""
import torch

LIB = torch.library.Library("slothai", "DEF")  # noqa: TOR901 (a library of schemas, kept for the process)

# NF4 codes (+ block scales, optionally double-quantized) -> dense weight.
LIB.define("dequant_nf4(Tensor packed, Tensor absmax, Tensor? code2, Tensor? absmax2, Tensor? offset, "
           "int blocksize, int blocksize2, SymInt[] shape, ScalarType dtype) -> Tensor")

# x @ dequant_nf4(...)^T + bias (+ lora_x @ lora_b^T), the weight dequantized in
# x's dtype into a temporary. One opaque op, so that under torch.compile the
# backward's own dequant_nf4 cannot be merged with the forward's (which would
# keep every dense weight alive until backward). lora_x [..., r] and lora_b
# [out_features, r]: a low-rank term the base GEMM accumulates onto, times
# lora_scale (LoRA's A(x), its B and alpha / r), so that base + LoRA is written once.
# lora_scale: a float applied in fp32 to the term, not a pass over lora_x.
NF4_LINEAR = ("(Tensor x, Tensor packed, Tensor absmax, Tensor? code2, Tensor? absmax2, Tensor? offset, "
              "int blocksize, int blocksize2, SymInt[] shape, Tensor? bias, Tensor? lora_x=None, "
              "Tensor? lora_b=None, float lora_scale=1.0) -> Tensor")
LIB.define("nf4_linear" + NF4_LINEAR)
# The same product with the weight read 4-bit, straight into the product
# (nothing of W written): bound by the codes' bytes for a few rows of x, the
# decode shapes; nf4_linear takes it there on its own (nf4_linear.py).
LIB.define("nf4_matmul" + NF4_LINEAR)
# nf4_linear for several weights sharing x (a layer's q/k/v, or gate/up, at a decode
# step): nf4_linear's arguments past x as one list per argument, `shapes` flattened
# ([out, in] of each weight in turn), one output per weight. On CUDA, for a few rows
# of x, one launch of the 4-bit kernel computes them all. No autograd: made by the
# decode step's graph pass (slothai/generation/grouping.py) in no-grad graphs.
LIB.define("nf4_linear_group(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor?[] code2, Tensor?[] absmax2, "
           "Tensor?[] offset, int[] blocksize, int[] blocksize2, SymInt[] shapes, Tensor?[] bias, "
           "Tensor?[] lora_x, Tensor?[] lora_b, float[] lora_scale) -> Tensor[]")

# Linear + cross-entropy over chunks of rows; reduction "none", "sum" or "mean".
# Returns (loss, d hidden, d weight, d bias, z loss, token accuracy, predicted
# tokens): exactly the gradients the grad_* flags ask for, for the upstream
# factors grad_rows or, with reduction sum / mean and no grad_rows, for the
# reduced loss itself; exactly the outputs the return_* flags ask for. Whatever
# is not asked for comes back empty.
# fp32_weight_grad: d weight summed over chunks in fp32 (else in the input dtype).
# ce_weight (V,): class weights as torch's cross_entropy(weight=); use_token_scaling:
# each row's loss and gradient times its (detached) probability of the target.
# The names after fp32_weight_grad are Liger-Kernel's.
LIB.define("fused_ce(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? grad_rows, "
           "int ignore_index, float label_smoothing, float softcap, float z_loss, str reduction, int chunk_size, "
           "bool grad_hidden, bool grad_weight, bool grad_bias, bool fp32_weight_grad, Tensor? ce_weight=None, "
           "bool use_token_scaling=False, bool return_z_loss=False, bool return_token_accuracy=False, "
           "bool return_predicted_tokens=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

# self *= factor in place, the product in fp32 and rounded once into self's
# dtype; factor: one fp32 value on self's device, read there (no host sync).
# fused_ce's backward scales its saved gradients with it.
LIB.define("scale_(Tensor(a!) self, Tensor factor) -> ()")


def register_kernel(name, kernel):
    """`kernel` as the op's implementation on the CPU and on CUDA (it serves both: kernels.launch)."""
    for key in ("CPU", "CUDA"):
        LIB.impl(name, kernel, key)


def register_autograd(name, backward, setup_context):
    """torch.library.register_autograd's Autograd kernel without its per-call cost:
    torch's fills the left-out defaults back in with `utils.fill_defaults`, which
    rebuilds the schema's argument list once per argument -- 32 µs a call for
    nf4_linear's 12 arguments, 90 µs for fused_ce's 20 (CPU, torch 2.13), more
    than everything else in an eager nf4_linear call. Here setup_context gets the
    inputs as the dispatcher passed them, trailing defaults left out (the ops read
    them with schema.Arguments.bind, which fills them in), and backward the same
    `ctx` and `ctx.needs_input_grad` as under torch's. Same registration: an
    autograd.Function at the Autograd key that redispatches below it."""
    op = getattr(torch.ops.slothai, name).default
    below = torch._C._after_autograd_keyset

    def forward(ctx, *args):
        *args, keyset = args
        with torch._C._AutoDispatchBelowAutograd():
            out = op.redispatch(keyset & below, *args)
        setup_context(ctx, tuple(args), out)
        return out

    def backward_(ctx, *grads):
        whole = ctx.needs_input_grad
        ctx.needs_input_grad = whole[:-1]  # not the keyset's
        try:
            return (*backward(ctx, *grads), None)
        finally:
            ctx.needs_input_grad = whole

    function = type(f"Backward_slothai_{name}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_)})

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below, *args)

    LIB.impl(name, kernel, "Autograd", with_keyset=True)
