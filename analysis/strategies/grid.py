"""Drop grid: keep the experts whose single removal raises perplexity most.

The grid (:func:`~moescope.analysis.measure.sensitivity.drop_grid`: the perplexity of the model with one
expert removed, for every layer × expert) is computed on the first ``grid_samples`` windows of the
calibration batch and stored in the cache, so a repeated request, or ``moescope grid`` on the same
windows, reuses it. An expert's keep-score is that perplexity: with ``keep`` the most needed
experts of every layer stay; with a global ``budget`` they are ranked across layers (top-k of every
layer always stay), so a layer whose experts matter more keeps more of them.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
from moescope.analysis.measure.sensitivity import cached_drop_grid
from moescope.analysis.strategies.base import Param, register
from moescope.analysis.strategies.selection import keep_counts, top


def first_rows(batch, n: int):
    """The first ``n`` windows of ``batch`` as a batch of their own (own fingerprint)."""
    if n >= batch.n_samples:
        return batch
    fp = hashlib.sha256(f"{batch.fingerprint}:first:{n}".encode()).hexdigest()
    return dataclasses.replace(batch, input_ids=batch.input_ids[:n], domains=batch.domains[:n], fingerprint=fp,
                               score_from=None if batch.score_from is None else batch.score_from[:n])


def grid_scores(grid) -> dict[int, torch.Tensor]:
    """Keep-scores from a :class:`~moescope.analysis.measure.sensitivity.DropGrid`: each cell's perplexity."""
    return {l: torch.tensor(row, dtype=torch.float64) for l, row in zip(grid.layers, grid.ppl)}


@register("drop-grid", "Keep the experts whose single removal raises perplexity most (the drop grid on the first "
          "calibration windows, cached); with a budget, ranked across layers.",
          [Param("grid_samples", int, 16, help="calibration windows the drop grid is computed on", minimum=1)],
          budget=True)
def by_drop_grid(ctx, params):
    batch = first_rows(ctx.calib, params["grid_samples"])
    grid = cached_drop_grid(ctx.model, batch, ctx.cache, progress=ctx.progress)
    scores = grid_scores(grid)
    plan = ctx.plan_from_keep(top(ctx.model, scores, keep_counts(ctx.model, params, scores)), "drop-grid")
    plan.provenance["grid_data"] = batch.describe()
    return plan
