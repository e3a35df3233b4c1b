"""An op's arguments by name, read from its own schema (csrc/torch/library.cpp),
so that no Python code repeats an argument's position."""
import types


class Arguments:
    """The argument names of one op (an OpOverload), in schema order."""

    def __init__(self, op):
        self.names = tuple(a.name for a in op._schema.arguments)

    def bind(self, values):
        """Per-argument values (a call's inputs, or ctx.needs_input_grad) by name."""
        values = tuple(values)
        if len(values) != len(self.names):
            raise TypeError(f"expected {len(self.names)} values for {self.names}, got {len(values)}")
        return types.SimpleNamespace(**dict(zip(self.names, values)))

    def gradients(self, **grads):
        """What the op's backward returns: these gradients at their arguments' places, None elsewhere."""
        unknown = set(grads) - set(self.names)
        if unknown:
            raise TypeError(f"no argument named {sorted(unknown)} in {self.names}")
        return tuple(grads.get(name) for name in self.names)
