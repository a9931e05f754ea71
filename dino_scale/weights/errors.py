"""The error every weight reader raises."""

from dino_scale.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says why."""
