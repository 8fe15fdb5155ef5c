"""Exception hierarchy of edp-det.

Every error raised on bad user input derives from :class:`EDPError` *and* ``ValueError`` so that
callers can catch either; tools catch them at top level, print one line and exit with status 2.
Messages name the file, the field and the offending value.
"""

__all__ = ["EDPError", "DataError", "ConfigError", "CheckpointError", "WriteError", "caused_by_interrupt"]


class EDPError(Exception):
    """Base class of all edp-det errors."""


class DataError(EDPError, ValueError):
    """A dataset on disk is missing, malformed or inconsistent."""


class ConfigError(EDPError, ValueError):
    """A configuration value (YAML / CLI override / argument) is invalid."""


class CheckpointError(EDPError, ValueError):
    """A checkpoint or compressed model file is missing, corrupt or incompatible."""


class WriteError(EDPError, OSError):
    """A result file could not be written (disk full, permissions); the previous file, if any, is unchanged."""


def caused_by_interrupt(exc: BaseException | None) -> bool:
    """True when ``exc`` is, or was raised while handling, a KeyboardInterrupt (torch wraps a Ctrl-C during a
    checkpoint write into a RuntimeError chained from it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
