"""moescope analysis backend: every computation lives here; the dashboard and CLI only call it."""

from moescope.analysis.errors import MoescopeError

__all__ = ["MoescopeError"]
__version__ = "0.1.0"
