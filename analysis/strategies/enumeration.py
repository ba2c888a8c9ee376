"""Enumerate and skip (Lu et al.): per layer, the kept subset that reconstructs the layer output best.

With a global ``budget`` the counts per layer are allocated greedily on the reconstruction losses:
each layer's best loss at every size (:func:`~moescope.analysis.measure.sensitivity.loss_curve`, on the
original model's inputs), relative to the layer's output norm so that layers compare, and experts
are removed one at a time where the relative loss rises least (never below top-k)."""

from __future__ import annotations

import contextlib

from moescope.analysis.measure.capture import LayerStream
from moescope.analysis.measure.sensitivity import (
    ENUMERATION_METHODS,
    allocate_greedy,
    enumerate_layer,
    loss_curve,
)
from moescope.analysis.strategies.base import Param, register
from moescope.analysis.strategies.selection import keep_counts

OBJECTIVES = ("eq3", "per-batch")


def batch_tokens(ctx, params) -> int | None:
    """Tokens per block of the per-batch objective (None: eq. 3's one norm)."""
    if params["objective"] != "per-batch":
        return None
    return params["objective_batch"] * ctx.calib.input_ids.shape[1]


def budget_allocation(ctx, params) -> tuple[dict[int, int], dict[int, list[int]], dict[int, dict[int, float]]]:
    """(experts per layer for ``params["budget"]``, the best layer-wise subset at that count,
    the relative loss curves ``{layer: {size: ‖F'−F‖/‖F‖}}``)."""
    model = ctx.model
    curves, best = {}, {}
    n = model.num_hidden_layers
    for l, x in LayerStream(model, ctx.calib.input_ids).layers():
        if x is not None:
            results, norm = loss_curve(model.layers[l], x, method=params["method"], max_subsets=params["max_subsets"],
                                       batch_tokens=batch_tokens(ctx, params))
            curves[l] = {k: r.loss / max(norm, 1e-30) for k, r in results.items()}
            best[l] = {k: r.keep for k, r in results.items()}
        ctx.report("layers", l + 1, n)
    counts = allocate_greedy(curves, params["budget"], {l: v.top_k for l, v in model.layers.items()})
    return counts, {l: best[l][c] for l, c in counts.items()}, curves


@register("enumerate", "Lu et al.: per layer the kept subset with the smallest reconstruction loss on "
          "calibration inputs; layer-wise (inputs of the original model) or progressive (inputs that already "
          "went through the pruned earlier layers). A budget is allocated greedily across layers on the "
          "reconstruction losses (relative to each layer's output norm).",
          [Param("mode", str, "layer-wise", choices=("layer-wise", "progressive"), help="which inputs each layer sees",
                 affects_key=False),
           Param("method", str, "auto", choices=ENUMERATION_METHODS, help="subset search", label="search",
                 affects_key=False),
           Param("max_subsets", int, 5000, help="exact search up to this many subsets, else greedy/beam",
                 minimum=1, affects_key=False),
           Param("objective", str, "eq3", choices=OBJECTIVES, affects_key=False,
                 help="eq3: one Frobenius norm over all calibration tokens (the paper's eq. 3) | per-batch: the sum "
                      "over batches of objective_batch sequences of each batch's norm (the authors' wrapper.py)"),
           Param("objective_batch", int, 8, minimum=1, affects_key=False, label="sequences per batch",
                 help="per-batch objective: calibration sequences per batch (8, the authors' --batch_size default)",
                 when=lambda p: p.get("objective") == "per-batch")],
          budget=True, edits_model=lambda p: p.get("mode") == "progressive")
def enumerate_subsets(ctx, params):
    mode = params["mode"]
    extra = {}
    if params.get("budget") is not None:
        counts, keep, curves = budget_allocation(ctx, params)
        extra = {"counts": {str(l): c for l, c in counts.items()}}
        if mode == "layer-wise":
            plan = ctx.plan_from_keep(keep, f"enumerate:{mode}")
            plan.provenance.update(extra)
            return plan
    else:
        counts = keep_counts(ctx.model, params)
    model = ctx.model
    keep: dict[int, list[int]] = {}
    stream = LayerStream(model, ctx.calib.input_ids)
    n = model.num_hidden_layers
    with contextlib.ExitStack() as stack:
        while stream.layer < n:
            l = stream.layer
            before = [h.clone() for h in stream.hidden] if mode == "progressive" and l in model.layers else None
            x = stream.step(capture_moe_input=True)
            if x is not None:
                keep[l] = enumerate_layer(model.layers[l], x, counts[l], method=params["method"],
                                          max_subsets=params["max_subsets"], batch_tokens=batch_tokens(ctx, params)).keep
                if before is not None:
                    # later layers see this layer pruned: edit it (restored on exit) and redo its output
                    stack.enter_context(model.temporary_edit(l))
                    model.keep(l, keep[l])
                    stream.hidden, stream.layer = before, l
                    stream.step(capture_moe_input=False)
            ctx.report("layers", l + 1, n)
    plan = ctx.plan_from_keep(keep, f"enumerate:{mode}")
    plan.provenance.update(extra)
    return plan
