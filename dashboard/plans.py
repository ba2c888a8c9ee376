"""The Plan page's plans and the analysis pages' actions on them: named plans kept in the cache,
their predicted cost, and the drops / merges an analysis view adds to the current plan (read from
:mod:`analysis.named_plans` and the stored analyses through :mod:`dashboard.backend`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from moescope.analysis.pruning.plan import edit_layer, unused_kept_short
from moescope.dashboard.backend import (
    MoescopeError,
    PruningPlan,
    Settings,
    empty_plan,
    eval_batch,
    grid_delta,
    load_model,
    lookup_drop_grid,
    validate_plan,
)

# ---------------------------------------------------------------- named plans and their predicted cost


def named_plans(s: Settings) -> dict[str, PruningPlan]:
    from moescope.analysis.run.named_plans import list_plans

    return list_plans(s.model, s.cache())


def save_named_plan(s: Settings, name: str, plan: PruningPlan) -> None:
    from moescope.analysis.run.named_plans import save_plan

    save_plan(name, plan, s.model, s.cache())


def delete_named_plan(s: Settings, name: str) -> None:
    from moescope.analysis.run.named_plans import delete_plan

    delete_plan(name, s.model, s.cache())


def rename_named_plan(s: Settings, old: str, new: str) -> None:
    from moescope.analysis.run.named_plans import rename_plan

    rename_plan(old, new, s.model, s.cache())


def unique_plan_name(s: Settings, base: str) -> str:
    from moescope.analysis.run.named_plans import unique_name

    return unique_name(base, set(named_plans(s)))


def paired_text(cost) -> str:
    """A plan's proxy perplexity against the original's, paired on the proxy batch's windows:
    ``worse ×1.210 [1.160–1.250]`` (:meth:`~analysis.run.named_plans.PredictedCost.paired`)."""
    p = cost.paired()
    if p is None:
        return "— (finetuned weights: not applied in the proxy)" if cost.proxy_ppl_after is None else "—"
    return f"{p.verdict('lower')} {p.text()}"


def predicted_costs(s: Settings, names: list[str], progress=None) -> pd.DataFrame:
    """One row per named plan: size change and the proxy perplexity change on a small evaluation
    batch (computed once per plan, then read from the cache), and the drop grid's estimate."""
    from moescope.analysis.run.named_plans import predict_cost, proxy_batch

    model = load_model(s.model)
    batch = proxy_batch(model, s.eval_source)
    grid = lookup_drop_grid(model, eval_batch(s), s.cache())
    plans = named_plans(s)
    rows = []
    for k, name in enumerate(names):
        plan = plans[name]
        c = predict_cost(model, plan, batch, grid=grid, cache=s.cache())
        if not rows:  # the original first: what every plan is measured against
            rows.append({"plan": "original (no plan)", "experts": c.experts_before, "params Δ%": 0.0,
                         "weight bytes Δ%": 0.0, "proxy ppl": c.proxy_ppl_before, "proxy Δ%": 0.0,
                         "against the original (paired)": "—", "grid Σ Δppl": "—", "skipping": "—",
                         "unused experts kept": "—", "seconds": None})
        merges = any(lp.merges() for lp in plan.layers.values())
        grid_text = (f"{c.grid_sum:+.3f}" if c.grid_sum is not None else
                     "— (merges: the grid prices drops only)" if merges else "— (no drop grid stored)")
        rows.append({"plan": name, "experts": c.experts_after,
                     "params Δ%": 100 * (c.params_after / c.params_before - 1),
                     "weight bytes Δ%": 100 * (c.bytes_after / c.bytes_before - 1),
                     "proxy ppl": c.proxy_ppl_after, "proxy Δ%": None if c.proxy_change is None else 100 * c.proxy_change,
                     "against the original (paired)": paired_text(c),
                     "grid Σ Δppl": grid_text,
                     "skipping": "plan has β; not applied in the proxy" if plan.skip_beta else "none",
                     # experts no calibration token reached, kept while used ones go (count and which)
                     "unused experts kept": unused_kept_short(plan),
                     "seconds": c.seconds})
        if progress:
            progress("plans", k + 1, len(names))
    table = pd.DataFrame(rows)
    table.attrs["batch"] = batch.describe()
    table.attrs["grid"] = grid is not None
    return table


# ---------------------------------------------------------------- analysis views -> the plan


def layer_state(plan: PruningPlan | None, layer: int, num_experts: int) -> tuple[list[list[int]], list[int]]:
    """(merged groups, dropped experts) of ``layer`` in ``plan``."""
    if plan is None or layer not in plan.layers:
        return [], []
    lp = plan.layers[layer]
    # a member merged with weight 0 is a drop (1.00 × e + 0.00 × f keeps e), and is shown and edited as one
    kept = {e for i, g in enumerate(lp.groups) for e in g if e not in lp.weightless(i)}
    return lp.merges(), [e for e in range(num_experts) if e not in kept]


def add_to_plan(s: Settings, current: dict | None, drops: dict[int, list[int]] | None = None,
                merges: dict[int, list[tuple[int, int]]] | None = None, action: str | None = None) -> PruningPlan:
    """The current plan (a JSON dict, or none yet) with ``drops`` added to each layer's dropped
    experts and the pairs in ``merges`` merged (joined with the groups already there); validated
    against the model, so a result that leaves fewer experts than top-k is refused in one line."""
    plan = PruningPlan.from_json(current, where="current plan") if current else empty_plan(s)
    counts = load_model(s.model).num_experts()
    drops, merges = drops or {}, merges or {}
    for layer in sorted(set(drops) | set(merges)):
        if layer not in counts:
            raise MoescopeError(f"layer {layer} is not an MoE layer of {s.model}")
        groups, dropped = layer_state(plan, layer, counts[layer])
        in_groups = {e for g in groups for e in g}
        new_drop = sorted(set(dropped) | {int(e) for e in drops.get(layer, [])})
        clash = sorted(in_groups & set(new_drop) - set(dropped))
        if clash:
            raise MoescopeError(f"layer {layer}: expert(s) {clash} are merged in the plan; split them on the Plan page "
                                "before dropping them")
        pairs = [list(p) for p in merges.get(layer, []) if not set(p) & set(new_drop)]
        plan = edit_layer(plan, layer, counts[layer], new_drop, groups + pairs)
    plan.provenance = dict(plan.provenance or {"strategy": "manual"})
    if plan.provenance.get("strategy", "manual") != "manual":
        plan.provenance["edited_by_hand"] = True  # a strategy's plan, then changed from an analysis view
    if action:  # the analysis actions that built it (the model card names them as the plan's origin)
        plan.provenance["actions"] = [*plan.provenance.get("actions", []), action]
    return validate_plan(s, plan)


def least_needed(s: Settings, n: int) -> dict[int, list[int]]:
    """Per MoE layer, the ``n`` experts whose single removal raises perplexity least (the stored
    drop grid of these settings), never more than the layer can lose (down to top-k)."""
    data = grid_delta(s)
    if data is None:
        raise MoescopeError("no drop grid for these settings yet: compute it first")
    model = load_model(s.model)
    counts, tops = model.num_experts(), {l: v.top_k for l, v in model.layers.items()}
    out = {}
    for i, l in enumerate(data["layers"]):
        row = data["delta"][i]
        order = [int(e) for e in np.argsort(np.where(np.isfinite(row), row, np.inf), kind="stable")]
        out[int(l)] = sorted(order[: max(0, min(n, counts[l] - tops[l]))])
    return out


def grid_on_layers(s: Settings, layers: list[int]) -> np.ndarray:
    """The drop grid's Δ perplexity as a ``[len(layers), max E]`` map in ``layers``' order (NaN where
    the grid has no value)."""
    data = grid_delta(s)
    width = max(len(r) for r in data["delta"])
    out = np.full((len(layers), width), np.nan)
    for i, l in enumerate(layers):
        if l in data["layers"]:
            row = data["delta"][data["layers"].index(l)]
            out[i, : len(row)] = row
    return out
