"""The one error class of the merge: bad input or configuration, reported as one line, exit status 2."""


class MergeError(ValueError):
    """A user error: bad configuration, incompatible or corrupt inputs, no room for the output."""

    exit_code = 2


def message_of(e: BaseException, path: str | None = None) -> str:
    """The first line of an error's message, less a leading "path: " or a " (path)" (the caller's message names
    the file)."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if path and msg.startswith(f"{path}: "):
        msg = msg[len(path) + 2:]
    return msg.replace(f" ({path})", "") if path else msg
