"""The dashboard's only door to :mod:`analysis`: cached wrappers returning plain data."""

from __future__ import annotations

import streamlit as st

from analysis.models import load_moe


@st.cache_data(show_spinner="Reading the model's structure…")
def model_info(source: str) -> dict:
    """``moescope info`` facts for ``source`` (config only, no weights)."""
    return load_moe(source, dtype=None, weights=False).info()
