"""Background prune-and-evaluate jobs: they outlive the page (or shell) that started them.

:func:`start` writes the job's spec under ``<cache root>/.jobs/<id>/`` and launches
``python -m moescope.analysis.run.jobs <folder>`` in its own session. The child runs
:func:`analysis.experiments.run_experiment` and reports through ``status.json`` (replaced
atomically on every progress step): ``state`` (``running`` / ``done`` / ``failed`` /
``cancelled``), the current stage with ``done`` / ``total``, and at the end the experiment id or
a one-line error. :func:`cancel` sends SIGTERM to the child's process group; the child stops at
the next Python instruction, and since the experiment is stored only when every step finished,
a cancelled job leaves no partial record. A child that died without reporting (killed, machine
restarted) is shown as ``failed`` by :func:`status`.

Jobs queue: by default one job runs at a time, the others wait ``queued`` in the order they were
started (their ids sort by start time), each recording when it began to wait and when it began
to run. ``parallel`` (the Run page's "jobs at a time", ``MOESCOPE_JOBS`` for scripts) lets more
run together; a job then measures speed only once no other job of ours is running (jobs that
wait for the speed slot or in the queue do not count), so a speed figure is never taken beside
our own work.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.core.paths import REPO_ROOT
from moescope.analysis.core.processes import process_alive

FINAL = ("done", "failed", "cancelled")
WAITING = ("starting", "queued")  # not yet running: in the queue, in start order
QUEUED = "queued: waiting for the jobs ahead"  # the stage while a job waits its turn
QUIET_WAIT = "waiting for our other jobs to finish before measuring speed"
QUEUE_KIND = "job-queue"  # the cache kind whose one lock orders the queue's hand-overs


def default_parallel() -> int:
    """Jobs that may run at once: ``MOESCOPE_JOBS`` (a whole number ≥ 1), else 1."""
    raw = os.environ.get("MOESCOPE_JOBS", "1")
    try:
        n = int(raw)
    except ValueError:
        raise MoescopeError(f"MOESCOPE_JOBS must be a whole number of jobs at a time (1 or more), got {raw!r}") from None
    if n < 1:
        raise MoescopeError(f"MOESCOPE_JOBS must be 1 or more jobs at a time, got {n}")
    return n


def jobs_root(cache=None) -> Path:
    from moescope.analysis.core.cache import Cache

    root = (cache or Cache()).root / ".jobs"
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass
class JobStatus:
    id: str
    state: str
    stage: str = ""
    done: int = 0
    total: int = 0
    label: str = ""
    model: str = ""
    created: str = ""
    updated: float = 0.0
    experiment: str | None = None
    error: str | None = None
    pid: int | None = None
    started: float = 0.0  # time.time() when the child began
    stage_started: float = 0.0  # when the current stage began
    finished: float = 0.0
    result: dict | None = None  # the finished experiment in brief (see _brief)
    estimate_s: float | None = None  # the whole job's expected seconds (from earlier runs of its setting)
    queued_at: float = 0.0  # time.time() when it began waiting in the queue
    parallel: int = 1  # jobs that may run at once (as started)
    position: int = 0  # place in the queue while waiting (1: next)

    def waited(self, now: float | None = None) -> float:
        """Seconds spent in the queue: so far while waiting, else until it began to run."""
        if not self.queued_at:
            return 0.0
        end = self.started if self.started else (now or time.time())
        return max(0.0, end - self.queued_at)

    @property
    def running(self) -> bool:
        return self.state not in FINAL

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    def elapsed(self, now: float | None = None) -> float:
        """Seconds since the job began (to its end once finished)."""
        if not self.started:
            return 0.0
        end = self.finished if not self.running and self.finished else (now or time.time())
        return max(0.0, end - self.started)

    def stage_elapsed(self, now: float | None = None) -> float:
        """Seconds in the current stage (e.g. how long it has waited for the speed slot)."""
        return max(0.0, (now or time.time()) - self.stage_started) if self.stage_started and self.running else 0.0

    def job_eta(self, now: float | None = None) -> float | None:
        """Seconds left of the whole job by its estimate (None without one); never below the
        current stage's own estimate."""
        if not self.running or self.estimate_s is None:
            return None
        left = max(0.0, self.estimate_s - self.elapsed(now))
        return max(left, self.stage_eta(now) or 0.0)

    def stage_eta(self, now: float | None = None) -> float | None:
        """Seconds left in the current stage, from its pace so far: None until three steps or 5 % of
        the stage are done (one request of 400 says nothing of the pace: the first steps include
        the warm-up)."""
        if not self.running or not self.stage_started or not self.total or self.done >= self.total:
            return None
        if self.done < min(3, self.total) and self.done < 0.05 * self.total:
            return None
        spent = (now or time.time()) - self.stage_started
        return spent / self.done * (self.total - self.done)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def start(model: str, plan: dict | None, spec: dict, label: str | None = None, cache=None,
          parallel: int | None = None) -> str:
    """Launch a job pruning ``model`` by ``plan`` (PruningPlan JSON, validated here first) and
    evaluating it by ``spec`` (EvalSpec JSON); returns its id. It joins the queue: it runs once
    fewer than ``parallel`` jobs run and none started before it still waits (default
    :func:`default_parallel`)."""
    parallel = default_parallel() if parallel is None else parallel
    if not isinstance(parallel, int) or parallel < 1:
        raise MoescopeError(f"jobs at a time must be 1 or more, got {parallel}")
    from moescope.analysis.evaluation import EvalSpec
    from moescope.analysis.pruning.plan import PruningPlan

    if plan is not None:  # against the model's shapes (built on the meta device, no weights read)
        from moescope.analysis.model import load_moe

        PruningPlan.from_json(plan).validate_for(load_moe(model, weights=False, load_tokenizer=False))
    EvalSpec.from_json(spec).validate()
    job_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    folder = jobs_root(cache) / job_id
    folder.mkdir()
    cache_root = str(folder.parent.parent)
    _write_json(folder / "spec.json", {"model": model, "plan": plan, "eval": spec, "label": label,
                                       "cache": cache_root, "parallel": parallel})
    _write_json(folder / "status.json", {"state": "starting", "label": label or "", "model": model,
                                         "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                         "updated": time.time(), "queued_at": time.time(), "parallel": parallel})
    with open(folder / "log.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moescope.analysis.run.jobs", str(folder)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=str(REPO_ROOT))
    (folder / "pid").write_text(str(proc.pid))
    return job_id



def status(job_id: str, cache=None) -> JobStatus:
    folder = jobs_root(cache) / job_id
    pid_file = folder / "pid"
    pid = int(pid_file.read_text()) if pid_file.is_file() else None

    def read() -> JobStatus:
        try:
            data = json.loads((folder / "status.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MoescopeError(f"no job '{job_id}' under {folder.parent}") from None
        return JobStatus(id=job_id, pid=pid, **{k: v for k, v in data.items() if k in JobStatus.__dataclass_fields__})

    st = read()
    if st.running and pid is not None and not process_alive(pid):
        time.sleep(0.2)  # it may have written its final status just now
        st = read()
        if st.running:
            st.state, st.error = "failed", "the job's process ended without reporting (killed?); see its log.txt"
    return st


def list_jobs(cache=None) -> list[JobStatus]:
    """Every job, newest first (jobs sent in the same second in the order they were sent)."""
    root = jobs_root(cache)
    out = []
    for folder in (p for p in root.iterdir() if p.is_dir()):
        try:
            out.append(status(folder.name, cache))
        except (MoescopeError, ValueError, OSError):
            continue
    return sorted(out, key=lambda j: (j.queued_at or 0.0, j.id), reverse=True)


def queue(cache=None) -> list[JobStatus]:
    """The jobs not finished, in queue order: those running first (in start order), then those
    waiting, each waiting job with its ``position`` (1: next to run)."""
    live = sorted((j for j in list_jobs(cache) if j.running), key=_order)
    running = [j for j in live if j.state not in WAITING]
    waiting = [j for j in live if j.state in WAITING]
    for k, j in enumerate(waiting, start=1):
        j.position = k
    return running + waiting


def may_run(job_id: str, parallel: int, cache=None) -> bool:
    """Whether the waiting job ``job_id`` may start now: fewer than ``parallel`` jobs run, counting
    with them every job that started waiting before it (first come, first served)."""
    jobs = list_jobs(cache)
    me = next((j for j in jobs if j.id == job_id), None)
    live = [j for j in jobs if j.running and j.id != job_id]
    running = sum(1 for j in live if j.state not in WAITING)
    ahead = sum(1 for j in live if j.state in WAITING and me is not None and _order(j) < _order(me))
    return running + ahead < parallel


def _order(job: JobStatus) -> tuple:
    """Queue order: when a job was started (to the microsecond; ids only to the second), then its id."""
    return job.queued_at or float("inf"), job.id


def others_busy(job_id: str, cache=None) -> list[JobStatus]:
    """Our other jobs that are working now (running, and not themselves waiting: in the queue, for
    the speed slot, or for quiet): while any is, a speed measurement waits."""
    from moescope.analysis.evaluation.efficiency import SLOT_WAIT

    return [j for j in list_jobs(cache) if j.id != job_id and j.running and j.state not in WAITING
            and j.stage not in (SLOT_WAIT, QUIET_WAIT)]


def cancel(job_id: str, cache=None) -> bool:
    """Ask a running job to stop; True if a signal was sent."""
    st = status(job_id, cache)
    if not st.running or not st.pid:
        return False
    try:
        os.killpg(st.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def wait(job_id: str, timeout: float = 600.0, cache=None) -> JobStatus:
    """Block until the job ends (for scripts and tests)."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(job_id, cache)
        if not st.running or time.monotonic() > deadline:
            return st
        time.sleep(0.25)


def _run(folder: Path) -> int:
    """The child: run the experiment, reporting into ``status.json``."""
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.evaluation import EvalSpec
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.run.experiments import run_experiment

    spec = json.loads((folder / "spec.json").read_text(encoding="utf-8"))
    base = json.loads((folder / "status.json").read_text(encoding="utf-8"))

    def report(**fields) -> None:
        now = time.time()
        if fields.get("stage") not in (None, base.get("stage")):
            base["stage_started"] = now
        base.update(fields, updated=now)
        _write_json(folder / "status.json", base)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    last = [0.0]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        # a new stage is always written (a wait that follows a finished stage must show at once)
        if now - last[0] > 0.2 or done == total or stage != base.get("stage"):
            last[0] = now
            report(state="running", stage=stage, done=done, total=total)

    cache = Cache(spec["cache"])
    parallel = int(spec.get("parallel") or 1)
    try:
        _wait_turn(folder.name, parallel, cache, report)
    except KeyboardInterrupt:
        report(state="cancelled", stage="cancelled")
        return 130
    base["started"] = time.time()
    report(state="running", stage="load", done=0, total=1)

    def quiet() -> None:
        """Before a speed measurement: wait while another job of ours works (only when several run)."""
        while others_busy(folder.name, cache):
            progress(QUIET_WAIT, 0, 1)
            time.sleep(0.5)

    try:
        from moescope.analysis.run.experiments import estimate_seconds

        base["estimate_s"] = estimate_seconds(spec["model"], spec["eval"], spec["plan"] is not None,
                                              cache=Cache(spec["cache"]))
        plan = PruningPlan.from_json(spec["plan"]) if spec["plan"] is not None else None
        exp = run_experiment(spec["model"], plan, EvalSpec.from_json(spec["eval"]), cache=Cache(spec["cache"]),
                             progress=progress, label=spec.get("label") or None,
                             before_speed=quiet if parallel > 1 else None)
    except KeyboardInterrupt:
        report(state="cancelled", stage="cancelled")
        return 130
    except MoescopeError as err:
        report(state="failed", error=str(err))
        return 2
    except Exception as err:  # noqa: BLE001 - the page shows one line; the traceback is in log.txt
        import traceback

        traceback.print_exc()
        report(state="failed", error=f"{type(err).__name__}: {err} (traceback in {folder / 'log.txt'})")
        return 1
    report(state="done", stage="done", done=1, total=1, experiment=exp.id, label=exp.label, finished=time.time(),
           result=_brief(exp))
    return 0


def _wait_turn(job_id: str, parallel: int, cache, report) -> None:
    """Wait ``queued`` until :func:`may_run`; the check and the switch to ``running`` are made under
    the queue's lock, so two jobs never both take the last place."""
    from moescope.analysis.core.cache import cache_key

    key = cache_key(QUEUE_KIND, {"queue": "jobs"})
    while True:
        with cache.lock(QUEUE_KIND, key):
            if may_run(job_id, parallel, cache):
                report(state="running", stage="load", done=0, total=1)
                return
        report(state="queued", stage=QUEUED, done=0, total=0)
        time.sleep(0.5)


def _brief(exp) -> dict:
    """What a finished job card shows: the headline perplexity against the original and the size."""
    out: dict = {}
    ppl, ref = exp.result.get("ppl") or {}, exp.reference.get("ppl") or {}
    if ppl:
        src = "demo:all" if "demo:all" in ppl else next(iter(ppl))
        out.update(ppl_source=src, ppl=ppl[src], ppl_original=ref.get(src))
    before = ((exp.structure or {}).get("before") or {}).get("params", {}).get("total")
    after = ((exp.structure or {}).get("after") or {}).get("params", {}).get("total")
    if before and after:
        out.update(params=after, params_original=before)
    return out


if __name__ == "__main__":
    sys.exit(_run(Path(sys.argv[1])))
