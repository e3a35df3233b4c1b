"""Faster bookkeeping for inductor's CUDA-graph trees, installed by `slothai.compile`
when it turns CUDA graphs on.

Recording a graph (the second step at each new length bucket) checks every input
and output of the new graph against every output recorded before it on the tree's
path, and torch does each check as a Python loop that dereferences a weak
reference and reads the tensor's address again per path entry. A training step of
a regionally compiled model is one long path (every layer's forward, then every
layer's backward; each forward's outputs are the tensors saved for backward), so
recording is quadratic: Llama-3.2-1B, 32 graphs per step, 2,528 alias checks and
3,904 membership checks, 2.2M dereferences (~870 path entries per check); 3.5 of
the 4.8 s of a recording step under cProfile (H100, torch 2.11), where a replayed
step takes 0.07 s.

The replacements give the same answers (tests/test_graph_trees.py compares them
with torch's own on random paths): they read the tensor's address once per call
and compare the recorded address (a plain int) before asking whether the storage
is still alive, which only the matching entry needs.
"""
_ORIGINALS = {}


def _node_is_recorded(self, t):
    """CUDAGraphNode._is_cuda_graph_recorded_tensor: is t's storage an output of a
    graph on this path (alive or not: graph-owned memory is never released)."""
    ptr = t.untyped_storage().data_ptr()
    return any(ref is not None and ref.data_ptr() == ptr for refs in self.path_weakrefs for ref in refs)


def _node_alias_of_live(self, t):
    """CUDAGraphNode._is_alias_of_live_recorded_tensor: (depth, index) of the first
    live output on the path whose storage t shares, or None."""
    ptr = t.untyped_storage().data_ptr()
    for depth, refs in enumerate(self.path_weakrefs):
        for index, ref in enumerate(refs):
            if ref is not None and ref.data_ptr() == ptr and ref() is not None:
                return depth, index
    return None


def _get_liveness(weakrefs):
    """CUDAGraphNode._get_liveness: per output, whether its storage is alive (False
    for a None entry, as torch's pytree.tree_map(is_live, ...) gives)."""
    return [[ref is not None and ref() is not None for ref in refs] for refs in weakrefs]


def _warmup_is_recorded(self, t):
    """CUDAWarmupNode._is_cuda_graph_recorded_tensor: is t's storage a live output of
    a node on this path."""
    ptr = t.untyped_storage().data_ptr()
    return any(ref is not None and ref.data_ptr() == ptr and ref() is not None
               for node in self._path_from_root for ref in node.outputs_weakrefs)


_REPLACEMENTS = {
    ("CUDAGraphNode", "_is_cuda_graph_recorded_tensor"): _node_is_recorded,
    ("CUDAGraphNode", "_is_alias_of_live_recorded_tensor"): _node_alias_of_live,
    ("CUDAGraphNode", "_get_liveness"): staticmethod(_get_liveness),
    ("CUDAWarmupNode", "_is_cuda_graph_recorded_tensor"): _warmup_is_recorded,
}


def install():
    """Replace the methods above (once; a torch without them is left alone)."""
    from torch._inductor import cudagraph_trees as _trees
    for (cls_name, attr), fn in _REPLACEMENTS.items():
        cls = getattr(_trees, cls_name, None)
        if cls is None or attr not in vars(cls) or (cls_name, attr) in _ORIGINALS:
            continue
        _ORIGINALS[cls_name, attr] = vars(cls)[attr]
        setattr(cls, attr, fn)


def original(cls_name, attr):
    """torch's own method (or staticmethod), installed or not: what the tests compare with."""
    from torch._inductor import cudagraph_trees as _trees
    if (cls_name, attr) in _ORIGINALS:
        return _ORIGINALS[cls_name, attr]
    return vars(getattr(_trees, cls_name))[attr]
