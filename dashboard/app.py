"""Entry point: ``streamlit run dashboard/app.py`` (or ``moescope dashboard``).

Shared sidebar widgets and session-state defaults live here; each page is a script in
``dashboard/app_pages/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import streamlit as st

PAGES = Path(__file__).parent / "app_pages"

st.set_page_config(page_title="moescope", page_icon="🔬", layout="wide")
_cli = argparse.ArgumentParser(add_help=False)
_cli.add_argument("--model", default="demo")
st.session_state.setdefault("model", _cli.parse_known_args(sys.argv[1:])[0].model)

with st.sidebar:
    st.title("moescope")
    st.text_input("Model", key="model", help="'demo', a local model folder, or a hub id")

pg = st.navigation([st.Page(str(PAGES / "model.py"), title="Model", icon="🧩", default=True)])
pg.run()
