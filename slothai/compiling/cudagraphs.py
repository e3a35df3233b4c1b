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

Warming up a new length bucket (the first step at it) walks the path too: each
layer call asks whether every output on the path is dead (torch lists all the live
ones to answer) and lists the live ones again, a walk of every output of the step
so far per call (0.17-0.24 s of a 0.5-0.7 s warm-up step under cProfile, 1B shape,
H100). The answer to "all dead?" stops at the first live output here, and the
liveness test is inlined.

Each check reads a node's recorded addresses from a cache (`_addresses`): a set
per node's output list, kept while the list holds the same wrappers (compared by
identity, in C), so a check costs a set lookup per node of the path, not a Python
comparison per output.
"""
from ..patching.fsdp import is_fsdp_module, is_fully_sharded

_ORIGINALS = {}
_ADDRESSES = {}  # id(output list) -> (the list, its wrappers then, their addresses); see _addresses
_ADDRESSES_MAX = 1 << 14  # lists cached before the cache is emptied (a node's list is one entry)


def _addresses(refs):
    """The set of storage addresses of a node's recorded outputs (None entries left
    out), cached until the list holds other wrappers: torch appends to a node's list
    while recording it and may replace an entry later. A wrapper's address never
    changes (it is the address the storage had when recorded)."""
    hit = _ADDRESSES.get(id(refs))
    if hit is not None and hit[0] is refs and hit[1] == refs:  # == compares the wrappers by identity
        return hit[2]
    if len(_ADDRESSES) >= _ADDRESSES_MAX:
        _ADDRESSES.clear()
    ptrs = {ref.data_ptr() for ref in refs if ref is not None}
    _ADDRESSES[id(refs)] = (refs, list(refs), ptrs)
    return ptrs


def _node_is_recorded(self, t):
    """CUDAGraphNode._is_cuda_graph_recorded_tensor: is t's storage an output of a
    graph on this path (alive or not: graph-owned memory is never released)."""
    ptr = t.untyped_storage().data_ptr()
    return any(ptr in _addresses(refs) for refs in self.path_weakrefs)


def _node_alias_of_live(self, t):
    """CUDAGraphNode._is_alias_of_live_recorded_tensor: (depth, index) of the first
    live output on the path whose storage t shares, or None."""
    ptr = t.untyped_storage().data_ptr()
    for depth, refs in enumerate(self.path_weakrefs):
        if ptr in _addresses(refs):
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
               for node in self._path_from_root if ptr in _addresses(node.outputs_weakrefs)
               for ref in node.outputs_weakrefs)


def _warmup_path_live(self):
    """CUDAWarmupNode.path_live_weakrefs: the live outputs of the path's nodes, root
    first (torch's, with its is_live inlined)."""
    for node in self._path_from_root:
        for ref in node.outputs_weakrefs:
            if ref is not None and ref() is not None:
                yield ref


def _node_path_live(self):
    """CUDAGraphNode.path_live_weakrefs: the outputs live after this node's graph that
    are live now (torch's, with its is_live inlined)."""
    path = self.path_weakrefs
    for depth, index in self.live_indices_after_graph:
        ref = path[depth][index]
        if ref is not None and ref() is not None:
            yield ref


def _warmup_all_dead(self):
    """CUDAWarmupNode.all_outputs_are_dead: no live output on the path; stops at the
    first live one, where torch lists them all."""
    return next(self.path_live_weakrefs(), None) is None


_REPLACEMENTS = {
    ("CUDAGraphNode", "_is_cuda_graph_recorded_tensor"): _node_is_recorded,
    ("CUDAGraphNode", "_is_alias_of_live_recorded_tensor"): _node_alias_of_live,
    ("CUDAGraphNode", "_get_liveness"): staticmethod(_get_liveness),
    ("CUDAGraphNode", "path_live_weakrefs"): _node_path_live,
    ("CUDAWarmupNode", "_is_cuda_graph_recorded_tensor"): _warmup_is_recorded,
    ("CUDAWarmupNode", "path_live_weakrefs"): _warmup_path_live,
    ("CUDAWarmupNode", "all_outputs_are_dead"): _warmup_all_dead,
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


def has_cudagraphs(kwargs):
    """Whether torch.compile keyword arguments turn inductor's CUDA graphs on."""
    return bool(kwargs.get("options", {}).get("triton.cudagraphs"))


def without_cudagraphs(kwargs):
    """torch.compile keyword arguments with inductor's CUDA graphs option removed."""
    rest = {k: v for k, v in kwargs.get("options", {}).items() if k != "triton.cudagraphs"}
    kwargs = {k: v for k, v in kwargs.items() if k != "options"}
    return {**kwargs, "options": rest} if rest else kwargs


def why_no_cudagraphs(layer, model=None):
    """Why CUDA graphs cannot replay `layer` now (see _settle_cudagraphs), or None."""
    if getattr(layer, "gradient_checkpointing", False):  # transformers' gradient_checkpointing_enable()
        return ("the layer checkpoints its activations (transformers' gradient checkpointing, on in TRL's "
                "configs): the recomputation in backward replays its CUDA graph over outputs the backward still "
                "reads")
    if is_fully_sharded(model) if model is not None else is_fsdp_module(layer):  # the whole model: first call only
        return ("the model is sharded by FSDP2's fully_shard: a CUDA graph replays the weight addresses it "
                "recorded, and FSDP2 frees and reallocates them every step")
    return None
