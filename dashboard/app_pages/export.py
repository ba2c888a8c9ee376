"""Export: write an experiment's pruned model folder with its model card; download the plan."""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.run.export import split_front_matter
from moescope.dashboard import runs


def default_folder(exp) -> str:
    """``~/moescope-exports/<plan name>-<experiment id>``: the folder says which plan it holds."""
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", exp.label).strip("-.")[:40] or "plan"
    return str(Path.home() / "moescope-exports" / f"{slug}-{exp.id}")


st.header("Export")
experiments = [e for e in runs.experiment_list() if e.plan]
if not experiments:
    st.info("No pruned experiment yet: run a plan on the Run page first.")
    st.stop()
labels = {e.id: f"{e.id} · {e.label} · {e.model}" for e in experiments}
ident = st.selectbox("Experiment", list(labels)[::-1], format_func=labels.get, key="export_id")
exp = next(e for e in experiments if e.id == ident)
after = exp.structure.get("after", {})
before = exp.structure.get("before", {})
c = st.columns(3)
c[0].metric("Experts per layer", ", ".join(f"{v}" for v in after.get("experts", {}).values()))
c[1].metric("Parameters", f"{after.get('params', {}).get('total', 0) / 1e6:.2f}M",
            f"{100 * (after['params']['total'] / before['params']['total'] - 1):+.1f}%" if before else None,
            delta_color="inverse")
ppl = exp.result.get("ppl", {})
if ppl:
    src, value = next(iter(ppl.items()))
    c[2].metric(f"Perplexity {src}", f"{value:.2f}", f"{100 * (value / exp.reference['ppl'][src] - 1):+.1f}%",
                delta_color="inverse")

plan_text = runs.plan_json(ident)
st.download_button("Download plan JSON", plan_text, file_name=f"plan-{ident}.json", mime="application/json")

# outside the repository (the dashboard runs from it): the user's home, one folder per experiment,
# named for the experiment chosen now (the widget's key follows the experiment, so choosing another
# one never keeps the previous one's folder; an edited folder is kept per experiment)
out = st.text_input("Output folder", value=default_folder(exp), key=f"export_dir_{ident}",
                    help="a new or empty folder (an earlier moescope export with Overwrite); the weights, "
                         "config, tokenizer, plan.json, experiment.json and the model card README.md")
overwrite = st.checkbox("Overwrite a non-empty folder", value=False, key="export_overwrite")
transformers_only = st.checkbox("For transformers only", value=False, key="export_transformers_only",
                                help="accept different expert counts per layer for a family moescope's vLLM plugin "
                                     "does not serve (the folder then loads in transformers, not in vLLM)")
if st.button("Export", type="primary", key="export_go"):
    refusal, files = None, []
    with st.status("Exporting…", expanded=False) as status:
        try:
            files = runs.export_experiment(ident, out, overwrite, transformers_only)
        except MoescopeError as err:
            refusal = str(err)
            status.update(label="Export refused", state="error")
        else:
            status.update(label="Exported", state="complete")
    if refusal is not None:  # the reason in full view, never inside the collapsed status box
        st.error(refusal)
    else:
        st.success(f"Wrote {out}: {', '.join(files)}")
        if "modeling_moescope.py" in files:
            st.info("The layers keep different expert counts, so the folder carries `modeling_moescope.py`: "
                    "load it with `AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)` "
                    "(lm-eval: `--model_args pretrained=PATH,trust_remote_code=True`); moescope loads it as is; "
                    "vLLM serves it with moescope's plugin installed (the model card's Serving section).")
        with st.expander("Model card (README.md)"):
            header, body = split_front_matter((Path(out) / "README.md").read_text(encoding="utf-8"))
            if header:
                st.caption("Hub metadata (the card's YAML header)")
                st.code(header, language="yaml")
            st.markdown(body)
