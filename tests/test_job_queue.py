"""The job queue (analysis/run/jobs.py): one job at a time by default, first come first served, each
job's wait recorded; with several at a time, speed waits until no other job of ours works."""

from __future__ import annotations

import json
import os

import pytest
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.evaluation import EvalSpec
from moescope.analysis.evaluation.efficiency import SLOT_WAIT
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.run import jobs


def fake_job(cache: Cache, ident: str, state: str, queued_at: float, stage: str = "") -> None:
    """A job folder as :func:`jobs.start` and the child leave it, owned by this (living) process."""
    folder = jobs.jobs_root(cache) / ident
    folder.mkdir()
    (folder / "pid").write_text(str(os.getpid()))
    (folder / "status.json").write_text(json.dumps({"state": state, "stage": stage, "queued_at": queued_at,
                                                    "started": 0.0 if state in jobs.WAITING else queued_at + 1}))


def test_first_come_first_served_and_how_many_at_a_time(tmp_path):
    cache = Cache(tmp_path / "cache")
    # ids sort by the second they started; the queue goes by the microsecond (queued_at)
    fake_job(cache, "20260101-000000-ffff", "running", 10.0, stage="perplexity")
    fake_job(cache, "20260101-000001-bbbb", "queued", 12.0)
    fake_job(cache, "20260101-000001-aaaa", "queued", 12.5)  # later, though its id sorts first
    b, a = "20260101-000001-bbbb", "20260101-000001-aaaa"
    assert not jobs.may_run(b, 1, cache)  # one runs already
    assert jobs.may_run(b, 2, cache) and not jobs.may_run(a, 2, cache)  # b is ahead of a
    assert jobs.may_run(a, 3, cache)
    line = jobs.queue(cache)
    assert [j.id for j in line] == ["20260101-000000-ffff", b, a] and [j.position for j in line] == [0, 1, 2]
    # the running job finishes: b is next, a still waits behind it
    status = jobs.jobs_root(cache) / "20260101-000000-ffff" / "status.json"
    status.write_text(json.dumps({"state": "done", "queued_at": 10.0}))
    assert jobs.may_run(b, 1, cache) and not jobs.may_run(a, 1, cache)
    assert jobs.JobStatus(id="x", state="queued", queued_at=100.0).waited(now=130.0) == 30.0
    assert jobs.JobStatus(id="x", state="running", queued_at=100.0, started=112.0).waited(now=500.0) == 12.0


def test_speed_waits_only_for_our_jobs_that_work(tmp_path):
    cache = Cache(tmp_path / "cache")
    fake_job(cache, "20260101-000000-0001", "running", 1.0, stage="efficiency")
    fake_job(cache, "20260101-000000-0002", "running", 2.0, stage=SLOT_WAIT)  # waits for the slot: not working
    fake_job(cache, "20260101-000000-0003", "queued", 3.0)  # in the queue: not working
    assert jobs.others_busy("20260101-000000-0001", cache) == []
    fake_job(cache, "20260101-000000-0004", "running", 4.0, stage="perplexity")
    assert [j.id for j in jobs.others_busy("20260101-000000-0001", cache)] == ["20260101-000000-0004"]


def test_a_stage_estimate_waits_for_a_pace_worth_the_name():
    # "about 39 min 21 s left" at 1 of 400 lm-eval requests: no estimate until 3 steps or 5 % are done
    job = dict(id="x", state="running", stage="lm-eval requests", total=400, started=100.0, stage_started=100.0)
    assert jobs.JobStatus(**job, done=1).stage_eta(now=106.0) is None
    assert jobs.JobStatus(**job, done=3).stage_eta(now=106.0) == pytest.approx(6.0 / 3 * 397)
    assert jobs.JobStatus(**{**job, "total": 4}, done=1).stage_eta(now=106.0) == pytest.approx(18.0)  # 25 %


def test_a_bad_number_of_jobs_at_a_time_is_one_line(monkeypatch):
    monkeypatch.setenv("MOESCOPE_JOBS", "two")
    with pytest.raises(MoescopeError, match="MOESCOPE_JOBS must be a whole number of jobs at a time"):
        jobs.default_parallel()
    monkeypatch.setenv("MOESCOPE_JOBS", "0")
    with pytest.raises(MoescopeError, match="1 or more"):
        jobs.default_parallel()
    monkeypatch.delenv("MOESCOPE_JOBS")
    assert jobs.default_parallel() == 1


@pytest.mark.slow
def test_jobs_sent_together_run_one_after_another_in_order(demo_dir, tmp_path):
    cache = Cache(tmp_path / "cache")
    spec = EvalSpec(ppl=["demo:python"], samples=2, seq_len=32, efficiency=False).to_json()
    plans = [PruningPlan.from_keep("demo", {0: [e for e in range(8) if e != k]},
                                   provenance={"strategy": "manual", "params": {}}).to_json() for k in range(3)]
    ids = [jobs.start("demo", p, spec, label=f"drop {k}", cache=cache) for k, p in enumerate(plans)]
    done = [jobs.wait(i, timeout=600, cache=cache) for i in ids]
    assert [d.state for d in done] == ["done"] * 3, [d.error for d in done]
    # in the order sent, each starting only once the one before had finished
    for first, second in zip(done, done[1:]):
        assert second.started >= first.finished
    assert done[2].waited() >= done[2].started - done[2].queued_at - 1e-6 > 0
