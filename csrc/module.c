/*
 * The `slothai._C` extension module: the C core's entry points, callable from
 * Python with plain numbers (pointers as ints, sizes, floats), and nothing of
 * torch. slothai/ops/kernels.py fills them from tensors and registers the ops.
 *
 * Written against the CPython limited API (3.10) and with no torch header, so
 * one build serves every Python >= 3.10 and every torch release: the ABI
 * between us and torch is data pointers and a stream. Each function takes the
 * fields of its core argument block (csrc/core/slothai.h) in the header's order,
 * after two leading arguments: `cuda` (run the CUDA kernel) and `ctx`, which is
 * the cudaStream_t to launch on (CUDA) or the number of threads to split the
 * range over (CPU). A status other than SLOTHAI_OK raises RuntimeError.
 *
 * The CUDA kernels live in a separate library, one per CUDA major version
 * (slothai/lib/libslothai_cuda<major>.so, linked to that major's libcudart,
 * which torch has loaded): load_cuda(path) opens the one matching torch's CUDA,
 * so one wheel serves CUDA 12 and CUDA 13 torch builds and CPU-only ones.
 *
 * The GIL is released while a kernel runs (CPU threads, or a CUDA launch).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>

#include "core/slothai.h"

/* glibc 2.34 moved dlopen and pthread_create into libc under new symbol versions;
 * binding the old ones (which every glibc still exports) keeps this module loadable
 * on the glibc 2.28 of manylinux_2_28, as torch's own wheels are. */
#if defined(__x86_64__) && defined(__GLIBC__)
#define SLOTHAI_OLD_SYMBOL(name) __asm__(".symver " #name "," #name "@GLIBC_2.2.5")
SLOTHAI_OLD_SYMBOL(dlopen);
SLOTHAI_OLD_SYMBOL(dlsym);
SLOTHAI_OLD_SYMBOL(dlerror);
SLOTHAI_OLD_SYMBOL(dlclose);
SLOTHAI_OLD_SYMBOL(pthread_create);
SLOTHAI_OLD_SYMBOL(pthread_join);
#endif

/* ---- CUDA entry points, from the library load_cuda opened --------------- */

typedef slothai_status (*dequant_cuda_fn)(const slothai_nf4_args *, void *);
typedef slothai_status (*matmul_cuda_fn)(const slothai_nf4_matmul_args *, void *);
typedef slothai_status (*matmul_group_cuda_fn)(const slothai_nf4_matmul_args *, int, void *);
typedef slothai_status (*rows_cuda_fn)(const slothai_fused_ce_rows_args *, void *);
typedef slothai_status (*scale_cuda_fn)(void *, slothai_dtype, int64_t, const float *, void *);

static struct {
    dequant_cuda_fn dequant_nf4;
    matmul_cuda_fn nf4_matmul;
    matmul_group_cuda_fn nf4_matmul_group;
    rows_cuda_fn fused_ce_rows;
    scale_cuda_fn scale;
} cuda;

static PyObject *load_cuda(PyObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        PyErr_Format(PyExc_OSError, "slothai: cannot load the CUDA kernels: %s", dlerror());
        return NULL;
    }
    void *f[5] = {dlsym(lib, "slothai_dequant_nf4_cuda"), dlsym(lib, "slothai_nf4_matmul_cuda"),
                  dlsym(lib, "slothai_fused_ce_rows_cuda"), dlsym(lib, "slothai_scale_cuda"),
                  dlsym(lib, "slothai_nf4_matmul_group_cuda")};
    for (int i = 0; i < 5; i++)
        if (!f[i]) {
            PyErr_Format(PyExc_OSError, "slothai: %s lacks an entry point of csrc/core/slothai.h", path);
            dlclose(lib);
            return NULL;
        }
    /* Kept open for the life of the process: kernels may still run from it. */
    cuda.dequant_nf4 = (dequant_cuda_fn)f[0];
    cuda.nf4_matmul = (matmul_cuda_fn)f[1];
    cuda.fused_ce_rows = (rows_cuda_fn)f[2];
    cuda.scale = (scale_cuda_fn)f[3];
    cuda.nf4_matmul_group = (matmul_group_cuda_fn)f[4];
    Py_RETURN_NONE;
}

/* ---- CPU: a range of work split over threads ---------------------------- */

typedef slothai_status (*range_fn)(const void *args, int64_t begin, int64_t end);

typedef struct {
    range_fn fn;
    const void *args;
    int64_t begin, end;
    slothai_status status;
} range_job;

static void *run_range(void *p)
{
    range_job *j = p;
    j->status = j->fn(j->args, j->begin, j->end);
    return NULL;
}

/* fn over [0, n) in up to `threads` contiguous parts of at least `grain` items:
 * the calling thread runs the last part. Threads are started per call; the CPU
 * path is the reference (and the tests' path), not where speed is sold. */
#define MAX_THREADS 64
static slothai_status parallel_for(range_fn fn, const void *args, int64_t n, int64_t grain, long threads)
{
    int64_t parts = grain > 0 ? (n + grain - 1) / grain : 1;
    if (parts > threads) parts = threads;
    if (parts > MAX_THREADS) parts = MAX_THREADS;
    if (parts <= 1) return fn(args, 0, n);
    range_job jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t p = 0; p < parts; p++) {
        jobs[p] = (range_job){fn, args, n * p / parts, n * (p + 1) / parts, SLOTHAI_OK};
        if (p < parts - 1) started[p] = pthread_create(&tid[p], NULL, run_range, &jobs[p]) == 0;
    }
    for (int64_t p = 0; p < parts - 1; p++)
        if (!started[p]) run_range(&jobs[p]); /* no thread to be had: run it here */
    run_range(&jobs[parts - 1]);
    slothai_status s = SLOTHAI_OK;
    for (int64_t p = 0; p < parts; p++) {
        if (p < parts - 1 && started[p]) pthread_join(tid[p], NULL);
        if (jobs[p].status != SLOTHAI_OK) s = jobs[p].status;
    }
    return s;
}

static slothai_status dequant_range(const void *a, int64_t b, int64_t e) { return slothai_dequant_nf4_cpu(a, b, e); }
static slothai_status matmul_range(const void *a, int64_t b, int64_t e) { return slothai_nf4_matmul_cpu(a, b, e); }
static slothai_status rows_range(const void *a, int64_t b, int64_t e) { return slothai_fused_ce_rows_cpu(a, b, e); }

typedef struct {
    void *x;
    slothai_dtype dtype;
    const float *factor;
} scale_args;

static slothai_status scale_range(const void *p, int64_t b, int64_t e)
{
    const scale_args *a = p;
    return slothai_scale_cpu(a->x, a->dtype, b, e, a->factor);
}

/* ---- the entry points --------------------------------------------------- */

static PyObject *done(slothai_status s, const char *what, int on_cuda)
{
    if (s == SLOTHAI_OK) Py_RETURN_NONE;
    PyErr_Format(PyExc_RuntimeError, "slothai: %s (%s) failed: %s", what, on_cuda ? "cuda" : "cpu",
                 slothai_status_string(s));
    return NULL;
}

static PyObject *no_cuda(void)
{
    PyErr_SetString(PyExc_RuntimeError, "slothai: the CUDA kernels are not loaded (slothai/ops/kernels.py loads them)");
    return NULL;
}

#define PTR(T, v) ((T)(uintptr_t)(v))
typedef unsigned long long ptr_t; /* "K" */

/* cuda, ctx, then slothai_nf4_args: packed absmax_u8 absmax_f32 code2 absmax2 offset
 * numel blocksize blocksize2 out_dtype out */
static PyObject *dequant_nf4(PyObject *self, PyObject *args)
{
    int on_cuda, dtype;
    ptr_t ctx, packed, u8, f32, code2, absmax2, offset, out;
    long long numel, bs, bs2;
    if (!PyArg_ParseTuple(args, "pKKKKKKKLLLiK", &on_cuda, &ctx, &packed, &u8, &f32, &code2, &absmax2, &offset,
                          &numel, &bs, &bs2, &dtype, &out))
        return NULL;
    if (on_cuda && !cuda.dequant_nf4) return no_cuda();
    const slothai_nf4_args a = {PTR(const uint8_t *, packed), PTR(const uint8_t *, u8), PTR(const float *, f32),
                                PTR(const float *, code2),    PTR(const float *, absmax2), PTR(const float *, offset),
                                numel, bs, bs2, (slothai_dtype)dtype, PTR(void *, out)};
    slothai_status s;
    Py_BEGIN_ALLOW_THREADS
    s = on_cuda ? cuda.dequant_nf4(&a, PTR(void *, ctx)) : parallel_for(dequant_range, &a, numel, 1 << 16, (long)ctx);
    Py_END_ALLOW_THREADS
    return done(s, "dequant_nf4", on_cuda);
}

/* One product's fields: the weight's slothai_nf4_args (as dequant_nf4, without
 * out_dtype and out), then dtype m n k r x bias lora_x lora_b out lora_scale lora_dtype. */
static int matmul_fields(PyObject *t, slothai_nf4_matmul_args *a)
{
    int dtype, lora_dtype;
    ptr_t packed, u8, f32, code2, absmax2, offset, x, bias, lora_x, lora_b, out;
    long long numel, bs, bs2, m, n, k, r;
    double lora_scale;
    if (!PyArg_ParseTuple(t, "KKKKKKLLLiLLLLKKKKKdi", &packed, &u8, &f32, &code2, &absmax2, &offset, &numel, &bs,
                          &bs2, &dtype, &m, &n, &k, &r, &x, &bias, &lora_x, &lora_b, &out, &lora_scale, &lora_dtype))
        return 0;
    *a = (slothai_nf4_matmul_args){
        {PTR(const uint8_t *, packed), PTR(const uint8_t *, u8), PTR(const float *, f32), PTR(const float *, code2),
         PTR(const float *, absmax2), PTR(const float *, offset), numel, bs, bs2, (slothai_dtype)dtype, NULL},
        (slothai_dtype)dtype, m, n, k, r,
        PTR(const void *, x), PTR(const void *, bias), PTR(const void *, lora_x), PTR(const void *, lora_b),
        PTR(void *, out), (float)lora_scale, (slothai_dtype)lora_dtype};
    return 1;
}

/* The CPU reference of one product, split over output features: each thread
 * expands its rows of W once. */
static slothai_status matmul_cpu(const slothai_nf4_matmul_args *a, long threads)
{
    const int64_t grain = a->k > 0 && a->k < (1 << 16) ? (1 << 16) / a->k : 1;
    return parallel_for(matmul_range, a, a->n, grain, threads);
}

/* The leading `cuda, ctx` of a call whose other arguments are parsed apart. */
static int cuda_and_ctx(PyObject *args, int *on_cuda, ptr_t *ctx)
{
    if (PyTuple_Size(args) < 2) {
        PyErr_SetString(PyExc_TypeError, "slothai: expected cuda, ctx, then the fields");
        return 0;
    }
    *on_cuda = PyObject_IsTrue(PyTuple_GetItem(args, 0));
    *ctx = PyLong_AsUnsignedLongLong(PyTuple_GetItem(args, 1));
    return *on_cuda >= 0 && !PyErr_Occurred();
}

/* cuda, ctx, then one product's fields (matmul_fields) */
static PyObject *nf4_matmul(PyObject *self, PyObject *args)
{
    int on_cuda;
    ptr_t ctx;
    slothai_nf4_matmul_args a;
    if (!cuda_and_ctx(args, &on_cuda, &ctx)) return NULL;
    PyObject *fields = PyTuple_GetSlice(args, 2, PyTuple_Size(args));
    if (!fields) return NULL;
    const int ok = matmul_fields(fields, &a);
    Py_DECREF(fields);
    if (!ok) return NULL;
    if (on_cuda && !cuda.nf4_matmul) return no_cuda();
    slothai_status s;
    Py_BEGIN_ALLOW_THREADS
    s = on_cuda ? cuda.nf4_matmul(&a, PTR(void *, ctx)) : matmul_cpu(&a, (long)ctx);
    Py_END_ALLOW_THREADS
    return done(s, "nf4_matmul", on_cuda);
}

/* cuda, ctx, then 1 to SLOTHAI_NF4_GROUP_MAX tuples of a product's fields
 * (matmul_fields), the products sharing x: on CUDA one call of
 * slothai_nf4_matmul_group_cuda, on the CPU the reference per product. */
static PyObject *nf4_matmul_group(PyObject *self, PyObject *args)
{
    int on_cuda;
    ptr_t ctx;
    slothai_nf4_matmul_args a[SLOTHAI_NF4_GROUP_MAX];
    if (!cuda_and_ctx(args, &on_cuda, &ctx)) return NULL;
    const Py_ssize_t count = PyTuple_Size(args) - 2;
    if (count < 1 || count > SLOTHAI_NF4_GROUP_MAX) {
        PyErr_Format(PyExc_ValueError, "slothai: a group holds 1 to %d products, got %zd", SLOTHAI_NF4_GROUP_MAX,
                     count);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++)
        if (!matmul_fields(PyTuple_GetItem(args, i + 2), &a[i])) return NULL;
    if (on_cuda && !cuda.nf4_matmul_group) return no_cuda();
    slothai_status s = SLOTHAI_OK;
    Py_BEGIN_ALLOW_THREADS
    if (on_cuda)
        s = cuda.nf4_matmul_group(a, (int)count, PTR(void *, ctx));
    else
        for (Py_ssize_t i = 0; i < count && s == SLOTHAI_OK; i++) s = matmul_cpu(&a[i], (long)ctx);
    Py_END_ALLOW_THREADS
    return done(s, "nf4_matmul_group", on_cuda);
}

/* cuda, ctx, then slothai_fused_ce_rows_args: logits dtype rows vocab ld target
 * ignore_index label_smoothing softcap z_loss grad grad_stride loss class_weight
 * class_weight_sum z_loss_factor token_scaling z_loss_out accuracy_out argmax_out */
static PyObject *fused_ce_rows(PyObject *self, PyObject *args)
{
    int on_cuda, dtype, token_scaling;
    ptr_t ctx, logits, target, grad, loss, cw, cw_sum, zf, z_out, acc_out, arg_out;
    long long rows, vocab, ld, ignore, grad_stride;
    float eps, softcap, z_loss;
    if (!PyArg_ParseTuple(args, "pKKiLLLKLfffKLKKKKiKKK", &on_cuda, &ctx, &logits, &dtype, &rows, &vocab, &ld, &target,
                          &ignore, &eps, &softcap, &z_loss, &grad, &grad_stride, &loss, &cw, &cw_sum, &zf,
                          &token_scaling, &z_out, &acc_out, &arg_out))
        return NULL;
    if (on_cuda && !cuda.fused_ce_rows) return no_cuda();
    const slothai_fused_ce_rows_args a = {
        PTR(void *, logits), (slothai_dtype)dtype, rows, vocab, ld, PTR(const int64_t *, target), ignore, eps,
        softcap, z_loss, PTR(const float *, grad), grad_stride, PTR(float *, loss), PTR(const float *, cw),
        PTR(const float *, cw_sum), PTR(const float *, zf), token_scaling, PTR(float *, z_out),
        PTR(float *, acc_out), PTR(int64_t *, arg_out)};
    slothai_status s;
    Py_BEGIN_ALLOW_THREADS
    s = on_cuda ? cuda.fused_ce_rows(&a, PTR(void *, ctx)) : parallel_for(rows_range, &a, rows, 1, (long)ctx);
    Py_END_ALLOW_THREADS
    return done(s, "fused_ce rows", on_cuda);
}

/* cuda, ctx, x dtype numel factor */
static PyObject *scale(PyObject *self, PyObject *args)
{
    int on_cuda, dtype;
    ptr_t ctx, x, factor;
    long long numel;
    if (!PyArg_ParseTuple(args, "pKKiLK", &on_cuda, &ctx, &x, &dtype, &numel, &factor)) return NULL;
    if (on_cuda && !cuda.scale) return no_cuda();
    const scale_args a = {PTR(void *, x), (slothai_dtype)dtype, PTR(const float *, factor)};
    slothai_status s;
    Py_BEGIN_ALLOW_THREADS
    s = on_cuda ? cuda.scale(a.x, a.dtype, numel, a.factor, PTR(void *, ctx))
                : parallel_for(scale_range, &a, numel, 1 << 16, (long)ctx);
    Py_END_ALLOW_THREADS
    return done(s, "scale_", on_cuda);
}

static PyMethodDef methods[] = {
    {"load_cuda", load_cuda, METH_VARARGS, "load_cuda(path): open the CUDA kernels' library"},
    {"dequant_nf4", dequant_nf4, METH_VARARGS, "slothai_dequant_nf4_{cpu,cuda}"},
    {"nf4_matmul", nf4_matmul, METH_VARARGS, "slothai_nf4_matmul_{cpu,cuda}"},
    {"nf4_matmul_group", nf4_matmul_group, METH_VARARGS,
     "slothai_nf4_matmul_cpu per product, slothai_nf4_matmul_group_cuda"},
    {"fused_ce_rows", fused_ce_rows, METH_VARARGS, "slothai_fused_ce_rows_{cpu,cuda}"},
    {"scale", scale, METH_VARARGS, "slothai_scale_{cpu,cuda}"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef slothai_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "slothai's C core (csrc/core/slothai.h), called with pointers and sizes",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__C(void)
{
    PyObject *m = PyModule_Create(&slothai_c_module);
    if (!m) return NULL;
    /* The element types' codes and the group size, from the one header that defines them. */
    if (PyModule_AddIntConstant(m, "FLOAT32", SLOTHAI_FLOAT32) || PyModule_AddIntConstant(m, "FLOAT16", SLOTHAI_FLOAT16) ||
        PyModule_AddIntConstant(m, "BFLOAT16", SLOTHAI_BFLOAT16) ||
        PyModule_AddIntConstant(m, "NF4_GROUP_MAX", SLOTHAI_NF4_GROUP_MAX)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
