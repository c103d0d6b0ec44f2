"""One exception type for everything a user can get wrong.

NOTE: the CLI and the server print `str(err)` as a single line, so messages must name the cause
(file, field, value) and never span lines.
"""


class RawpagedError(Exception):
    """A user-facing error: bad model directory, bad argument, impossible request."""
