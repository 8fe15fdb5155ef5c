"""Exception hierarchy of edp-det.

Every error raised on bad user input derives from :class:`EDPError` *and* ``ValueError`` so that
callers can catch either; tools catch them at top level, print one line and exit with status 2.
Messages name the file, the field and the offending value.
"""

__all__ = ["EDPError", "DataError", "ConfigError", "CheckpointError"]


class EDPError(Exception):
    """Base class of all edp-det errors."""


class DataError(EDPError, ValueError):
    """A dataset on disk is missing, malformed or inconsistent."""


class ConfigError(EDPError, ValueError):
    """A configuration value (YAML / CLI override / argument) is invalid."""


class CheckpointError(EDPError, ValueError):
    """A checkpoint or compressed model file is missing, corrupt or incompatible."""
