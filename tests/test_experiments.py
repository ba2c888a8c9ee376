"""Experiments (run, store, compare), export with a model card, and the eval/export CLI, on the demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from by_hand_eval import continuation_items, multiple_choice_metrics
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.evaluation import EfficiencyParams, EvalSpec, perplexity
from moescope.analysis.model import load_moe
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.run import experiments as X
from moescope.analysis.run.cli import main
from moescope.analysis.run.export import export, export_experiment
from transformers import AutoModelForCausalLM

SPEC = dict(ppl=["demo:python", "demo:all"], samples=6, seq_len=64, efficiency=False)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))


def drop_plan(drop: dict[int, list[int]], name: str = "manual") -> PruningPlan:
    keep = {l: [e for e in range(8) if e not in drop.get(l, [])] for l in range(4)}
    return PruningPlan.from_keep("demo", keep, provenance={"strategy": name, "params": {"drop": str(drop)}})


def test_a_plan_that_keeps_everything_changes_nothing(demo_dir):
    exp = X.run_experiment("demo", drop_plan({}), EvalSpec(**SPEC))
    assert exp.result["ppl"] == exp.reference["ppl"]
    assert exp.structure["before"] == exp.structure["after"]


def test_experiment_round_trip_and_comparison(demo_dir):
    cache = Cache()
    a = X.run_experiment("demo", drop_plan({0: [0, 1], 2: [3]}, "A"), EvalSpec(**SPEC), cache=cache)
    b = X.run_experiment("demo", drop_plan({1: [4]}, "B"), EvalSpec(**SPEC), cache=cache)
    assert a.id != b.id
    assert a.reference["ppl_domains"] == b.reference["ppl_domains"]  # the original: same numbers (cached)
    assert [e.id for e in X.list_experiments(cache)] == [a.id, b.id]
    again = X.load(a.id, cache)
    assert again == a
    if a.id[:-1] != b.id[:-1]:  # a unique prefix finds it
        assert X.load(a.id[:-1], cache).id == a.id
    assert a.structure["after"]["experts"] == {"0": 6, "1": 8, "2": 7, "3": 8}
    assert a.plan["provenance"]["strategy"] == "A" and a.versions["torch"] == torch.__version__
    table = X.compare([a, b])
    # best headline (perplexity on demo:python, the first source) first, under the one original
    order = sorted([a, b], key=lambda e: e.result["ppl"]["demo:python"])
    assert list(table["experiment"]) == ["original"] + [e.id for e in order]
    table = X.compare([a, b]).set_index("experiment").loc[["original", a.id, b.id]].reset_index()
    ref = a.reference["ppl"]["demo:all"]
    assert table.loc[0, "ppl demo:all"] == ref and table.loc[0, "Δ% ppl demo:all"] == 0
    assert table.loc[1, "Δ% ppl demo:all"] == pytest.approx(100 * (a.result["ppl"]["demo:all"] / ref - 1))
    assert table.loc[1, "params ratio"] == pytest.approx(a.structure["after"]["params"]["total"]
                                                         / a.structure["before"]["params"]["total"])
    # every perplexity carries its per-window 95 % range, around the value
    for i in range(3):
        assert table.loc[i, "ppl demo:all low"] < table.loc[i, "ppl demo:all"] < table.loc[i, "ppl demo:all high"]
    assert list(a.result["ppl_interval"]["demo:all"]["all"]) == [table.loc[1, "ppl demo:all low"],
                                                                 table.loc[1, "ppl demo:all high"]]
    # experts per layer: one integer column per layer and the total (no mixed "6/7/8" column)
    assert [int(table.loc[1, f"experts L{l}"]) for l in range(4)] == [6, 8, 7, 8]
    assert table.loc[1, "experts kept"] == 29 and table.loc[0, "experts kept"] == 32
    assert table["experts L0"].dtype.kind == "i" and "experts/layer" not in table.columns
    setting = "ppl demo:python+demo:all 6×64"
    assert list(table["name"]) == [f"original · {setting}", a.label, b.label]
    assert set(table["setting"]) == {setting} and set(table["group"]) == {0}
    # a run under another evaluation setting gets its own original, named by that setting
    c = X.run_experiment("demo", drop_plan({3: [2]}, "C"), EvalSpec(**{**SPEC, "samples": 4}), cache=cache)
    both = X.compare([a, c, b])
    assert list(both["experiment"]) == ["original"] + [e.id for e in order] + ["original", c.id]
    assert list(both["name"])[3] == "original · ppl demo:python+demo:all 4×64"
    assert list(both["group"]) == [0, 0, 0, 1, 1]
    table = X.compare([a, b])
    with pytest.raises(MoescopeError, match="no experiment 'nope'"):
        X.load("nope", cache)

    # the Compare page: the short view, formatted changes, the best pruned value marked, one colour
    # per experiment shared by the charts, the original in grey
    from pathlib import Path

    from moescope.dashboard import runs
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=120)
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    # one section per setting: a's and b's (6 windows) first, c's (4 windows) below, each with its original
    assert [len(d.value) for d in at.dataframe] == [3, 2]
    assert any("2 different settings: nothing pairs across them" in i.value for i in at.info)
    shown = at.dataframe[0].value
    assert list(shown.columns)[:3] == ["name", "experts kept", "params ratio"]
    assert "experts L0" not in shown.columns and "Δ% ppl demo:all" in shown.columns
    view = runs.compare_view(table)
    assert view.better["ppl demo:all"] == "lower" and view.better["params ratio"] == "lower"
    styler = runs.styled(table, view, view.columns)
    html = styler.to_html()
    assert "+" in html and "×" in html
    marked = styler._compute().ctx  # (row, column position) -> CSS of the marked cells
    col = view.columns.index("ppl demo:all")
    # bold only where the best is better than the other beyond their paired range (same windows)
    from moescope.analysis.run.verdicts import best_of

    clear = X.best_marks(table, "ppl demo:all", "lower")
    leader = best_of({a.id: a.result, b.id: b.result}, "ppl demo:all")
    assert clear == ({list(table["experiment"]).index(leader)} if leader else set())
    assert sorted(r for (r, c), css in marked.items() if c == col and css == [("font-weight", "bold"),
                                                                                ("color", "#2b8a3e")]) == sorted(clear)
    # the page says which is best per column and setting, only beyond the uncertainty
    assert any(h.value == "Setting 1: ppl demo:python+demo:all 6×64" for h in at.subheader)
    verdict = next(m.value for m in at.markdown if m.value.startswith("**Verdict** "))  # the first setting's
    full = X.compare([a, b, c])
    won = X.best_marks(full, "ppl demo:all", "lower")
    want = (f"ppl demo:all: **{full['name'].iloc[next(iter(won))]}** best beyond every rival's paired range" if won
            else "ppl demo:all: no clear best")
    assert want in verdict, verdict
    # and against the original, each experiment's paired verdict
    for e in (a, b):
        assert e.label in verdict.split("ppl demo:all — ")[1]
    # the page shows every experiment of the model (a, b and c), c under its own original
    frames = [d.value for d in at.dataframe]
    assert sum(len(f) for f in frames) == 5 and [sum(n.startswith("original · ") for n in f["name"]) for f in frames] \
        == [1, 1]
    colours = runs.experiment_colours(X.compare([a, b, c]), [a.id, b.id, c.id])
    assert colours[table.loc[0, "name"]] == "#868e96" and len(set(colours.values())) == 4
    scatters = [json.loads(ch.proto.spec) for ch in at.get("plotly_chart")]
    scatters = [f for f in scatters if f["data"] and f["data"][0].get("mode") == "markers"]
    assert len(scatters) == 2  # a chart per setting
    # one trace per row, named in the legend (no text labels on the points), the colours fixed per experiment
    drawn = {t["name"].replace(" (within noise)", ""): t["marker"]["color"] for f in scatters for t in f["data"]}
    assert drawn == colours
    scatter = scatters[0]
    assert all(t.get("mode") == "markers" for t in scatter["data"])
    # an experiment keeps its colour when the selection narrows
    at.text_input(key="compare_filter").set_value(b.label).run()
    assert list(at.dataframe[0].value["name"]) == [table.loc[0, "name"], b.label]
    assert any("Showing **1 of 3**" in cap.value and "2 hidden by the filter" in cap.value for cap in at.caption)
    narrowed = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert {t["name"].replace(" (within noise)", ""): t["marker"]["color"] for t in narrowed["data"]}[b.label] \
        == colours[b.label]
    at.text_input(key="compare_filter").set_value("").run()
    at.checkbox(key="compare_all").check().run()
    assert "experts L0" in at.dataframe[0].value.columns


def test_a_bad_plan_is_refused_before_any_evaluation(demo_dir):
    plan = drop_plan({0: list(range(7))})  # keeps 1 < top-2
    with pytest.raises(MoescopeError, match="routes every token to top-2"):
        X.run_experiment("demo", plan, EvalSpec(**SPEC))
    assert X.list_experiments() == []


def test_export_reloads_with_identical_logits_and_a_model_card(demo_dir, tmp_path):
    plan = drop_plan({0: [5, 6], 1: [0, 7], 2: [1, 2], 3: [3, 4]}, "manual")
    model = load_moe("demo")
    exp = X.prune_and_evaluate(model, plan, EvalSpec(**SPEC))  # prunes `model` in place, as its name says
    out = export(model, tmp_path / "out", plan=plan, experiment=exp)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "plan.json", "experiment.json", "README.md"} <= names
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 4096, (2, 32))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, model.hf(input_ids=ids).logits)
    assert hf.config.num_local_experts == 6
    card = (out / "README.md").read_text()
    assert "| 0 | 8 | 6 | 0, 1, 2, 3, 4, 7 |" in card
    ref_iv, res_iv = (q["ppl_interval"]["demo:all"]["all"] for q in (exp.reference, exp.result))
    assert (f"| perplexity demo:all | {exp.reference['ppl']['demo:all']:.4g} [{ref_iv[0]:.4g}–{ref_iv[1]:.4g}] | "
            f"{exp.result['ppl']['demo:all']:.4g} [{res_iv[0]:.4g}–{res_iv[1]:.4g}] |") in card
    from moescope.analysis.run.verdicts import against

    p_all, verdict = against(exp.reference, exp.result, "ppl demo:all")
    assert f"| {verdict}, {p_all.text()} |" in card  # the paired verdict against the original
    from moescope.analysis.core.units import format_bytes

    weights = exp.structure["after"]["weight_bytes"]
    assert f"| weights in memory | {format_bytes(exp.structure['before']['weight_bytes'])} | {format_bytes(weights)} |" \
        in card
    assert json.loads((out / "experiment.json").read_text())["id"] == exp.id
    # the card states a speed change only when the repeats tell it from noise
    import dataclasses

    from moescope.analysis.run.export import model_card

    def side(runs, busy=0.0):
        return {"plain": {"generate_tokens_per_s": sorted(runs)[1], "generate_tokens_runs": runs,
                          "prefill_tokens_per_s": 1000.0, "prefill_tokens_runs": [990.0, 1000.0, 1010.0],
                          "busy_cores": busy, "peak_memory_bytes": 1, "params": {}}}

    clear = dataclasses.replace(exp, efficiency={"original": side([100.0, 101.0, 102.0]),
                                                 "pruned": side([120.0, 121.0, 122.0])})
    text = model_card(model, plan, clear)
    # the card names the plan (the experiment's label: the named plan's name) and where it came from
    assert f"Plan: **{exp.label}**" in text and "Origin: edited by hand (no strategy)" in text
    from moescope.analysis.run.export import plan_origin

    action = "Drop grid: drop L0: 5, 6"
    assert plan_origin({"strategy": "manual", "actions": [action]}) == f"analysis actions: {action}"
    assert plan_origin({"strategy": "frequency", "edited_by_hand": True}) == "strategy **frequency**, then edited by hand"
    named = dataclasses.replace(plan, provenance={**plan.provenance, "name": "grid plan", "actions": [action]})
    card = model_card(model, named, clear)
    assert "Plan: **grid plan**" in card and f"Origin: analysis actions: {action}" in card
    assert "Strategy: **manual**" not in card
    assert "| generation tokens/s | 101 | 121 | +19.8% (repeats: 1.18–1.22×) |" in text, text
    # a speed figure that is noise is left out, and the card says so
    assert "| prefill tokens/s | – | – | left out: within noise (the repeats' range 0.98–1.02× covers 1.0×) |" in text
    loaded = dataclasses.replace(exp, efficiency={"original": side([100.0, 101.0, 102.0], busy=1.5),
                                                  "pruned": side([120.0, 121.0, 122.0])})
    assert "within noise (measured while other processes kept 1.5 cores busy)" in model_card(model, plan, loaded)
    # rebuilt from the record alone: the same weights
    again = export_experiment(exp.id, tmp_path / "again")
    hf2 = AutoModelForCausalLM.from_pretrained(again)
    for (n, p), (_, q) in zip(hf.state_dict().items(), hf2.state_dict().items()):
        assert torch.equal(p, q), n
    with pytest.raises(MoescopeError, match="not empty"):
        export_experiment(exp.id, tmp_path / "again")


@pytest.mark.slow
def test_efficiency_of_original_and_pruned_with_and_without_skipping(demo_dir):
    spec = EvalSpec(ppl=["demo:python"], samples=2, seq_len=64, efficiency=True, skip_calib="demo:all",
                    skip_calib_samples=4, efficiency_params=EfficiencyParams(prompt_tokens=32, new_tokens=4, repeats=1))
    exp = X.run_experiment("demo", drop_plan({l: [0, 1] for l in range(4)}), spec)
    o, p = exp.efficiency["original"], exp.efficiency["pruned"]
    assert o["plain"]["params_total"] == 4_396_160
    assert p["plain"]["params_total"] == exp.structure["after"]["params"]["total"] < 4_396_160
    assert p["plain"]["weight_bytes"] == 4 * p["plain"]["params_total"]
    for variant in (o, p):
        assert variant["skip"]["skip_beta"] and 0 < variant["skip"]["skipped_fraction"] < 1
        assert variant["plain"]["generate_tokens_per_s"] > 0 and variant["plain"]["peak_memory_bytes"] > 0
    row = X.compare([exp]).iloc[1]
    # 2 of 8 experts (3 × 128 × 256 weights each) and their router rows (128) gone in 4 layers
    assert p["plain"]["params_total"] == 4_396_160 - 4 * 2 * (3 * 128 * 256 + 128) == 3_608_704
    assert row["weight bytes ratio"] == pytest.approx(3_608_704 / 4_396_160)


def run(capsys, *argv):
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_json_runs_offline_on_local_tasks(capsys, demo_dir):
    rc, out, err = run(capsys, "eval", "demo", "--ppl", "demo:all", "--tasks", "moescope_demo_continuation",
                       "--limit", "8", "--samples", "6", "--seq-len", "64", "--no-efficiency", "--json")
    assert rc == 0, err
    res = json.loads(out)
    demo = load_moe("demo")
    assert set(res["ppl"]) == {"demo:all"}
    assert res["ppl"]["demo:all"] == pytest.approx(perplexity(demo, "demo:all", samples=6, seq_len=64)["value"])
    want = multiple_choice_metrics(demo.hf, demo.tokenizer, continuation_items()[:8])
    for metric in ("acc", "acc_norm"):
        assert res["tasks"]["moescope_demo_continuation"][metric] == pytest.approx(want[metric])
    rc, out, _ = run(capsys, "experiments", "ls", "--json")
    assert [e["id"] for e in json.loads(out)] == [res["experiment"]]


# a document of the docs domain is 3825 tokens: the rolling windows past 512 positions count too
TASKS = ("moescope_demo_continuation", "moescope_demo_ppl_docs")


@pytest.mark.slow
def test_two_strategies_prune_eval_export_compare_and_lm_eval_cli(capsys, demo_dir, tmp_path):
    ids = []
    for strategy in ("frequency", "enumerate"):
        plan = tmp_path / f"{strategy}.json"
        rc, _, err = run(capsys, "plan", "demo", "--strategy", strategy, "--keep", "6", "--samples", "4",
                         "--seq-len", "64", "-o", str(plan))
        assert rc == 0, err
        rc, out, err = run(capsys, "prune", "demo", "--plan", str(plan), "-o", str(tmp_path / strategy),
                           "--ppl", "demo:all", "--tasks", *TASKS, "--limit", "8",
                           "--samples", "6", "--seq-len", "64", "--no-efficiency", "--json")
        assert rc == 0, err
        ids.append(json.loads(out)["experiment"])
    rc, out, err = run(capsys, "experiments", "compare", *ids, "--csv")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("experiment,name,label,group,setting,")
    assert lines[1].startswith("original,original · ppl demo:all 6×64 · moescope_demo_continuation+moescope_demo_ppl_docs ≤8,demo,")
    assert {lines[2].split(",")[0], lines[3].split(",")[0]} == set(ids)
    assert "Δ moescope_demo_continuation acc" in lines[0]
    # export of an experiment refuses a non-empty folder, then writes with --overwrite
    rc, _, err = run(capsys, "export", ids[1], "-o", str(tmp_path / "enumerate"))
    assert rc == 2 and "not empty" in err
    rc, _, err = run(capsys, "export", ids[1], "-o", str(tmp_path / "enumerate"), "--overwrite")
    assert rc == 0, err
    # lm-eval's own CLI on the exported folder gives the accuracy and perplexities recorded in-memory
    # (those are checked by hand in test_evaluate.py / test_lm_eval_values.py)
    from moescope.analysis.evaluation import LOCAL_TASKS_DIR

    # `python -m lm_eval` (the `lm_eval` script is missing where lm-eval comes from another venv's path)
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'enumerate'},dtype=float32",
                           "--tasks", ",".join(TASKS), "--include_path", str(LOCAL_TASKS_DIR),
                           "--device", "cpu", "--limit", "8", "--batch_size", "8", "--output_path", str(tmp_path / "lm")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result_file = next((tmp_path / "lm").rglob("results_*.json"))
    cli = json.loads(result_file.read_text())["results"]
    recorded = X.load(ids[1]).result["tasks"]
    for task, metrics in (("moescope_demo_continuation", ("acc", "acc_norm")),
                          ("moescope_demo_ppl_docs", ("word_perplexity", "byte_perplexity", "bits_per_byte"))):
        for metric in metrics:
            assert cli[task][f"{metric},none"] == pytest.approx(recorded[task][metric], rel=1e-5), (task, metric)


def test_the_cli_compares_under_the_original_of_each_setting_and_states_every_speed_with_its_verdict(capsys, demo_dir):
    import dataclasses

    from moescope.analysis.run.report import print_quality

    a = X.run_experiment("demo", drop_plan({0: [0]}, "A"), EvalSpec(**SPEC))
    b = X.run_experiment("demo", drop_plan({1: [1]}, "B"), EvalSpec(**SPEC))
    c = X.run_experiment("demo", drop_plan({2: [2]}, "C"), EvalSpec(**{**SPEC, "samples": 4}))
    rc, out, err = run(capsys, "experiments", "compare", a.id, c.id, b.id)
    assert rc == 0, err
    blocks = out.split("measured against: ")[1:]
    assert len(blocks) == 2
    assert blocks[0].startswith("original · ppl demo:python+demo:all 6×64")
    assert a.id in blocks[0] and b.id in blocks[0] and c.id not in blocks[0]
    assert blocks[1].startswith("original · ppl demo:python+demo:all 4×64") and c.id in blocks[1]
    assert "*: best beyond every rival's paired range; ~: within noise of the original" in out
    assert "nan" not in out.lower()
    # three settings' experiments pair nothing across settings: one line says so, first
    assert out.startswith("these experiments were measured on different settings: nothing pairs across them")
    # two experiments of one setting: the second against the first as well, paired per window
    from moescope.analysis.run.verdicts import against, verdict_text

    rc, out, err = run(capsys, "experiments", "compare", a.id, b.id)
    assert rc == 0, err and "different settings" not in out
    tail = out.split(f"{b.label} ({b.id}) against {a.label} ({a.id}), paired on the same windows / documents:\n")[1]
    want = verdict_text(*against(a.result, b.result, "ppl demo:all"), "ppl demo:all")
    assert f"  ppl demo:all: {want}" in tail.splitlines()

    def side(prefill, generate, busy=0.0):
        return {"plain": {"params_total": 1, "params_active": 1, "weight_bytes": 4, "peak_memory_bytes": 8,
                          "prefill_tokens_per_s": sorted(prefill)[1], "prefill_tokens_runs": prefill,
                          "generate_tokens_per_s": sorted(generate)[1], "generate_tokens_runs": generate,
                          "busy_cores": busy}, "skip": None}

    quiet = dataclasses.replace(a, efficiency={"original": side([100.0, 101.0, 102.0], [10.0, 10.1, 10.2]),
                                               "pruned": side([150.0, 151.0, 152.0], [9.9, 10.1, 10.3])})
    capsys.readouterr()
    print_quality(quiet)
    out = capsys.readouterr().out
    assert "evaluated on: ppl demo:python+demo:all 6×64" in out
    assert "speed against the original: prefill 1.50× (1.47–1.52×); generate within noise: the repeats' range " in out
    busy = dataclasses.replace(quiet, efficiency={**quiet.efficiency,
                                                  "pruned": side([150.0, 151.0, 152.0], [12.0, 12.1, 12.2], 1.3)})
    print_quality(busy)
    out = capsys.readouterr().out
    assert "(measured while other processes kept 1.3 cores busy)" in out
    assert "prefill within noise: measured while other processes kept 1.3 cores busy" in out
    # every perplexity is printed with its per-window range
    lo, hi = a.result["ppl_interval"]["demo:all"]["all"]
    assert f"[95% {lo:.3f}–{hi:.3f}]" in out
