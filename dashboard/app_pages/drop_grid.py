"""Drop grid: the perplexity of the model with one expert removed, for every layer and expert
(Δ against the unpruned model), computed on demand on the evaluation data and cached."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from moescope.dashboard import backend, charts, plans
from moescope.dashboard.ui import add_to_plan, guarded, persistent, require_stored, settings

st.header("Drop grid")
c1, c2, c3 = st.columns([2, 1, 1])
with c1:
    persistent(st.text_input, "Evaluation source", "eval_source", help="its test split is used")
with c2:
    persistent(st.number_input, "Sequences", "grid_samples", min_value=1, step=4)
with c3:
    persistent(st.number_input, "Tokens per sequence", "grid_seq_len", min_value=8, step=64)
s = settings()

data = guarded(backend.grid_delta, s)
if data is None:
    batch = guarded(backend.describe_batch, s, "eval")
    cells = sum(guarded(backend.model_info, s.model)["num_experts"].values())
    data = require_stored(
        backend.grid_delta, backend.compute_grid, s,
        f"Not computed for {batch} yet: {cells} cells, each the perplexity with one expert removed (every cell "
        "re-runs only the layers from its own on). Cached once computed; `moescope grid` shares it.",
        "Compute the drop grid", "grid_compute", "Computing the drop grid…", "Drop grid done")

layers, delta = data["layers"], data["delta"]
st.caption(data["data"])
c1, c2, c3 = st.columns(3)
c1.metric("Baseline perplexity", f"{data['baseline']:.3f}",
          help="the unpruned model's perplexity on these sequences; each cell is the change from it (lower is better)")
worst = np.unravel_index(np.nanargmax(delta), delta.shape)
best = np.unravel_index(np.nanargmin(delta), delta.shape)
c2.metric("Most needed expert", f"layer {layers[worst[0]]} · expert {worst[1]}", f"{delta[worst]:+.3f} perplexity",
          delta_color="inverse")
c3.metric("Least needed expert", f"layer {layers[best[0]]} · expert {best[1]}", f"{delta[best]:+.3f} perplexity",
          delta_color="inverse")
# the colour saturates at the 95th percentile of |Δ| so one critical expert does not wash out the rest
bound = float(np.nanpercentile(np.abs(delta), 95)) or float(np.nanmax(np.abs(delta))) or 1.0
fig = charts.layer_expert_heatmap(delta, layers, "Δ perplexity", colorscale=charts.DIVERGING, zmid=0.0, fmt="+.4f",
                                  customdata=data["ppl"], custom_label="perplexity",
                                  title="Perplexity change when one expert is dropped (colour capped at the 95th percentile)")
fig.update_traces(zmin=-bound, zmax=bound, selector=dict(type="heatmap"))
st.plotly_chart(fig, key="grid_heatmap")
rows = [{"layer": l, "least needed": int(np.nanargmin(delta[i])), "Δ ppl without it": float(np.nanmin(delta[i])),
         "most needed": int(np.nanargmax(delta[i])), "Δ ppl without that one": float(np.nanmax(delta[i])),
         "mean Δ ppl": float(np.nanmean(delta[i]))} for i, l in enumerate(layers)]
HELP = {"least needed": "the expert whose removal raises perplexity least (the first candidate to drop)",
        "Δ ppl without it": "perplexity change when only the least-needed expert is dropped (lower is better; "
                            "negative: the model is better without it)",
        "most needed": "the expert whose removal raises perplexity most (keep it)",
        "Δ ppl without that one": "perplexity change when only the most-needed expert is dropped",
        "mean Δ ppl": "mean change over the layer's experts: how much this layer's experts matter"}
st.dataframe(pd.DataFrame(rows), hide_index=True,
             column_config={c: st.column_config.NumberColumn(format="%+.4f", help=HELP[c])
                            for c in ("Δ ppl without it", "Δ ppl without that one", "mean Δ ppl")}
             | {c: st.column_config.Column(help=HELP[c]) for c in ("least needed", "most needed")})

st.subheader("Into the plan")
most = max(1, min(n - k for n, k in guarded(backend.model_layers, s).values()))
c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
n_drop = int(c1.number_input("Least-needed experts per layer", 1, most, 1, key="grid_add_n",
                             help="by this grid: the experts whose removal alone raises perplexity least"))
if c2.button(f"Drop the {n_drop} least needed in every layer", key="grid_add"):
    drops = guarded(plans.least_needed, s, n_drop)
    add_to_plan(page="Drop grid", drops=drops, what="drop " + "; ".join(f"L{l}: {', '.join(map(str, e))}" for l, e in drops.items()))
