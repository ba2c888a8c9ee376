"""Entry point: ``streamlit run dashboard/app.py`` (or ``moescope dashboard``).

Shared session-state defaults and the sidebar live here; each page is a script in
``dashboard/app_pages/`` (pages whose file is not there yet are left out of the navigation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import streamlit as st
from moescope.analysis.pruning.plan import recipe_name
from moescope.dashboard import backend
from moescope.dashboard.backend import Settings

PAGES = Path(__file__).parent / "app_pages"

# (section, file, title, icon); the first page is the default
NAVIGATION = [
    ("Analyse", "model.py", "Model & data", ":material/memory:"),
    ("Analyse", "similarity.py", "Similarity", ":material/grid_on:"),
    ("Analyse", "routing.py", "Routing", ":material/alt_route:"),
    ("Analyse", "expert_maps.py", "Expert maps", ":material/map:"),
    ("Analyse", "drop_grid.py", "Drop grid", ":material/target:"),
    ("Prune", "plan.py", "Plan", ":material/content_cut:"),
    ("Prune", "run.py", "Run", ":material/play_arrow:"),
    ("Prune", "compare.py", "Compare", ":material/compare_arrows:"),
    ("Prune", "export.py", "Export", ":material/output:"),
]

# shared settings (session-state keys read by every page), with the defaults backend.Settings declares;
# page-specific keys carry a prefix
DEFAULTS = {**Settings.defaults(), "plan": None}  # plan: the current PruningPlan as its JSON dict

st.set_page_config(page_title="moescope", page_icon="🔬", layout="wide")
_cli = argparse.ArgumentParser(add_help=False)
_cli.add_argument("--model", default=DEFAULTS["model"])
_cli.add_argument("--trust-remote-code", action="store_true")  # `moescope dashboard --trust-remote-code`
_args = _cli.parse_known_args(sys.argv[1:])[0]
st.session_state.setdefault("model", _args.model)
st.session_state.setdefault("trust_remote_code", _args.trust_remote_code)
for _key, _value in DEFAULTS.items():
    st.session_state.setdefault(_key, _value)
# fixed for the server's lifetime (set at launch), so the model loaders read it as a module setting
backend.TRUST_REMOTE_CODE = bool(st.session_state["trust_remote_code"])

sections: dict[str, list] = {}
for section, file, title, icon in NAVIGATION:
    if (PAGES / file).is_file():
        sections.setdefault(section, []).append(
            st.Page(str(PAGES / file), title=title, icon=icon, default=file == NAVIGATION[0][1]))
pg = st.navigation(sections)

with st.sidebar:
    st.title("moescope")
    st.caption(f"Model **{st.session_state['model']}**  \n"
               f"Calibration `{st.session_state['calib_source']}` · {st.session_state['calib_samples']}×"
               f"{st.session_state['calib_seq_len']} tokens · seed {st.session_state['seed']}  \n"
               f"Evaluation `{st.session_state['eval_source']}`")
    if st.session_state["trust_remote_code"]:
        st.warning("Remote code is trusted: the model's own Python code from its folder or hub repository "
                   "runs when it loads (`--trust-remote-code`).", icon=":material/warning:")
    # drawn now and again after the page ran: a page may change the plan ("Add to the plan") after
    # the sidebar was drawn; a page that stops early keeps the line as it was when it began
    plan_line = st.empty()


def _draw_plan_line() -> None:
    plan = st.session_state.get("plan")
    if plan:
        changed = ", ".join(f"L{l}→{len(lp['groups'])}" for l, lp in plan.get("layers", {}).items()) or "no layer changed"
        plan_line.caption(f"Plan ({recipe_name(plan.get('provenance'))}): {changed}")
    else:
        plan_line.caption("No plan yet (build one on the Plan page)")


_draw_plan_line()

# choices on the analysis pages survive switching pages: Streamlit forgets the state of a widget a
# run does not draw unless its key is written back before the page runs (its documented pattern);
# only widgets created without an explicit default value are listed (those would warn)
PERSISTENT = ("sim_representation", "sim_metric", "sim_view", "sim_layer", "sim_order", "sim_scale",
              "sim_threshold", "map_criterion", "map_order", "route_view", "route_layer", "route_expert")
for _key in PERSISTENT:
    if _key in st.session_state:
        st.session_state[_key] = st.session_state[_key]

pg.run()
_draw_plan_line()
