"""The adapter engine's error types, in one module every other adapter module may import (no import circles).

Each names what is wrong and where (a field, a layer, a file); the CLI turns them into one-line messages.
"""


class AdapterConfigError(ValueError):
    """An adapter configuration that cannot be used."""


class AdapterStateError(RuntimeError):
    """An adapter operation that is not valid in the model's current state (merged, unknown name, ...)."""


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded into this model."""


class CompositionError(ValueError):
    """Adapters that cannot be composed (the message names the adapters and, for overlaps, the layer and pair)."""
