"""Every way of choosing what to drop or merge, each producing a :class:`~moescope.analysis.pruning.plan.PruningPlan`.

One module per strategy, each registering itself with :func:`~.base.register` and declaring its
parameters once (:mod:`.base`); every module in this folder is imported here, so adding a
strategy is adding one file. :mod:`.selection` holds the shared target and selection rules.
"""

import importlib
import pkgutil

from moescope.analysis.strategies.base import (
    STRATEGIES,
    Param,
    Strategy,
    StrategyContext,
    get_strategy,
    make_plan,
    register,
    validate_request,
)
from moescope.analysis.strategies.selection import keep_counts

# the built-in strategies in the order they are listed, then any other module of this folder
_BUILTIN = ("simple", "criterion", "grid", "enumeration", "merge", "manual", "skip", "lottery")
for _name in _BUILTIN + tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _BUILTIN)):
    if not _name.startswith("_"):
        importlib.import_module(f"{__name__}.{_name}")

from moescope.analysis.strategies.presets import PRESETS, check_presets, get_preset  # noqa: E402

check_presets()  # every preset names a registered strategy and only parameters it declares

__all__ = ["PRESETS", "STRATEGIES", "Param", "Strategy", "StrategyContext", "get_preset", "get_strategy",
           "keep_counts", "make_plan", "register", "validate_request"]
