"""vfioproxy: a man-in-the-middle proxy, recorder and replay engine for vfio-user."""

__version__ = "0.1.0"
