"""The one exception type users see: a single clear line naming the file, line or key."""


class PrismError(RuntimeError):
    """A user-facing error whose message is one line that names what to fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
