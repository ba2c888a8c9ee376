"""Experiments: one record per prune-and-evaluate run, stored under the cache, compared side by side.

An :class:`Experiment` holds its id, the base model and its fingerprint, the plan (with its
provenance), the evaluation spec, the original model's quality on that spec (``reference``) and
the pruned model's (``result``), efficiency of both (with and without dynamic skipping),
structure, timings, software versions and a timestamp. It is stored as a cache entry of kind
``experiment`` (``meta.json`` plus tidy Parquet tables; finetuned weights, if any, as
safetensors), so it is written atomically and listed with ``moescope cache ls`` as well.

:func:`run_experiment` (load, then :func:`prune_and_evaluate`) is the one path the CLI
(``moescope prune … --ppl``, ``moescope eval``), the dashboard's background jobs and scripts share.
"""

from __future__ import annotations

import platform
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from moescope.analysis.core.errors import MoescopeError

if TYPE_CHECKING:  # evaluation imports torch; listing experiments must not
    from moescope.analysis.evaluation import EvalSpec

KIND = "experiment"
Progress = Callable[[str, int, int], None]


def _verdicts():
    """:mod:`analysis.run.verdicts`, imported when a verdict is asked for: it reads the paired
    statistics of :mod:`analysis.evaluation`, whose package imports torch, which listing commands
    (``experiments ls``) do without."""
    from moescope.analysis.run import verdicts

    return verdicts


def __getattr__(name: str):
    """``HIGHER_METRICS`` (the scores whose higher end is better) is re-exported from
    :mod:`analysis.run.verdicts` on first use, as :func:`_verdicts` imports it."""
    if name == "HIGHER_METRICS":
        return _verdicts().HIGHER_METRICS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def new_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxx`` (UTC time, 4 random hex digits): sortable and short to type."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def software_versions() -> dict[str, str]:
    import lm_eval
    import torch
    import transformers
    from moescope.analysis.core import __version__

    return {"moescope": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": getattr(lm_eval, "__version__", "?"), "python": platform.python_version()}


@dataclass
class Experiment:
    id: str
    created: str
    label: str  # e.g. "enumerate keep=4", or "original" for an evaluation without a plan
    model: str  # base model source
    model_fingerprint: str
    pruned_fingerprint: str | None
    plan: dict | None  # PruningPlan JSON (with provenance)
    eval: dict  # EvalSpec JSON
    reference: dict  # quality of the original model: {"ppl", "ppl_domains", "tasks", ...}
    result: dict  # quality of the pruned model (the reference itself without a plan)
    efficiency: dict = field(default_factory=dict)  # {"original"|"pruned": {"plain": …, "skip": …|None}}
    structure: dict = field(default_factory=dict)  # experts per layer and parameter counts, before / after
    timings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    finetuned: bool = False  # the pruned weights were trained (stored with the record)
    files_fingerprint: str | None = None  # the base folder's tokenizer and generation config (what an export copies)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Experiment:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    # ---- tidy views --------------------------------------------------------------------------
    def quality_rows(self) -> list[dict]:
        """One row per (variant, kind, source/task, domain/metric, value)."""
        rows = []
        for variant, q in (("original", self.reference), ("pruned", self.result)):
            for src, domains in q.get("ppl_domains", {}).items():
                for domain, value in domains.items():
                    rows.append({"variant": variant, "kind": "ppl", "name": src, "detail": domain, "value": value})
            for task, metrics in q.get("tasks", {}).items():
                for metric, value in metrics.items():
                    rows.append({"variant": variant, "kind": "task", "name": task, "detail": metric, "value": value})
        return rows

    def summary_line(self) -> str:
        ppl = ", ".join(f"{s} {self.reference['ppl'][s]:.2f}→{v:.2f}" for s, v in self.result.get("ppl", {}).items())
        return f"{self.id}  {self.label}  {self.model}  {ppl}"


def _label(plan) -> str:
    if plan is None:
        return "original"
    from moescope.analysis.pruning.plan import recipe_name

    prov = plan.provenance or {}
    name = recipe_name(prov)  # a preset by its name (mc-smoe), not its strategy's (router-guided)
    params = prov.get("params") or {}
    short = " ".join(f"{k}={v}" for k, v in params.items() if isinstance(v, int | float | str) and k != "seed")
    return f"{name} {short}".strip()


def model_structure(model) -> dict:
    """Routed experts per MoE layer, parameter counts and weight bytes of ``model`` as it is now."""
    return {"experts": {str(k): v for k, v in model.num_experts().items()}, "params": model.parameter_counts(),
            "weight_bytes": sum(model.bytes_by_dtype().values())}


def _skip_betas(model, spec: EvalSpec, cache, progress) -> dict[int, float] | None:
    """β per layer for the "with skipping" efficiency variant: the model's own, else calibrated on
    the spec's calibration source (a routing-only analysis, cached)."""
    if model.skip_beta:
        return dict(model.skip_beta)
    if not spec.skip_calib or any(v.top_k < 2 for v in model.layers.values()):
        return None  # nothing to skip for a top-1 router
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.analyze import AnalysisParams, run_analysis
    from moescope.analysis.model import skipping

    batch = sample_tokens(spec.skip_calib, model.tokenizer, spec.skip_calib_samples, spec.seq_len, seed=spec.seed,
                          split="validation")
    res = run_analysis(model, batch, AnalysisParams(metrics=("routing",)), cache=cache,
                       progress=(lambda s, d, t: progress("skip calibration", d, t)) if progress else None)
    return skipping.calibrate(res)


def run_experiment(source: str, plan=None, spec: EvalSpec | None = None, cache=None, progress: Progress | None = None,
                   label: str | None = None, dtype: str | None = None, device: str | None = None,
                   trust_remote_code: bool = False, allow_pickle: bool = False,
                   before_speed: Callable[[], None] | None = None) -> Experiment:
    """Load ``source``, check ``plan`` (a :class:`PruningPlan` or None) against it, then
    :func:`prune_and_evaluate` the loaded model. Nothing is stored unless every step finished, so
    an interrupted run leaves no record."""
    from moescope.analysis.evaluation import EvalSpec
    from moescope.analysis.model import load_config, load_moe

    spec = spec or EvalSpec()
    spec.validate()
    spec.validate_for(load_config(source, trust_remote_code))  # before any weights are read
    t0 = time.perf_counter()
    if progress:
        progress("load", 0, 1)
    model = load_moe(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                     allow_pickle=allow_pickle)
    if plan is not None:
        plan.validate_for(model)  # refuse a bad plan before any evaluation
    return prune_and_evaluate(model, plan, spec, cache=cache, progress=progress, label=label, dtype=dtype,
                              device=device, load_s=time.perf_counter() - t0, trust_remote_code=trust_remote_code,
                              allow_pickle=allow_pickle, before_speed=before_speed)


def check_finite_quality(result: dict, what: str) -> None:
    """Refuse a perplexity or task score that is not a finite number (NaN/inf weights, a diverged
    finetune, a broken config): it is never stored or exported as a result."""
    import math

    numbers = [(f"perplexity on {src}", v) for src, v in result.get("ppl", {}).items()]
    numbers += [(f"{task} {m}", v) for task, ms in result.get("tasks", {}).items() for m, v in ms.items()
                if isinstance(v, float)]
    for name, value in numbers:
        if isinstance(value, int | float) and not math.isfinite(value):
            raise MoescopeError(f"{name} of {what} is {value}: its weights or config produce non-finite numbers; "
                                "nothing was stored or exported")


def prune_and_evaluate(model, plan=None, spec: EvalSpec | None = None, cache=None, progress: Progress | None = None,
                       label: str | None = None, dtype: str | None = None, device: str | None = None,
                       load_s: float = 0.0, store: bool = True, trust_remote_code: bool = False,
                       allow_pickle: bool = False, before_speed: Callable[[], None] | None = None) -> Experiment:
    """Evaluate ``model`` (the original, as loaded from ``model.source``), prune it in place by
    ``plan``, evaluate the result, measure efficiency of both (each in a fresh process), and store
    the experiment. ``before_speed`` (a background job running beside others) is called once the
    speed slot is held and returns when the machine is quiet of our own jobs. ``model`` is left
    pruned (the caller may export it). ``store=False`` leaves
    the storing to the caller (:func:`store`), e.g. after the export it belongs to is complete,
    so a run killed mid-export leaves no record."""
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.evaluation import EvalSpec, evaluate_quality, isolated_efficiency
    from moescope.analysis.evaluation.efficiency import measurement_slot
    from moescope.analysis.model.loading import files_fingerprint
    from moescope.analysis.pruning.prune import apply, finetuned_weights, is_finetuned

    spec = spec or EvalSpec()
    spec.validate()
    cache = cache or Cache()
    source = model.source
    timings: dict[str, float] = {"load_s": load_s}
    t_all = time.perf_counter()

    def step(name: str):
        if progress:
            progress(name, 0, 1)
        return time.perf_counter()

    finetuned = is_finetuned(plan)
    trained = finetuned_weights(plan, cache) if finetuned else None  # found before any evaluation
    before = model_structure(model)
    base_fp = model.fingerprint()

    t0 = step("evaluate original")
    reference = evaluate_quality(model, spec, cache=cache, progress=progress)
    check_finite_quality(reference, f"'{source}'")
    timings["evaluate_original_s"] = time.perf_counter() - t0
    betas_original = _skip_betas(model, spec, cache, progress) if spec.efficiency else None

    if plan is None:
        result = reference
    else:
        t0 = step("prune")
        apply(model, plan, weights=trained)
        timings["prune_s"] = time.perf_counter() - t0
        t0 = step("evaluate pruned")
        result = evaluate_quality(model, spec, cache=cache, progress=progress)
        check_finite_quality(result, f"the pruned '{source}'")
        timings["evaluate_pruned_s"] = time.perf_counter() - t0

    efficiency = {}
    if spec.efficiency:
        t0 = step("efficiency")
        p = spec.efficiency_params
        betas_pruned = _skip_betas(model, spec, cache, progress) if plan is not None else betas_original
        # one speed measurement at a time on this machine (other jobs wait), original and pruned
        # back to back, each recording how busy the rest of the machine was
        t_wait = time.perf_counter()
        with measurement_slot(str(cache.root), progress):
            if before_speed is not None:
                before_speed()
            timings["speed_wait_s"] = time.perf_counter() - t_wait  # another job's measurement went first
            t0 += timings["speed_wait_s"]  # efficiency_s: the stage's own work, not the wait
            if progress:
                progress("efficiency", 0, 1)
            flags = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
            efficiency["original"] = original_efficiency(model, source, p, betas_original, dtype, device, cache,
                                                         base_fp, **flags)
            if plan is None:
                efficiency["pruned"] = efficiency["original"]
            else:
                efficiency["pruned"] = isolated_efficiency(source, plan.to_json(), p, betas_pruned, dtype, device,
                                                           cache_root=str(cache.root), **flags)
        timings["efficiency_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all + load_s

    exp = Experiment(
        id=new_id(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        label=label or _label(plan), model=source, model_fingerprint=base_fp,
        pruned_fingerprint=model.fingerprint() if plan is not None else None,
        plan=plan.to_json() if plan is not None else None, eval=spec.to_json(), reference=reference, result=result,
        efficiency=efficiency, structure={"before": before, "after": model_structure(model)}, timings=timings,
        versions=software_versions(), finetuned=finetuned, files_fingerprint=files_fingerprint(model.source_dir),
    )
    from moescope.analysis.core.distributed import current

    if store and current().is_main:  # under torchrun the main rank alone stores the record
        save(exp, cache, tensors=trained)
    return exp


def evaluate_offloaded(source: str, pruned_dir, plan, spec: EvalSpec, offload_dir, dtype: str | None = None,
                       cache=None, progress: Progress | None = None, trust_remote_code: bool = False,
                       label: str | None = None) -> Experiment:
    """The quality of ``source`` and of its pruned folder ``pruned_dir`` (written by the streaming
    export), each loaded with its decoder layers on disk in a fresh folder under ``offload_dir`` and
    evaluated layer by layer, so neither needs to fit in memory. Memory and speed need the model in
    memory and are not measured. The experiment is returned unstored (:func:`store`)."""
    import tempfile
    from pathlib import Path

    from moescope.analysis.core.cache import Cache
    from moescope.analysis.evaluation import evaluate_quality
    from moescope.analysis.model import load_moe, resolve_source
    from moescope.analysis.model.loading import files_fingerprint

    spec.validate()
    cache = cache or Cache()
    Path(offload_dir).mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    measured = {}
    for name, where in (("original", source), ("pruned", str(pruned_dir))):
        if progress:
            progress(f"evaluate {name}", 0, 1)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=offload_dir, prefix=f"moescope-offload-{name}-") as d:
            model = load_moe(where, dtype=dtype, offload_dir=d, trust_remote_code=trust_remote_code)
            measured[name] = (model_structure(model), model.fingerprint(),
                              evaluate_quality(model, spec, cache=cache, progress=progress))
            del model
        timings[f"evaluate_{name}_s"] = time.perf_counter() - t0
    (before, base_fp, reference), (after, pruned_fp, result) = measured["original"], measured["pruned"]
    timings["total_s"] = sum(timings.values())
    return Experiment(
        id=new_id(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        label=label or _label(plan), model=source, model_fingerprint=base_fp, pruned_fingerprint=pruned_fp,
        plan=plan.to_json(), eval=spec.to_json(), reference=reference, result=result, efficiency={},
        structure={"before": before, "after": after}, timings=timings, versions=software_versions(), finetuned=False,
        files_fingerprint=files_fingerprint(resolve_source(source)[1]),
    )


def original_efficiency(model, source: str, params, betas: dict | None, dtype, device, cache, fingerprint: str,
                        **flags) -> dict:
    """The original model's size and speed for these efficiency settings: measured once (in a fresh
    process, see :func:`~moescope.analysis.evaluation.efficiency.isolated_efficiency`) and then read
    from the cache by every later experiment of the same model, settings, skip thresholds, dtype,
    device and thread count (each figure keeps how busy the machine was while it was taken). ``flags``
    (``trust_remote_code``, ``allow_pickle``) reach the child process that measures."""
    import torch
    from moescope.analysis.evaluation import isolated_efficiency
    from moescope.analysis.evaluation.keys import EVAL_VERSION

    parts = {"model": fingerprint, "params": asdict(params), "skip_beta": {str(k): v for k, v in (betas or {}).items()},
             "dtype": dtype, "device": device, "threads": torch.get_num_threads(), "version": EVAL_VERSION}
    entry = cache.get_or_compute(
        "efficiency-original", parts,
        lambda: {"meta": {"efficiency": isolated_efficiency(source, None, params, betas, dtype, device, **flags)}},
        label=f"{source}-original")
    return entry.meta["efficiency"]


_STAGE_TIMINGS = ("load_s", "evaluate_original_s", "prune_s", "evaluate_pruned_s", "efficiency_s")


def estimate_seconds(model: str, spec: dict, with_plan: bool, cache=None) -> float | None:
    """A whole job's expected seconds from the stages' costs in earlier experiments of the same
    model source and evaluation setting: the median of each stage's time, except the original's
    evaluation, whose least time is taken (it is a cached result once measured), and the
    pruned-only stages left out for an evaluation without a plan. None without an earlier run."""
    import statistics

    key = spec_key(spec)
    past = [e for e in list_experiments(cache) if e.model == model and spec_key(e.eval) == key]
    if not past:
        return None
    total = 0.0
    for stage in _STAGE_TIMINGS:
        if not with_plan and stage in ("prune_s", "evaluate_pruned_s"):
            continue
        seen = [e.timings[stage] for e in past if isinstance(e.timings.get(stage), int | float)]
        if seen:
            total += min(seen) if stage == "evaluate_original_s" else statistics.median(seen)
    return total


def store(exp: Experiment, cache=None):
    """Store an experiment that :func:`prune_and_evaluate` left unstored (``store=False``), with
    its finetuned weights when it has them."""
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.pruning.prune import finetuned_weights

    trained = finetuned_weights(PruningPlan.from_json(exp.plan), cache) if exp.finetuned else None
    return save(exp, cache, tensors=trained)


def trained_tensors_of(exp: Experiment, cache=None) -> dict:
    """A finetuned experiment's stored routers and experts (see :func:`moescope.analysis.pruning.prune.apply`)."""
    return _entry(exp.id, cache).tensors()


# ---- store -----------------------------------------------------------------------------------
def save(exp: Experiment, cache=None, tensors: dict | None = None):
    import pandas as pd
    from moescope.analysis.core.cache import Cache

    cache = cache or Cache()
    rows = exp.quality_rows()
    tables = {"quality": pd.DataFrame(rows, columns=["variant", "kind", "name", "detail", "value"])}
    meta = {"experiment": exp.to_json(), "model_source": exp.model, "model": exp.model_fingerprint,
            "data": ", ".join(exp.eval.get("ppl", [])) or None}
    return cache.put(KIND, {"id": exp.id}, tensors=tensors or None, tables=tables, meta=meta,
                     label=f"{exp.id} {exp.label}")


def list_experiments(cache=None, model: str | None = None) -> list[Experiment]:
    """Every stored experiment, oldest first (``model``: a source or fingerprint prefix)."""
    from moescope.analysis.core.cache import Cache

    cache = cache or Cache()
    out = []
    for info in cache.entries(KIND, model=model):
        entry = cache.get_by_key(KIND, info.key)
        if entry is not None and "experiment" in entry.meta:
            out.append(Experiment.from_json(entry.meta["experiment"]))
    return out


def _id_of(info) -> str:
    """An experiment entry's id: the first word of its label (``"<id> <strategy label>"``)."""
    return (info.label or "").split(" ")[0]


def _entry(ident: str, cache=None):
    from moescope.analysis.core.cache import Cache, cache_key

    cache = cache or Cache()
    entry = cache.get_by_key(KIND, cache_key(KIND, {"id": ident}))
    if entry is not None:
        return entry
    stored = cache.entries(KIND)
    matches = [i for i in stored if _id_of(i).startswith(ident)] if ident else []
    ids = sorted({_id_of(i) for i in matches})
    if len(ids) == 1:
        entry = cache.get_by_key(KIND, matches[0].key)
        if entry is not None:
            return entry
    if len(ids) > 1:
        raise MoescopeError(f"experiment id '{ident}' is ambiguous: it starts {', '.join(ids)}")
    known = [_id_of(i) for i in stored]
    hint = f"; stored: {', '.join(known[-5:])}" + (" …" if len(known) > 5 else "") if known else \
        "; none stored yet (run `moescope prune … --ppl …` or `moescope eval`)"
    raise MoescopeError(f"no experiment '{ident}' in the cache at {cache.root}{hint}")


def load(ident: str, cache=None) -> Experiment:
    """The experiment with this id (or a unique prefix of it)."""
    return Experiment.from_json(_entry(ident, cache).meta["experiment"])


# ---- comparison ------------------------------------------------------------------------------
def _ratio(a, b):
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def setting_name(spec: dict) -> str:
    """A short name of an evaluation setting (what the original row of a comparison is measured
    on): perplexity sources with windows × tokens, tasks with their sample limit and shots, and the
    speed measurement's repeats, e.g. ``ppl demo:all 48×256 · moescope_demo_continuation ≤100 · speed ×3``."""
    parts = []
    if spec.get("ppl"):
        window = f"{spec.get('samples')}×{spec.get('seq_len')}"
        extra = "".join([f" stride {spec['stride']}" if spec.get("stride") else "",
                         f" {spec['sampling']} seed {spec.get('seed', 0)}" if spec.get("sampling", "first") != "first"
                         else ""])
        parts.append(f"ppl {'+'.join(spec['ppl'])} {window}{extra}")
    if spec.get("tasks"):
        limit = spec.get("limit")
        limit = "" if limit is None else f" ≤{limit:g}"
        shots = "" if spec.get("num_fewshot") is None else f" {spec['num_fewshot']}-shot"
        parts.append(f"{'+'.join(spec['tasks'])}{limit}{shots}")
    if spec.get("efficiency"):
        eff = spec.get("efficiency_params") or {}
        parts.append(f"speed ×{eff.get('repeats', '?')}")
    return " · ".join(parts) or "no evaluation"


def spec_key(spec: dict) -> str:
    """An evaluation spec as one canonical string (stored records come back with sorted keys)."""
    import json

    return json.dumps(spec, sort_keys=True)


def _setting_key(exp: Experiment) -> tuple:
    return exp.model_fingerprint, spec_key(exp.eval)


def headline(table) -> tuple[str, str] | None:
    """``(column, better end)`` a comparison is sorted by: the pooled perplexity of the first
    source, else the first lm-eval score, else the parameter ratio."""
    cols = list(table.columns)
    for c in cols:
        if c.startswith("ppl ") and not c.endswith(DERIVED_SUFFIXES):
            return c, "lower"
    for c in cols:
        if c.startswith("task:") and not c.endswith(DERIVED_SUFFIXES):
            return c, "higher" if c.split(" ")[-1] in _verdicts().HIGHER_METRICS else "lower"
    return ("params ratio", "lower") if "params ratio" in cols else None


# a comparison's derived columns: a value's range, its verdict against its original, the paired
# change, whether it is the best of its setting
DERIVED_SUFFIXES = (" low", " high", " noise", " verdict", " vs original", " best")


def compare(experiments: list[Experiment]):
    """One table: for each evaluation setting (base model and evaluation spec), its original as a
    reference row named by the setting (``setting`` column, ``group`` number), then the experiments
    measured against that original, best headline metric first (:func:`headline`); an evaluation
    without a plan is that original row itself. Columns: quality
    per source/task with its 95 % interval (``… low`` / ``… high``: per-window for perplexity,
    lm-eval's standard error for task scores) and the change against the original, the paired
    verdict against the original (``… verdict``: better / worse / within noise, ``… vs original``:
    the paired change with its range, see :mod:`~moescope.analysis.run.verdicts`) and whether it is
    the setting's best beyond every rival's paired range (``… best``), parameter,
    weight-byte and peak-memory ratios, prefill and generation speed ratios with the repeats' range
    and the verdict (plain and with dynamic skipping). See :func:`best_marks` and
    :func:`noise_marks` for what may be called best and what is within noise. Experiments of
    different settings pair nothing: each is measured against its own original only."""
    import pandas as pd

    if not experiments:
        raise MoescopeError("nothing to compare: give at least one experiment id")
    names = display_names(experiments)
    groups: dict[tuple, list[Experiment]] = {}
    for exp in experiments:
        groups.setdefault(_setting_key(exp), []).append(exp)
    models = {e.model_fingerprint for e in experiments}
    frames = []
    for g, members in enumerate(groups.values()):
        first = members[0]
        eff = first.efficiency or {}
        ref_eff = (eff.get("original") or {}).get("plain") or {}
        setting = setting_name(first.eval) + (f" · {first.model}" if len(models) > 1 else "")
        ref = _row("original", first.model, first.structure.get("before", {}), first.reference, first.reference,
                   eff.get("original") or {}, ref_eff, first.structure.get("before", {}), f"original · {setting}")
        rows = []
        for exp in members:
            if exp.plan is None:  # an evaluation without a plan is this setting's original row itself
                continue
            e_eff = exp.efficiency or {}
            r_eff = (e_eff.get("original") or {}).get("plain") or {}
            rows.append(_row(exp.id, exp.label, exp.structure.get("after", {}), exp.result, exp.reference,
                             e_eff.get("pruned") or {}, r_eff, exp.structure.get("before", {}), names[exp.id]))
            rows[-1].update(_paired_cells(exp))
        pruned = {e.id: e.result for e in members if e.plan is not None}
        for col in {c for q in pruned.values() for c in _verdicts().quality_columns(q)}:
            leader = _verdicts().best_of(pruned, col)
            for row in rows:
                row[f"{col} best"] = row["experiment"] == leader
        body = pd.DataFrame(rows)
        key = headline(body) if rows else None
        if key is not None and key[0] in body.columns and len(body) > 1:
            body = body.sort_values(key[0], ascending=key[1] == "lower", kind="stable", na_position="last")
        part = pd.concat([pd.DataFrame([ref]), body], ignore_index=True)
        part.insert(0, "group", g)
        part.insert(1, "setting", setting)
        frames.append(part)
    table = pd.concat(frames, ignore_index=True)
    front = ["experiment", "name", "label", "group", "setting"]
    return table[front + [c for c in table.columns if c not in front]]


def _paired_cells(exp: Experiment) -> dict:
    """``{column verdict, column vs original}`` of every quality column of ``exp``: its paired verdict
    against its own original (:func:`~moescope.analysis.run.verdicts.against`)."""
    cells = {}
    for col in _verdicts().quality_columns(exp.result):
        p, verdict = _verdicts().against(exp.reference, exp.result, col)
        cells[f"{col} verdict"] = verdict
        cells[f"{col} vs original"] = p.text() if p is not None else ""
    return cells


def between(a: Experiment, b: Experiment) -> list[tuple[str, object, str]]:
    """``[(column, paired range, verdict)]``: experiment ``b`` against ``a`` in every quality column
    both have, paired on their common windows and documents. Experiments of different settings (model
    or evaluation spec) pair nothing: a :class:`MoescopeError` saying so."""
    if _setting_key(a) != _setting_key(b):
        raise MoescopeError(f"{a.id} and {b.id} were measured on different settings "
                            f"({setting_name(a.eval)} on {a.model}; {setting_name(b.eval)} on {b.model}): "
                            "nothing pairs, so each is shown against its own original")
    cols = [c for c in _verdicts().quality_columns(b.result) if c in _verdicts().quality_columns(a.result)]
    return [(c, *_verdicts().against(a.result, b.result, c)) for c in cols]


def same_setting(experiments: list[Experiment]) -> bool:
    """Whether every experiment was measured on one setting (model and evaluation spec)."""
    return len({_setting_key(e) for e in experiments}) <= 1


def quality_intervals(table, column: str) -> list:
    """The 95 % interval of every row's value of a quality or speed-ratio column (None where the
    table has none), from its ``… low`` / ``… high`` columns and, for a speed ratio, its verdict."""
    import math

    from moescope.analysis.evaluation.uncertainty import Interval

    def missing(v) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v))

    out = []
    low_c, high_c = f"{column} low", f"{column} high"
    noise_c = f"{column} noise"
    ranged = low_c in table.columns  # a measured quantity (else exact, e.g. a parameter ratio)
    for _, row in table.iterrows():
        value = row.get(column)
        if not isinstance(value, int | float) or missing(value):
            out.append(None)
            continue
        low, high = row.get(low_c), row.get(high_c)
        noise = row.get(noise_c)
        noise = noise if isinstance(noise, str) and noise else None
        if missing(low) or missing(high):
            low = high = value
            if ranged and noise is None:  # a measured value without a range cannot be called better
                noise = "no range measured"
        out.append(Interval(float(value), float(low), float(high), noise))
    return out


# exact quantities: counted, not measured, so the smallest is the smallest (no uncertainty to beat)
EXACT_COLUMNS = ("params ratio", "weight bytes ratio", "experts kept")


def best_marks(table, column: str, direction: str) -> set[int]:
    """Row positions of ``table`` (from :func:`compare`) whose ``column`` value is the best of the
    experiments measured against the same original. A quality column (perplexity, lm-eval score)
    is best only where it is better than every rival beyond their paired range (its ``… best``
    column, :func:`~moescope.analysis.run.verdicts.best_of`); an exact count (parameters, weight
    bytes) where it is strictly the smallest; a measured figure without a paired range (peak
    memory, speed) never. Originals are never marked."""
    from moescope.analysis.evaluation.uncertainty import best_beyond_noise

    if column not in table.columns:
        return set()
    flag = f"{column} best"
    if flag in table.columns:
        # True or numpy's True (a missing cell is NaN, which bool() would call true)
        return {i for i in range(len(table)) if table["experiment"].iloc[i] != "original"
                and str(table[flag].iloc[i]) == "True"}
    if column not in EXACT_COLUMNS:
        return set()
    intervals = quality_intervals(table, column)
    marked = set()
    for g in table["group"].unique():
        pos = [i for i in range(len(table)) if table["group"].iloc[i] == g and table["experiment"].iloc[i] != "original"]
        best = best_beyond_noise({i: intervals[i] for i in pos}, direction)
        if best is not None:
            marked.add(best)
    return marked


def noise_marks(table, column: str) -> set[int]:
    """Row positions whose ``column`` value cannot be told from its original's: a quality value whose
    paired range against its original covers no change (``… verdict`` is within noise), or a speed
    ratio within noise itself (measured on a busy machine, or a repeats' range covering 1.0×). A
    value that could not be paired gets no mark (nor any verdict)."""
    if column not in table.columns:
        return set()
    verdict_c = f"{column} verdict"
    if verdict_c in table.columns:
        return {i for i in range(len(table)) if table["experiment"].iloc[i] != "original"
                and table[verdict_c].iloc[i] == _verdicts().WITHIN}
    if not (column.endswith("ratio") or column.endswith("ratio (skip)")):
        return set()
    intervals = quality_intervals(table, column)
    return {i for i in range(len(table)) if table["experiment"].iloc[i] != "original"
            and intervals[i] is not None and intervals[i].noisy}


def display_names(experiments: list[Experiment]) -> dict[str, str]:
    """A short name per experiment for tables and chart legends: its label (the plan's name), with
    the id's first characters added where two experiments share a label."""
    counts: dict[str, int] = {}
    for exp in experiments:
        counts[exp.label] = counts.get(exp.label, 0) + 1
    return {exp.id: exp.label if counts[exp.label] == 1 else f"{exp.label} ({exp.id[:8]})" for exp in experiments}


def speed_text(verdict: dict | None) -> str:
    """A speed ratio as the CLI, the dashboard and the model card say it: ``1.20× (1.18–1.22×)``,
    or ``within noise: <why>``; empty without a figure."""
    if verdict is None:
        return ""
    if verdict["noise"]:
        return f"within noise: {verdict['noise']}"
    return f"{verdict['ratio']:.2f}× ({verdict['low']:.2f}–{verdict['high']:.2f}×)"


def _row(ident, label, structure, quality, reference, eff, ref_eff, ref_structure, name) -> dict:
    row = {"experiment": ident, "name": name, "label": label}
    experts = structure.get("experts") or {}
    if experts:  # one integer column per layer (a tidy table: no "8/7"-style mixed column)
        row["experts kept"] = int(sum(experts.values()))
        for layer in sorted(experts, key=int):
            row[f"experts L{layer}"] = int(experts[layer])
    params = (structure.get("params") or {}).get("total")
    row["params"] = params
    row["params ratio"] = _ratio(params, (ref_structure.get("params") or {}).get("total"))
    from moescope.analysis.evaluation.uncertainty import stderr_interval

    for src, value in quality.get("ppl", {}).items():
        row[f"ppl {src}"] = value
        domains = (quality.get("ppl_interval") or {}).get(src) or {}
        iv = domains.get("all") or (next(iter(domains.values())) if len(domains) == 1 else None)
        row[f"ppl {src} low"], row[f"ppl {src} high"] = (iv[0], iv[1]) if iv else (None, None)
        row[f"Δ% ppl {src}"] = 100 * (value / reference["ppl"][src] - 1) if src in reference.get("ppl", {}) else None
    for task, metrics in quality.get("tasks", {}).items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or metric == "samples":
                continue
            col = f"task: {task} {metric}"
            row[col] = value
            se = metrics.get(f"{metric}_stderr")
            iv = stderr_interval(value, se)
            row[f"{col} low"], row[f"{col} high"] = (iv.low, iv.high) if se is not None else (None, None)
            ref = reference.get("tasks", {}).get(task, {}).get(metric)
            row[f"Δ {task} {metric}"] = value - ref if isinstance(ref, int | float) else None
    plain, skip = eff.get("plain") or {}, eff.get("skip") or {}
    if plain:
        row["weight bytes ratio"] = _ratio(plain.get("weight_bytes"), ref_eff.get("weight_bytes"))
        row["peak memory ratio"] = _ratio(plain.get("peak_memory_bytes"), ref_eff.get("peak_memory_bytes"))
        row["prefill speed ratio"] = _ratio(plain.get("prefill_tokens_per_s"), ref_eff.get("prefill_tokens_per_s"))
        row["generate speed ratio"] = _ratio(plain.get("generate_tokens_per_s"), ref_eff.get("generate_tokens_per_s"))
        row["generate tok/s"] = plain.get("generate_tokens_per_s")
        from moescope.analysis.evaluation.efficiency import speed_verdict

        for what, key in (("prefill", "prefill_tokens_per_s"), ("generate", "generate_tokens_per_s")):
            v = speed_verdict(plain, ref_eff, key) if ident != "original" else None
            row[f"{what} speed"] = speed_text(v)
            if v is not None:
                row[f"{what} speed ratio low"], row[f"{what} speed ratio high"] = v["low"], v["high"]
                row[f"{what} speed ratio noise"] = v["noise"] or ""
    if skip:
        from moescope.analysis.evaluation.efficiency import speed_verdict

        row["generate speed ratio (skip)"] = _ratio(skip.get("generate_tokens_per_s"),
                                                    ref_eff.get("generate_tokens_per_s"))
        v = speed_verdict(skip, ref_eff, "generate_tokens_per_s") if ident != "original" else None
        if v is not None:
            row["generate speed ratio (skip) low"], row["generate speed ratio (skip) high"] = v["low"], v["high"]
            row["generate speed ratio (skip) noise"] = v["noise"] or ""
        # share of the (token, selected expert) calls that dynamic skipping left out while generating
        row["skipped expert calls"] = skip.get("skipped_fraction")
    return row
