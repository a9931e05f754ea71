"""The error every weight reader raises."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says why."""
