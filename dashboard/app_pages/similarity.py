"""Similarity: expert × expert heatmaps per layer, data-centric (expert outputs on the same
calibration tokens) or model-centric (weights, surrogate weights), one layer large or all layers
on one colour scale, with the current plan's grouping overlaid."""

from __future__ import annotations

import streamlit as st
from moescope.analysis.measure.explore import SIMILAR_AT
from moescope.dashboard import backend, charts
from moescope.dashboard.ui import (
    add_to_plan,
    current_plan,
    layer_select,
    plan_layer_state,
    require_analysis,
    settings,
)

st.header("Similarity")
s = settings()
ov = require_analysis(s)

c1, c2, c3 = st.columns([3, 2, 2])
representation = c1.radio("Representation", list(backend.REPRESENTATIONS),
                          format_func=lambda v: backend.friendly(v, "representation"),
                          key="sim_representation")
choices = backend.REPRESENTATIONS[representation]
if st.session_state.get("sim_metric") not in choices:
    st.session_state["sim_metric"] = choices[0]
metric = c2.selectbox("Similarity", choices, format_func=lambda v: backend.friendly(v, "similarity"),
                      key="sim_metric")
view = c3.radio("View", ["One layer", "All layers"], key="sim_view", horizontal=True)

name = backend.similarity_name(representation, metric)
if name not in ov["similarities"]:
    st.error(f"this analysis has no '{name}' similarity (it has: {', '.join(ov['similarities'])})")
    st.stop()
distance = backend.is_distance(name)
mats = backend.similarity_matrices(s, name)
bounds = backend.similarity_bounds(name)
c4, c5 = st.columns([2, 3])
scales = ["absolute", "relative"] if bounds else ["relative"]
if st.session_state.get("sim_scale") not in scales:
    st.session_state["sim_scale"] = scales[0]
scale = c4.radio("Colour scale", scales, key="sim_scale", horizontal=True,
                 format_func=lambda v: (f"absolute ({bounds[0]:g} to {bounds[1]:g})" if v == "absolute" and bounds
                                        else "relative (off-diagonal range)"),
                 help="absolute: every value at its place on the metric's whole range, so 0.4 never looks like "
                      "1.0; relative: the colours span this model's off-diagonal values (small differences "
                      "become visible, but the brightest pair need not be alike at all)")
zrange = bounds if scale == "absolute" else None
lo_all, hi_all = charts.offdiag_range(mats.values())
t_lo, t_hi = bounds if bounds else (0.0, max(hi_all, 1e-12))
if st.session_state.get("sim_threshold") is None or not t_lo <= st.session_state["sim_threshold"] <= t_hi:
    # on the measure's own scale: CKA / cosine 0.9, near-duplicates (what the Model page calls a merge
    # candidate), even where no pair is that alike (then nothing is outlined and nothing offered to merge:
    # the measure does not say these experts are similar); MSE, a distance without a fixed scale: the
    # lowest tenth of its range
    st.session_state["sim_threshold"] = SIMILAR_AT if bounds else lo_all + 0.1 * (hi_all - lo_all)
if bounds and hi_all < SIMILAR_AT:
    st.caption(f"No pair of experts reaches {SIMILAR_AT:g} here (the most alike: {hi_all:.3g}): by this measure "
               "none is a near-duplicate to merge. Lower the threshold to outline the most alike anyway.")
threshold = c5.slider(("Outline pairs at or below" if distance else "Outline pairs at or above"),
                      float(t_lo), float(t_hi), key="sim_threshold", step=(t_hi - t_lo) / 200,
                      format="%.3g",
                      help="pairs this alike are candidates to merge (or to keep only one of): "
                           + ("MSE is a distance, 0 = identical outputs" if distance else
                              "1 = the same representation up to rotation and scale (CKA) or direction "
                              "(cosine); around 0.9 and above experts are near-duplicates"))
st.caption(("Smaller = more alike (a distance); the colour scale is reversed so alike looks the same. "
            if distance else "Larger = more alike. ")
           + ("The colours span the metric's whole range." if zrange else
              "The colours span the off-diagonal entries (an expert with itself is left out)."))

if view == "All layers":
    st.plotly_chart(charts.similarity_small_multiples(mats, name, distance=distance, zrange=zrange),
                    key="sim_multiples")
    st.stop()

left, right = st.columns([3, 1], gap="medium")
with right:
    layer = layer_select(ov["layers"], "sim_layer")
    plan = current_plan()
    groups, dropped = plan_layer_state(plan, layer, ov["num_experts"][layer])
    overlay = st.checkbox("Overlay the current plan", value=plan is not None, key="sim_overlay",
                          disabled=plan is None, help="merged groups outlined, dropped experts crossed")
    if plan is not None and overlay:
        st.caption(f"Layer {layer}: " + ("; ".join(
            [f"merge {'+'.join(map(str, g))}" for g in groups] + ([f"drop {', '.join(map(str, dropped))}"] if dropped else []))
            or "unchanged by the plan"))
    ordering = st.radio("Expert order", ["by index", "by clustering"], key="sim_order", horizontal=True,
                        help="by clustering: alike experts side by side (average-linkage hierarchical "
                             "clustering of this matrix), so redundant blocks show along the diagonal; "
                             "drag on the map to zoom, double-click to reset")
    order = backend.similarity_order(s, name, layer) if ordering == "by clustering" else None
    n_pairs = 5 if ov["num_experts"][layer] <= 16 else 20
    st.markdown(f"**Most alike pairs** (top {n_pairs})")
    st.dataframe(backend.similar_pairs(s, name, layer, n_pairs), hide_index=True,
                 column_config={name: st.column_config.NumberColumn(format="%.4f")})
with left:
    beyond = backend.pairs_beyond(s, name, layer, threshold)
    st.caption(f"{len(beyond)} pair{'s' if len(beyond) != 1 else ''} beyond the threshold in layer {layer}")
    if st.button(f"Merge the outlined pairs of layer {layer}", key="sim_add", disabled=not beyond,
                 help="add them to the current plan as merges (overlapping pairs form one group)"):
        add_to_plan(page="Similarity", merges={layer: beyond}, what=f"merge {', '.join(f'{i}+{j}' for i, j in beyond)} in layer {layer}")
    fig = charts.similarity_heatmap(mats[layer], name, distance=distance, zrange=zrange, outlined=beyond,
                                    groups=groups if overlay else None, dropped=dropped if overlay else None,
                                    title=f"layer {layer} · {name}", order=order,
                                    height=520 if ov["num_experts"][layer] <= 32 else 760)
    st.plotly_chart(fig, key="sim_heatmap")
