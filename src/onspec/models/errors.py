"""The one error type of model resolution and loading."""


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved or used; the message says why."""
