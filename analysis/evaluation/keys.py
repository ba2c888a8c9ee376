"""What every evaluation result is keyed by besides the model fingerprint."""

from __future__ import annotations

from collections.abc import Callable

EVAL_VERSION = 1
Progress = Callable[[str, int, int], None]


def skip_key(model) -> dict[str, float]:
    """The model's dynamic-skipping thresholds as JSON (part of every cache key and record:
    skipping changes outputs, the fingerprint covers only config and weights)."""
    return {str(k): v for k, v in sorted(model.skip_beta.items())}
