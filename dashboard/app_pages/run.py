"""Run: prune + evaluate the current plan as a background job; progress, cancel, results."""

from __future__ import annotations

import streamlit as st
from moescope.analysis.core import defaults as D
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.pruning.plan import PruningPlan, recipe_name
from moescope.dashboard import plans, runs
from moescope.dashboard.ui import settings

st.header("Run")
started_msg = st.session_state.pop("run_started_msg", None)
if started_msg:  # the jobs just sent (the page was drawn again without the plans it sent)
    st.success(started_msg)
model = st.session_state.get("model", "demo")
plan = st.session_state.get("plan")
queue = st.session_state.get("run_queue") or []
if queue:  # named plans sent from the Plan page: one job each
    c1, c2 = st.columns([3, 2], vertical_alignment="center")
    c1.markdown("Plans sent from the Plan page, one job each: " + ", ".join(f"**{n}**" for n in queue))
    if c2.button("Run only the current plan", key="run_clear_queue", width="stretch"):
        st.session_state["run_queue"] = []
        st.rerun()
elif plan:
    try:
        summary = PruningPlan.from_json(plan).summary()
    except MoescopeError as err:
        st.error(str(err))
        st.stop()
    strategy = recipe_name(plan.get("provenance"))  # a preset by its own name
    st.markdown(f"Plan **{strategy}** on `{model}`: {summary}")
else:
    st.info("No plan yet: build one on the Plan page. Running now evaluates the original model alone.")

local = runs.local_tasks()
with st.form("run_form"):
    c1, c2, c3 = st.columns(3)
    ppl = c1.text_input("Perplexity sources (comma-separated)", value=st.session_state.get("eval_source", "demo:all"),
                        key="run_ppl", help="demo:DOMAIN | demo:all | file:PATH | hf:NAME[:CONFIG]:SPLIT[:FIELD]")
    samples = c2.number_input("Windows", min_value=1, value=D.EVAL_SAMPLES, step=8, key="run_samples",
                              help="the CLI's default too, so that CLI and dashboard runs share an original")
    seq_len = c3.number_input("Tokens per window", min_value=8, value=D.EVAL_SEQ_LEN, step=64, key="run_seq_len")
    c1, c2, c3 = st.columns(3)
    tasks = c1.multiselect("lm-eval tasks (offline)", local, default=list(D.EVAL_TASKS), key="run_tasks",
                           help="scored per document, so that two models' scores are compared document by document")
    other = c2.text_input("Other lm-eval tasks (need the network)", value="", key="run_other_tasks",
                          help="e.g. arc_easy, boolq, hellaswag")
    limit = c3.number_input("Samples per task (0: all)", min_value=0, value=int(D.TASK_LIMIT), step=50, key="run_limit")
    efficiency = st.checkbox("Measure memory and tokens/s (original and pruned, with and without skipping)",
                             value=True, key="run_efficiency")
    c1, c2 = st.columns([3, 1])
    label = c1.text_input("Label (optional)", value="", key="run_label")
    parallel = c2.number_input("Jobs at a time", min_value=1, value=runs.default_parallel(), step=1, key="run_parallel",
                               help="1 (default): the jobs queue and run one after another, so none slows another "
                                    "and every speed is measured on a machine quiet of our jobs. More: they run "
                                    "together, and each waits before its speed measurement until the others are done")
    submitted = st.form_submit_button("Run prune + evaluate", type="primary")

if submitted:
    try:
        spec = runs.eval_spec([s.strip() for s in ppl.split(",") if s.strip()], int(samples), int(seq_len),
                              list(tasks) + [t.strip() for t in other.split(",") if t.strip()],
                              float(limit) or None, bool(efficiency), seed=int(st.session_state.get("seed", 0)))
        if queue:
            named = plans.named_plans(settings())
            started = [runs.start_job(model, runs.with_name(named[n].to_json(), n), spec,
                                      n if not label else f"{label} · {n}", int(parallel)) for n in queue if n in named]
            st.session_state["run_queue"] = []
        else:
            started = [runs.start_job(model, plan, spec, label or None, int(parallel))]
    except MoescopeError as err:
        st.error(str(err))
    else:
        st.session_state["run_last_job"] = started[-1]
        st.session_state["run_started_msg"] = (f"Sent {len(started)} job{'s' if len(started) > 1 else ''} to the "
                                               f"queue: {', '.join(started)}")
        st.rerun()  # the header no longer offers the plans just sent


def _jobs_panel() -> None:
    jobs = runs.job_list()
    if not jobs:
        st.caption("No jobs yet.")
        return
    line = runs.job_queue()
    places = {j.id: j for j in line}
    # always one element here, so that the cards below keep their places when the queue empties
    # (a fragment redrawn with fewer elements leaves the last card's stale copy on screen a while)
    st.markdown("**Queue** (in order): " + " → ".join(
        f"{k}. {j.label or j.id} ({'running' if j.state not in ('starting', 'queued') else 'waiting'}"
        f"{', waited ' + runs.clock(j.waited()) if j.waited() >= 1 else ''})" for k, j in enumerate(line, start=1))
        if line else "**Queue**: empty (every job has finished)")
    for job in jobs:
        job = places.get(job.id, job)  # a waiting job with its place in line
        with st.container(border=True):
            c1, c2 = st.columns([5, 1])
            title = f"**{job.label or 'job'}** on `{job.model}` · {job.id}"
            if job.state == "done":
                c1.markdown(f"{title} · done in {runs.clock(job.elapsed())} → experiment `{job.experiment}` (see Compare)")
                r = job.result or {}
                facts = []
                if r.get("ppl") is not None and r.get("ppl_original"):
                    facts.append(f"perplexity {r['ppl_source']}: {r['ppl_original']:.2f} → {r['ppl']:.2f} "
                                 f"({100 * (r['ppl'] / r['ppl_original'] - 1):+.1f} %)")
                if r.get("params") and r.get("params_original"):
                    facts.append(f"parameters {r['params_original'] / 1e6:.2f} M → {r['params'] / 1e6:.2f} M "
                                 f"({100 * (r['params'] / r['params_original'] - 1):+.1f} %)")
                if facts:
                    c1.caption(" · ".join(facts))
            elif job.state in ("failed", "cancelled"):
                c1.markdown(f"{title} · {job.state}")
                if job.error:
                    c1.error(job.error.splitlines()[0])
            else:
                c1.markdown(title)
                text = runs.stage_text(job)
                c1.progress(job.fraction if job.stage != runs.SLOT_WAIT else 0.0, text=text)
                if c2.button("Cancel", key=f"cancel-{job.id}"):
                    runs.cancel_job(job.id)
                    st.rerun()


st.subheader("Jobs")
st.caption("Jobs run in their own process: this page (or the whole browser) can be closed; the result lands in the "
           "experiments store.")
_running = any(j.running for j in runs.job_list())
st.fragment(_jobs_panel, run_every=1.0 if _running else None)()
