"""One setting everywhere: the CLI's defaults and the dashboard's are the same numbers
(analysis/core/defaults.py), so a CLI run and a dashboard run with the defaults share an original,
and ``plan`` calibrates on the windows ``analyze`` stored."""

from __future__ import annotations

from pathlib import Path

from moescope.analysis.core import defaults as D
from moescope.analysis.run import experiments as X
from moescope.analysis.run.cli import build_parser
from moescope.analysis.run.commands import eval_spec

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


def test_the_cli_and_the_run_page_default_to_one_evaluation_setting(tmp_path, monkeypatch):
    from moescope.dashboard import runs
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    args = build_parser().parse_args(["eval", "demo"])
    cli = eval_spec(args, [D.EVAL_SOURCE]).to_json()
    at = AppTest.from_file(APP, default_timeout=120)
    at.switch_page("app_pages/run.py").run()
    assert not at.exception, [e.value for e in at.exception]
    samples, seq_len = at.number_input(key="run_samples").value, at.number_input(key="run_seq_len").value
    tasks, limit = at.multiselect(key="run_tasks").value, at.number_input(key="run_limit").value
    page = runs.eval_spec([at.text_input(key="run_ppl").value], samples, seq_len, list(tasks), float(limit) or None,
                          at.checkbox(key="run_efficiency").value, seed=0)
    assert X.spec_key(page) == X.spec_key(cli)  # the same original, the same windows, pairs across faces
    assert (cli["samples"], cli["limit"], cli["efficiency_params"]["repeats"]) == (96, 100, 5)
    # prune's evaluation flags are eval's
    pruned = eval_spec(build_parser().parse_args(["prune", "demo", "--plan", "p.json", "-o", "out", "--ppl"]),
                       [D.EVAL_SOURCE]).to_json()
    assert pruned["samples"] == cli["samples"] and pruned["limit"] == cli["limit"]
    # --limit 0: every sample of a task
    assert eval_spec(build_parser().parse_args(["eval", "demo", "--limit", "0"]), ["demo:all"]).limit is None


def test_analyze_plan_and_the_sidebar_calibrate_on_the_same_windows():
    from moescope.dashboard.backend import Settings

    analyze = build_parser().parse_args(["analyze", "demo"])
    plan = build_parser().parse_args(["plan", "demo", "--strategy", "frequency", "-o", "p.json"])
    sidebar = Settings()
    assert (analyze.calib, analyze.samples, analyze.seq_len) == (D.CALIB_SOURCE, D.CALIB_SAMPLES, D.CALIB_SEQ_LEN)
    # plan leaves both open (a preset's paper fills them in); without a preset they are analyze's
    assert plan.calib == analyze.calib and plan.samples is None and plan.seq_len is None
    assert (sidebar.calib_source, sidebar.calib_samples, sidebar.calib_seq_len) == (analyze.calib, 64, 256)
    grid = build_parser().parse_args(["grid", "demo"])
    assert (grid.eval, grid.samples, grid.seq_len) == (sidebar.eval_source, sidebar.grid_samples, sidebar.grid_seq_len)


def test_plan_without_a_preset_calibrates_on_analyzes_windows(tmp_path, monkeypatch):
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.run.cli import main

    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    assert main(["plan", "demo", "--strategy", "frequency", "--keep", "6", "-o", str(tmp_path / "p.json")]) == 0
    described = PruningPlan.load(tmp_path / "p.json").provenance["data_description"]
    assert f"{D.CALIB_SAMPLES}×{D.CALIB_SEQ_LEN} tokens" in described, described
