"""The one exception type that the CLI turns into a one-line error."""


class QuantkitError(Exception):
    """A user-facing error: the message names the problem and the fix."""
