"""The dashboard's door to background jobs, experiments and export (:mod:`analysis.jobs`,
:mod:`analysis.experiments`, :mod:`analysis.export`): plain data in, plain data out."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st
from moescope.analysis.core.cache import Cache
from moescope.analysis.evaluation import EfficiencyParams, EvalSpec, local_task_names
from moescope.analysis.run import experiments as X
from moescope.analysis.run import jobs


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


@dataclass
class CompareView:
    """What the Compare page shows by default: ``columns``, which end is better for each
    (``better[c]`` = "lower" | "higher"), a help text per column, and the quality and cost columns
    offered to the chart."""

    columns: list[str]
    better: dict[str, str]
    help: dict[str, str]
    quality: list[str]
    cost: list[str]


_HIGHER_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mc1", "mc2")
_RATIO_HELP = "pruned ÷ original; 1.00× = unchanged"


def compare_view(table: pd.DataFrame) -> CompareView:
    cols, better, help_ = ["name"], {}, {"name": "the plan's name (the original: the model before pruning)"}

    def add(col: str, direction: str | None, text: str) -> None:
        if col in table.columns and col not in cols:
            cols.append(col)
            help_[col] = text + (f" ({direction} is better)" if direction else "")
            if direction:
                better[col] = direction

    add("experts kept", None, "routed experts kept in all MoE layers together")
    add("params ratio", "lower", "parameters, " + _RATIO_HELP)
    add("weight bytes ratio", "lower", "bytes of the weights in memory, " + _RATIO_HELP)
    quality, cost = [], [c for c in ("params ratio", "weight bytes ratio", "peak memory ratio", "prefill speed ratio",
                                     "generate speed ratio", "generate speed ratio (skip)") if c in table.columns]
    for c in table.columns:
        if c.startswith("ppl "):
            add(c, "lower", f"perplexity on {c[4:]}")
            add(f"Δ% ppl {c[4:]}", "lower", "change of perplexity against the original, in %")
            quality.append(c)
        elif " " in c and not c.startswith(("Δ", "experts", "params", "weight", "peak", "prefill", "generate",
                                            "skipped")) and c not in ("name", "label", "experiment"):
            metric = c.split(" ")[-1]
            direction = "higher" if metric in _HIGHER_METRICS else "lower"
            add(c, direction, f"lm-eval {c}")
            add(f"Δ {c}", direction, "change against the original (absolute)")
            quality.append(c)
    add("generate speed", None, "generation tokens/s, pruned ÷ original with the range over the repeats; "
                                "'within noise' when measured while other processes were busy or when the range "
                                "covers 1.0× (higher is better)")
    for c in table.columns:  # help for the columns shown only with "every column"
        help_.setdefault(c, {"peak memory ratio": "peak memory while generating, " + _RATIO_HELP,
                             "prefill speed ratio": "prompt tokens/s, " + _RATIO_HELP,
                             "generate speed ratio (skip)": "generation tokens/s with dynamic skipping, "
                                                            + _RATIO_HELP,
                             "skipped fraction": "expert calls skipped by dynamic skipping",
                             "prefill speed": "prompt tokens/s verdict, as 'generate speed'",
                             "params": "parameters", "experiment": "experiment id", "label": "the run's label"}
                         .get(c, "experts kept in this layer" if c.startswith("experts L") else c))
    for c in ("peak memory ratio",):
        better.setdefault(c, "lower")
    for c in ("prefill speed ratio", "generate speed ratio", "generate speed ratio (skip)"):
        better.setdefault(c, "higher")
    return CompareView(cols, better, help_, quality, cost)


def styled(table: pd.DataFrame, view: CompareView, columns: list[str] | None = None):
    """The table formatted for reading: changes signed with %, ratios as ×, the best pruned value of
    each column with a known better end in bold green (the original row is the reference, never
    marked)."""
    fmt = {}
    for c in columns or table.columns:
        if c.startswith("Δ%"):
            fmt[c] = "{:+.1f}%"
        elif c.startswith("Δ "):
            fmt[c] = "{:+.4f}"
        elif c.endswith("ratio") or c.endswith("ratio (skip)"):
            fmt[c] = "{:.2f}×"
        elif c.startswith("ppl ") or c == "generate tok/s":
            fmt[c] = "{:.2f}"
        elif c == "params":
            fmt[c] = lambda v: f"{v / 1e6:.2f} M" if pd.notna(v) else ""
        elif c == "skipped fraction":
            fmt[c] = "{:.1%}"
    pruned = table.index[table["experiment"] != "original"]
    table = table[columns] if columns is not None else table

    def best(col: pd.Series):
        style = [""] * len(col)
        direction = view.better.get(col.name)
        vals = pd.to_numeric(col.loc[col.index.intersection(pruned)], errors="coerce").dropna()
        if direction and len(vals) > 1 and vals.nunique() > 1:
            target = vals.min() if direction == "lower" else vals.max()
            for k, idx in enumerate(col.index):
                if idx in vals.index and vals[idx] == target:
                    style[k] = "font-weight: bold; color: #2b8a3e"
        return style

    return table.style.format(fmt, na_rep="").apply(best, axis=0)


def colour_map(names: list[str]) -> dict[str, str]:
    """One colour per experiment name for every chart on the page; the original in grey."""
    palette = ["#1c7ed6", "#e8590c", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#c2255c", "#5c940d",
               "#6741d9", "#e03131"]
    out, k = {}, 0
    for n in names:
        if n in out:
            continue
        if n.startswith("original"):
            out[n] = "#868e96"
        else:
            out[n] = palette[k % len(palette)]
            k += 1
    return out


def domain_table(ids: list[str]) -> pd.DataFrame:
    """Tidy perplexity per (experiment, source, domain), the original as its own rows; experiments
    named as in :func:`compare_table` (their plan's name)."""
    c = cache()
    exps = [X.load(i, c) for i in ids]
    names = X.display_names(exps)
    rows, seen = [], set()
    for exp in exps:
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
                rows.append({"experiment": names[exp.id], **r})
    return pd.DataFrame(rows)


def export_experiment(ident: str, out_dir: str, overwrite: bool, transformers_only: bool = False) -> list[str]:
    from moescope.analysis.run.export import export_experiment as export

    out = export(ident, out_dir, overwrite=overwrite, cache=cache(), transformers_only=transformers_only)
    return sorted(p.name for p in out.iterdir())


def plan_json(ident: str) -> str | None:
    import json

    exp = X.load(ident, cache())
    return json.dumps(exp.plan, indent=2) if exp.plan else None
