"""Errors a user can act on. ``run.py`` prints them as one line and exits non-zero."""


class APError(Exception):
    """A user-facing error whose message says what to do next."""


class MaskError(APError):
    """A mask cannot be applied to a model (unknown site, wrong shape, unsupported backend)."""
