"""The decode step's graph pass: the 4-bit products that share x, one op.

A decoder layer calls its projections one by one -- q, k, v on the normed hidden
state, then gate and up on the next one -- so a compiled decode step holds one
`slothai::nf4_linear` per projection, each a launch of its own (inductor cannot fuse
an opaque op). At a decode step each launch reads a few MB of codes in a few µs, so
its fixed cost is a large part of it. This pass, run by inductor on the step's
post-grad graph (Engine.compiled installs it), replaces the nf4_linear calls that
take the same x by one `slothai::nf4_linear_group` (slothai/ops/nf4_group.py): one
launch of the 4-bit kernel for q/k/v, one for gate/up. Every output is what its own
nf4_linear gave, bit for bit, so the pass changes no number.

Calls are grouped in graph order, up to nf4_group.GROUP_MAX a group. A call whose
other inputs depend on an earlier call of its group (none in a decoder layer) is
left alone, as is a call with keyword arguments.
"""
import functools
import hashlib
import operator

import torch

from ..ops.nf4_group import GROUP_MAX
from ..ops.schema import Arguments

_LINEAR = torch.ops.slothai.nf4_linear.default
_GROUP = torch.ops.slothai.nf4_linear_group.default
_ARGS = Arguments(_LINEAR)
_PER_WEIGHT = ("packed", "absmax", "code2", "absmax2", "offset", "blocksize", "blocksize2")
_PER_OUTPUT = ("bias", "lora_x", "lora_b", "lora_scale")


def _calls_by_input(graph):
    """nf4_linear calls with every argument given positionally, by their x node, in graph order."""
    by_x = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _LINEAR and not node.kwargs:
            by_x.setdefault(node.args[0], []).append(node)
    return by_x


def _depends_on(node, targets, order, floor):
    """Whether `node` is computed from any of `targets` (searching back no further than position `floor`)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        for arg in n.all_input_nodes:
            if arg not in seen and order[arg] >= floor:
                seen.add(arg)
                stack.append(arg)
    return False


def _independent(calls, order):
    """The longest leading run of `calls` (up to GROUP_MAX) of which none is computed from another."""
    group = [calls[0]]
    for call in calls[1:GROUP_MAX]:
        others = [a for a in call.all_input_nodes if a is not call.args[0]]
        if any(_depends_on(a, set(group), order, order[group[0]]) for a in others):
            break
        group.append(call)
    return group


def _groups(graph):
    """The groups to make, found on the graph as it is: lists of calls sharing x."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups = []
    for calls in _calls_by_input(graph).values():
        while len(calls) > 1:
            group = _independent(calls, order)
            calls = calls[len(group):]
            if len(group) > 1:
                groups.append(group)
    return groups


def _replace(graph, group):
    """One nf4_linear_group node (and a getitem per output) in place of `group`'s calls.
    Their arguments are read now: an earlier replacement may have changed them."""
    bound = [_ARGS.bind(call.args) for call in group]
    lists = [[getattr(b, name) for b in bound] for name in _PER_WEIGHT]
    shapes = [size for b in bound for size in b.shape]
    outputs = [[getattr(b, name) for b in bound] for name in _PER_OUTPUT]
    with graph.inserting_before(group[-1]):
        node = graph.call_function(_GROUP, (bound[0].x, *lists, shapes, *outputs))
        node.meta["val"] = [call.meta.get("val") for call in group]
        for i, call in enumerate(group):
            item = graph.call_function(operator.getitem, (node, i))
            item.meta.update(call.meta)
            call.replace_all_uses_with(item)
            graph.erase_node(call)


def group_products(graph):
    """Replace the nf4_linear calls of `graph` that share x by nf4_linear_group calls;
    the number of groups made."""
    groups = _groups(graph)
    for group in groups:
        _replace(graph, group)
    if groups:
        from torch._inductor.pattern_matcher import stable_topological_sort

        stable_topological_sort(graph)  # the earlier calls' users now follow their group
    return len(groups)


@functools.cache
def _inductor_pass():
    """group_products as inductor's post-grad custom pass: a CustomGraphPass, so that
    inductor's cache keys it by this module's source. (Made on first use: importing
    inductor's pass machinery takes ~1 s, not to be paid at `import slothai`.)"""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class GroupProducts(CustomGraphPass):
        def __call__(self, graph):
            group_products(graph)

        def uuid(self):
            with open(__file__, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()

    return GroupProducts()


def inductor_options(backend):
    """torch.compile's `options` for a decode step compiled by `backend`: the pass, for inductor."""
    return {"post_grad_custom_post_pass": _inductor_pass()} if backend == "inductor" else None
