"""Compare: experiments side by side, the original as the reference row; a short table of changes
with the best value per column marked, charts in one colour per experiment, and the full CSV."""

from __future__ import annotations

import plotly.express as px
import streamlit as st
from moescope.analysis.core.errors import MoescopeError
from moescope.dashboard import runs

st.header("Compare")
experiments = runs.experiment_list()
if not experiments:
    st.info("No experiments yet: run one on the Run page (or `moescope prune … --ppl demo:all`).")
    st.stop()
labels = {e.id: f"{e.label} · {e.id} · {e.model}" for e in experiments}
default = [e.id for e in experiments[-3:]]
ids = st.multiselect("Experiments", list(labels), default=default, format_func=labels.get, key="compare_ids")
if not ids:
    st.info("Pick at least one experiment.")
    st.stop()
try:
    table = runs.compare_table(ids)
except MoescopeError as err:
    st.error(str(err))
    st.stop()

view = runs.compare_view(table)
show_all = st.checkbox("Every column", value=False, key="compare_all",
                       help="the short view shows the changes that decide; every column adds raw values, "
                            "per-layer expert counts and every speed figure")
shown = list(table.columns) if show_all else view.columns
st.caption("Changes are against the original (first row). **Bold green**: the best pruned value of a column. "
           + " ".join(f"{c}: {'lower' if d == 'lower' else 'higher'} is better." for c, d in view.better.items()
                      if c in shown and not show_all))
st.dataframe(runs.styled(table, view, shown), hide_index=True, width="stretch",
             column_config={c: st.column_config.Column(help=view.help[c]) for c in shown if c in view.help})
st.download_button("Download CSV (every column)", table.to_csv(index=False), file_name="moescope-compare.csv",
                   mime="text/csv")

colours = runs.colour_map(list(table["name"]))
quality = [c for c in view.quality if c in table.columns]
cost = [c for c in view.cost if c in table.columns]
if quality and cost:
    c1, c2 = st.columns(2)
    q = c1.selectbox("Quality", quality, key="compare_quality")
    x = c2.selectbox("Against", cost, key="compare_cost")
    fig = px.scatter(table, x=x, y=q, color="name", text="name", hover_name="experiment", height=440,
                     color_discrete_map=colours, category_orders={"name": list(colours)},
                     labels={"name": "experiment"})
    fig.update_traces(textposition="top center", marker={"size": 14})
    fig.update_traces(marker={"symbol": "diamond", "size": 16}, selector={"name": "original"})
    st.plotly_chart(fig, width="stretch")

domains = runs.domain_table(ids)
if not domains.empty:
    src = st.selectbox("Perplexity per domain of", sorted(domains["name"].unique()), key="compare_source")
    sub = domains[(domains["name"] == src) & (domains["detail"] != "all")]
    if not sub.empty:
        fig = px.bar(sub, x="detail", y="value", color="experiment", barmode="group", height=420,
                     color_discrete_map=colours, category_orders={"experiment": list(colours)},
                     labels={"detail": "domain", "value": "perplexity (lower is better)"})
        st.plotly_chart(fig, width="stretch")
