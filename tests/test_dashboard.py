"""The dashboard, driven through Streamlit's AppTest on the demo model.

Every test reads what a page shows (figure data, tables, metrics, messages) and checks it against
the analysis it came from. Results go to a throw-away cache ($MOESCOPE_CACHE), analysed once per
module on 8×128 calibration tokens.

AppTest runs the page in a thread while the test thread polls it every millisecond; with torch on
two intra-op threads on two cores that polling slows the analysis tenfold, so this module runs
torch on one thread (the real server has no such poller).
"""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from moescope.analysis.core.cache import ENV_VAR, Cache
from moescope.analysis.data import sample_tokens
from moescope.analysis.measure.analyze import AnalysisParams, run_analysis
from moescope.analysis.measure.explore import routing_trace, skip_ratios
from moescope.analysis.measure.sensitivity import cached_drop_grid
from moescope.analysis.model import load_moe
from moescope.dashboard import charts
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
SMALL = {"calib_samples": 8, "calib_seq_len": 128, "grid_samples": 4, "grid_seq_len": 64}


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, str(root))
        yield root
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_model(cache_dir):
    return load_moe("demo")


@pytest.fixture(scope="module")
def analysed(demo_model, cache_dir):
    """The analysis and routing trace the pages read, computed through the library (as the CLI does)."""
    batch = sample_tokens("demo:all", demo_model.tokenizer, 8, 128, seed=0, split="validation")
    res = run_analysis(demo_model, batch, AnalysisParams(), cache=Cache(cache_dir))
    trace = routing_trace(demo_model, batch, cache=Cache(cache_dir))
    return res, trace


def app(page: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in {**SMALL, **state}.items():
        at.session_state[k] = v
    at.run()
    if page:
        at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def figures(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def array(v) -> np.ndarray:
    """A plotly data array as numpy (plotly ships numpy arrays as base64 typed arrays)."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(x) for x in str(v.get("shape", a.size)).split(",")]) if "shape" in v else a
    return np.asarray(v, dtype=float)


def table(at, column: str):
    """The first table on the page with ``column``."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no table with a '{column}' column; tables: {[list(d.value.columns) for d in at.dataframe]}")


def errors(at) -> list[str]:
    return [e.value for e in at.error]


# ---------------------------------------------------------------- model & data


def test_model_page_shows_the_demo_structure(demo_dir):
    at = app()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Family"] == "mixtral"
    assert metrics["Experts · top-k"] == "8 · 2"
    assert metrics["MoE layers"] == "4 / 4"


def test_a_bad_model_or_data_source_is_one_clear_line():
    at = app(model="/no/such/folder")
    assert len(at.error) == 1 and "not found" in at.error[0].value and "\n" not in at.error[0].value
    at = app(calib_source="nope:x")
    assert len(at.error) == 1 and "nope:x" in at.error[0].value
    assert not at.exception


def test_a_local_folder_is_read_and_an_unusable_one_is_one_line(tiny_dirs):
    at = app()
    at.radio(key="_w_model_kind").set_value("folder").run()
    assert at.session_state["model"] == "" and at.info[0].value == "Enter a model folder or hub id."
    folder = tiny_dirs["qwen3_moe"]
    at.text_input(key="_w_model_text").input(folder).run()
    assert at.session_state["model"] == folder and at.radio(key="_w_model_kind").value == "folder"
    assert {m.label: m.value for m in at.metric}["Family"] == "qwen3_moe"
    # a weights-only folder cannot be sampled with: one line (transformers 5 hands back an empty
    # tokenizer for it, so the line is about the missing tokens rather than the missing files)
    assert len(at.error) == 1 and "\n" not in at.error[0].value and not at.exception
    assert "tokenizer" in at.error[0].value or at.error[0].value.startswith("not enough tokens")
    at.radio(key="_w_model_kind").set_value("demo").run()
    assert at.session_state["model"] == "demo" and not errors(at)
    at.radio(key="_w_model_kind").set_value("demo-upcycled").run()
    assert at.session_state["model"] == "demo-upcycled" and not errors(at)


def test_model_page_runs_the_analysis_once_then_reuses_it(cache_dir):
    at = app(seed=3, calib_samples=4, calib_seq_len=64)
    assert [b.label for b in at.button] == ["Run the analysis"]
    # its cost is stated before it runs: memory at the peak against what the machine has, and time
    predicted = [c.value for c in at.caption if c.value.startswith("Predicted before it runs")]
    assert predicted and "of memory at the peak" in predicted[0] and " s** on this machine" in predicted[0]
    assert "expert outputs" in set(table(at, "memory")["part"])
    at.button(key="run_analysis").click().run()
    assert not at.exception and not errors(at)
    # 10 similarities: cka_linear, cka_rbf (full batch), cka_rbf_minibatch, cosine, mse, HC-SMoE's
    # mean_output_euclidean and the four weight/surrogate ones; 22 criteria: the sixteen, REAP and five variants
    assert at.success[0].value.startswith("Cached analysis: 4 MoE layers, 10 similarities, 22 criteria")
    summary = table(at, "most similar pair")
    assert list(summary["layer"]) == [0, 1, 2, 3] and summary["most similar pair"].str.match(r"\d–\d").all()
    listed = table(at, "compute s")
    assert (listed["model"] == "demo").any() and listed["data"].str.contains("4×64").any()
    stored = Cache(cache_dir).entries(kind="analysis")
    assert any("4×64 tokens, random seed 3" in (e.data or "") for e in stored)  # where the CLI would look
    assert Cache(cache_dir).entries(kind="routing")  # the token trace came with it
    again = app(seed=3, calib_samples=4, calib_seq_len=64)  # a new session reuses it
    assert not again.button and again.success[0].value.startswith("Cached analysis")


def test_settings_survive_switching_pages(analysed):
    at = app()
    at.number_input(key="_w_calib_samples").set_value(16).run()
    at.text_input(key="_w_eval_source").input("demo:python").run()
    assert at.session_state["calib_samples"] == 16 and at.session_state["eval_source"] == "demo:python"
    at.switch_page("app_pages/drop_grid.py").run()
    assert at.text_input(key="_w_eval_source").value == "demo:python"
    at.switch_page("app_pages/model.py").run()
    assert at.number_input(key="_w_calib_samples").value == 16
    assert "16×128" in at.sidebar.caption[0].value


# ---------------------------------------------------------------- similarity


def test_similarity_page_shows_a_layer_and_switches_metric_and_representation(analysed):
    res, _ = analysed
    at = app("similarity")
    heat = figures(at)[0]["data"][0]
    assert np.allclose(array(heat["z"]), res.similarity(0, "cka_linear").numpy())
    assert "cka_linear %{z:.4f}" in heat["hovertemplate"]
    at.selectbox(key="sim_layer").select(2).run()
    assert np.allclose(array(figures(at)[0]["data"][0]["z"]), res.similarity(2, "cka_linear").numpy())
    S = res.similarity(2, "cka_linear").clone().fill_diagonal_(-1)
    i, j = divmod(int(S.argmax()), 8)
    assert at.dataframe[0].value.iloc[0]["experts"] == f"{min(i, j)}–{max(i, j)}"
    at.selectbox(key="sim_metric").select("mse").run()
    heat = figures(at)[0]["data"][0]
    assert np.allclose(array(heat["z"]), res.similarity(2, "mse").numpy()) and heat["reversescale"] is True
    assert any(c.value.startswith("Smaller = more alike") for c in at.caption)
    assert at.radio(key="sim_scale").options == ["relative (off-diagonal range)"]  # MSE has no upper bound
    at.radio(key="sim_representation").set_value("surrogate").run()
    assert at.selectbox(key="sim_metric").options == ["cosine", "MSE"]  # MSE stays chosen
    assert np.allclose(array(figures(at)[0]["data"][0]["z"]), res.similarity(2, "surrogate_mse").numpy())
    at.selectbox(key="sim_metric").select("cosine").run()
    assert np.allclose(array(figures(at)[0]["data"][0]["z"]), res.similarity(2, "surrogate_cosine").numpy())


def test_similarity_small_multiples_share_one_colour_scale(analysed):
    res, _ = analysed
    at = app("similarity")
    at.radio(key="sim_view").set_value("All layers").run()
    fig = figures(at)[0]
    assert len(fig["data"]) == 4 and {t["coloraxis"] for t in fig["data"]} == {"coloraxis"}
    # the panel titles sit above the plot area: the top margin leaves them room
    assert [a["text"] for a in fig["layout"]["annotations"]] == [f"layer {l}" for l in range(4)]
    assert fig["layout"]["margin"]["t"] >= 30
    # absolute by default: CKA on its whole 0-1 range, so a low similarity never looks bright
    assert (fig["layout"]["coloraxis"]["cmin"], fig["layout"]["coloraxis"]["cmax"]) == (0.0, 1.0)
    at.radio(key="sim_scale").set_value("relative").run()
    fig = figures(at)[0]
    lo, hi = fig["layout"]["coloraxis"]["cmin"], fig["layout"]["coloraxis"]["cmax"]
    off = np.concatenate([res.similarity(l, "cka_linear").numpy()[~np.eye(8, dtype=bool)] for l in range(4)])
    assert (lo, hi) == pytest.approx((off.min(), off.max()))
    for l, t in enumerate(fig["data"]):
        assert np.allclose(array(t["z"]), res.similarity(l, "cka_linear").numpy())


def test_similarity_overlays_the_current_plan(analysed):
    plan = {"version": 1, "base_model": "demo", "layers": {"0": {"groups": [[0, 5], [1], [2], [3], [4], [6]]}}}
    at = app("similarity", plan=plan)
    assert at.checkbox(key="sim_overlay").value is True
    traces = [t for t in figures(at)[0]["data"] if t.get("name") != "beyond the threshold"]  # the default outlines pairs
    names = [t.get("name") for t in traces[1:]]
    assert names == ["merged 0+5", "dropped"]
    assert array(traces[2]["x"]).tolist() == [7]
    assert "merge 0+5; drop 7" in " ".join(c.value for c in at.caption)
    at.checkbox(key="sim_overlay").uncheck().run()
    assert [t.get("name") for t in figures(at)[0]["data"][1:]] in ([], ["beyond the threshold"])


def test_similarity_threshold_outlines_the_pairs_and_choices_survive_a_page_switch(analysed):
    res, _ = analysed
    at = app("similarity")
    heat = figures(at)[0]["data"][0]
    assert heat["texttemplate"] == "%{z:.2f}"  # 8 experts: the values are printed in the cells
    assert (heat["zmin"], heat["zmax"]) == (0.0, 1.0)
    S = res.similarity(0, "cka_linear")
    t = float(S.clone().fill_diagonal_(-1).flatten().sort().values[-7])  # a threshold that catches a few pairs
    at.slider(key="sim_threshold").set_value(t).run()
    want = {(i, j) for i in range(8) for j in range(i + 1, 8) if S[i, j] >= at.slider(key="sim_threshold").value}
    outline = next(tr for tr in figures(at)[0]["data"] if tr.get("name") == "beyond the threshold")
    got = set(zip(array(outline["y"]).astype(int).tolist(), array(outline["x"]).astype(int).tolist()))
    assert {(i, j) for i, j in got if i < j} == want and len(want) >= 1
    assert any(f"{len(want)} pair" in c.value for c in at.caption)
    at.selectbox(key="sim_layer").select(2).run()
    at.radio(key="sim_order").set_value("by clustering").run()
    at.switch_page("app_pages/routing.py").run()
    at.switch_page("app_pages/similarity.py").run()
    assert at.selectbox(key="sim_layer").value == 2 and at.radio(key="sim_order").value == "by clustering"


def test_similarity_in_clustered_order_names_the_experts_and_keeps_the_overlay(analysed):
    from moescope.analysis.measure.explore import cluster_order

    res, _ = analysed
    plan = {"version": 1, "base_model": "demo", "layers": {"0": {"groups": [[0, 5], [1], [2], [3], [4], [6]]}}}
    at = app("similarity", plan=plan)
    at.radio(key="sim_order").set_value("by clustering").run()
    order = cluster_order(res.similarity(0, "cka_linear"))
    assert sorted(order) == list(range(8))
    fig = figures(at)[0]
    heat = fig["data"][0]
    S = res.similarity(0, "cka_linear").numpy()
    assert np.allclose(array(heat["z"]), S[np.ix_(order, order)])  # drawn in the clustered order
    assert fig["layout"]["xaxis"]["ticktext"] == [str(e) for e in order]  # ticks name the experts
    pos = {e: i for i, e in enumerate(order)}
    by_name = {t.get("name"): t for t in fig["data"][1:]}  # (the default threshold also outlines pairs)
    merged, dropped = by_name["merged 0+5"], by_name["dropped"]
    assert sorted(zip(array(merged["x"]).tolist(), array(merged["y"]).tolist())) == sorted(
        (pos[j], pos[i]) for i in (0, 5) for j in (0, 5))
    assert array(dropped["x"]).tolist() == [pos[7]]
    at.radio(key="sim_order").set_value("by index").run()
    assert np.allclose(array(figures(at)[0]["data"][0]["z"]), S)


# ---------------------------------------------------------------- routing


def test_routing_usage_coactivation_and_vocabulary(analysed):
    res, _ = analysed
    at = app("routing")
    usage = res.layer_map("usage", "routing").numpy()
    figs = figures(at)
    assert np.allclose(array(figs[0]["data"][0]["z"]), usage)
    assert np.allclose(array(figs[1]["data"][0]["y"]), usage[0])  # bars of layer 0
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Least used expert"] == str(int(usage[0].argmin()))
    assert float(metrics["Balance (entropy / log E)"]) == pytest.approx(res.scalars(0)["balance_entropy"], abs=1e-3)
    at.radio(key="route_view").set_value("Co-activation").run()
    at.selectbox(key="route_layer").select(3).run()
    C = array(figures(at)[0]["data"][0]["z"])
    assert np.allclose(C, res.routing(3, "coactivation").numpy() / (8 * 128))
    assert np.allclose(np.diag(C), res.routing(3, "usage").numpy())
    at.radio(key="route_view").set_value("Vocabulary").run()
    assert np.allclose(array(figures(at)[0]["data"][0]["z"]), res.layer_map("vocab_coverage", "routing").numpy())


def test_routing_token_examples_are_decoded_text_routed_to_the_expert(analysed, demo_model):
    _, trace = analysed
    at = app("routing")
    at.radio(key="route_view").set_value("Tokens").run()
    at.selectbox(key="route_layer").select(1).run()
    at.selectbox(key="route_expert").select(5).run()
    assert not at.exception
    examples, top = at.dataframe[0].value, at.dataframe[1].value
    assert len(examples) == 12 and list(examples["weight"]) == sorted(examples["weight"], reverse=True)
    idx, ids = trace.topk_idx(1), trace.input_ids
    for _, r in examples.iterrows():
        t = r["sequence"] * 128 + r["position"]
        assert 5 in idx[t].tolist()
        shown = r["token"].replace("·", " ").replace("⏎", "\n")  # spaces and newlines made visible
        assert shown == demo_model.tokenizer.decode([int(ids.reshape(-1)[t])])
    routed = ids.reshape(-1)[(idx == 5).any(-1)]
    assert top["count"].iloc[0] == int(torch.bincount(routed).max())


def test_routing_skip_ratios_at_the_calibrated_and_a_chosen_beta(analysed):
    res, trace = analysed
    at = app("routing")
    at.radio(key="route_view").set_value("Skipping").run()
    table = at.dataframe[0].value
    want = skip_ratios(trace, {l: res.scalars(l)["beta"] for l in res.layers})
    assert list(table["β"]) == pytest.approx([res.scalars(l)["beta"] for l in res.layers])
    assert list(table["tokens skipping an expert"]) == pytest.approx([want[l]["tokens"] for l in res.layers])
    assert all(0.4 < v < 0.6 for v in table["tokens skipping an expert"])  # β is the median of w₂/w₁
    at.checkbox(key="route_same_beta").check().run()
    at.slider(key="route_beta").set_value(1.0).run()
    assert list(at.dataframe[0].value["tokens skipping an expert"]) == [1.0] * 4  # w₂ ≤ w₁ always
    at.slider(key="route_beta").set_value(0.0).run()
    assert list(at.dataframe[0].value["expert calls skipped"]) == [0.0] * 4


def test_routing_offers_to_trace_when_only_the_analysis_is_stored(demo_model, cache_dir):
    batch = sample_tokens("demo:all", demo_model.tokenizer, 2, 64, seed=4, split="validation")
    run_analysis(demo_model, batch, AnalysisParams(metrics=("similarity", "weights", "routing", "activations",
                                                            "gradients")), cache=Cache(cache_dir))
    at = app("routing", seed=4, calib_samples=2, calib_seq_len=64)
    at.radio(key="route_view").set_value("Tokens").run()
    assert [b.label for b in at.button] == ["Trace the routing"]
    at.button(key="route_trace").click().run()
    assert not at.exception and len(at.dataframe[0].value) > 0


# ---------------------------------------------------------------- expert maps and drop grid


def test_expert_maps_criterion_orientation_and_drop_grid_agreement(analysed, demo_model, cache_dir):
    res, _ = analysed
    at = app("expert_maps", grid_samples=2, grid_seq_len=32)
    at.selectbox(key="map_criterion").select("EAN").run()
    fig = figures(at)[0]
    values = res.layer_map("EAN").numpy()
    assert np.allclose(array(fig["data"][0]["z"]), values, equal_nan=True)

    def first(pick):  # an expert without a value (never routed) goes first, then by the orientation
        return [int(np.flatnonzero(np.isnan(r))[0]) if np.isnan(r).any() else int(pick(r)) for r in values]

    assert np.isnan(values).any()  # the demo has a never-routed expert at these sizes: both rules are checked
    assert array(fig["data"][1]["x"]).tolist() == first(np.nanargmin)  # min: the smallest go first
    at.radio(key="map_order").set_value("max").run()
    assert array(figures(at)[0]["data"][1]["x"]).tolist() == first(np.nanargmax)
    assert f"{int(np.isnan(values).sum())} expert(s) have no value" in " ".join(c.value for c in at.caption)
    assert "Drop grid" in at.info[0].value  # no grid for these evaluation settings yet
    batch = sample_tokens("demo:all", demo_model.tokenizer, 2, 32, seed=0, split="test")
    grid = cached_drop_grid(demo_model, batch, Cache(cache_dir))
    at.run()
    from moescope.analysis.measure.explore import criterion_grid_correlation

    rho = criterion_grid_correlation(res, grid, "EAN")
    metric = {m.label: m.value for m in at.metric}["Mean Spearman ρ"]
    assert float(metric) == pytest.approx(np.mean(list(rho.values())), abs=1e-3)
    assert np.allclose(array(figures(at)[1]["data"][0]["y"]), [rho[l] for l in range(4)])


def test_drop_grid_is_computed_on_demand_then_cached(demo_model, cache_dir):
    at = app("drop_grid", grid_samples=2, grid_seq_len=48)
    assert [b.label for b in at.button] == ["Compute the drop grid"]
    at.button(key="grid_compute").click().run()
    assert not at.exception and not errors(at)
    batch = sample_tokens("demo:all", demo_model.tokenizer, 2, 48, seed=0, split="test")
    cache = Cache(cache_dir)
    grid = cached_drop_grid(demo_model, batch, cache)
    assert cache.stats.computed() == 0 and cache.stats.hits("dropgrid") == 1  # served from what the page filled
    assert np.allclose(array(figures(at)[0]["data"][0]["z"]), np.array(grid.delta()))
    assert {m.label: m.value for m in at.metric}["Baseline perplexity"] == f"{grid.baseline:.3f}"
    table = at.dataframe[0].value
    assert list(table["most needed"]) == np.array(grid.delta()).argmax(1).tolist()
    again = app("drop_grid", grid_samples=2, grid_seq_len=48)  # stored: no compute button, the map at once
    assert [b.key for b in again.button] == ["grid_add"] and again.get("plotly_chart")


# ---------------------------------------------------------------- plan


def test_manual_plan_drop_merge_split_validated_live(analysed):
    at = app("plan")
    at.radio(key="plan_mode").set_value("By hand").run()
    at.multiselect(key="plan_drop_0").set_value([7]).run()
    assert at.session_state["plan"]["layers"] == {"0": {"groups": [[0], [1], [2], [3], [4], [5], [6]]}}
    assert at.success[0].value.startswith("Valid plan (manual): 31 of 32 routed experts remain")
    at.multiselect(key="plan_pick_0").set_value([2, 5]).run()
    at.button(key="plan_merge_btn_0").click().run()
    assert at.session_state["plan"]["layers"]["0"] == {"groups": [[0], [1], [2, 5], [3], [4], [6]],
                                                       "merge_router": True}
    table = at.dataframe[0].value
    assert table.iloc[0].to_dict() == {"layer": 0, "experts": 8, "after": 6, "dropped": "7", "merged": "2+5"}
    # the merge shows on the pair picker: cells (2,5) and (5,2) outlined
    overlay = [t for t in figures(at)[0]["data"] if t.get("name") == "merged 2+5"][0]
    assert sorted(zip(array(overlay["x"]).tolist(), array(overlay["y"]).tolist())) == [(2, 5), (5, 2)]
    # too few experts: one line, and the last valid plan stays current
    valid = at.session_state["plan"]
    at.selectbox(key="plan_layer").select(1).run()
    at.multiselect(key="plan_drop_1").set_value(list(range(7))).run()
    assert not at.exception
    assert errors(at) == ["layer 1: the plan leaves 1 expert(s) but the model routes every token to top-2; "
                          "keep at least 2 experts in this layer"]
    assert at.session_state["plan"] == valid
    at.multiselect(key="plan_drop_1").set_value([0, 1]).run()
    assert not errors(at) and at.session_state["plan"]["layers"]["1"]["groups"] == [[e] for e in range(2, 8)]
    at.selectbox(key="plan_layer").select(0).run()
    at.button(key="plan_split_0_0").click().run()
    assert at.session_state["plan"]["layers"]["0"] == {"groups": [[e] for e in range(7)]}
    # an expert both merged and dropped is refused in one line
    at.multiselect(key="plan_pick_0").set_value([1, 2]).run()
    at.button(key="plan_merge_btn_0").click().run()
    at.multiselect(key="plan_dropall_0").set_value([1, 7]).run()
    assert errors(at) == ["layer 0: expert(s) [1] cannot be both dropped and merged"]


def test_strategy_plan_from_the_registry(analysed):
    res, _ = analysed
    at = app("plan")
    at.selectbox(key="plan_strategy").select("frequency").run()
    at.number_input(key="plan_keep").set_value(6).run()
    at.button(key="plan_make").click().run()
    assert not at.exception and not errors(at)
    plan = at.session_state["plan"]
    assert plan["provenance"]["strategy"] == "frequency" and plan["provenance"]["params"] == {"keep": 6}
    for l in res.layers:
        kept = sorted(g[0] for g in plan["layers"][str(l)]["groups"])
        assert kept == sorted(np.argsort(-res.routing(l, "usage").numpy(), kind="stable")[:6].tolist())
    assert at.success[0].value.startswith("Valid plan (frequency): 24 of 32")
    assert "Plan (frequency): L0→6" in at.sidebar.caption[1].value
    # alignment and TIES density are declared merge parameters, so the page shows them
    at.selectbox(key="plan_strategy").select("merge").run()
    align = at.selectbox(key="plan_merge_align")
    # options read as on the analysis pages (friendly names), the values stay the registry's; the
    # group-and-merge paper merges raw weights (alignment is MC-SMoE's addition)
    assert align.value == "none"
    assert list(align.options) == ["none", "weight matching", "activation matching",
                                   "activation matching on routed tokens (MC-SMoE)"]
    assert align.label == "Align experts first" and not at.exception
    assert "TIES (sign consensus)" in at.selectbox(key="plan_merge_merge").options
    rep = at.selectbox(key="plan_merge_representation")
    assert rep.value == "outputs" and "Data-centric: expert outputs" in rep.options
    assert "CKA (linear)" in at.selectbox(key="plan_merge_similarity").options
    # TIES density and the learned merge's SGD act only with their operator: hidden for a uniform merge
    shown = {w.key for w in at.number_input}
    assert "plan_merge_density" not in shown and "plan_merge_epochs" not in shown and "plan_merge_lr" not in shown
    at.selectbox(key="plan_merge_merge").select("ties").run()
    assert at.number_input(key="plan_merge_density").value == 0.2 and not at.exception
    at.selectbox(key="plan_merge_merge").select("learned").run()
    shown = {w.key for w in at.number_input}
    assert {"plan_merge_epochs", "plan_merge_lr"} <= shown and "plan_merge_density" not in shown
    assert at.number_input(key="plan_merge_epochs").value == 50


def test_a_preset_fills_its_strategys_widgets_and_is_recorded(analysed):
    at = app("plan")
    at.selectbox(key="plan_preset").select("hc-smoe").run()
    assert not at.exception and at.selectbox(key="plan_strategy").value == "merge"
    assert at.selectbox(key="plan_merge_representation").value == "mean_output"
    assert at.selectbox(key="plan_merge_similarity").value == "euclidean"
    assert at.selectbox(key="plan_merge_grouping").value == "agglomerative"
    assert at.selectbox(key="plan_merge_merge").value == "fix-dom-same"
    assert any("HC-SMoE" in c.value for c in at.caption)
    at.selectbox(key="plan_merge_merge").select("uniform").run()  # every value stays editable
    at.number_input(key="plan_keep").set_value(6).run()
    at.button(key="plan_make").click().run()
    assert not at.exception and not errors(at)
    plan = at.session_state["plan"]
    assert plan["provenance"]["preset"] == "hc-smoe" and plan["provenance"]["strategy"].startswith("merge:mean_output")
    given = plan["provenance"]["params"]  # the page passes what differs from the strategy's defaults
    assert given["representation"] == "mean_output" and "merge" not in given  # uniform: the default again
    groups = plan["layers"]["0"]["groups"]
    assert plan["layers"]["0"]["coefficients"] == [[1 / len(g)] * len(g) for g in groups]
    at.selectbox(key="plan_preset").select("max-rwn").run()
    assert at.selectbox(key="plan_strategy").value == "criterion"
    assert at.selectbox(key="plan_criterion_criterion").value == "RWN"
    assert at.selectbox(key="plan_criterion_order").value == "max"


def test_plan_shows_counts_and_export_form_and_evens_out(analysed, demo_model, cache_dir):
    res, _ = analysed
    at = app("plan")
    at.radio(key="plan_mode").set_value("By hand").run()
    at.multiselect(key="plan_dropall_0").set_value([6, 7]).run()
    at.multiselect(key="plan_dropall_1").set_value([3]).run()
    page = " ".join(m.value for m in at.markdown)
    assert "**Experts per layer:** L0 6 · L1 7 · L2 8 · L3 8" in page
    assert "trust_remote_code=True" in at.warning[0].value
    # even out by a criterion: 29 experts over 4 layers → 7 each
    at.selectbox(key="plan_even_by").select("EAN").run()
    assert at.number_input(key="plan_even_count").value == 7
    at.button(key="plan_even").click().run()
    assert not at.exception and not errors(at)
    plan = at.session_state["plan"]
    values = res.layer_map("EAN").numpy()  # EAN drops the smallest values; no value (never routed) first
    keep_score = np.where(np.isnan(values), -np.inf, values)
    assert plan["layers"]["0"]["groups"] == [[e] for e in sorted([0, 1, 2, 3, 4, 5, 6 if keep_score[0, 6] >=
                                                                  keep_score[0, 7] else 7])]
    assert plan["layers"]["1"]["groups"] == [[e] for e in range(8) if e != 3]
    for l in (2, 3):
        least = int(np.argmin(keep_score[l]))
        assert plan["layers"][str(l)]["groups"] == [[e] for e in range(8) if e != least]
    assert plan["provenance"]["evened_out"]["by"] == "min-EAN"
    assert "**Experts per layer:** L0 7 · L1 7 · L2 7 · L3 7" in " ".join(m.value for m in at.markdown)
    assert "Exports to the plain MixtralForCausalLM class (7 experts in every layer)." in [c.value for c in at.caption]
    assert not at.warning and "plan_even" not in [b.key for b in at.button]
    # by the drop grid of these evaluation settings: the least needed (lowest perplexity when dropped) go
    batch = sample_tokens("demo:all", demo_model.tokenizer, SMALL["grid_samples"], SMALL["grid_seq_len"], seed=0,
                          split="test")
    grid = cached_drop_grid(demo_model, batch, Cache(cache_dir))
    at.multiselect(key="plan_dropall_2").set_value([]).run()  # L2 back to 8: non-uniform again
    assert at.selectbox(key="plan_even_by").options[0] == "drop grid"
    at.selectbox(key="plan_even_by").select("drop grid").run()
    at.number_input(key="plan_even_count").set_value(6).run()
    at.button(key="plan_even").click().run()
    plan = at.session_state["plan"]
    ppl = np.array(grid.ppl)
    for l in range(4):
        kept = [g[0] for g in plan["layers"][str(l)]["groups"]]
        assert len(kept) == 6
        if l == 2:  # all 8 were kept: the two with the lowest perplexity when dropped go
            assert kept == sorted(np.argsort(-ppl[2], kind="stable")[:6].tolist())


def test_plan_upload_good_bad_and_malformed(analysed):
    at = app("plan")
    good = {"version": 1, "base_model": "demo", "layers": {"2": {"groups": [[0, 1], [2], [3], [4], [5], [6], [7]]}}}
    at.file_uploader(key="plan_upload").set_value(("good.json", json.dumps(good).encode(), "application/json")).run()
    assert not at.exception and at.session_state["plan"]["layers"] == {
        "2": {"groups": [[0, 1], [2], [3], [4], [5], [6], [7]], "merge_router": True}}
    assert not at.download_button[0].proto.disabled
    bad = {"version": 1, "base_model": "demo", "layers": {"9": {"groups": [[0], [1]]}}}
    at.file_uploader(key="plan_upload").set_value(("bad.json", json.dumps(bad).encode(), "application/json")).run()
    assert errors(at) == ["plan names layer 9, which is not an MoE layer of 'demo' (MoE layers: [0, 1, 2, 3])"]
    assert "2" in at.session_state["plan"]["layers"]  # the good plan stays current
    at.file_uploader(key="plan_upload").set_value(("broken.json", b"{not json", "application/json")).run()
    # the unreadable file is refused; the loaded invalid plan is still the one being edited
    assert errors(at)[0].startswith("broken.json is not valid JSON (") and errors(at)[1].startswith("plan names layer 9")
    at.button(key="plan_clear").click().run()
    assert not errors(at) and at.session_state["plan"] is None


# ---------------------------------------------------------------- plumbing


def test_selected_cells_read_plotly_selection_events():
    event = {"selection": {"points": [
        {"curve_number": 0, "customdata": [2, 5]}, {"curve_number": 0, "customdata": [2, 5]},
        {"curve_number": 1, "customdata": [0, 1]}, {"curve_number": 0, "customdata": [3, 4]},
        {"curve_number": 0, "customdata": {"0": 6, "1": 1}}]}}  # as the browser sends typed-array rows
    assert charts.selected_cells(event) == [(2, 5), (3, 4), (6, 1)]
    assert charts.selected_cells(None) == [] and charts.selected_cells({"selection": {"points": []}}) == []
    fig = charts.pair_picker(np.eye(4), "cka_linear", groups=[[1, 3]], dropped=[0])
    cells = {tuple(c) for c in np.asarray(fig.data[0].customdata).tolist()}
    assert len(cells) == 12 and (1, 1) not in cells  # every off-diagonal cell is selectable


def test_navigation_lists_every_page_file_that_exists():
    at = app()
    files = sorted(p.name for p in (Path(APP).parent / "app_pages").glob("*.py") if not p.name.startswith("_"))
    assert {"model.py", "similarity.py", "routing.py", "expert_maps.py", "drop_grid.py", "plan.py"} <= set(files)
    for file in files:
        at.switch_page(f"app_pages/{file}")  # raises unless st.navigation registered the page


def test_analysis_never_imports_streamlit():
    code = ("import importlib, pkgutil, sys, moescope.analysis as A\n"
            "for m in pkgutil.iter_modules(A.__path__): importlib.import_module('moescope.analysis.' + m.name)\n"
            "assert 'streamlit' not in sys.modules, 'analysis imported streamlit'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-500:]


# ---------------------------------------------------------------- named plans


def test_named_plans_save_open_rename_delete_and_survive_a_new_session(analysed, demo_model, cache_dir):
    from moescope.analysis.run.named_plans import list_plans, predict_cost, proxy_batch

    plan = {"version": 1, "base_model": "demo", "layers": {"1": {"groups": [[0], [1], [2], [3], [4], [5], [6]]}},
            "provenance": {"strategy": "manual"}}
    at = app("plan", plan=plan)
    assert at.text_input(key="plan_name").value.startswith("manual")
    at.text_input(key="plan_name").set_value("drop 7 in L1").run()
    at.button(key="plan_save").click().run()
    assert not at.exception and any("Saved 'drop 7 in L1'" in m.value for m in at.success)
    # a second plan, from a strategy
    at.selectbox(key="plan_strategy").select("frequency").run()
    at.number_input(key="plan_keep").set_value(6).run()
    at.button(key="plan_make").click().run()
    at.text_input(key="plan_name").set_value("frequency 6").run()
    at.button(key="plan_save").click().run()
    stored = list_plans("demo")
    assert list(stored) == ["drop 7 in L1", "frequency 6"]

    # a new session (a reload) sees both, opens one, predicts both costs
    at = app("plan")
    assert at.selectbox(key="plan_pick").options[0].startswith("drop 7 in L1")
    at.selectbox(key="plan_pick").set_value("frequency 6").run()
    at.button(key="plan_open").click().run()
    assert at.session_state["plan"] == stored["frequency 6"].to_json()
    at.button(key="plan_predict").click().run()
    assert not at.exception
    table = next(d.value for d in at.dataframe if "proxy ppl" in d.value.columns)
    batch = proxy_batch(demo_model)
    # the original first (what every plan is measured against), then each plan
    original, table = table.iloc[0], table.iloc[1:]
    assert original["plan"] == "original (no plan)" and original["experts"] == 32 and original["proxy Δ%"] == 0
    for _, row in table.iterrows():
        want = predict_cost(demo_model, stored[row["plan"]], batch)
        assert row["proxy ppl"] == pytest.approx(want.proxy_ppl_after)
        assert row["params Δ%"] == pytest.approx(100 * (want.params_after / want.params_before - 1))
        assert original["proxy ppl"] == pytest.approx(want.proxy_ppl_before)
        # the verdict is paired on the proxy windows: the stored per-window losses give it, and they add up
        # to the proxy perplexity
        p = want.paired()
        assert row["against the original (paired)"] == f"{p.verdict('lower')} {p.text()}"
        n, length = batch.input_ids.shape
        assert math.exp(sum(want.windows_after) / (n * (length - 1))) == pytest.approx(want.proxy_ppl_after)
        assert p.value == pytest.approx(want.proxy_ppl_after / want.proxy_ppl_before)
        # drop-only plans: the grid's sum where this session's tests stored a grid, else why there is none
        assert row["skipping"] == "none"
        assert re.fullmatch(r"[+-]\d+\.\d{3}|— \(no drop grid stored\)", row["grid Σ Δppl"]), row["grid Σ Δppl"]
    assert list(table["experts"]) == [31, 24]
    # the hand-made plan was never checked for experts without calibration tokens; frequency keeps none
    assert list(table["unused experts kept"]) == ["— (not checked)", "none"]
    assert demo_model.num_experts() == {0: 8, 1: 8, 2: 8, 3: 8}  # predictions restored the shared model

    # rename, duplicate, delete
    at.text_input(key="plan_rename_to").set_value("freq6").run()
    at.button(key="plan_rename").click().run()
    assert list(list_plans("demo")) == ["drop 7 in L1", "freq6"]
    at.selectbox(key="plan_pick").set_value("drop 7 in L1").run()
    at.button(key="plan_dup").click().run()
    assert list(list_plans("demo")) == ["drop 7 in L1", "freq6", "drop 7 in L1 2"]
    at.selectbox(key="plan_pick").set_value("drop 7 in L1 2").run()
    at.button(key="plan_delete").click().run()
    assert list(list_plans("demo")) == ["drop 7 in L1", "freq6"]

    # send two to Run: the Run page lists them, one job each
    at.button(key="plan_predict").click().run()
    at.multiselect(key="plan_send").set_value(["drop 7 in L1", "freq6"]).run()
    at.button(key="plan_send_go").click().run()
    assert at.session_state["run_queue"] == ["drop 7 in L1", "freq6"]


# ---------------------------------------------------------------- analysis views -> the plan


def _kept(plan: dict, layer: int) -> list[list[int]]:
    return plan["layers"][str(layer)]["groups"] if str(layer) in plan["layers"] else [[e] for e in range(8)]


def test_drop_grid_action_drops_the_least_needed_experts_of_every_layer(analysed, demo_model, cache_dir):
    batch = sample_tokens("demo:all", demo_model.tokenizer, 2, 32, seed=0, split="test")
    delta = np.array(cached_drop_grid(demo_model, batch, Cache(cache_dir)).delta())
    at = app("drop_grid", grid_samples=2, grid_seq_len=32)
    at.number_input(key="grid_add_n").set_value(2).run()
    at.button(key="grid_add").click().run()
    assert not at.exception and not errors(at) and at.success
    plan = at.session_state["plan"]
    for l in range(4):
        least = sorted(np.argsort(delta[l], kind="stable")[:2].tolist())
        assert _kept(plan, l) == [[e] for e in range(8) if e not in least]
    # the sidebar says so in the same run (not "No plan yet"), and the plan remembers the action that built it
    assert any("Plan (manual): L0→6" in c.value for c in at.sidebar.caption), [c.value for c in at.sidebar.caption]
    assert plan["provenance"]["actions"][0].startswith("Drop grid: drop L0: ")
    from moescope.analysis.run.export import plan_origin

    assert plan_origin(plan["provenance"]).startswith("analysis actions: Drop grid: drop L0: ")


def test_expert_maps_action_drops_the_marked_experts(analysed):
    res, _ = analysed
    at = app("expert_maps")
    at.selectbox(key="map_criterion").select("REAP").run()
    at.radio(key="map_order").set_value("min").run()
    fig = figures(at)[0]
    marked = list(zip(list(fig["data"][1]["y"]), array(fig["data"][1]["x"]).astype(int).tolist()))
    at.button(key="map_add").click().run()
    assert not at.exception and not errors(at)
    plan = at.session_state["plan"]
    for label, e in marked:  # the marks are the experts dropped, layer by layer
        l = int(str(label).split()[-1])
        assert [e] not in _kept(plan, l) and len(_kept(plan, l)) == 7


def test_similarity_action_merges_the_outlined_pairs(analysed):
    res, _ = analysed
    at = app("similarity")
    S = res.similarity(0, "cka_linear")
    off = S.clone().fill_diagonal_(-1)
    t = float(off.flatten().sort().values[-3])  # the top pair (both orientations) and maybe one more
    at.slider(key="sim_threshold").set_value(t).run()
    t = at.slider(key="sim_threshold").value
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8) if S[i, j] >= t]
    at.button(key="sim_add").click().run()
    assert not at.exception and not errors(at)
    groups = _kept(at.session_state["plan"], 0)
    for i, j in pairs:  # each outlined pair ends up in one output expert
        assert any(i in g and j in g for g in groups)
    assert len(groups) == 8 - len({e for p in pairs for e in p}) + len(
        {frozenset(g) for g in groups if len(g) > 1})


def test_by_hand_picker_colours_by_any_criterion_and_states_the_gesture(analysed):
    res, _ = analysed
    at = app("plan")
    at.radio(key="plan_mode").set_value("By hand").run()
    at.selectbox(key="plan_colour_by").select("EAN").run()
    picker = figures(at)[-1]["data"][0]
    values = res.layer_map("EAN").numpy()
    want = [values[i, e] for i in range(4) for e in range(8) if np.isfinite(values[i, e])]
    assert np.allclose(array(picker["marker"]["color"]), want)
    assert any("Shift+click" in c.value and "box" in c.value for c in at.caption)


def test_building_shows_its_stages_time_and_last_duration_while_the_work_runs_in_a_worker():
    def script():
        import time

        import streamlit as st
        from moescope.dashboard.backend import Settings
        from moescope.dashboard.ui import run_with_progress

        def build(s, progress):
            for i in range(3):
                time.sleep(0.4)  # long enough for the page to draw between the steps
                progress("layers", i + 1, 3)
            return "plan"

        st.session_state["out"] = run_with_progress("Running merge…", build, Settings(), "merge plan ready")
        st.session_state["took"] = dict(st.session_state["_took"])

    at = AppTest.from_function(script, default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["out"] == "plan"
    took = at.session_state["took"]["Running merge…"]
    assert took >= 1.2
    status = at.status[0]
    assert status.label.startswith("merge plan ready (") and status.state == "complete"
    bars = [p.proto.text for p in at.get("progress")]
    assert any(t.startswith("decoder layers: 3 / 3 · ") for t in bars), bars


def test_a_refusal_in_the_worker_is_one_line():
    def script():
        from moescope.analysis.core.errors import MoescopeError
        from moescope.dashboard.backend import Settings
        from moescope.dashboard.ui import run_with_progress

        def build(s, progress):
            raise MoescopeError("keep must be at least 2\nsecond line")

        run_with_progress("Running merge…", build, Settings(), "ready")

    at = AppTest.from_function(script, default_timeout=60)
    at.run()
    assert not at.exception and [e.value for e in at.error] == ["keep must be at least 2"]
    assert at.status[0].state == "error"


def test_similarity_suggests_merges_only_where_the_measure_says_similar(analysed):
    # the threshold starts on CKA's own scale at 0.9 (near-duplicates, what the Model page calls a merge
    # candidate); the demo's CKA stays far below it, so nothing is outlined or offered to merge, and the
    # page says why (it offered "Merge the outlined pairs" at CKA 0.33–0.38 before)
    from moescope.dashboard import charts

    res, _ = analysed
    at = app("similarity")
    assert not at.exception
    assert at.slider(key="sim_threshold").value == 0.9
    top = max(float(res.similarity(l, "cka_linear").clone().fill_diagonal_(-1).max()) for l in res.layers)
    assert top < 0.9
    assert at.button(key="sim_add").disabled
    assert any(f"No pair of experts reaches 0.9 here (the most alike: {top:.3g})" in c.value for c in at.caption)
    # the by-hand picker paints on the same absolute scale: 0.38 is not the brightest colour
    S = res.similarity(0, "cka_linear")
    fig = charts.pair_picker(S, "cka_linear", zrange=(0.0, 1.0))
    assert (fig.data[0].marker.cmin, fig.data[0].marker.cmax) == (0.0, 1.0)


def test_the_picker_colour_scale_is_capped_where_one_outlier_would_flatten_it():
    from moescope.dashboard import charts

    M = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 46.0]])  # the one drop-grid cell at 46
    fig = charts.cell_picker(M, [0, 1], "Δ perplexity")
    marker = fig.data[0].marker
    # Q1 0.275, Q3 0.625: the far fence 0.625 + 3 × 0.35 = 1.675 leaves 46 out; colours span 0.1–0.7
    assert marker.cmin == pytest.approx(0.1) and marker.cmax == pytest.approx(0.7)
    assert "capped to 0.1–0.7" in marker.colorbar.title.text and "46" in marker.colorbar.title.text
    even = charts.cell_picker(np.array([[0.1, 0.2], [0.3, 0.4]]), [0, 1], "x").data[0].marker
    assert (even.cmin, even.cmax) == (pytest.approx(0.1), pytest.approx(0.4)) and even.colorbar.title.text == "x"
