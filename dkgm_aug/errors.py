"""Exception types raised by dkgm_aug.

Every error we raise on bad input derives from :class:`DKGMError` (itself a
``ValueError``), so callers can catch one type and get a message that says what
to do.
"""


class DKGMError(ValueError):
    """Base class of every error dkgm_aug raises on bad input."""


class CheckpointError(DKGMError):
    """A checkpoint file is missing, corrupt, of an unknown format, or unsafe."""


class DataError(DKGMError):
    """A dataset is missing, empty or holds images the model cannot take."""
