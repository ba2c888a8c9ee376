"""The one exception type that carries a user mistake.

Anything raised as :class:`MoescopeError` is printed by the CLI and the dashboard as one line
(no traceback): it must say what was wrong and what is accepted.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MoescopeError(ValueError):
    """A problem with the user's input (model, data source, plan, folder, cache entry)."""


def unknown_name(kind: str, name: str, available: Iterable[str]) -> MoescopeError:
    """Build the error for a registry miss: 'unknown KIND 'x'. Did you mean 'y'? Available: ...'."""
    names = sorted(available)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return MoescopeError(f"unknown {kind} '{name}'.{hint} Available: {', '.join(names)}")
