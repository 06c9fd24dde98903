"""The one error class of the merge: bad input or configuration, reported as one line, exit status 2."""


class MergeError(ValueError):
    """A user error: bad configuration, incompatible or corrupt inputs, no room for the output."""

    exit_code = 2
