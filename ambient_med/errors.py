"""The one exception type that the CLI turns into a single clear line."""


class AmbientMedError(Exception):
    """A user-facing error: bad input file, bad config key, missing dependency.

    The message must name the file or config key and the reason, on one line, and must never
    contain a patient identifier read from an input.
    """
