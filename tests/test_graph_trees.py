"""slothai.compiling.cudagraphs: its replacements of the CUDA-graph trees' bookkeeping give
torch's own answers, on paths of real storage weak references (CPU storages: the
methods only read addresses and reference counts)."""
import random
import types

import pytest
import torch
from torch._inductor.cudagraph_trees import StorageWeakRefWrapper

from slothai.compiling import cudagraphs as graph_trees

METHODS = [("CUDAGraphNode", "_is_cuda_graph_recorded_tensor"), ("CUDAGraphNode", "_is_alias_of_live_recorded_tensor"),
           ("CUDAWarmupNode", "_is_cuda_graph_recorded_tensor")]


def make_path(seed, levels=6, width=12):
    """A path of recorded outputs: live ones, dead ones (their tensor freed), Nones,
    and entries sharing a storage. Returns the path and the tensors kept alive."""
    rng = random.Random(seed)
    alive, path = [], []
    for _ in range(levels):
        refs = []
        for _ in range(rng.randint(0, width)):
            kind = rng.random()
            if kind < 0.15:
                refs.append(None)
            elif kind < 0.3 and alive:  # a second output on an existing storage
                refs.append(StorageWeakRefWrapper(rng.choice(alive)))
            else:
                t = torch.empty(rng.randint(1, 64))
                refs.append(StorageWeakRefWrapper(t))
                if kind < 0.75:
                    alive.append(t)
        path.append(refs)
    return path, alive


def queries(alive):
    """Tensors to ask about: live outputs, views into them, unrelated tensors."""
    return alive + [t[1:] for t in alive if t.numel() > 1] + [torch.empty(3) for _ in range(3)]


def graph_node(path):
    return types.SimpleNamespace(path_weakrefs=path)


def warmup_node(path, ours=False):
    """A warm-up node over `path`; its path_live_weakrefs is torch's, or ours."""
    nodes = [types.SimpleNamespace(outputs_weakrefs=refs) for refs in path]
    node = types.SimpleNamespace(_path_from_root=nodes)
    walk = graph_trees._REPLACEMENTS["CUDAWarmupNode", "path_live_weakrefs"] if ours else \
        graph_trees.original("CUDAWarmupNode", "path_live_weakrefs")
    node.path_live_weakrefs = lambda: walk(node)
    return node


def path_walks_answer_as_torch(path):
    """The path walks (live outputs, all dead?) of both node kinds, ours against torch's."""
    ours_node, theirs_node = warmup_node(path, ours=True), warmup_node(path)
    ours = list(graph_trees._REPLACEMENTS["CUDAWarmupNode", "path_live_weakrefs"](ours_node))
    assert ours == list(graph_trees.original("CUDAWarmupNode", "path_live_weakrefs")(theirs_node))
    assert graph_trees._REPLACEMENTS["CUDAWarmupNode", "all_outputs_are_dead"](ours_node) == \
        graph_trees.original("CUDAWarmupNode", "all_outputs_are_dead")(theirs_node) == (not ours)
    node = graph_node(path)
    node.live_indices_after_graph = [(d, i) for d, refs in enumerate(path) for i in range(len(refs))]
    assert list(graph_trees._REPLACEMENTS["CUDAGraphNode", "path_live_weakrefs"](node)) == \
        list(graph_trees.original("CUDAGraphNode", "path_live_weakrefs")(node))


@pytest.mark.parametrize("seed", range(20))
def test_replacements_answer_as_torch(seed):
    path, alive = make_path(seed)
    for cls_name, attr in METHODS:
        node = (warmup_node if cls_name == "CUDAWarmupNode" else graph_node)(path)
        ours = graph_trees._REPLACEMENTS[cls_name, attr]
        theirs = graph_trees.original(cls_name, attr)
        for q in queries(alive):
            assert ours(node, q) == theirs(node, q), (cls_name, attr)
    theirs = graph_trees.original("CUDAGraphNode", "_get_liveness").__func__
    ours = graph_trees._REPLACEMENTS["CUDAGraphNode", "_get_liveness"].__func__
    assert ours(path) == theirs(path)
    path_walks_answer_as_torch(path)
    del alive[: len(alive) // 2]  # outputs die between checks
    assert ours(path) == theirs(path)
    path_walks_answer_as_torch(path)
    del alive[:]
    path_walks_answer_as_torch(path)


def test_checks_follow_a_node_list_that_changes():
    """torch appends to a node's output list while recording and may replace an entry:
    the cached addresses must follow, or a check answers from a stale list."""
    recorded = graph_trees._REPLACEMENTS["CUDAGraphNode", "_is_cuda_graph_recorded_tensor"]
    alias = graph_trees._REPLACEMENTS["CUDAGraphNode", "_is_alias_of_live_recorded_tensor"]
    a, b, c = torch.empty(4), torch.empty(4), torch.empty(4)
    refs = [StorageWeakRefWrapper(a)]
    node = graph_node([refs])
    assert recorded(node, a) and not recorded(node, b)
    refs.append(StorageWeakRefWrapper(b))  # appended after a check
    assert recorded(node, b) and alias(node, b) == (0, 1)
    refs[0] = StorageWeakRefWrapper(c)  # replaced in place
    assert recorded(node, c) and not recorded(node, a) and alias(node, c) == (0, 0) and alias(node, a) is None


def test_alias_of_live_skips_dead_entries_at_the_same_address():
    """Two outputs at one address, the first dead: the live one's position is the answer."""
    t = torch.empty(8)
    live = StorageWeakRefWrapper(t)
    gone = torch.empty(8)
    dead = StorageWeakRefWrapper(gone)
    del gone
    dead._data_ptr = live.data_ptr()  # the dead output's memory since reused by t
    node = graph_node([[None, dead], [live]])
    assert graph_trees._REPLACEMENTS["CUDAGraphNode", "_is_alias_of_live_recorded_tensor"](node, t) == (1, 0)
    assert graph_trees.original("CUDAGraphNode", "_is_alias_of_live_recorded_tensor")(node, t) == (1, 0)


def test_install_replaces_once_and_keeps_torchs():
    from torch._inductor import cudagraph_trees as trees
    graph_trees.install()
    graph_trees.install()
    for (cls_name, attr), fn in graph_trees._REPLACEMENTS.items():
        assert vars(getattr(trees, cls_name))[attr] is fn
        assert graph_trees.original(cls_name, attr) is not fn
