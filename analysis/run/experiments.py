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
    prov = plan.provenance or {}
    name = prov.get("strategy", "plan")
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
                   trust_remote_code: bool = False, allow_pickle: bool = False) -> Experiment:
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
                              allow_pickle=allow_pickle)


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
                       allow_pickle: bool = False) -> Experiment:
    """Evaluate ``model`` (the original, as loaded from ``model.source``), prune it in place by
    ``plan``, evaluate the result, measure efficiency of both (each in a fresh process), and store
    the experiment. ``model`` is left pruned (the caller may export it). ``store=False`` leaves
    the storing to the caller (:func:`store`), e.g. after the export it belongs to is complete,
    so a run killed mid-export leaves no record."""
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.evaluation import EvalSpec, evaluate_quality, isolated_efficiency
    from moescope.analysis.evaluation.efficiency import measurement_slot
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
        with measurement_slot(str(cache.root), progress):
            if progress:
                progress("efficiency", 0, 1)
            flags = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
            efficiency["original"] = isolated_efficiency(source, None, p, betas_original, dtype, device, **flags)
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
        versions=software_versions(), finetuned=finetuned,
    )
    if store:
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
    from moescope.analysis.model import load_moe

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
    )


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


def compare(experiments: list[Experiment]):
    """One table, a row per experiment plus the original as the reference row (one per distinct
    base model and evaluation), columns: quality per source/task with the change against that
    original, parameter, weight-byte and peak-memory ratios, prefill and generation speed ratios
    (plain and with dynamic skipping)."""
    import pandas as pd

    if not experiments:
        raise MoescopeError("nothing to compare: give at least one experiment id")
    names = display_names(experiments)
    rows = []
    seen_refs = set()
    for exp in experiments:
        ref_key = (exp.model_fingerprint, repr(sorted(exp.eval.items())))
        eff = exp.efficiency or {}
        ref_eff = (eff.get("original") or {}).get("plain") or {}
        if ref_key not in seen_refs:
            seen_refs.add(ref_key)
            rows.append(_row("original", exp.model, exp.structure.get("before", {}), exp.reference, exp.reference,
                             eff.get("original") or {}, ref_eff, exp.structure.get("before", {}),
                             "original" if len(seen_refs) == 1 else f"original {exp.model}"))
        rows.append(_row(exp.id, exp.label, exp.structure.get("after", {}), exp.result, exp.reference,
                         eff.get("pruned") or {}, ref_eff, exp.structure.get("before", {}), names[exp.id]))
    return pd.DataFrame(rows)


def display_names(experiments: list[Experiment]) -> dict[str, str]:
    """A short name per experiment for tables and chart legends: its label (the plan's name), with
    the id's first characters added where two experiments share a label."""
    counts: dict[str, int] = {}
    for exp in experiments:
        counts[exp.label] = counts.get(exp.label, 0) + 1
    return {exp.id: exp.label if counts[exp.label] == 1 else f"{exp.label} ({exp.id[:8]})" for exp in experiments}


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
    for src, value in quality.get("ppl", {}).items():
        row[f"ppl {src}"] = value
        row[f"Δ% ppl {src}"] = 100 * (value / reference["ppl"][src] - 1) if src in reference.get("ppl", {}) else None
    for task, metrics in quality.get("tasks", {}).items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or metric == "samples":
                continue
            row[f"{task} {metric}"] = value
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
            row[f"{what} speed"] = ("" if v is None else f"within noise: {v['noise']}" if v["noise"] else
                                    f"{v['ratio']:.2f}× ({v['low']:.2f}–{v['high']:.2f}×)")
    if skip:
        row["generate speed ratio (skip)"] = _ratio(skip.get("generate_tokens_per_s"),
                                                    ref_eff.get("generate_tokens_per_s"))
        row["skipped fraction"] = skip.get("skipped_fraction")
    return row
