"""The one error type users see: a one-line message naming the field or file."""


class HarnessError(Exception):
    """Bad input or an unusable environment; the CLI prints it on one line and exits 2."""
