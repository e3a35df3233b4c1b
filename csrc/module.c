/*
 * The `slothai._C` extension module. Its only job is to be importable: loading
 * this shared object runs the TORCH_LIBRARY registrations linked into it.
 * Written against the CPython limited API, so one build serves Python >= 3.9.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef slothai_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "slothai's compiled operators (registered as torch.ops.slothai.*)",
    -1,   /* no per-module state */
    NULL, /* no methods: importing is the point */
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&slothai_c_module); }
