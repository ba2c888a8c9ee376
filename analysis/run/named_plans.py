"""Named plans: any number of PruningPlans per model, kept in the cache so they survive a restart,
and each plan's predicted cost before any run.

Every save is one immutable cache entry (kind ``named-plan``: the name, the plan, the model it was
made for, when); the newest entry of a name is that name's plan, and deleting a name removes all
of its entries. The prediction (:func:`predict_cost`) applies a plan to the loaded model inside
temporary edits (restored afterwards) and reads: parameters and weight bytes before and after,
the perplexity on a small evaluation batch (the *proxy*: 8 windows of 128 tokens of the evaluation
source's test split unless asked otherwise, cached per plan), and for a plan that only drops, the
sum of the dropped experts' single-drop deltas from the drop grid when one is stored.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from dataclasses import dataclass

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.pruning.plan import PruningPlan

KIND = "named-plan"
PROXY_KIND = "plan-proxy"
PROXY_SAMPLES, PROXY_SEQ_LEN = 8, 128
MAX_NAME = 64


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise MoescopeError(f"a plan name must be 1-{MAX_NAME} printable characters, got {name!r}")
    return name


def _entries(model_source: str, cache):
    """``[(name, created, key, plan json)]`` of every stored revision for ``model_source``."""
    out = []
    for info in cache.entries(KIND, model=model_source):
        entry = cache.get_by_key(KIND, info.key)
        if entry is None or "plan" not in entry.meta:
            continue
        out.append((entry.meta["name"], entry.meta.get("saved", 0.0), info.key, entry.meta["plan"]))
    return out


def list_plans(model_source: str, cache=None) -> dict[str, PruningPlan]:
    """The named plans of ``model_source`` (its newest revision per name), oldest name first."""
    from moescope.analysis.core.cache import Cache

    cache = cache or Cache()
    newest: dict[str, tuple[float, dict]] = {}
    first: dict[str, float] = {}
    for name, saved, _, plan in _entries(model_source, cache):
        first[name] = min(first.get(name, saved), saved)
        if name not in newest or saved >= newest[name][0]:
            newest[name] = (saved, plan)
    return {n: PruningPlan.from_json(newest[n][1], where=f"plan '{n}'") for n in sorted(newest, key=first.get)}


@contextlib.contextmanager
def _names_locked(cache, model_source: str, *names: str):
    """Hold the inter-process lock of each plan name of ``model_source`` (taken in one order, so two
    renames never wait on each other): a save, a delete or a rename of a name runs alone, and a
    rename's "does the new name exist" check and its write are one step."""
    import hashlib

    keys = sorted({hashlib.sha256(f"named-plan-lock\0{model_source}\0{n}".encode()).hexdigest() for n in names})
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(cache.lock(KIND, key))
        yield


def save_plan(name: str, plan: PruningPlan, model_source: str, cache=None) -> None:
    """Store ``plan`` under ``name`` (a new revision; the name's older ones stay until deleted)."""
    from moescope.analysis.core.cache import Cache

    name = check_name(name)
    cache = cache or Cache()
    with _names_locked(cache, model_source, name):
        _store(name, plan, model_source, cache)


def _store(name: str, plan: PruningPlan, model_source: str, cache) -> None:
    data = plan.to_json()
    # when it was saved and a random part: two saves of one name are two entries, the newest wins
    cache.put(KIND, {"model": model_source, "name": name, "revision": uuid.uuid4().hex},
              meta={"name": name, "plan": data, "saved": time.time(), "model_source": model_source},
              label=name)


def delete_plan(name: str, model_source: str, cache=None, keys=None) -> int:
    """Remove the revisions of ``name`` seen now (or exactly ``keys``, the revisions a caller saw);
    how many were removed. A revision saved after the listing is never removed: it is a newer plan
    of that name."""
    from moescope.analysis.core.cache import Cache

    cache = cache or Cache()
    with _names_locked(cache, model_source, name):
        return _remove(name, model_source, cache, keys)


def _remove(name: str, model_source: str, cache, keys=None) -> int:
    if keys is None:
        keys = [key for n, _, key, _ in _entries(model_source, cache) if n == name]
    return sum(cache.remove(KIND, key) for key in keys)


def rename_plan(old: str, new: str, model_source: str, cache=None) -> None:
    """Store ``old``'s newest plan under ``new`` and remove the revisions of ``old`` this rename
    read, and only those. Both names are locked for the whole rename: a save of either name, another
    rename of ``old`` (A→B racing A→C: one of them finds no A) or of anything onto ``new`` waits for
    it, so no plan is duplicated and no save is hidden behind the renamed plan."""
    from moescope.analysis.core.cache import Cache

    cache = cache or Cache()
    new = check_name(new)
    with _names_locked(cache, model_source, old, new):
        _rename(old, new, model_source, cache)


def _rename(old: str, new: str, model_source: str, cache) -> None:
    seen = _entries(model_source, cache)  # one listing: what is renamed is exactly what is removed
    names = {n for n, _, _, _ in seen}
    if old not in names:
        raise MoescopeError(f"no plan named '{old}'; there are: {', '.join(sorted(names)) or 'none'}")
    if new in names and new != old:
        raise MoescopeError(f"a plan named '{new}' exists already; delete it or pick another name")
    mine = [(saved, key, plan) for n, saved, key, plan in seen if n == old]
    newest = max(mine, key=lambda m: m[0])[2]
    _store(new, PruningPlan.from_json(newest, where=f"plan '{old}'"), model_source, cache)
    if new != old:
        _remove(old, model_source, cache, keys=[key for _, key, _ in mine])


def unique_name(base: str, taken) -> str:
    """``base``, or ``base 2``, ``base 3``, … the first not in ``taken``."""
    base = check_name(base[:MAX_NAME - 4])
    if base not in taken:
        return base
    k = 2
    while f"{base} {k}" in taken:
        k += 1
    return f"{base} {k}"


# ---------------------------------------------------------------- predicted cost


@dataclass
class PredictedCost:
    experts_before: int
    experts_after: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    proxy_ppl_before: float
    proxy_ppl_after: float | None  # None where the plan cannot be applied in place (finetuned weights)
    proxy_tokens: int
    grid_sum: float | None  # Σ single-drop Δppl of the dropped experts (drop-only plans, grid stored)
    seconds: float
    windows_before: list[float] | None = None  # per-window loss sums on the proxy batch (paired verdicts)
    windows_after: list[float] | None = None

    def paired(self):
        """The proxy perplexity after ÷ before, paired on the proxy batch's windows
        (:func:`~moescope.analysis.evaluation.paired.perplexity_ratio`); None without per-window losses."""
        from moescope.analysis.evaluation.paired import perplexity_ratio

        if not self.windows_before or not self.windows_after or len(self.windows_before) != len(self.windows_after):
            return None
        predicted = self.proxy_tokens // len(self.windows_before) - 1  # a window of L tokens predicts L − 1
        return perplexity_ratio(self.windows_before, self.windows_after, [predicted] * len(self.windows_before))

    @property
    def proxy_change(self) -> float | None:
        """Relative perplexity change on the proxy batch (0.05 = +5 %)."""
        if self.proxy_ppl_after is None:
            return None
        return self.proxy_ppl_after / self.proxy_ppl_before - 1

    def to_json(self) -> dict:
        return {**self.__dict__}


def proxy_batch(model, source: str = "demo:all", samples: int = PROXY_SAMPLES, seq_len: int = PROXY_SEQ_LEN):
    """The small evaluation batch the proxy perplexity is measured on (the source's test split)."""
    from moescope.analysis.evaluation import perplexity_windows

    return perplexity_windows(source, model.tokenizer, samples=samples, seq_len=seq_len, split="test")


def _size(model) -> tuple[int, int, int]:
    """(routed experts, parameters, weight bytes) of ``model`` as it is now."""
    from moescope.analysis.run.experiments import model_structure

    s = model_structure(model)
    return sum(s["experts"].values()), s["params"]["total"], s["weight_bytes"]


def predict_cost(model, plan: PruningPlan, batch, grid=None, cache=None) -> PredictedCost:
    """What ``plan`` would do to ``model``, measured without a run: its size and the perplexity
    on ``batch`` (the loaded model is edited inside temporary edits and restored; the result is
    cached per model, plan and batch). ``grid``: a stored :class:`DropGrid` for ``grid_sum``."""
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.measure.sensitivity import window_losses
    from moescope.analysis.pruning.prune import is_finetuned

    cache = cache or Cache()
    plan.validate_for(model)
    parts = {"model": model.fingerprint(), "plan": plan.to_json(), "data": batch.fingerprint, "per_window": 1}

    def compute():
        t0 = time.perf_counter()
        base_ppl, base_windows = _baseline(model, batch, cache)
        before = _size(model)
        with contextlib.ExitStack() as stack:
            for l in sorted(plan.layers):
                stack.enter_context(model.temporary_edit(l))
            for l, lp in sorted(plan.layers.items()):
                model.merge(l, lp.groups, lp.coefficients, merge_router=lp.merge_router,
                            permutations=lp.permutations, operator=lp.operator, density=lp.density,
                            router_coeffs=lp.router_coefficients, folds=lp.folds)
            after = _size(model)
            windows = None if is_finetuned(plan) else window_losses(model, batch.input_ids)
        n, length = batch.input_ids.shape
        ppl = None if windows is None else math.exp(sum(windows) / (n * (length - 1)))
        meta = {"experts_before": before[0], "experts_after": after[0], "params_before": before[1],
                "params_after": after[1], "bytes_before": before[2], "bytes_after": after[2],
                "proxy_ppl_before": base_ppl, "proxy_ppl_after": ppl, "proxy_tokens": int(batch.input_ids.numel()),
                "seconds": time.perf_counter() - t0, "windows_before": base_windows, "windows_after": windows}
        return {"meta": meta}

    entry = cache.get_or_compute(PROXY_KIND, parts, compute, label=f"proxy {plan.summary()[:40]}")
    m = entry.meta
    return PredictedCost(m["experts_before"], m["experts_after"], m["params_before"], m["params_after"],
                         m["bytes_before"], m["bytes_after"], m["proxy_ppl_before"], m["proxy_ppl_after"],
                         m["proxy_tokens"], grid_delta_sum(plan, grid), m["seconds"], m.get("windows_before"),
                         m.get("windows_after"))


def _baseline(model, batch, cache) -> tuple[float, list[float]]:
    """The original's proxy perplexity and per-window losses (cached)."""
    from moescope.analysis.measure.sensitivity import window_losses

    def compute():
        windows = window_losses(model, batch.input_ids)
        n, length = batch.input_ids.shape
        return {"meta": {"ppl": math.exp(sum(windows) / (n * (length - 1))), "windows": windows}}

    parts = {"model": model.fingerprint(), "data": batch.fingerprint, "plan": None, "per_window": 1}
    entry = cache.get_or_compute(PROXY_KIND, parts, compute, label="proxy original")
    return float(entry.meta["ppl"]), list(entry.meta["windows"])


def grid_delta_sum(plan: PruningPlan, grid) -> float | None:
    """Σ over the experts a drop-only plan removes of their single-drop perplexity change (the
    drop grid's first-order estimate); None for plans that merge, or without a grid."""
    if grid is None or any(not lp.is_pure_keep() for lp in plan.layers.values()):
        return None
    delta = grid.delta()
    total = 0.0
    for l, lp in plan.layers.items():
        if l not in grid.layers:
            return None
        row = delta[grid.layers.index(l)]
        kept = set(lp.kept())
        total += sum(row[e] for e in range(len(row)) if e not in kept and math.isfinite(row[e]))
    return total
