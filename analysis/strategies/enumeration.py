"""Enumerate and skip (Lu et al.): per layer, the kept subset that reconstructs the layer output best."""

from __future__ import annotations

import contextlib

from moescope.analysis.capture import LayerStream
from moescope.analysis.sensitivity import ENUMERATION_METHODS, enumerate_layer
from moescope.analysis.strategies.base import Param, register
from moescope.analysis.strategies.selection import keep_counts


@register("enumerate", "Lu et al.: per layer the kept subset with the smallest reconstruction loss on "
          "calibration inputs; layer-wise (inputs of the original model) or progressive (inputs that already "
          "went through the pruned earlier layers).",
          [Param("mode", str, "layer-wise", choices=("layer-wise", "progressive"), help="which inputs each layer sees"),
           Param("method", str, "auto", choices=ENUMERATION_METHODS, help="subset search", label="search"),
           Param("max_subsets", int, 5000, help="exact search up to this many subsets, else greedy/beam",
                 minimum=1)],
          edits_model=lambda p: p.get("mode") == "progressive")
def enumerate_subsets(ctx, params):
    mode = params["mode"]
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
                                          max_subsets=params["max_subsets"]).keep
                if before is not None:
                    # later layers see this layer pruned: edit it (restored on exit) and redo its output
                    stack.enter_context(model.temporary_edit(l))
                    model.keep(l, keep[l])
                    stream.hidden, stream.layer = before, l
                    stream.step(capture_moe_input=False)
            ctx.report("layers", l + 1, n)
    return ctx.plan_from_keep(keep, f"enumerate:{mode}")
