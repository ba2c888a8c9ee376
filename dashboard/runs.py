"""The dashboard's door to background jobs, experiments and export (:mod:`analysis.jobs`,
:mod:`analysis.experiments`, :mod:`analysis.export`): plain data in, plain data out."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st
from moescope.analysis.core.cache import Cache
from moescope.analysis.evaluation import EfficiencyParams, EvalSpec, local_task_names
from moescope.analysis.evaluation.efficiency import SLOT_WAIT
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
                    efficiency=efficiency, efficiency_params=EfficiencyParams())  # the CLI's defaults
    spec.validate()
    return spec.to_json()


def with_name(plan: dict, name: str) -> dict:
    """A named plan's JSON with its name in the provenance (the model card names it)."""
    return {**plan, "provenance": {**(plan.get("provenance") or {}), "name": name}}


def start_job(model: str, plan: dict | None, spec: dict, label: str | None, parallel: int | None = None) -> str:
    return jobs.start(model, plan, spec, label=label, cache=cache(), parallel=parallel)


def default_parallel() -> int:
    """Jobs at a time unless the page says otherwise (``MOESCOPE_JOBS``, else 1)."""
    try:
        return jobs.default_parallel()
    except Exception:  # noqa: BLE001 - a bad MOESCOPE_JOBS is refused when a job starts; the page shows 1
        return 1


def job_queue() -> list[jobs.JobStatus]:
    """The unfinished jobs in queue order (running, then waiting with their place in line)."""
    return jobs.queue(cache())


def job_list(limit: int = 10) -> list[jobs.JobStatus]:
    return jobs.list_jobs(cache())[:limit]


def cancel_job(job_id: str) -> bool:
    return jobs.cancel(job_id, cache())


def experiment_list() -> list[X.Experiment]:
    return X.list_experiments(cache())


def compare_table(ids: list[str]) -> pd.DataFrame:
    c = cache()
    return X.compare([X.load(i, c) for i in ids])


def setting_parts(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """A comparison split by evaluation setting: ``(setting, its rows)``, each part keeping only the
    columns the setting has a value in (another setting's tasks or speed columns are left out)."""
    out = []
    for g in table["group"].unique():
        part = table[table["group"] == g].reset_index(drop=True)
        keep = [c for c in part.columns if part[c].notna().any() and not (part[c].astype(str) == "").all()]
        out.append((str(part["setting"].iloc[0]), part[keep]))
    return out


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


_RATIO_HELP = "pruned ÷ original; 1.00× = unchanged"
_HIDDEN_SUFFIXES = X.DERIVED_SUFFIXES


def compare_view(table: pd.DataFrame) -> CompareView:
    cols, better, help_ = ["name"], {}, {"name": "the plan's name; each original is named by the evaluation "
                                                 "setting its experiments (below it) were measured on"}

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
        if c.endswith(_HIDDEN_SUFFIXES):
            continue
        if c.startswith("ppl "):
            add(c, "lower", f"perplexity on {c[4:]}; its 95 % per-window range is in the chart and the CSV")
            add(f"Δ% ppl {c[4:]}", "lower", "change of perplexity against the original, in %")
            quality.append(c)
        elif c.startswith("task: "):
            metric = c.split(" ")[-1]
            direction = "higher" if metric in X.HIGHER_METRICS else "lower"
            add(c, direction, f"lm-eval {c[6:]}; ± 1.96 × lm-eval's standard error in the chart and the CSV")
            add(f"Δ {c[6:]}", direction, "change against the original (absolute)")
            quality.append(c)
    add("prefill speed", None, "prompt tokens/s, pruned ÷ original with the range over the repeats; "
                               "'within noise' when measured while other processes were busy or when the range "
                               "covers 1.0× (higher is better)")
    add("generate speed", None, "generation tokens/s, as 'prefill speed' (higher is better)")
    for c in table.columns:  # help for the columns shown only with "every column"
        help_.setdefault(c, {"peak memory ratio": "peak memory while generating, " + _RATIO_HELP,
                             "prefill speed ratio": "prompt tokens/s, " + _RATIO_HELP,
                             "generate speed ratio (skip)": "generation tokens/s with dynamic skipping, "
                                                            + _RATIO_HELP,
                             "skipped expert calls": SKIPPED_HELP,
                             "setting": "the evaluation setting (the original each experiment is measured against)",
                             "group": "which original (evaluation setting) the row belongs to",
                             "params": "parameters", "experiment": "experiment id", "label": "the run's label"}
                         .get(c, "experts kept in this layer" if c.startswith("experts L") else c))
    for c in ("peak memory ratio",):
        better.setdefault(c, "lower")
    for c in ("prefill speed ratio", "generate speed ratio", "generate speed ratio (skip)"):
        better.setdefault(c, "higher")
    return CompareView(cols, better, help_, quality, cost)


SKIPPED_HELP = ("share of (token, selected expert) calls that dynamic skipping left out while generating the speed "
                "prompts; the Routing page's skipping view counts tokens that skip at least one expert, and calls, "
                "on the calibration data, so the numbers differ by what and where they count")

BEST_CSS = "font-weight: bold; color: #2b8a3e"
NOISE_CSS = "color: #868e96; font-style: italic"


def styled(table: pd.DataFrame, view: CompareView, columns: list[str] | None = None):
    """The table formatted for reading: changes signed with %, ratios as ×. In bold green the best
    value of a column among the experiments measured against the same original, only where it is
    better than every other beyond the uncertainty (:func:`analysis.run.experiments.best_marks`);
    in grey italics a value within noise of its original (:func:`~analysis.run.experiments.noise_marks`).
    Originals are the reference, never marked."""
    fmt = {}
    for c in columns or table.columns:
        if c.endswith((" verdict", " vs original", " best", " noise")):  # words, not numbers
            continue
        if c.startswith("Δ%"):
            fmt[c] = "{:+.1f}%"
        elif c.startswith("Δ "):
            fmt[c] = "{:+.4f}"
        elif c.endswith("ratio") or c.endswith("ratio (skip)"):
            fmt[c] = "{:.2f}×"
        elif c.startswith("ppl ") or c == "generate tok/s":
            fmt[c] = "{:.2f}"
        elif c.startswith("task: "):
            fmt[c] = "{:.3f}"
        elif c == "params":
            fmt[c] = lambda v: f"{v / 1e6:.2f} M" if pd.notna(v) else ""
        elif c == "skipped expert calls":
            fmt[c] = "{:.1%}"
    full = table.reset_index(drop=True)
    marks = {}
    for c, direction in view.better.items():
        if c in full.columns:
            marks[c] = (X.best_marks(full, c, direction), X.noise_marks(full, c))
    # a change column carries the marks of the value it is the change of
    for c in list(full.columns):
        if c.startswith("Δ% ppl ") and f"ppl {c[7:]}" in marks:
            marks[c] = marks[f"ppl {c[7:]}"]
        elif c.startswith("Δ ") and f"task: {c[2:]}" in marks:
            marks[c] = marks[f"task: {c[2:]}"]
    for what in ("prefill", "generate"):
        if f"{what} speed ratio" in marks:
            marks[f"{what} speed"] = marks[f"{what} speed ratio"]
    shown = full[columns] if columns is not None else full

    def paint(col: pd.Series):
        best, noise = marks.get(col.name, (set(), set()))
        return [BEST_CSS if i in best else NOISE_CSS if i in noise else "" for i in range(len(col))]

    return shown.style.format(fmt, na_rep="").apply(paint, axis=0)


PALETTE = ["#1c7ed6", "#e8590c", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#c2255c", "#5c940d",
           "#6741d9", "#e03131", "#1098ad", "#d6336c"]
ORIGINAL_GREY = "#868e96"


def domain_table(ids: list[str]) -> pd.DataFrame:
    """Tidy perplexity per (experiment, source, domain) with its 95 % per-window range (``low``,
    ``high``), each original as its own rows named as in :func:`compare_table` (by its evaluation
    setting), experiments by their plan's name."""
    c = cache()
    exps = [X.load(i, c) for i in ids]
    names = X.display_names(exps)
    models = {e.model_fingerprint for e in exps}
    rows, seen = [], set()
    for exp in exps:
        setting = X.setting_name(exp.eval) + (f" · {exp.model}" if len(models) > 1 else "")
        for variant, q in (("original", exp.reference), ("pruned", exp.result)):
            for src, domains in q.get("ppl_domains", {}).items():
                ranges = (q.get("ppl_interval") or {}).get(src) or {}
                for domain, value in domains.items():
                    low, high = ranges.get(domain) or (None, None)
                    row = {"variant": variant, "name": src, "detail": domain, "value": value, "low": low, "high": high}
                    if variant == "original":
                        key = (exp.model_fingerprint, setting, src, domain)
                        if key in seen:
                            continue
                        seen.add(key)
                        rows.append({"experiment": f"original · {setting}", **row})
                    else:
                        rows.append({"experiment": names[exp.id], **row})
    return pd.DataFrame(rows)


def export_experiment(ident: str, out_dir: str, overwrite: bool, transformers_only: bool = False) -> list[str]:
    from moescope.analysis.run.export import export_experiment as export

    out = export(ident, out_dir, overwrite=overwrite, cache=cache(), transformers_only=transformers_only)
    return sorted(p.name for p in out.iterdir())


def plan_json(ident: str) -> str | None:
    import json

    exp = X.load(ident, cache())
    return json.dumps(exp.plan, indent=2) if exp.plan else None


def experiment_colours(table: pd.DataFrame, order: list[str]) -> dict[str, str]:
    """``{row name: colour}`` for a comparison table: an experiment's colour is fixed by its place
    in ``order`` (every experiment id of the model, oldest first), so narrowing the selection never
    recolours it; originals in grey."""
    place = {ident: i for i, ident in enumerate(order)}
    out = {}
    for ident, name in zip(table["experiment"], table["name"]):
        if ident == "original":
            out[name] = ORIGINAL_GREY
        else:
            out[name] = PALETTE[place.get(ident, len(out)) % len(PALETTE)]
    return out


def noise_rows(table: pd.DataFrame, columns: list[str]) -> set[int]:
    """Row positions within noise of their original in any of ``columns``."""
    full = table.reset_index(drop=True)
    out: set[int] = set()
    for c in columns:
        out |= X.noise_marks(full, c)
    return out


STAGE_NAMES = {"load": "loading the model", "perplexity": "perplexity windows",
               "lm-eval requests": "lm-eval requests", "efficiency": "memory and speed runs",
               "skip calibration": "calibrating dynamic skipping (β)"}


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def stage_text(job) -> str:
    """A running job's line: its stage (a wait for the speed slot with how long it has waited),
    the steps done, time so far, and what is left of the stage and of the whole job."""
    if job.state in jobs.WAITING:
        place = ("next in line" if job.position == 1 else f"{_ordinal(job.position)} in line") if job.position \
            else "in line"
        return (f"queued: {place}, waiting for the job{'s' if job.parallel > 1 else ''} ahead "
                f"({job.parallel} at a time) for {clock(job.waited())}")
    if job.stage == jobs.QUIET_WAIT:
        text = (f"{jobs.QUIET_WAIT} (several run at a time; speed is measured only on a machine quiet of our "
                f"jobs) for {clock(job.stage_elapsed())}")
    elif job.stage == SLOT_WAIT:
        text = (f"waiting for the speed slot (another job is measuring speed; one measurement at a time keeps "
                f"the figures clean) for {clock(job.stage_elapsed())}")
    elif job.total:
        text = f"{STAGE_NAMES.get(job.stage, job.stage)}: {job.done} / {job.total}"
    else:
        text = job.state
    text += f" · {clock(job.elapsed())} so far" + (f" (after {clock(job.waited())} in the queue)"
                                                  if job.waited() >= 1 else "")
    eta = job.stage_eta()
    text += (f" · about {clock(eta)} left in this stage" if eta is not None and job.stage not in (SLOT_WAIT, jobs.QUIET_WAIT)
             else "")
    whole = job.job_eta()
    if whole is not None:
        text += f" · whole job about {clock(whole)} left (estimate {clock(job.estimate_s)} from earlier runs)"
    elif job.estimate_s is None:
        text += " · no whole-job estimate yet (first run of this setting)"
    return text


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def verdicts(table: pd.DataFrame, view: CompareView) -> list[str]:
    """One line per evaluation setting: for each of its quality columns, the experiment that is best
    beyond every rival's paired range (or that none is), then the experiments worse than, better
    than and within noise of the original, from their paired verdicts
    (:func:`analysis.run.experiments.best_marks`, the ``… verdict`` columns)."""
    full = table.reset_index(drop=True)
    several = full["group"].nunique() > 1
    lines = []
    for g in full["group"].unique():
        rows = [i for i in range(len(full)) if full["group"].iloc[i] == g and full["experiment"].iloc[i] != "original"]
        if not rows:
            continue
        have = [c for c in view.quality if c in full.columns and full[c].iloc[rows].notna().any()]
        parts = []
        for c in have:
            best = X.best_marks(full, c, view.better[c])
            won = [full["name"].iloc[i] for i in rows if i in best]
            if len(rows) > 1:
                parts.append(f"{c}: **{won[0]}** best beyond every rival's paired range" if won else
                             f"{c}: no clear best (the leaders are within each other's paired range)")
            verdict_c = f"{c} verdict"
            if verdict_c in full.columns:
                by = {}
                for i in rows:
                    v = full[verdict_c].iloc[i]
                    if isinstance(v, str):
                        by.setdefault(v, []).append(full["name"].iloc[i])
                said = "; ".join(f"{v} than the original: {', '.join(n)}" if v in ("better", "worse")
                                 else f"{v}: {', '.join(n)}" for v, n in sorted(by.items()))
                if said:
                    parts.append(f"{c} — {said}")
        if parts:
            where = f"*{full['setting'].iloc[rows[0]]}* — " if several else ""
            lines.append(where + " · ".join(parts))
    return lines
