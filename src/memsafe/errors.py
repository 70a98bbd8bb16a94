"""One exception type for every problem a user can fix: the CLI prints its message on one line."""


class MemsafeError(Exception):
    """A user-facing error: bad input, bad config, or a run that cannot continue."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
