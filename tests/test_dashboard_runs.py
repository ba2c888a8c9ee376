"""Background jobs and the Run / Compare / Export pages, driven through AppTest on the demo model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from moescope.analysis.evaluation import EvalSpec
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.run import experiments as X
from moescope.analysis.run import jobs
from streamlit.testing.v1 import AppTest
from transformers import AutoModelForCausalLM

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
SMALL = EvalSpec(ppl=["demo:python"], samples=4, seq_len=64, efficiency=False).to_json()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))


def drop_plan(drop: dict[int, list[int]]) -> dict:
    keep = {l: [e for e in range(8) if e not in drop.get(l, [])] for l in range(4)}
    return PruningPlan.from_keep("demo", keep, provenance={"strategy": "manual", "params": {}}).to_json()


@pytest.mark.slow
def test_a_job_runs_in_its_own_process_and_stores_its_experiment(demo_dir):
    job = jobs.start("demo", drop_plan({0: [1]}), SMALL, label="drop L0E1")
    st = jobs.wait(job, timeout=300)
    assert st.state == "done", st.error
    exp = X.load(st.experiment)
    assert exp.label == "drop L0E1" and exp.structure["after"]["experts"]["0"] == 7
    assert exp.result["ppl"]["demo:python"] != exp.reference["ppl"]["demo:python"]
    # the finished card's facts: the headline perplexity against the original, the size, the time taken
    src = st.result["ppl_source"]
    assert st.result["ppl"] == exp.result["ppl"][src] and st.result["ppl_original"] == exp.reference["ppl"][src]
    assert st.result["params"] == exp.structure["after"]["params"]["total"]
    assert 0 < st.elapsed() == st.finished - st.started and st.stage_eta() is None


def test_job_status_elapsed_and_stage_estimate():
    running = jobs.JobStatus(id="x", state="running", stage="perplexity", done=3, total=12, started=100.0,
                             stage_started=130.0)
    assert running.elapsed(now=160.0) == 60.0
    assert running.stage_eta(now=160.0) == pytest.approx(30.0 / 3 * 9)  # its pace so far, for the 9 left
    assert jobs.JobStatus(id="x", state="running", stage="load", done=0, total=1).stage_eta() is None


@pytest.mark.slow
def test_a_cancelled_job_leaves_no_experiment(demo_dir):
    slow = EvalSpec(ppl=["demo:all"], samples=480, seq_len=256, efficiency=False).to_json()
    job = jobs.start("demo", drop_plan({1: [2]}), slow)
    deadline = time.monotonic() + 120
    while jobs.status(job).stage not in ("perplexity", "evaluate original") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert jobs.cancel(job)
    st = jobs.wait(job, timeout=60)
    assert st.state == "cancelled" and not st.running
    assert X.list_experiments() == []


def test_a_bad_plan_is_refused_when_the_job_is_asked_for(demo_dir):
    from moescope.analysis.core.errors import MoescopeError

    one_left = PruningPlan.from_keep("demo", {0: [3]}, provenance={"strategy": "manual"}).to_json()
    with pytest.raises(MoescopeError, match="keep at least 2 experts"):  # the demo routes to top-2
        jobs.start("demo", one_left, SMALL)
    with pytest.raises(MoescopeError, match="not an MoE layer"):
        jobs.start("demo", PruningPlan.from_keep("demo", {9: [0, 1]}).to_json(), SMALL)
    with pytest.raises(MoescopeError, match="unknown sampling|data source|demo domain"):
        jobs.start("demo", None, {**SMALL, "ppl": ["demo:klingon"]})
    assert not any(jobs.jobs_root().iterdir())  # nothing was launched


def _page(name: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.switch_page(f"app_pages/{name}.py")
    return at


@pytest.mark.slow
def test_run_compare_and_export_pages_end_to_end(demo_dir, tmp_path):
    # Run: a manual plan in the session, small settings, one click
    at = _page("run")
    at.session_state["plan"] = drop_plan({l: [l] for l in range(4)})
    at.run()
    assert not at.exception
    assert any("Plan **manual**" in m.value for m in at.markdown)
    at.text_input(key="run_ppl").set_value("demo:python, demo:spanish")
    at.number_input(key="run_samples").set_value(4)
    at.number_input(key="run_seq_len").set_value(64)
    at.multiselect(key="run_tasks").set_value(["moescope_demo_continuation"])
    at.number_input(key="run_limit").set_value(6)
    at.checkbox(key="run_efficiency").set_value(False)
    at.text_input(key="run_label").set_value("page run")
    at.button[0].click()  # the form's submit button
    at.run()
    assert not at.exception
    job = at.session_state["run_last_job"]
    st = jobs.wait(job, timeout=300)
    assert st.state == "done", st.error
    at.run()
    assert any(f"experiment `{st.experiment}`" in m.value for m in at.markdown)

    # Compare: the original as reference row, the run beside it
    at = _page("compare")
    at.run()
    assert not at.exception
    table = at.dataframe[0].value
    exp = X.load(st.experiment)
    # the original named by its evaluation setting, the run by its label (the plan's name)
    assert list(table["name"]) == ["original · ppl demo:python+demo:spanish 4×64 · moescope_demo_continuation ≤6",
                                   exp.label]
    assert table.loc[1, "ppl demo:spanish"] == pytest.approx(exp.result["ppl"]["demo:spanish"])
    full = X.compare([exp])
    assert full.loc[1, "experts L3"] == 7 and full.loc[0, "experts L3"] == 8

    # Export: writes a loadable folder; a second export into it is refused in one line
    out = tmp_path / "exported"
    at = _page("export")
    at.run()
    assert not at.exception
    default = Path(at.text_input(key=f"export_dir_{st.experiment}").value)
    # outside the repository, named for the plan and the experiment
    assert default == Path.home() / "moescope-exports" / f"page-run-{st.experiment}"
    assert Path(__file__).resolve().parents[1] not in default.parents
    at.text_input(key=f"export_dir_{st.experiment}").set_value(str(out))
    at.button(key="export_go").click().run()
    assert not at.exception and at.success and "README.md" in at.success[0].value
    # the card renders as Markdown: its YAML header shown as YAML, not as the first paragraph
    assert any(c.language == "yaml" and "library_name: transformers" in c.value for c in at.code)
    assert not any(m.value.lstrip().startswith("---") for m in at.markdown)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.num_local_experts == 7
    at.button(key="export_go").click().run()
    assert at.error and "not empty" in at.error[0].value


@pytest.mark.slow
def test_different_expert_counts_export_with_the_loading_note_and_refusals_show_expanded(demo_dir, tmp_path):
    from moescope.analysis.model import load_moe

    job = jobs.start("demo", drop_plan({0: [0, 1], 3: [7]}), SMALL)
    assert jobs.wait(job, timeout=300).state == "done"
    out = tmp_path / "x"
    at = _page("export")
    at.run()
    at.text_input(key=f"export_dir_{at.selectbox(key='export_id').value}").set_value(str(out))
    at.button(key="export_go").click().run()
    assert not at.exception and not at.error
    assert at.success and "modeling_moescope.py" in at.success[0].value
    assert at.info and "trust_remote_code=True" in at.info[0].value
    assert load_moe(str(out)).num_experts() == {0: 6, 1: 8, 2: 8, 3: 7}  # moescope needs no flag
    # a refusal is shown in full, not inside the collapsed status box
    at.button(key="export_go").click().run()
    assert at.error and "not empty" in at.error[0].value
    assert all(not box.error for box in [*at.status, *at.expander]), "the refusal sits inside a collapsible box"


def test_the_job_line_says_it_waits_for_the_speed_slot_and_what_is_left_of_the_whole_job():
    from moescope.dashboard import runs

    waiting = jobs.JobStatus(id="x", state="running", stage=runs.SLOT_WAIT, done=0, total=1, started=100.0,
                             stage_started=160.0, estimate_s=300.0)
    text = runs.stage_text(waiting)
    assert "waiting for the speed slot" in text and "another job is measuring speed" in text
    assert waiting.stage_elapsed(now=190.0) == 30.0
    assert waiting.job_eta(now=190.0) == 300.0 - 90.0  # the estimate less the time spent so far
    # the stage's own pace wins when the job runs past its estimate
    late = jobs.JobStatus(id="x", state="running", stage="perplexity", done=3, total=12, started=100.0,
                          stage_started=130.0, estimate_s=50.0)
    assert late.job_eta(now=160.0) == pytest.approx(90.0)
    first = jobs.JobStatus(id="x", state="running", stage="lm-eval requests", done=40, total=80, started=1.0,
                           stage_started=2.0)
    line = runs.stage_text(first)
    assert "lm-eval requests: 40 / 80" in line and "no whole-job estimate yet" in line


def test_a_whole_job_estimate_comes_from_the_stages_of_earlier_runs_of_its_setting(demo_dir):
    import dataclasses

    spec = EvalSpec(ppl=["demo:python"], samples=4, seq_len=64).to_json()
    assert X.estimate_seconds("demo", spec, True) is None  # nothing to learn from yet
    base = X.Experiment(id="", created="", label="x", model="demo", model_fingerprint="f", pruned_fingerprint=None,
                        plan=None, eval=spec, reference={}, result={})
    runs_ = [(1, {"load_s": 2.0, "evaluate_original_s": 30.0, "prune_s": 1.0, "evaluate_pruned_s": 20.0,
                  "efficiency_s": 10.0, "speed_wait_s": 100.0}),
             (2, {"load_s": 4.0, "evaluate_original_s": 0.5, "prune_s": 3.0, "evaluate_pruned_s": 40.0,
                  "efficiency_s": 30.0, "speed_wait_s": 0.0}),
             (3, {"load_s": 3.0, "evaluate_original_s": 0.7, "prune_s": 2.0, "evaluate_pruned_s": 30.0,
                  "efficiency_s": 20.0})]
    for k, timings in runs_:
        X.save(dataclasses.replace(base, id=f"2026-0{k}", timings=timings))
    other = dataclasses.replace(base, id="2026-09", eval={**spec, "samples": 8}, timings={"load_s": 1000.0})
    X.save(other)  # another setting: not counted
    # medians 3 + 2 + 30 + 20, the original's least (a cached result once measured) 0.5; waits left out
    assert X.estimate_seconds("demo", spec, True) == pytest.approx(3 + 0.5 + 2 + 30 + 20)
    assert X.estimate_seconds("demo", spec, False) == pytest.approx(3 + 0.5 + 20)


@pytest.mark.slow
def test_jobs_wait_for_the_speed_slot_visibly_and_reuse_the_originals_measurement(demo_dir):
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.evaluation.efficiency import SLOT_WAIT, measurement_slot

    spec = {**SMALL, "efficiency": True, "skip_calib": None,
            "efficiency_params": {"prompt_tokens": 16, "new_tokens": 3, "repeats": 1, "warmup": 0,
                                  "batch_size": 1, "source": "demo:all"}}
    cache = Cache()
    with measurement_slot(str(cache.root)):  # another measurement holds the slot
        job = jobs.start("demo", drop_plan({0: [1]}), spec)
        deadline = time.monotonic() + 120
        while jobs.status(job).stage != SLOT_WAIT and time.monotonic() < deadline:
            assert jobs.status(job).running, jobs.status(job).error
            time.sleep(0.2)
        assert jobs.status(job).stage == SLOT_WAIT  # the label says so while it waits
        time.sleep(1.0)
    first = jobs.wait(job, timeout=300)
    assert first.state == "done", first.error
    second = jobs.wait(jobs.start("demo", drop_plan({1: [2]}), spec), timeout=300)
    assert second.state == "done", second.error
    a, b = X.load(first.experiment), X.load(second.experiment)
    assert a.timings["speed_wait_s"] >= 1.0 and b.timings["speed_wait_s"] < a.timings["speed_wait_s"]
    # the original was measured once: the second job read the first one's figures
    assert a.efficiency["original"] == b.efficiency["original"]
    assert len(cache.entries("efficiency-original")) == 1
    assert a.efficiency["pruned"] != b.efficiency["pruned"]
    assert second.estimate_s is not None and first.estimate_s is None
