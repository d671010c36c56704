"""The error types of the storage layer (and `one_line`, which their messages use)."""

from nbody_dt.errors import one_line

__all__ = ["RunError", "RunNotFound", "one_line"]


class RunError(Exception):
    """A run URL is missing, foreign, corrupt, unreadable, locked, or opened with a conflicting config.

    The message is a single line meant for the command line; nothing is changed on storage when
    it is raised.
    """


class RunNotFound(RunError):
    """Nothing at all is stored at the run URL (a fresh run may be created there)."""
