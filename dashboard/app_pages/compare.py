"""Compare: experiments side by side, the original as the reference row; charts and CSV."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from moescope.analysis.errors import MoescopeError
from moescope.dashboard import runs

st.header("Compare")
experiments = runs.experiment_list()
if not experiments:
    st.info("No experiments yet: run one on the Run page (or `moescope prune … --ppl demo:all`).")
    st.stop()
labels = {e.id: f"{e.id} · {e.label} · {e.model}" for e in experiments}
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

st.dataframe(table, hide_index=True, width="stretch")
st.download_button("Download CSV", table.to_csv(index=False), file_name="moescope-compare.csv", mime="text/csv")

quality = [c for c in table.columns if c.startswith("ppl ") or (c.split(" ")[0].startswith("moescope") and not
                                                                  c.startswith("Δ"))]
quality += [c for c in table.columns if " " in c and not c.startswith(("Δ", "ppl ")) and c.split(" ")[-1] in
            ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte") and c not in quality]
cost = [c for c in ("params ratio", "weight bytes ratio", "peak memory ratio", "prefill speed ratio",
                    "generate speed ratio", "generate speed ratio (skip)") if c in table.columns]
if quality and cost:
    c1, c2 = st.columns(2)
    q = c1.selectbox("Quality", quality, key="compare_quality")
    x = c2.selectbox("Against", cost, key="compare_cost")
    fig = px.scatter(table, x=x, y=q, text="label", hover_name="experiment", height=420)
    fig.update_traces(textposition="top center", marker={"size": 12})
    st.plotly_chart(fig, width="stretch")

domains = runs.domain_table(ids)
if not domains.empty:
    src = st.selectbox("Perplexity per domain of", sorted(domains["name"].unique()), key="compare_source")
    sub = domains[(domains["name"] == src) & (domains["detail"] != "all")]
    if not sub.empty:
        fig = px.bar(sub, x="detail", y="value", color="experiment", barmode="group", height=420,
                     labels={"detail": "domain", "value": "perplexity"})
        st.plotly_chart(fig, width="stretch")
