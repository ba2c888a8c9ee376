"""Compare: every experiment of the model, grouped under the original of the evaluation setting it
was measured on (one original per setting, named by it), best headline metric first; a short
table of changes where a value is bold only when it is the best beyond the uncertainty and grey
when it is within noise of its original; charts with error bars and hollow markers for values
within noise, one fixed colour per experiment; the full CSV."""

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

view = runs.compare_view(table)
show_all = st.checkbox("Every column", value=False, key="compare_all",
                       help="the short view shows the changes that decide; every column adds raw values, "
                            "the 95 % ranges, per-layer expert counts and every speed figure")
shown = list(table.columns) if show_all else view.columns
n_settings = table["group"].nunique()
if n_settings > 1:
    st.info(f"These experiments were measured on {n_settings} different settings: nothing pairs across them, so "
            "each is shown against its own original only.")
st.caption(
    ("Each experiment sits under the original of its evaluation setting; changes are against that original. "
     if n_settings > 1 else "Changes are against the original (first row). ")
    + "Sorted by the headline metric. Verdicts are paired: the same windows (perplexity) or documents "
      "(lm-eval) scored by both models, a paired bootstrap's 95 % range of the change. **Bold green**: better "
      "than every other experiment under the same original beyond their paired range. *Grey italics*: within "
      "noise of the original (the paired range covers no change). Hover a column's name for which end is better.")
st.dataframe(runs.styled(table, view, shown), hide_index=True, width="stretch",
             column_config={c: st.column_config.Column(help=view.help[c], width="large" if c == "name" else None)
                            for c in shown if c in view.help})
lines = runs.verdicts(table, view)
for line in lines:
    st.markdown("**Verdict** " + line, help="paired on the same windows / documents: best only where better than "
                "every rival beyond the paired 95 % range; against the original, within noise where the paired "
                "range covers no change")
st.download_button("Download CSV (every column)", table.to_csv(index=False), file_name="moescope-compare.csv",
                   mime="text/csv")

colours = runs.experiment_colours(table, [e.id for e in pool])
quality = [c for c in view.quality if c in table.columns]
cost = [c for c in view.cost if c in table.columns]
if quality and cost:
    c1, c2 = st.columns(2)
    q = c1.selectbox("Quality", quality, key="compare_quality")
    x = c2.selectbox("Against", cost, key="compare_cost")
    st.plotly_chart(charts.compare_scatter(table, x, q, colours, runs.noise_rows(table, [x, q])), width="stretch")
    st.caption("Bars: 95 % ranges. Hollow markers: a value within noise of its original (a point to read as "
               "'no measurable change', not as a result). Diamonds and squares: the originals, one per setting.")

domains = runs.domain_table([e.id for e in chosen])
if not domains.empty:
    src = st.selectbox("Perplexity per domain of", sorted(domains["name"].unique()), key="compare_source")
    sub = domains[(domains["name"] == src) & (domains["detail"] != "all")]
    if not sub.empty:
        st.plotly_chart(charts.domain_bars(sub, colours), width="stretch")
