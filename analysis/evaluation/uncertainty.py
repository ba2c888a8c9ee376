"""How sure a compared number is: an interval for every value moescope puts side by side, and the
rule that marks a value "best" only where it is better than every other beyond their intervals.

* Perplexity: a per-window interval. With window ``i`` summing ``s_i`` nats over ``c_i`` predicted
  tokens, the pooled mean loss is ``m = Σ s_i / Σ c_i`` (perplexity ``exp(m)``); its standard error
  is the ratio estimator's, ``se² = k / (k − 1) · Σ (s_i − m·c_i)² / (Σ c_i)²`` over the ``k``
  windows, and the 95 % interval is ``exp(m ± 1.96·se)``. With equal token counts this is the
  familiar standard error of a mean of ``k`` window losses (two windows of losses ``a`` and ``b``:
  ``se = |a − b| / 2``).
* lm-eval task scores: lm-eval's own standard error (``<metric>_stderr``: the closed form
  ``sd / √n`` for a mean such as ``acc``, its bootstrap otherwise), as ``value ± 1.96·stderr``.
* Speed: the range over the repeats (worst pairing to best pairing, see
  :func:`~moescope.analysis.evaluation.efficiency.speed_verdict`); a ratio measured while other
  processes kept the machine busy, or whose range covers 1.0×, is within noise and never best.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959964  # two-sided 95 % of a normal distribution


@dataclass(frozen=True)
class Interval:
    """A value with its 95 % ``low``–``high`` range; ``noisy`` (a reason) where the value is not to be
    trusted at all (e.g. a speed measured on a busy machine)."""

    value: float
    low: float
    high: float
    noisy: str | None = None

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high


def mean_loss_se(sums: Sequence[float], counts: Sequence[int]) -> tuple[float, float | None]:
    """``(m, se)``: the pooled mean loss ``Σ s_i / Σ c_i`` of windows and its ratio-estimator
    standard error (None for fewer than two windows)."""
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("no predicted tokens")
    m = float(sum(sums)) / total
    k = len(sums)
    if k < 2:
        return m, None
    resid = sum((s - m * c) ** 2 for s, c in zip(sums, counts))
    return m, math.sqrt(k / (k - 1) * resid) / total


def perplexity_interval(sums: Sequence[float], counts: Sequence[int]) -> Interval:
    """Perplexity ``exp(m)`` of windows with per-window loss sums and token counts, with the 95 %
    per-window interval ``exp(m ± 1.96·se)`` (see the module docstring); a single window has the
    point as its interval."""
    m, se = mean_loss_se(sums, counts)
    if se is None:
        return Interval(math.exp(m), math.exp(m), math.exp(m))
    return Interval(math.exp(m), math.exp(m - Z95 * se), math.exp(m + Z95 * se))


def stderr_interval(value: float, stderr: float | None) -> Interval:
    """An lm-eval score with lm-eval's standard error: ``value ± 1.96·stderr`` (the point alone
    where lm-eval gave none)."""
    if stderr is None or not isinstance(stderr, int | float) or math.isnan(stderr):
        return Interval(value, value, value)
    return Interval(value, value - Z95 * stderr, value + Z95 * stderr)


def best_beyond_noise(values: dict[str, Interval | None], direction: str) -> str | None:
    """The key whose value is best (``direction`` "lower" or "higher") *and* whose interval lies
    entirely beyond every other value's interval; None where the best is within noise of another
    (intervals overlap), where it is noisy itself, or where there are fewer than two values.
    Noisy values take no part (they cannot be beaten or win)."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    usable = {k: v for k, v in values.items() if v is not None and v.noisy is None and not math.isnan(v.value)}
    if len(usable) < 2:
        return None
    sign = 1 if direction == "lower" else -1
    best = min(usable, key=lambda k: sign * usable[k].value)
    b = usable[best]
    for k, v in usable.items():
        if k == best:
            continue
        if b.overlaps(v):
            return None
    return best


def differs(value: Interval | None, reference: Interval | None) -> bool | None:
    """Whether ``value`` is told apart from ``reference`` (their intervals do not overlap and
    neither is noisy); None where either is missing."""
    if value is None or reference is None:
        return None
    if value.noisy or reference.noisy:
        return False
    return not value.overlaps(reference)
