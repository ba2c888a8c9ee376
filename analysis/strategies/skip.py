"""Dynamic skipping only (Lu et al. §3.3, App. A.2): no expert removed."""

from __future__ import annotations

from moescope.analysis.model.skipping import calibrate, refuse_top1
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.strategies.base import register


def check_skippable(strategy: str, model) -> None:
    """Refuse dynamic skipping on a model with a top-1 MoE layer, before any weights load."""
    for l, view in model.layers.items():
        refuse_top1(view.top_k, f"{strategy}: layer {l}")


@register("skip", "Dynamic skipping only: a token skips its lower-weighted experts (top-2: w₂ < β·w₁; top-k: "
          "Σ skipped ≤ β·Σ all k) and the kept weights are renormalised; β per layer is the calibration median "
          "of that ratio (no expert removed).",
          target=False, with_skip=False, check=lambda params, model: check_skippable("skip", model))
def skip(ctx, params):
    plan = PruningPlan(ctx.model.source, {}, provenance=ctx.provenance("skip"))
    plan.skip_beta = calibrate(ctx.analysis(metrics=("routing",)))
    return plan
