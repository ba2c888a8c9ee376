"""MC-Suite (Jaiswal et al.): drop by one criterion, one-shot or iteratively.

A per-expert criterion drops the experts with the smallest (``min``) or largest (``max``) values. A
pair criterion (ECC eq. 8, ETS eq. 10) picks the pair with the min / max value and drops that
pair's lower-usage member, then repeats on the experts left (one-shot: on the one estimate;
iterative: one drop per layer per round, the matrix re-estimated on the pruned model)."""

from __future__ import annotations

from moescope.analysis.measure.criteria import CRITERIA, canonical_name, criterion_scores, get_criterion
from moescope.analysis.strategies.base import Param, register
from moescope.analysis.strategies.selection import iterative_drop, keep_counts, top

CRITERION = Param("criterion", str, "EAN", choices=lambda p: tuple(CRITERIA), normalize=canonical_name,
                  help="MC-Suite criterion (EAN, EUF, …, REAP; variants such as EAN-mean)", affects_key=False)
ORDER = Param("order", str, None, choices=("min", "max"),
              help="drop the experts (or, for ECC / ETS, pick the pair) with the min or max value "
                   "(default: the criterion's own end, the paper's better one)",
              affects_key=False)


def resolve(params) -> tuple[str, str, tuple[str, ...]]:
    """(criterion name, the end dropped, the metric families its analysis needs)."""
    c = get_criterion(params["criterion"])
    return c.name, params.get("order") or c.drop, c.metrics


@register("criterion", "MC-Suite: drop the experts with the smallest (or largest) value of a criterion, "
          "one-shot or iteratively (one expert per layer per round, re-estimated on the pruned model).",
          [CRITERION, ORDER, Param("mode", str, "one-shot", choices=("one-shot", "iterative"),
                                   help="one-shot, or iterative re-estimation")],
          budget=True, edits_model=lambda p: p.get("mode") == "iterative")
def by_criterion(ctx, params):
    name, order, metrics = resolve(params)
    if name in CO_SELECTION and all(v.top_k == 1 for v in ctx.model.layers.values()):  # known before any analysis
        refuse_degenerate_pairs(ctx.model, None, name, order, keep_counts(ctx.model, params, None))
    res = ctx.analysis(metrics=metrics)
    scores = criterion_scores(res, name, order)
    counts = keep_counts(ctx.model, params, scores)
    if get_criterion(name).pair:
        refuse_degenerate_pairs(ctx.model, res, name, order, counts)
    if params["mode"] == "one-shot":
        return ctx.plan_from_keep(top(ctx.model, scores, counts), f"criterion:{order}-{name}")
    keep = iterative_drop(ctx, counts, lambda r: criterion_scores(r, name, order), metrics)
    return ctx.plan_from_keep(keep, f"criterion:{order}-{name}")


CO_SELECTION = ("ECC",)  # pair criteria counting tokens that selected both experts: all zero under top-1 routing


def refuse_degenerate_pairs(model, res, name: str, order: str, counts: dict[int, int]) -> None:
    """Refuse a pair criterion whose matrix holds one value for every pair of experts in a layer that
    drops experts (ECC on a top-1 router: experts are never selected together, every count is 0):
    the min/max pair would be a tie broken by index, not a choice the criterion made."""
    import torch
    from moescope.analysis.core.errors import MoescopeError

    for l in (res.layers if res is not None else sorted(model.layers)):
        n = model.layers[l].num_experts if l in model.layers else None
        if n is None or counts.get(l, n) >= n:
            continue
        # a top-1 router's co-selection counts are 0 by construction (refused before the analysis)
        P = res.pair(l, name).double() if res is not None else torch.zeros(n, n, dtype=torch.float64)
        off = P[~torch.eye(P.shape[0], dtype=torch.bool)]
        off = off[torch.isfinite(off)]
        if off.numel() and bool((off == off[0]).all()):
            why = " (a top-1 router never selects two experts together)" if model.layers[l].top_k == 1 else ""
            raise MoescopeError(f"criterion {name} is {float(off[0]):g} for every pair of experts in layer {l}{why}: "
                                f"its {order} pair would be a tie broken by expert index, not a choice; use a "
                                "per-expert criterion (e.g. --preset min-ean or min-euf)")
