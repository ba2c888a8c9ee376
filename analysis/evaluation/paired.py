"""Paired comparisons: whether one model is better, worse or within noise of another *measured on the
same windows or documents*.

Two models scored on the same evaluation windows share the windows' difficulty: a hard window is
hard for both. Intervals computed for each model on its own (:mod:`.uncertainty`) carry that shared
spread twice and overlap where the models plainly differ; the paired comparison looks only at the
per-window (per-document) differences. moescope uses one method for every paired verdict, the
**paired bootstrap**:

* Perplexity. Window ``i`` has ``c_i`` predicted tokens (the same for both models) and loss sums
  ``a_i`` (model A) and ``b_i`` (model B). The perplexity ratio is
  ``R = exp(Σ b_i / Σ c_i − Σ a_i / Σ c_i)`` (B ÷ A; 1.0 = no change). One bootstrap draw picks
  ``k`` window indices with replacement (the *same* indices for both models) and computes ``R*`` on
  them; the 95 % paired range is the 2.5th–97.5th percentile of :data:`DRAWS` draws.
* lm-eval scores. Document ``j`` has a per-document value for each model (lm-eval's logged
  samples: 0/1 for ``acc``, a ``(log-likelihood, words or bytes)`` pair for the perplexity-like
  metrics). The statistic is the difference of the task's aggregate, ``D = agg(B) − agg(A)``
  (the mean for ``acc``; ``exp(−Σ ll / Σ n)`` for ``word_perplexity`` / ``byte_perplexity``;
  ``−Σ ll / (Σ n · ln 2)`` for ``bits_per_byte``), bootstrapped over documents the same way.

The draws come from ``numpy.random.default_rng(SEED)`` seeded by :data:`SEED`, so the same losses
always give the same range. A verdict is *better* or *worse* only where the whole range lies on one
side of no change (``R = 1``, ``D = 0``), else *within noise*; a range of identical losses is the
point of no change itself (within noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DRAWS = 2000
SEED = 0
NO_CHANGE = {"ratio": 1.0, "difference": 0.0}

# lm-eval metrics whose per-document value is a (log-likelihood, count) pair, with their aggregate
PAIR_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
BETTER = "better"
WORSE = "worse"
WITHIN = "within noise"


@dataclass(frozen=True)
class Paired:
    """B against A on the same items: ``value`` (a ratio B ÷ A, or a difference B − A, see ``kind``),
    its 95 % paired-bootstrap range, the number of paired items and in how many B was higher."""

    kind: str  # "ratio" | "difference"
    value: float
    low: float
    high: float
    n: int
    higher: int  # items where B's value is higher than A's (a window's loss, a document's score)
    lower: int

    @property
    def covers_no_change(self) -> bool:
        ref = NO_CHANGE[self.kind]
        return self.low <= ref <= self.high

    def verdict(self, direction: str) -> str:
        """``better`` / ``worse`` (B against A, ``direction`` the better end of the quantity:
        "lower" or "higher") or ``within noise``."""
        if direction not in ("lower", "higher"):
            raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
        if self.covers_no_change:
            return WITHIN
        up = self.low > NO_CHANGE[self.kind]
        return WORSE if up == (direction == "lower") else BETTER

    def text(self) -> str:
        """``×1.21 [1.16–1.25]`` or ``+0.031 [+0.012–+0.050]``."""
        if self.kind == "ratio":
            return f"×{self.value:.3f} [{self.low:.3f}–{self.high:.3f}]"
        return f"{self.value:+.4g} [{self.low:+.4g}–{self.high:+.4g}]"

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _draws(n: int, draws: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def _percentiles(values) -> tuple[float, float]:
    import numpy as np

    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def perplexity_ratio(a_nll: Sequence[float], b_nll: Sequence[float], tokens: Sequence[int], draws: int = DRAWS,
                     seed: int = SEED) -> Paired:
    """Perplexity of B ÷ perplexity of A on the same windows (loss sums ``a_nll``, ``b_nll``, predicted
    tokens ``tokens`` per window) with its paired-bootstrap 95 % range (see the module docstring)."""
    import numpy as np

    a, b, c = (np.asarray(x, dtype=np.float64) for x in (a_nll, b_nll, tokens))
    if not (len(a) == len(b) == len(c)) or len(a) == 0:
        raise ValueError(f"paired windows must match: {len(a)}, {len(b)} and {len(c)} windows")
    if c.sum() <= 0:
        raise ValueError("no predicted tokens")
    value = math.exp((b.sum() - a.sum()) / c.sum())
    idx = _draws(len(a), draws, seed)
    d = b - a
    boot = np.exp(d[idx].sum(axis=1) / c[idx].sum(axis=1))
    low, high = _percentiles(boot)
    return Paired("ratio", value, min(low, value), max(high, value), len(a), int((d > 0).sum()), int((d < 0).sum()))


def _aggregate(metric: str, values):
    """``agg`` of lm-eval per-document values over the rows of ``values`` ([..., n] for a mean,
    [..., n, 2] for a (log-likelihood, count) pair): see the module docstring."""
    import numpy as np

    if metric in PAIR_METRICS:
        ll, n = values[..., 0].sum(axis=-1), values[..., 1].sum(axis=-1)
        if metric == "bits_per_byte":
            return -ll / (n * math.log(2))
        return np.exp(-ll / n)
    return values.mean(axis=-1)


def supported(metric: str, values: Sequence) -> bool:
    """Whether per-document ``values`` of ``metric`` can be paired: numbers (the task aggregates them
    by their mean) or the (log-likelihood, count) pairs of :data:`PAIR_METRICS`."""
    if not values:
        return False
    first = values[0]
    if metric in PAIR_METRICS:
        return isinstance(first, list | tuple) and len(first) == 2
    return isinstance(first, int | float)


def score_difference(metric: str, a_docs: Sequence, b_docs: Sequence, draws: int = DRAWS, seed: int = SEED) -> Paired:
    """lm-eval score of B − score of A over the same documents (per-document values in the same
    order), with its paired-bootstrap 95 % range (see the module docstring)."""
    import numpy as np

    if len(a_docs) != len(b_docs) or not a_docs:
        raise ValueError(f"paired documents must match: {len(a_docs)} and {len(b_docs)} documents")
    a, b = np.asarray(a_docs, dtype=np.float64), np.asarray(b_docs, dtype=np.float64)
    value = float(_aggregate(metric, b) - _aggregate(metric, a))
    idx = _draws(len(a), draws, seed)
    boot = _aggregate(metric, b[idx]) - _aggregate(metric, a[idx])
    low, high = _percentiles(boot)
    if a.ndim == 2:  # (ll, n) per document: compare per-document losses per unit
        pa, pb = -a[:, 0] / a[:, 1], -b[:, 0] / b[:, 1]
    else:
        pa, pb = a, b
    return Paired("difference", value, min(low, value), max(high, value), len(a), int((pb > pa).sum()),
                  int((pb < pa).sum()))
