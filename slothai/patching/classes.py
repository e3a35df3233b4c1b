"""How slothai patches a module: its class becomes a subclass of its own,
generated once per (class, kind of patch), whose `forward` is slothai's.

Nothing is stored per instance but the class, so `copy.deepcopy` gives an
independent patched copy that computes with its own weights, pickle / `torch.save`
store the patch and load it back (by the base class and the kind of patch, see
`_reduce_ex`), and torch.compile sees one class, guarded by type, not an object per
layer guarded by identity (which compiled every decoder layer apart). A forward
another library puts in the instance dict (TRL's fused LM head) is left to that
library. The kinds are registered by the modules that implement them
(linear4bit.py, causal_lm.py, slothai/compiling/offload.py); a package above
this one adds methods to a kind with `add_methods` (slothai/generation gives the
causal-LM head its `generate`)."""
import functools


def _patched_class(base, kind):
    """The subclass of `base` whose forward is slothai's `kind` (see `register_kind`);
    one per (base, kind), made on first use."""
    cls = _PATCHED_CLASSES.get((base, kind))
    if cls is not None:
        return cls
    fn, makers, _ = _KINDS[kind]

    def forward(self, *args, **kwargs):
        if type(self) is not cls:  # unpatched, but called through a bound method kept by another library
            return base.forward(self, *args, **kwargs)
        return fn(self, *args, **kwargs)

    # The original's name, docs and signature (`__wrapped__`): transformers' Trainer picks
    # dataset columns from it and generate() validates its keyword arguments against it.
    functools.update_wrapper(forward, base.forward)
    methods = {name: make(base) for name, make in makers.items()}
    cls = type(base.__name__, (base,), {
        "forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__,
        "__doc__": base.__doc__, "__reduce_ex__": _reduce_ex, "_slothai_base": base, "_slothai_kind": kind,
        **methods})
    _PATCHED_CLASSES[(base, kind)] = cls
    return cls


def _reduce_ex(self, protocol):
    """Pickle a patched module as its base class plus the kind of patch: the
    generated class has the base's name, so pickle could not find it by name."""
    rv = object.__reduce_ex__(self, max(2, protocol))
    cls = type(self)
    return (_new_patched, (cls._slothai_base, cls._slothai_kind)) + tuple(rv[2:])


def _new_patched(base, kind):
    obj = base.__new__(base)
    obj.__class__ = _patched_class(base, kind)
    return obj


_KINDS = {}  # kind -> (forward, {method name: maker(base) -> method}, instance attributes); see register_kind
_PATCHED_CLASSES = {}  # (base class, kind) -> generated subclass


def register_kind(kind, forward, methods=None, attrs=()):
    """Name a kind of patch: `forward(module, *args, **kwargs)` replaces the patched
    class's forward; `methods` maps other method names to makers `make(base)`; `attrs`
    names the instance attributes the patch sets, which `uninstall` removes."""
    _KINDS[kind] = (forward, dict(methods or {}), tuple(attrs))


def add_methods(kind, methods, attrs=()):
    """Add methods (name -> maker, as in `register_kind`) and instance attributes to a
    registered kind, also on the classes already generated for it: how a package
    above patching/ (which patching does not import) extends a kind."""
    forward, makers, kind_attrs = _KINDS[kind]
    _KINDS[kind] = (forward, {**makers, **methods}, tuple(dict.fromkeys(kind_attrs + tuple(attrs))))
    for (base, k), cls in _PATCHED_CLASSES.items():
        if k == kind:
            for name, make in methods.items():
                setattr(cls, name, make(base))


def install(module, kind):
    """Patch `module` with `kind` (its class becomes the generated subclass); a module
    already patched is left as it is."""
    if not is_patched(module):
        module.__class__ = _patched_class(type(module), kind)


def uninstall(module):
    """Give a patched module its own class back, without the attributes its patch set."""
    if is_patched(module):
        cls = type(module)
        module.__class__ = cls._slothai_base
        for name in _KINDS[cls._slothai_kind][2]:
            module.__dict__.pop(name, None)


def kind_of(module):
    """The kind of patch `module` has, or None."""
    return type(module)._slothai_kind if is_patched(module) else None


def is_patched(module):
    return "_slothai_base" in type(module).__dict__
