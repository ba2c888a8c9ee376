"""Dynamic skipping only (Lu et al.): no expert removed."""

from __future__ import annotations

from moescope.analysis.model.skipping import calibrate
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.strategies.base import register


@register("skip", "Dynamic skipping only: β per layer calibrated as the median w₂/w₁ (no expert removed).",
          target=False, with_skip=False)
def skip(ctx, params):
    plan = PruningPlan(ctx.model.source, {}, provenance=ctx.provenance("skip"))
    plan.skip_beta = calibrate(ctx.analysis(metrics=("routing",)))
    return plan
