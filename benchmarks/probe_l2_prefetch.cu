// probe_l2_prefetch.py's kernels: prefetch the first bytes of each row of a buffer into L2 (a line at a
// time, or one bulk prefetch a row on sm_90) and exit; and a kernel that sleeps.
#include <cstdint>
#include <cuda_runtime.h>

// the first `prefix` bytes of each of `rows` rows of `row_bytes`
__global__ void prefetch_lines(const char *p, int64_t rows, int64_t row_bytes, int64_t prefix)
{
    const int64_t per = (prefix + 127) / 128, lines = rows * per;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < lines; i += (int64_t)gridDim.x * blockDim.x)
        asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p + (i / per) * row_bytes + (i % per) * 128));
}

// the same, a bulk prefetch a row (sm_90)
__global__ void prefetch_bulk(const char *p, int64_t rows, int64_t row_bytes, int64_t prefix)
{
    for (int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += (int64_t)gridDim.x * blockDim.x) {
#if __CUDA_ARCH__ >= 900
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + r * row_bytes), "r"((uint32_t)((prefix + 15) & ~15)) : "memory");
#endif
    }
}

__global__ void sleep_kernel(int ns)
{
    __nanosleep(ns);
}

extern "C" int pf_lines(const void *p, int64_t rows, int64_t row_bytes, int64_t prefix, int ctas, void *stream)
{
    prefetch_lines<<<ctas, 256, 0, (cudaStream_t)stream>>>((const char *)p, rows, row_bytes, prefix);
    return (int)cudaGetLastError();
}
extern "C" int pf_bulk(const void *p, int64_t rows, int64_t row_bytes, int64_t prefix, int ctas, void *stream)
{
    prefetch_bulk<<<ctas, 32, 0, (cudaStream_t)stream>>>((const char *)p, rows, row_bytes, prefix);
    return (int)cudaGetLastError();
}
extern "C" int sleep_ns(int ns, void *stream)
{
    sleep_kernel<<<1, 32, 0, (cudaStream_t)stream>>>(ns);
    return (int)cudaGetLastError();
}
