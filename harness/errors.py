"""The one error type users see: a one-line message naming the field or file."""


class HarnessError(Exception):
    """Bad input or an unusable environment; the CLI prints it on one line and exits 2."""


def redact(url: str) -> str:
    """The URL with its password replaced by ***: a password is never printed or logged."""
    import re
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


def reason(e: BaseException, limit: int = 300) -> str:
    """'ErrorClass: first line' of an exception (a database driver's own error when it is
    wrapped), password-free: what goes in parentheses after a one-line error."""
    cause = getattr(e, "orig", None) or e
    text = str(cause).strip()
    return redact(f"{cause.__class__.__name__}: {text.splitlines()[0] if text else ''}"[:limit])
