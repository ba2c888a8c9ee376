"""Baselines: keep experts at random, or the most used ones."""

from __future__ import annotations

import torch
from moescope.analysis.strategies.base import Param, register
from moescope.analysis.strategies.selection import keep_counts, top


@register("random", "Keep a seeded random subset of experts in every layer (a baseline).",
          [Param("seed", int, 0, help="random seed", minimum=0, affects_key=False)], budget=True, needs_data=False)
def random_subset(ctx, params):
    g = torch.Generator().manual_seed(params["seed"])
    counts = keep_counts(ctx.model, params)
    scores = {l: torch.rand(v.num_experts, generator=g) for l, v in ctx.model.layers.items()}
    return ctx.plan_from_keep(top(ctx.model, scores, counts), "random")


@register("frequency", "Keep the experts that calibration tokens are routed to most often.", budget=True)
def frequency(ctx, params):
    res = ctx.analysis(metrics=("routing",))
    scores = {l: res.routing(l, "usage") for l in res.layers}
    return ctx.plan_from_keep(top(ctx.model, scores, keep_counts(ctx.model, params, scores)), "frequency")
