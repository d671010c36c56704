"""One line of an exception for the command line and logs (every layer may import this)."""


def one_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message (fsspec, botocore and Dask messages can span many
    lines); the type name alone for an empty message, or in front of it with `with_type`."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" if with_type else lines[0]
