"""A property of every registered strategy: no declared parameter can be served a stale cache entry.

For every parameter of every strategy (the registry's own declarations, so a new strategy or
parameter is covered, or fails here until it has an alternative value below):

- a plan made with that parameter changed, on a cache warmed by the default request, equals the
  plan made with the same request on an empty cache (a key that omits the parameter would hand
  back the entry computed for the other value: e.g. a drop grid computed on other windows);
- a parameter declared ``affects_key=True`` (an input of what the strategy stores) changes the
  keys of the cache entries the run reads.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import fresh_tiny
from moescope.analysis.core.cache import Cache
from moescope.analysis.data import TokenBatch
from moescope.analysis.measure.analyze import AnalysisParams
from moescope.analysis.strategies import STRATEGIES, StrategyContext, make_plan

FAST = AnalysisParams(similarity_tokens=128, rbf_batch_tokens=48, rbf_batches=1, chunk_size=4)
IDS = torch.randint(3, 256, (6, 32), generator=torch.Generator().manual_seed(0))
BATCH = TokenBatch(input_ids=IDS, domains=("s",) * 6, source="synthetic", fingerprint="synthetic-0")

# the request each strategy starts from (small where a parameter costs time)
BASE = {
    "manual": {"drop": {"0": [1, 3]}},
    "merge": {"keep": 4, "similarity": "mse", "epochs": 1},
    "router-guided": {"keep": 4, "epochs": 1},
    "lottery": {"keep": 6, "start_tokens": 64},
    "drop-grid": {"keep": 4, "grid_samples": 2},
}
# another value of every parameter whose alternative the declaration does not give (choices give
# one, a bool its negation); keyed by (strategy, parameter) or by the parameter alone
ALTERNATIVE = {
    "keep": 5, "budget": 11, "seed": 3, "grid_samples": 4, "batch": 4, "max_subsets": 3, "density": 0.5, "epochs": 2, "batch_sequences": 2, "augment_ratio": 0.5,
    ("merge", "lr"): 0.2, ("router-guided", "lr"): 0.2, ("lottery", "lr"): 1e-3, "start_tokens": 128,
    "criterion": "EUF", "drop": {"0": [2], "1": [0, 4]}, "objective_batch": 2,
    "groups": {"0": [[0, 1], [2], [3], [4], [5], [6], [7]]},
    "coefficients": {"0": [[0.25, 0.75], [1.0], [1.0], [1.0], [1.0], [1.0], [1.0]]},
}
# a parameter that acts only when another one is set: both requests (before and after the change) carry it
BASE_FOR = {("merge", "augment_ratio"): {"augment": "embeddings"}, ("enumerate", "objective_batch"): {"objective": "per-batch"}}
# parameters that only make sense together with another one
TOGETHER = {("manual", "coefficients"): {"groups": ALTERNATIVE["groups"]}, ("manual", "groups"): {"drop": None},
            ("manual", "merge_router"): {"groups": ALTERNATIVE["groups"], "drop": None}}


def alternative(strategy, p, base: dict):
    """A value of ``p`` other than the one the base request uses."""
    current = base.get(p.name, p.default)
    for key in ((strategy.name, p.name), p.name):
        if key in ALTERNATIVE:
            return ALTERNATIVE[key]
    if p.type is bool:
        return not current
    allowed = p.allowed({**{q.name: q.default for q in strategy.all_params()}, **base})
    if allowed:
        return next(v for v in allowed if v != current)
    raise AssertionError(f"strategy {strategy.name}: no alternative value for parameter {p.name}; add one to "
                         "ALTERNATIVE in tests/test_strategy_keys.py")


class RecordingCache(Cache):
    """A cache that records the (kind, key) of every entry a run looks up (hits and misses)."""

    def __init__(self, root):
        super().__init__(root)
        self.read: set[tuple[str, str]] = set()

    def _lookup(self, kind, key, locked):
        self.read.add((kind, key))
        return super()._lookup(kind, key, locked)


def plan_and_keys(name: str, params: dict, cache: RecordingCache):
    cache.read = set()
    model = fresh_tiny("mixtral")
    plan = make_plan(name, StrategyContext(model, BATCH, cache, FAST), {k: v for k, v in params.items()
                                                                         if v is not None})
    # the per-layer / per-row checkpoints of a resumable analysis or grid are looked up only while the
    # whole entry is missing (issue 34): the entries a result is served from are the others
    return plan.to_json(), frozenset(r for r in cache.read if r[0] not in CHECKPOINT_KINDS)


CHECKPOINT_KINDS = ("analysis-layer", "dropgrid-row")


CASES = [(name, p.name) for name, s in STRATEGIES.items() for p in s.all_params()
         if not (p.name == "budget" and name == "lottery")]


def test_every_registered_strategy_and_parameter_is_covered():
    covered = {n for n, _ in CASES}
    assert covered == {n for n, s in STRATEGIES.items() if s.all_params()}
    assert ("drop-grid", "grid_samples") in CASES and ("lottery", "lr") in CASES


@pytest.mark.parametrize("name, param", CASES, ids=[f"{n}.{p}" for n, p in CASES])
def test_a_changed_parameter_is_never_served_a_stale_entry(name, param, tmp_path):
    strategy = STRATEGIES[name]
    p = {q.name: q for q in strategy.all_params()}[param]
    base = {**BASE.get(name, {"keep": 4}), **BASE_FOR.get((name, param), {})}
    changed = {**base, **TOGETHER.get((name, param), {}), param: alternative(strategy, p, base)}
    if param == "budget":
        changed.pop("keep")
    warm = RecordingCache(tmp_path / "warm")
    _, keys_before = plan_and_keys(name, base, warm)
    warm_plan, keys_after = plan_and_keys(name, changed, warm)
    cold_plan, _ = plan_and_keys(name, changed, RecordingCache(tmp_path / "cold"))
    assert warm_plan == cold_plan, f"{name}: {param}={changed[param]!r} was served an entry made for {base}"
    if p.affects_key:
        assert keys_after != keys_before, (f"{name}: {param} is declared as affecting the cache key, but changing "
                                           "it reads the same entries")


def test_the_property_catches_a_key_that_omits_grid_samples(tmp_path, monkeypatch):
    """The fault the property exists for, planted: the drop grid's windows keyed without their count."""
    import moescope.analysis.strategies.grid as grid

    real = grid.first_rows

    def same_fingerprint(batch, n):
        return dataclasses.replace(real(batch, n), fingerprint=batch.fingerprint)

    monkeypatch.setattr(grid, "first_rows", same_fingerprint)
    warm = RecordingCache(tmp_path / "warm")
    _, before = plan_and_keys("drop-grid", {"keep": 4, "grid_samples": 2}, warm)
    warm_plan, after = plan_and_keys("drop-grid", {"keep": 4, "grid_samples": 4}, warm)
    cold_plan, _ = plan_and_keys("drop-grid", {"keep": 4, "grid_samples": 4}, RecordingCache(tmp_path / "cold"))
    assert after == before  # the planted fault: the same entry for other windows
    assert warm_plan != cold_plan  # and the property sees it
