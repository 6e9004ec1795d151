"""The one exception type users see: the CLI and the app print its message as a single clear line."""


class NanoSpecError(Exception):
    """A user-facing error (bad argument, unknown model, missing package, corrupt file)."""
