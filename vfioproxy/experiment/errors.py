"""Errors of ``vfioproxy experiment``."""

from __future__ import annotations

from vfioproxy.errors import VfioProxyError

__all__ = ["ExperimentError", "SweepError"]


class ExperimentError(VfioProxyError):
    """An experiment cannot be set up or run (bad option, missing server socket...)."""


class SweepError(ExperimentError):
    """A ``--sweep`` or ``--rule`` text is not valid; the message names the part at fault."""
