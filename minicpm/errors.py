"""The one exception type users see: a clear, one-line message about their input."""


class UserError(Exception):
    """Bad input or environment, reported as one line (no traceback) by every CLI."""
