"""Doing a plan: edit a model through the family view, exactly as a :class:`PruningPlan` says."""

from __future__ import annotations

from analysis.models import MoEModel
from analysis.plan import PruningPlan


def apply(model: MoEModel, plan: PruningPlan) -> MoEModel:
    """Edit ``model`` in place by ``plan`` (every layer is validated before the first edit, so a
    refused plan leaves the model untouched) and return it. The plan is remembered as
    ``model.plan`` so that a later save or export can store it."""
    plan.validate_for(model)
    for l, lp in sorted(plan.layers.items()):
        model.merge(l, lp.groups, lp.coefficients, merge_router=lp.merge_router)
    model.plan = plan
    return model
