"""Errors the user can cause. Each carries one line saying what is wrong and how to fix it."""


class HarnessError(Exception):
    """Base class: the CLI prints `error: <message>` and exits non-zero, without a traceback."""


class ConfigError(HarnessError):
    """Bad options, unknown method/suite, malformed yaml, invalid class order."""


class DataError(HarnessError):
    """Missing or malformed dataset files."""


class ResourceError(HarnessError):
    """Not enough CPUs/GPUs for the requested workers, unreachable tracking server."""


class CheckpointError(HarnessError):
    """A checkpoint that cannot be read."""


def one_line(text: object, limit: int | None = None) -> str:
    """`text` (an exception's message, a server's reply) as one line, cut at a word before `limit` characters."""
    flat = " ".join(str(text).split())
    if limit is not None and len(flat) > limit:
        flat = flat[:limit].rsplit(" ", 1)[0] + " ..."
    return flat
