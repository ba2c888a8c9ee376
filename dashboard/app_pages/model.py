"""Model & data: choose the model and the calibration / evaluation data, see the model's MoE
structure, start or reuse the cached analysis, list the cached analyses."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from moescope.dashboard import backend
from moescope.dashboard.ui import guarded, persistent, run_with_progress, settings, show_analysis_cost

st.header("Model & data")

KINDS = {"demo": "Demo model", "demo-upcycled": "Upcycled demo", "folder": "Local folder", "hub": "Hub id"}
DEMOS = ("demo", "demo-upcycled")


def _kind(model: str) -> str:
    if model in DEMOS:
        return model
    from pathlib import Path

    return "folder" if model.startswith((".", "/", "~")) or Path(model).exists() else "hub"


def _set_kind() -> None:
    kind = st.session_state["_w_model_kind"]
    if kind in DEMOS:
        st.session_state["model"] = kind
    elif _kind(st.session_state["model"]) != kind:
        st.session_state["model"] = ""  # ask for the folder / id


def _set_model() -> None:
    st.session_state["model"] = st.session_state["_w_model_text"].strip()


left, right = st.columns([3, 2], gap="large")
with left:
    st.subheader("Model")
    st.session_state["_w_model_kind"] = _kind(st.session_state["model"]) if st.session_state["model"] else \
        st.session_state.get("_w_model_kind", "folder")
    kind = st.radio("Source", list(KINDS), format_func=KINDS.get, horizontal=True, key="_w_model_kind",
                    on_change=_set_kind)
    if kind not in DEMOS:
        st.session_state["_w_model_text"] = st.session_state["model"]
        st.text_input("Model folder" if kind == "folder" else "Hub id", key="_w_model_text", on_change=_set_model,
                      placeholder="/path/to/model" if kind == "folder" else "Qwen/Qwen1.5-MoE-A2.7B")
with right:
    st.subheader("Data")
    c1, c2 = st.columns(2)
    with c1:
        persistent(st.text_input, "Calibration source", "calib_source",
                   help="demo:DOMAIN | demo:all | file:PATH (.txt or .jsonl) | hf:NAME[:CONFIG]:SPLIT[:FIELD]")
        persistent(st.number_input, "Calibration samples", "calib_samples", min_value=1, step=8)
        persistent(st.number_input, "Seed", "seed", min_value=0, step=1)
    with c2:
        persistent(st.text_input, "Evaluation source", "eval_source",
                   help="used by the drop grid (its test split) and by evaluation")
        persistent(st.number_input, "Tokens per sample", "calib_seq_len", min_value=8, step=64)

s = settings()
if not s.model:
    st.info("Enter a model folder or hub id.")
    st.stop()

with st.spinner(f"Reading {s.model}'s configuration…"):  # the first visit imports torch and transformers
    info = guarded(backend.model_info, s.model)
st.subheader("Structure")
p = info["params"]
cols = st.columns(4)
cols[0].metric("Family", info["family"])
cols[1].metric("MoE layers", f"{len(info['moe_layers'])} / {info['num_hidden_layers']}")
cols[2].metric("Experts · top-k", f"{max(info['num_experts'].values())} · {info['top_k']}")
cols[3].metric("Parameters (active)", f"{p['total'] / 1e6:.2f}M ({p['active'] / 1e6:.2f}M)")
shared = ", ".join(f"layer {x['layer']}" for x in info["shared_experts"]) or "none"
st.caption(f"Routing: {info['routing']}"
           + (f" ({info['routing_groups']} routing groups)" if info.get("routing_groups") else "")
           + f" · shared experts: {shared} · routed experts hold {100 * p['experts'] / p['total']:.1f}% of the "
           f"parameters · hidden size {info['hidden_size']}")
with st.expander("Experts per MoE layer"):
    st.dataframe(pd.DataFrame({"layer": [int(k) for k in info["num_experts"]],
                               "routed experts": list(info["num_experts"].values())}), hide_index=True)

st.subheader("Analysis")
st.session_state.setdefault("model_loaded", [])
if _kind(s.model) == "hub" and s.model not in st.session_state["model_loaded"]:
    st.info("Analysing a hub model downloads its weights first.")
    if st.button("Load the weights", key="load_weights"):
        st.session_state["model_loaded"].append(s.model)
        st.rerun()
    res = None
else:
    with st.spinner("Looking for a stored analysis…"):
        res = guarded(backend.find_analysis, s)
    st.caption(guarded(backend.describe_batch, s, "calib"))
    if res is None:
        st.info("Not analysed with these settings yet: similarities, routing statistics and every MC-Suite "
                "criterion are computed once and cached; progress is shown layer by layer while it runs "
                "(large models take minutes per layer).")
        cost = guarded(backend.analysis_cost, s.model, s.calib_samples, s.calib_seq_len)
        if cost is not None:
            show_analysis_cost(cost)
        if st.button("Run the analysis", type="primary", key="run_analysis"):
            run_with_progress("Analysing…", backend.compute_analysis, s, "Analysis done")
            st.rerun()
    else:
        ov = backend.analysis_overview(s)
        took = f", computed in {ov['elapsed_s']:.1f} s" if ov.get("elapsed_s") else ""
        st.success(f"Cached analysis: {len(ov['layers'])} MoE layers, {len(ov['similarities'])} similarities, "
                   f"{len(ov['criteria'])} criteria{took}.")
        HELP = {"most similar pair": "the two experts of the layer with the most alike outputs (linear CKA)",
                "CKA": "their linear CKA: 1 = the same representation up to rotation and scale, 0 = unrelated; "
                       "around 0.9 and above they are candidates to merge",
                "least used": "the expert the fewest calibration tokens are routed to",
                "its usage": "the fraction of tokens routed to it (each token picks top-k experts, so a "
                             "layer's usages sum to k); near 0: a candidate to drop",
                "β": "dynamic-skipping ratio: the median of w₂/w₁ over tokens; a token skips its second expert "
                     "when w₂ ≤ β·w₁ (higher β: more skipping)",
                "balance": "routing balance, the entropy of expert usage / log E: 1 = every expert used "
                           "equally, near 0 = a few experts take every token"}
        st.dataframe(backend.analysis_summary(s), hide_index=True,
                     column_config={c: st.column_config.NumberColumn(format="%.3f", help=HELP[c])
                                    for c in ("CKA", "its usage", "β", "balance")}
                     | {c: st.column_config.Column(help=HELP[c]) for c in ("most similar pair", "least used")})

with st.expander("Cached analyses", expanded=res is None):
    table = backend.cached_analyses(s.cache_root)
    st.caption(f"{len(table)} in `{s.cache_root}`")
    if len(table):
        st.dataframe(table, hide_index=True)
