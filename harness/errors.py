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


def lost_store(e: BaseException) -> str | None:
    """The one-line cause when `e` is a store (database or tracking server) that stopped
    answering in the middle of a run; None for any other error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        kind = f"{type(e).__module__}.{type(e).__name__}"
        if kind in _LOST or (kind == "mlflow.exceptions.MlflowException" and str(e).startswith("API request to")):
            return reason(e)
        e = e.__cause__ or e.__context__
    return None


_LOST = {"sqlalchemy.exc.OperationalError", "sqlalchemy.exc.InterfaceError",
         "requests.exceptions.ConnectionError", "requests.exceptions.ConnectTimeout",
         "requests.exceptions.ReadTimeout"}
