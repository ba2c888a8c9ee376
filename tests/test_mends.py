"""Small mends of issue 30, each with its check: an export of a partial analysis, the test run's
own files."""

from __future__ import annotations

from pathlib import Path

import tomllib
from moescope.analysis.run.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_analyze_exports_what_an_activations_only_analysis_has(tmp_path, capsys, monkeypatch, demo_dir):
    # it stopped with "ValueError: No objects to concatenate": no similarity metric was computed
    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tables"
    rc = main(["analyze", "demo", "--metrics", "activations", "--samples", "2", "--seq-len", "32", "--export", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["coactivation.csv", "criteria.csv", "routing.csv"]
    assert "not written: similarity.csv (this analysis has none: --metrics similarity computes it)" in captured.out
    criteria = (out / "criteria.csv").read_text().splitlines()
    assert criteria[0] == "layer,expert,criterion,value" and len(criteria) > 1


def test_the_test_run_leaves_no_pytest_cache_in_the_checkout():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "-p no:cacheprovider" in config["tool"]["pytest"]["ini_options"]["addopts"]


def test_a_preset_is_named_as_itself_with_its_paper(demo_dir):
    from moescope.analysis.model import load_moe
    from moescope.analysis.pruning.plan import PruningPlan, recipe_name
    from moescope.analysis.run import experiments as X
    from moescope.analysis.run.export import model_card
    from moescope.analysis.strategies.presets import PRESETS

    prov = {"strategy": "router-guided", "preset": "mc-smoe", "params": {"keep": 6}, "data": "ab" * 32,
            "data_description": "demo:all: 64 × 256 tokens"}
    plan = PruningPlan.from_keep("demo", {0: [0, 1, 2, 3, 4, 5]}, provenance=prov)
    assert recipe_name(prov) == "mc-smoe" and recipe_name({"strategy": "enumerate"}) == "enumerate"
    assert recipe_name(None) == "manual"
    assert X._label(plan) == "mc-smoe keep=6"  # the experiment's label, the plan's proposed name
    card = model_card(load_moe("demo"), plan)
    p = PRESETS["mc-smoe"]
    assert f"Preset: **mc-smoe** (strategy `router-guided`) — {p.help}. Source: {p.source}." in card
    assert "Calibration data: demo:all: 64 × 256 tokens (fingerprint `abababababababab`)" in card


def test_a_member_merged_with_weight_zero_is_shown_as_a_drop(demo_dir):
    from moescope.analysis.model import load_moe
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.run.export import model_card
    from moescope.dashboard.plans import layer_state

    groups = [[0, 5], [1, 6], [2], [3], [4]]  # 0 and 5 truly merged; 1.00 × 1 + 0.00 × 6 keeps 1
    plan = PruningPlan.from_json({"version": 1, "base_model": "demo", "layers": {"0": {
        "groups": groups, "coefficients": [[0.5, 0.5], [1.0, 0.0], [1.0], [1.0], [1.0]]}},
        "provenance": {"strategy": "merge"}})
    lp = plan.layers[0]
    assert lp.weightless(1) == [6] and lp.weightless(0) == [] and lp.merges() == [[0, 5]]
    assert layer_state(plan, 0, 8) == ([[0, 5]], [6, 7])  # 6 dropped (weight 0) and 7 (not in the plan)
    card = model_card(load_moe("demo"), plan)
    assert "(0.5·0 + 0.5·5), 1 [drops 6: weight 0], 2, 3, 4" in card
    only_zero = PruningPlan.from_json({"version": 1, "base_model": "demo", "layers": {"0": {
        "groups": [[1, 6], [2], [3], [4], [5]], "coefficients": [[1.0, 0.0], [1.0], [1.0], [1.0], [1.0]]}}})
    assert only_zero.summary() == "layer 0: 5 experts"  # not "(merged)"
    # under TIES a zero weight still votes on the signs: not a drop
    ties = PruningPlan.from_json({"version": 1, "base_model": "demo", "layers": {"0": {
        "groups": [[1, 6], [2], [3], [4], [5]], "coefficients": [[1.0, 0.0], [1.0], [1.0], [1.0], [1.0]],
        "operator": "ties", "density": 0.5}}})
    assert ties.layers[0].weightless(0) == []


def test_an_analysis_reports_its_progress_layer_by_layer_and_within_a_layer(tmp_path, demo_dir):
    # a long analysis showed only "Analysing… N s": now every layer and every step within it is reported
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.analyze import AnalysisParams, run_analysis
    from moescope.analysis.measure.criteria import CRITERIA
    from moescope.analysis.model import load_moe

    model = load_moe("demo")
    batch = sample_tokens("demo:all", model.tokenizer, 2, 16, seed=0)
    events = []
    params = AnalysisParams(metrics=("routing", "similarity", "activations"))
    run_analysis(model, batch, params, cache=Cache(tmp_path / "cache"), progress=lambda *e: events.append(e))
    n = model.num_hidden_layers
    layers = [e for e in events if e[0] == "layers"]
    assert layers[0] == ("layers", 0, n) and layers[-1] == ("layers", n, n)
    steps = [e for e in events if e[0] == "layer steps"]
    # routing, expert outputs, similarities and each routing / activations criterion, then done
    total = 3 + sum(1 for c in CRITERIA.values() if c.family in ("routing", "activations"))
    moe = len(model.layers)
    assert len(steps) == moe * (total + 1) and steps[:total + 1] == [("layer steps", d, total) for d in range(total + 1)]
    assert events.index(("layers", 0, n)) < events.index(steps[0])  # the first line shows before any layer's work
