"""The dashboard, driven through Streamlit's AppTest on the demo model."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


def test_model_page_shows_the_demo_structure(demo_dir):
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Family"] == "mixtral"
    assert metrics["Experts · top-k"] == "8 · 2"


def test_a_bad_model_is_one_clear_line():
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["model"] = "/no/such/folder"
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "not found" in at.error[0].value
