"""The one error type of the storage layer."""


class RunError(Exception):
    """A run URL is missing, foreign, corrupt, unreadable, locked, or opened with a conflicting config.

    The message is a single line meant for the command line; nothing is changed on storage when
    it is raised.
    """


class RunNotFound(RunError):
    """Nothing at all is stored at the run URL (a fresh run may be created there)."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (fsspec/botocore messages can span many lines)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
