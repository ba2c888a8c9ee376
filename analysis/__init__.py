"""moescope analysis backend: every computation lives here; the dashboard and CLI only call it."""

from moescope.analysis.core import __version__
from moescope.analysis.core.errors import MoescopeError

__all__ = ["MoescopeError", "__version__"]
