"""Routing: how the router spreads the calibration tokens over the experts — usage, co-activation,
vocabulary coverage, the tokens an expert receives, and how many would skip under dynamic skipping."""

from __future__ import annotations

import numpy as np
import streamlit as st
from moescope.dashboard import backend, charts
from moescope.dashboard.ui import layer_select, require_analysis, require_trace, settings

VIEWS = ["Usage", "Co-activation", "Vocabulary", "Tokens", "Skipping"]

st.header("Routing")
s = settings()
ov = require_analysis(s)
layers = ov["layers"]
view = st.radio("Show", VIEWS, horizontal=True, key="route_view", label_visibility="collapsed")

if view == "Usage":
    usage = backend.layer_map(s, "usage", "routing")
    st.plotly_chart(charts.layer_expert_heatmap(usage, layers, "usage", fmt=".3f",
                                                title="Fraction of tokens routed to each expert"), key="route_usage_map")
    layer = layer_select(layers, "route_layer")
    E, k = ov["num_experts"][layer], ov["top_k"][layer]
    row = usage[layers.index(layer), :E]
    balance = backend.layer_scalars(s).set_index("layer").loc[layer, "balance_entropy"]
    c1, c2, c3 = st.columns(3)
    c1.metric("Least used expert", f"{int(np.nanargmin(row))}", f"{row[np.nanargmin(row)]:.3f} of tokens",
              delta_color="off")
    c2.metric("Most used expert", f"{int(np.nanargmax(row))}", f"{row[np.nanargmax(row)]:.3f} of tokens",
              delta_color="off")
    c3.metric("Balance (entropy / log E)", f"{balance:.3f}",
              help="the entropy of this layer's expert usage divided by its maximum: 1 = every expert gets the same "
                   "share of tokens, near 0 = a few experts take every token (higher: more evenly used)")
    st.plotly_chart(charts.expert_bars(row, "usage", reference=k / E, reference_label=f"uniform (top-{k} / {E})",
                                       title=f"layer {layer}"), key="route_usage_bars")

elif view == "Co-activation":
    layer = layer_select(layers, "route_layer")
    C = backend.routing_matrix(s, layer, "coactivation")
    tokens = float(backend.layer_scalars(s).set_index("layer").loc[layer, "tokens"])
    st.caption(f"Fraction of the {int(tokens)} calibration tokens that chose both experts (diagonal: usage). "
               "Experts that are always chosen together are candidates for merging.")
    st.plotly_chart(charts.similarity_heatmap(C / tokens, "co-activation", title=f"layer {layer}"),
                    key="route_coact")

elif view == "Vocabulary":
    cov = backend.layer_map(s, "vocab_coverage", "routing")
    st.caption("Distinct token ids routed to each expert (EVC divides by the distinct ids in the batch).")
    st.plotly_chart(charts.layer_expert_heatmap(cov, layers, "distinct tokens", fmt=".0f",
                                                title="Vocabulary coverage"), key="route_vocab")

elif view == "Tokens":
    require_trace(s, "Token examples")
    c1, c2 = st.columns(2)
    with c1:
        layer = layer_select(layers, "route_layer")
    E = ov["num_experts"][layer]
    if st.session_state.get("route_expert", 0) >= E:
        st.session_state["route_expert"] = 0
    expert = c2.selectbox("Expert", list(range(E)), key="route_expert")
    examples, top = backend.expert_tokens(s, layer, expert)
    st.markdown(f"**Tokens routed to expert {expert} of layer {layer} with the largest weight** "
                "(at most two per distinct token; choice 1 = the token's first choice)")
    st.dataframe(examples, hide_index=True, width="stretch",
                 column_config={"weight": st.column_config.ProgressColumn(format="%.3f", min_value=0.0, max_value=1.0)})
    st.markdown("**Most frequent tokens** (share: of that token's occurrences, how many chose this expert)")
    st.dataframe(top, hide_index=True,
                 column_config={"share": st.column_config.ProgressColumn(format="%.2f", min_value=0.0, max_value=1.0)})

else:  # Skipping
    if min(ov["top_k"].values()) < 2:
        st.info("This model's router selects one expert per token: dynamic skipping has nothing to skip.")
        st.stop()
    require_trace(s, "Skip ratios")
    st.caption("Dynamic skipping (Lu et al. §3.3, App. A.2): top-2 tokens skip their second expert when w₂ < β·w₁; "
               "top-k tokens keep the fewest leading experts with Σ skipped ≤ β · Σ of all k; the kept weights are "
               "renormalised. β per layer is calibrated as the median of that ratio (w₂/w₁; w_k/Σw for k > 2), so "
               "at the calibrated β about half the calibration tokens skip an expert. Compare's *skipped expert calls* "
               "counts something else: the calls skipped while generating the speed prompts, at the β of the "
               "evaluation's skip calibration.")
    same = st.checkbox("One β for every layer", key="route_same_beta")
    beta = st.slider("β", 0.0, 1.0, 0.5, 0.01, key="route_beta") if same else None
    table = backend.skip_table(s, beta)
    st.plotly_chart(charts.layer_bars(table["layer"], {
        "tokens skipping an expert": table["tokens skipping an expert"],
        "expert calls skipped": table["expert calls skipped"]}, yaxis="fraction", yrange=[0, 1]), key="route_skip")
    st.dataframe(table, hide_index=True,
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in table.columns if c != "layer"})
