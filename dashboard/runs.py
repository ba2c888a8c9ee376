"""The dashboard's door to background jobs, experiments and export (:mod:`analysis.jobs`,
:mod:`analysis.experiments`, :mod:`analysis.export`): plain data in, plain data out."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from moescope.analysis import experiments as X
from moescope.analysis import jobs
from moescope.analysis.cache import Cache
from moescope.analysis.evaluation import EfficiencyParams, EvalSpec, local_task_names


def cache() -> Cache:
    return Cache()


@st.cache_data(show_spinner=False)
def local_tasks() -> list[str]:
    return local_task_names()


def eval_spec(ppl: list[str], samples: int, seq_len: int, tasks: list[str], limit: float | None, efficiency: bool,
              seed: int = 0) -> dict:
    """An EvalSpec as JSON (validated: a bad source is one clear line)."""
    spec = EvalSpec(ppl=ppl, samples=samples, seq_len=seq_len, tasks=tasks, limit=limit, seed=seed,
                    efficiency=efficiency, efficiency_params=EfficiencyParams(repeats=3))
    spec.validate()
    return spec.to_json()


def start_job(model: str, plan: dict | None, spec: dict, label: str | None) -> str:
    return jobs.start(model, plan, spec, label=label, cache=cache())


def job_list(limit: int = 10) -> list[jobs.JobStatus]:
    return jobs.list_jobs(cache())[:limit]


def cancel_job(job_id: str) -> bool:
    return jobs.cancel(job_id, cache())


def experiment_list() -> list[X.Experiment]:
    return X.list_experiments(cache())


def compare_table(ids: list[str]) -> pd.DataFrame:
    c = cache()
    return X.compare([X.load(i, c) for i in ids])


def domain_table(ids: list[str]) -> pd.DataFrame:
    """Tidy perplexity per (experiment, source, domain), the original as its own rows."""
    c = cache()
    rows, seen = [], set()
    for i in ids:
        exp = X.load(i, c)
        for r in exp.quality_rows():
            if r["kind"] != "ppl":
                continue
            if r["variant"] == "original":
                key = (exp.model_fingerprint, r["name"], r["detail"])
                if key in seen:
                    continue
                seen.add(key)
                rows.append({"experiment": "original", **r})
            else:
                rows.append({"experiment": f"{exp.id} · {exp.label}", **r})
    return pd.DataFrame(rows)


def export_experiment(ident: str, out_dir: str, overwrite: bool) -> list[str]:
    from moescope.analysis.export import export_experiment as export

    out = export(ident, out_dir, overwrite=overwrite, cache=cache())
    return sorted(p.name for p in out.iterdir())


def plan_json(ident: str) -> str | None:
    import json

    exp = X.load(ident, cache())
    return json.dumps(exp.plan, indent=2) if exp.plan else None
