"""Expert maps: any MC-Suite criterion as a layer × expert map, which experts dropping by its min
or max would remove first, and how well it agrees with the single-expert-drop grid."""

from __future__ import annotations

import numpy as np
import streamlit as st
from moescope.dashboard import backend, charts
from moescope.dashboard.ui import add_to_plan, require_analysis, settings

st.header("Expert maps")
s = settings()
ov = require_analysis(s)
layers = ov["layers"]

names = [c for c in backend.CRITERIA if c in ov["criteria"]]
c1, c2, c3 = st.columns([3, 2, 2])
criterion = c1.selectbox("Criterion", names, key="map_criterion",
                         format_func=lambda c: f"{c} — {backend.CRITERIA[c].description.split(':')[0]}")
order = c2.radio("Drop the experts with the", ["min", "max"], horizontal=True, key="map_order",
                 format_func=lambda o: f"{o}imum")
max_e = max(ov["num_experts"].values())
min_k = min(ov["top_k"].values())
first = c3.number_input("Mark per layer the first", 1, max(1, max_e - min_k), 1, key="map_first",
                        help="experts that dropping by this criterion and orientation removes first")
st.caption(f"**{criterion}**: {backend.CRITERIA[criterion].description} (dropped by default: the "
           f"{backend.CRITERIA[criterion].drop})")

if backend.CRITERIA[criterion].pair:
    st.caption(f"{criterion} is a pair criterion (MC-Suite): it picks the pair of experts with the {order} value of "
               "its expert × expert matrix and drops that pair's lower-usage member, then repeats. The map shows the "
               f"round in which that rule drops each expert at its default end ({backend.CRITERIA[criterion].drop}; "
               "1 = first); the hover shows the drop order for the end chosen here.")
values = backend.layer_map(s, criterion)
ranks = backend.criterion_drop_ranks(s, criterion, order)
marks = [(l, e) for i, l in enumerate(layers) for e in range(ranks.shape[1])
         if np.isfinite(ranks[i, e]) and ranks[i, e] < first]
custom = np.where(np.isfinite(ranks), ranks + 1, np.nan)
st.plotly_chart(charts.layer_expert_heatmap(
    values, layers, criterion, customdata=custom, custom_label=f"drop order ({order})", marks=marks,
    mark_label=f"dropped first by {order} {criterion}", fmt=".4g"), key="map_heatmap")
if st.button(f"Drop the marked experts ({len(marks)})", key="map_add", disabled=not marks,
             help="add them to the current plan as drops (the Plan page shows and edits it)"):
    drops: dict[int, list[int]] = {}
    for l, e in marks:
        drops.setdefault(int(l), []).append(int(e))
    add_to_plan(page="Expert maps", drops=drops, what=f"drop the first {first} by {order} {criterion} in every layer")
missing = int(np.isnan(values).sum() - sum(max_e - n for n in ov["num_experts"].values()))
if missing > 0:
    st.caption(f"{missing} expert(s) have no value (never routed a calibration token); "
               "they are dropped first either way.")

st.subheader("Agreement with the drop grid")
corr = backend.grid_correlation(s, criterion)
if corr is None:
    st.info("Compute the single-expert-drop grid on the **Drop grid** page to see how this criterion ranks the "
            "experts that matter.")
    st.stop()
rho = [corr[l] for l in layers if l in corr]
sign = 1 if order == "min" else -1
st.caption(f"Spearman correlation per layer between {criterion} and the perplexity increase when that expert alone "
           f"is dropped. Dropping by **{order}** follows the grid when the correlation is "
           f"**{'positive' if sign > 0 else 'negative'}** (the experts it removes first cost least).")
finite = [r for r in rho if np.isfinite(r)]
st.metric("Mean Spearman ρ", f"{np.mean(finite):+.3f}" if finite else "n/a",
          help="rank agreement between the criterion and the drop grid per layer, averaged: near ±1 the "
               "criterion orders the experts as the grid does; which sign helps depends on min / max (see above)")
st.plotly_chart(charts.layer_bars([l for l in layers if l in corr], {"Spearman ρ": rho}, yaxis="ρ",
                                  yrange=[-1, 1]), key="map_corr")
