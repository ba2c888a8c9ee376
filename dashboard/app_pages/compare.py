"""Compare: every experiment of the model, one section per evaluation setting (experiments of
different settings pair nothing), each with its own original, only the columns the setting has,
best headline metric first: a short table of changes where a value is bold only when it is better
than every rival beyond the paired range and grey when it is within noise of its original by the
paired comparison, one verdict line, charts with error bars and hollow markers for values within
noise, one fixed colour per experiment; the full CSV."""

from __future__ import annotations

import streamlit as st
from moescope.analysis.core.errors import MoescopeError
from moescope.dashboard import charts, runs

st.header("Compare")
model = st.session_state.get("model", "demo")
everything = runs.experiment_list()
if not everything:
    st.info("No experiments yet: run one on the Run page (or `moescope prune … --ppl demo:all`).")
    st.stop()
c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
query = c1.text_input("Filter (part of a name, strategy or id; empty: every experiment)", value="",
                      key="compare_filter")
other_models = c2.checkbox("Other models too", value=False, key="compare_other_models",
                           help=f"experiments of models other than {model}")
pool = [e for e in everything if other_models or e.model == model]
if not pool:
    st.info(f"No experiments of `{model}` yet ({len(everything)} of other models: tick *Other models too*).")
    st.stop()
needle = query.strip().lower()
chosen = [e for e in pool if not needle or needle in f"{e.label} {e.id} {e.model}".lower()]
hidden = len(pool) - len(chosen)
st.caption(f"Showing **{len(chosen)} of {len(pool)}** experiments of "
           + ("every model" if other_models else f"`{model}`")
           + (f" ({hidden} hidden by the filter '{query.strip()}')" if hidden else "")
           + (f"; {len(everything) - len(pool)} more of other models" if len(everything) > len(pool) else ""))
if not chosen:
    st.info("The filter matches no experiment.")
    st.stop()
try:
    table = runs.compare_table([e.id for e in chosen])
except MoescopeError as err:
    st.error(str(err))
    st.stop()

show_all = st.checkbox("Every column", value=False, key="compare_all",
                       help="the short view shows the changes that decide; every column adds raw values, "
                            "the 95 % ranges, per-layer expert counts and every speed figure")
parts = runs.setting_parts(table)
if len(parts) > 1:
    st.info(f"These experiments were measured on {len(parts)} different settings: nothing pairs across them, so "
            "each setting is shown on its own, against its own original.")
st.caption("Changes are against the setting's original (its first row), best headline metric first. Verdicts are "
           "paired: the same windows (perplexity) or documents (lm-eval) scored by both models, a paired "
           "bootstrap's 95 % range of the change. **Bold green**: better than every other experiment of the "
           "setting beyond their paired range. *Grey italics*: within noise of the original (the paired range "
           "covers no change). Hover a column's name for which end is better.")
colours = runs.experiment_colours(table, [e.id for e in pool])
domains = runs.domain_table([e.id for e in chosen])
for k, (setting, part) in enumerate(parts):
    if len(parts) > 1:
        st.subheader(f"Setting {k + 1}: {setting}")
    view = runs.compare_view(part)  # only the columns this setting has
    shown = list(part.columns) if show_all else view.columns
    st.dataframe(runs.styled(part, view, shown), hide_index=True, width="stretch",
                 column_config={c: st.column_config.Column(help=view.help[c], width="large" if c == "name" else None)
                                for c in shown if c in view.help})
    for line in runs.verdicts(part, view):
        st.markdown("**Verdict** " + line, help="paired on the same windows / documents: best only where better "
                    "than every rival beyond the paired 95 % range; against the original, within noise where the "
                    "paired range covers no change")
    quality = [c for c in view.quality if c in part.columns]
    cost = [c for c in view.cost if c in part.columns]
    if quality and cost:
        c1, c2 = st.columns(2)
        q = c1.selectbox("Quality", quality, key=f"compare_quality_{k}")
        x = c2.selectbox("Against", cost, key=f"compare_cost_{k}")
        st.plotly_chart(charts.compare_scatter(part, x, q, colours, runs.noise_rows(part, [x, q])), width="stretch",
                        key=f"compare_scatter_{k}")
        st.caption("Bars: 95 % ranges. Hollow markers: within noise of the original by the paired comparison (read "
                   "as 'no measurable change'). The diamond: the setting's original.")
    mine = domains[domains["experiment"].isin(set(part["name"]))] if not domains.empty else domains
    if not mine.empty:
        src = st.selectbox("Perplexity per domain of", sorted(mine["name"].unique()), key=f"compare_source_{k}")
        sub = mine[(mine["name"] == src) & (mine["detail"] != "all")]
        if not sub.empty:
            st.plotly_chart(charts.domain_bars(sub, colours), width="stretch", key=f"compare_domains_{k}")
st.download_button("Download CSV (every setting, every column)", table.to_csv(index=False),
                   file_name="moescope-compare.csv", mime="text/csv")
