"""Model page: the loaded model's MoE structure."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.errors import MoescopeError
from dashboard.backend import model_info

st.header("Model")
source = st.session_state.get("model", "demo")
try:
    info = model_info(source)
except MoescopeError as err:
    st.error(str(err))
    st.stop()

p = info["params"]
cols = st.columns(4)
cols[0].metric("Family", info["family"])
cols[1].metric("MoE layers", f"{len(info['moe_layers'])} / {info['num_hidden_layers']}")
cols[2].metric("Experts · top-k", f"{max(info['num_experts'].values())} · {info['top_k']}")
cols[3].metric("Parameters (active)", f"{p['total'] / 1e6:.2f}M ({p['active'] / 1e6:.2f}M)")
st.caption(f"Routing: {info['routing']}")
st.dataframe(
    pd.DataFrame(
        {"layer": [int(k) for k in info["num_experts"]], "routed experts": list(info["num_experts"].values())}
    ),
    hide_index=True,
)
