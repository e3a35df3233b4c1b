// slothai::dequant_nf4: checks, output allocation, and the CPU kernel.
// The CUDA kernel is registered in dequant_nf4_cuda.cpp; the fake (meta)
// function and the Python function live in slothai/ops/dequant_nf4.py.
#include <ATen/Parallel.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include "dequant_nf4.h"

namespace slothai {

Nf4Call nf4_call(const at::Tensor &packed, const at::Tensor &absmax, const std::optional<at::Tensor> &code2,
                 const std::optional<at::Tensor> &absmax2, const std::optional<at::Tensor> &offset,
                 int64_t blocksize, int64_t blocksize2, c10::SymIntArrayRef sym_shape, at::ScalarType dtype,
                 bool dense)
{
    const at::IntArrayRef shape = C10_AS_INTARRAYREF_SLOW(sym_shape);
    const at::Device dev = packed.device();
    // The element count, checked before anything is allocated (at::empty's own
    // product would overflow first): every size counts, a 0 one as 1, as in at::empty.
    int64_t numel = 1, bound = 1;
    bool overflow = false;
    for (int64_t d : shape) {
        TORCH_CHECK_VALUE(d >= 0, "shape must have non-negative sizes, got ", shape);
        overflow |= c10::mul_overflows(bound, std::max<int64_t>(d, 1), &bound);
        numel *= d == 0 ? 0 : 1;
    }
    TORCH_CHECK_VALUE(!overflow, "shape ", shape, " has more elements than int64 can count");
    numel *= bound;
    Nf4Call c;
    slothai_nf4_args &a = c.args;
    a.out_dtype = core_dtype(dtype, "dtype");
    TORCH_CHECK_VALUE(is_pow2(blocksize) && blocksize >= 32 && blocksize <= 4096,
                      "blocksize must be a power of two in [32, 4096], got ", blocksize);
    const int64_t bytes = packed.numel() * (int64_t)packed.element_size();
    TORCH_CHECK_VALUE(bytes >= numel / 2 + numel % 2, "packed holds ", bytes, " bytes but shape ", shape, " needs ",
                      numel / 2 + numel % 2);

    const int64_t nblocks = numel / blocksize + (numel % blocksize != 0); // (numel + blocksize - 1) could overflow
    check_device(absmax, dev, "absmax");
    TORCH_CHECK_VALUE(absmax.numel() >= nblocks, "absmax has ", absmax.numel(), " scales but shape ", shape,
                      " with blocksize ", blocksize, " needs ", nblocks);
    // The kernels read every input as a flat array in logical order: a strided
    // view is copied first (a no-op for the contiguous tensors bitsandbytes makes).
    c.packed = packed.contiguous();
    c.absmax = absmax.contiguous();
    if (absmax.scalar_type() == at::kByte) {
        // Double quantization: the block scales are uint8 codes into code2.
        TORCH_CHECK_VALUE(code2 && absmax2 && offset,
                          "absmax is uint8 (double-quantized), so code2, absmax2 and offset are required");
        check_dtype(*code2, at::kFloat, "code2");
        check_dtype(*absmax2, at::kFloat, "absmax2");
        // bitsandbytes adds a float16 / bfloat16 offset (some saved checkpoints
        // hold one) to the fp32 scales after widening it, which is exact: do the same.
        TORCH_CHECK_TYPE(at::isFloatingType(offset->scalar_type()), "offset must be a floating-point tensor, got ",
                         offset->scalar_type());
        check_device(*code2, dev, "code2");
        check_device(*absmax2, dev, "absmax2");
        check_device(*offset, dev, "offset");
        TORCH_CHECK_VALUE(code2->numel() == 256, "code2 must have 256 levels, got ", code2->numel());
        TORCH_CHECK_VALUE(offset->numel() == 1, "offset must hold one value, got ", offset->numel());
        TORCH_CHECK_VALUE(is_pow2(blocksize2) && blocksize2 <= 4096,
                          "blocksize2 must be a power of two in [1, 4096], got ", blocksize2);
        const int64_t nblocks2 = (nblocks + blocksize2 - 1) / blocksize2;
        TORCH_CHECK_VALUE(absmax2->numel() >= nblocks2, "absmax2 has ", absmax2->numel(), " scales but ", nblocks,
                          " blocks with blocksize2 ", blocksize2, " need ", nblocks2);
        c.code2 = code2->contiguous();
        c.absmax2 = absmax2->contiguous();
        c.offset = offset->to(at::kFloat);
        a.absmax_u8 = c.absmax.data_ptr<uint8_t>();
        a.code2 = c.code2.data_ptr<float>();
        a.absmax2 = c.absmax2.data_ptr<float>();
        a.offset = c.offset.data_ptr<float>();
    } else {
        TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "absmax must be uint8 or float32, got ",
                         absmax.scalar_type());
        TORCH_CHECK_VALUE(!code2 && !absmax2 && !offset,
                          "absmax is float32 (not double-quantized), so code2, absmax2 and offset must be None");
        a.absmax_f32 = c.absmax.data_ptr<float>();
    }
    a.packed = static_cast<const uint8_t *>(c.packed.data_ptr());
    a.numel = numel;
    a.blocksize = blocksize;
    a.blocksize2 = blocksize2;
    if (dense) {
        c.out = at::empty(shape, packed.options().dtype(dtype));
        a.out = c.out.data_ptr();
    }
    return c;
}

namespace {

at::Tensor dequant_nf4_cpu(const at::Tensor &packed, const at::Tensor &absmax, const std::optional<at::Tensor> &code2,
                           const std::optional<at::Tensor> &absmax2, const std::optional<at::Tensor> &offset,
                           int64_t blocksize, int64_t blocksize2, c10::SymIntArrayRef shape, at::ScalarType dtype)
{
    const Nf4Call c = nf4_call(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype);
    at::parallel_for(0, c.args.numel, 1 << 16, [&](int64_t begin, int64_t end) {
        check_status(slothai_dequant_nf4_cpu(&c.args, begin, end), "dequant_nf4 (cpu)");
    });
    return c.out;
}

} // namespace

TORCH_LIBRARY_IMPL(slothai, CPU, m) { m.impl("dequant_nf4", &dequant_nf4_cpu); }

} // namespace slothai
