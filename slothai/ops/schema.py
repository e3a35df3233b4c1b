"""An op's arguments by name, read from its own schema (library.py),
so that no Python code repeats an argument's position."""
import types


class Arguments:
    """The argument names of one op (an OpOverload), in schema order."""

    def __init__(self, op):
        args = op._schema.arguments
        self.names = tuple(a.name for a in args)
        # Trailing arguments with defaults (`Tensor? lora_x=None`) may be left out of a call.
        self.required = len(args)
        while self.required and args[self.required - 1].has_default_value():
            self.required -= 1
        self.defaults = tuple(a.default_value for a in args[self.required:])

    def bind(self, values):
        """Per-argument values (a call's inputs, or ctx.needs_input_grad) by name;
        left-out trailing arguments take their schema defaults."""
        values = tuple(values)
        if not self.required <= len(values) <= len(self.names):
            raise TypeError(f"expected {self.required} to {len(self.names)} values for {self.names}, "
                            f"got {len(values)}")
        values += self.defaults[len(values) - self.required:]
        return types.SimpleNamespace(**dict(zip(self.names, values)))

    def gradients(self, **grads):
        """What the op's backward returns: these gradients at their arguments' places, None elsewhere."""
        unknown = set(grads) - set(self.names)
        if unknown:
            raise TypeError(f"no argument named {sorted(unknown)} in {self.names}")
        return tuple(grads.get(name) for name in self.names)
