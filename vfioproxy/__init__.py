"""vfioproxy: a man-in-the-middle proxy, recorder and replay engine for vfio-user."""

from recorder.records import TOOL_VERSION

__all__ = ["__version__"]

#: the distribution's version (pyproject.toml), as traces record it
__version__ = TOOL_VERSION
