"""The dashboard's only door to :mod:`analysis`: cached wrappers returning plain data.

The on-disk cache (:mod:`analysis.cache`, shared with the CLI) stays the source of truth; these
wrappers only keep what was read in memory. ``st.cache_resource`` holds the objects that must not
be copied (the loaded model, token batches, stored analyses, traces, grids: read-only, never
mutated); ``st.cache_data`` holds the small arrays and tables pages draw. ``find_*`` never computes
(a page can ask on every view); ``compute_*`` runs the analysis call the CLI runs, with a
``progress(stage, done, total)`` callback.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st
from moescope.analysis.core import defaults as D
from moescope.analysis.core.cache import Cache, default_cache_root
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.measure.analyze import (
    SIMILARITY_NAMES,
    WEIGHT_SIMILARITY_NAMES,
    AnalysisParams,
    lookup_analysis,
    run_analysis,
)
from moescope.analysis.measure.criteria import CRITERIA, canonical_name
from moescope.analysis.measure.explore import (
    cluster_order,
    criterion_grid_correlation,
    drop_ranks,
    is_distance,
    lookup_routing_trace,
    routing_trace,
    skip_ratios,
    token_examples,
    top_pairs,
    top_tokens,
)
from moescope.analysis.measure.explore import (
    pairs_beyond as explore_pairs_beyond,
)
from moescope.analysis.measure.explore import (
    similarity_bounds as explore_similarity_bounds,
)
from moescope.analysis.measure.sensitivity import cached_drop_grid, lookup_drop_grid
from moescope.analysis.model import load_moe
from moescope.analysis.model.skipping import calibrate
from moescope.analysis.pruning.plan import PruningPlan, edit_layer, unused_kept_note
from moescope.analysis.strategies import STRATEGIES, StrategyContext, get_strategy, make_plan
from moescope.analysis.strategies.criterion import criterion_scores
from moescope.analysis.strategies.grid import grid_scores
from moescope.analysis.strategies.merge import REPRESENTATIONS, similarity_name
from moescope.analysis.strategies.presets import PRESETS, get_preset
from moescope.analysis.strategies.selection import even_out, uniform_count

__all__ = ["CRITERIA", "PRESETS", "REPRESENTATIONS", "STRATEGIES", "SIMILARITY_NAMES", "WEIGHT_SIMILARITY_NAMES", "MoescopeError", "PruningPlan",
           "is_distance", "similarity_name", "unused_kept_note"]


@dataclass(frozen=True)
class Settings:
    """What every page's results depend on (session-state keys of the same names)."""

    model: str = "demo"
    calib_source: str = D.CALIB_SOURCE  # the CLI's defaults (analysis.core.defaults): one setting everywhere
    calib_samples: int = D.CALIB_SAMPLES
    calib_seq_len: int = D.CALIB_SEQ_LEN
    seed: int = 0
    eval_source: str = D.EVAL_SOURCE
    grid_samples: int = D.GRID_SAMPLES
    grid_seq_len: int = D.GRID_SEQ_LEN
    cache_root: str = ""

    @classmethod
    def defaults(cls) -> dict:
        """The settings' session-state keys and their defaults (the entry point sets them)."""
        return {f: getattr(cls, f) for f in cls.__dataclass_fields__ if f != "cache_root"}

    @classmethod
    def from_state(cls, state) -> Settings:
        names = [f for f in cls.__dataclass_fields__ if f != "cache_root"]
        values = {n: state[n] for n in names if n in state}
        for n in names:
            if n in values and isinstance(getattr(cls, n), int):
                values[n] = int(values[n])
        return cls(**values, cache_root=str(default_cache_root()))

    def cache(self) -> Cache:
        return Cache(self.cache_root)


# ---------------------------------------------------------------- model and data


TRUST_REMOTE_CODE = False  # set by app.py from `moescope dashboard --trust-remote-code`, fixed per server


@st.cache_data(show_spinner="Reading the model's structure…")
def model_info(source: str) -> dict:
    """``moescope info`` facts for ``source`` (config only, no weights)."""
    return load_moe(source, dtype=None, weights=False, trust_remote_code=TRUST_REMOTE_CODE).info()


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def load_model(source: str):
    """The model with its weights (float32). Shared by every session: never edit it."""
    return load_moe(source, trust_remote_code=TRUST_REMOTE_CODE)


@st.cache_resource(show_spinner="Sampling tokens…", max_entries=16)
def token_batch(model: str, source: str, samples: int, seq_len: int, seed: int, split: str):
    from moescope.analysis.data import sample_tokens

    m = load_model(model)
    if m.tokenizer is None:
        raise MoescopeError(f"'{model}' has no tokenizer files; add them to the model folder (the dashboard needs "
                            "a tokenizer to sample calibration text)")
    return sample_tokens(source, m.tokenizer, samples, seq_len, seed=seed, sampling="random", split=split)


def calib_batch(s: Settings):
    """The calibration batch ``moescope analyze`` samples for the same settings."""
    return token_batch(s.model, s.calib_source, s.calib_samples, s.calib_seq_len, s.seed, "validation")


def eval_batch(s: Settings):
    """The evaluation batch ``moescope grid`` samples for the same settings."""
    return token_batch(s.model, s.eval_source, s.grid_samples, s.grid_seq_len, s.seed, "test")


def describe_batch(s: Settings, which: str = "calib") -> str:
    return (calib_batch(s) if which == "calib" else eval_batch(s)).describe()


# ---------------------------------------------------------------- stored results


class _Missing(Exception):
    """Not computed yet (raised so that st.cache_resource keeps only hits)."""


# what each stored result is looked up by (the CLI's call with the same settings computes it)
_LOOKUPS = {
    "analysis": lambda s: lookup_analysis(load_model(s.model), calib_batch(s), AnalysisParams(), s.cache()),
    "trace": lambda s: lookup_routing_trace(load_model(s.model), calib_batch(s), s.cache()),
    "grid": lambda s: lookup_drop_grid(load_model(s.model), eval_batch(s), s.cache()),
}


@st.cache_resource(show_spinner=False, max_entries=24)
def _stored(what: str, s: Settings):
    found = _LOOKUPS[what](s)
    if found is None:
        raise _Missing
    return found


def _find(what: str, s: Settings):
    try:
        return _stored(what, s)
    except _Missing:
        return None


def find_analysis(s: Settings):
    """The stored analysis for these settings, or None."""
    return _find("analysis", s)


def find_trace(s: Settings):
    """The stored routing trace for these settings, or None."""
    return _find("trace", s)


def find_grid(s: Settings):
    """The stored drop grid for these settings, or None."""
    return _find("grid", s)


@st.cache_data(show_spinner=False, max_entries=32)
def analysis_cost(model: str, samples: int, seq_len: int) -> dict:
    """What the analysis :func:`compute_analysis` runs is predicted to hold in memory and to take on
    this machine (:func:`moescope.analysis.measure.cost.analysis_cost`: from the config alone, no
    weight read; the speed calibrated once per process)."""
    import torch
    from moescope.analysis.measure.cost import analysis_cost as cost

    skeleton = load_moe(model, weights=False, trust_remote_code=TRUST_REMOTE_CODE)
    return cost(skeleton, AnalysisParams(), samples, seq_len, torch.float32)


def compute_analysis(s: Settings, progress=None):
    """Run (or reuse) the analysis ``moescope analyze`` runs, then the routing trace."""
    model, batch = load_model(s.model), calib_batch(s)
    res = run_analysis(model, batch, AnalysisParams(), cache=s.cache(), progress=progress)
    routing_trace(model, batch, cache=s.cache(), progress=progress)
    return res


def compute_trace(s: Settings, progress=None):
    return routing_trace(load_model(s.model), calib_batch(s), cache=s.cache(), progress=progress)


def compute_grid(s: Settings, progress=None):
    """The single-expert-drop grid ``moescope grid`` computes (cached)."""
    return cached_drop_grid(load_model(s.model), eval_batch(s), s.cache(), progress=progress)


def cached_analyses(root: str) -> pd.DataFrame:
    """Every stored analysis under the cache ``root`` (newest first)."""
    rows = [{"label": e.label, "model": e.model_source, "data": e.data, "created (UTC)": e.created[:19].replace("T", " "),
             "compute s": e.elapsed_s, "size KiB": round(e.size / 1024, 1), "key": e.key[:12]}
            for e in Cache(root).entries(kind="analysis")]
    return pd.DataFrame(rows[::-1], columns=["label", "model", "data", "created (UTC)", "compute s", "size KiB", "key"])


# ---------------------------------------------------------------- what pages draw (need a stored analysis)


def _analysis(s: Settings):
    res = find_analysis(s)
    if res is None:
        raise MoescopeError("no analysis for these settings yet; run it on the Model & data page")
    return res


@st.cache_data(show_spinner=False, max_entries=64)
def analysis_overview(s: Settings) -> dict:
    res = _analysis(s)
    return {
        "layers": res.layers,
        "num_experts": {l: res.num_experts(l) for l in res.layers},
        "top_k": {l: int(res.meta["layers"][str(l)]["top_k"]) for l in res.layers},
        "similarities": res.similarity_names(),
        "criteria": res.criteria_names(),
        "data": res.meta["data"],
        "elapsed_s": res.meta.get("elapsed_s"),
        "path": str(res.entry.path),
    }


@st.cache_data(show_spinner=False, max_entries=64)
def analysis_summary(s: Settings) -> pd.DataFrame:
    rows = []
    for l, r in _analysis(s).summary().items():
        pair = r.get("most_similar_pair")
        rows.append({"layer": int(l), "experts": r["num_experts"],
                     "most similar pair": f"{pair['experts'][0]}–{pair['experts'][1]}" if pair else "",
                     "CKA": pair["value"] if pair else None,
                     "least used": r["least_used_expert"]["expert"],
                     "its usage": r["least_used_expert"]["usage"],
                     "β": r["beta"], "balance": r["balance_entropy"]})
    return pd.DataFrame(rows)


@st.cache_data(show_spinner=False, max_entries=64)
def similarity_matrices(s: Settings, name: str) -> dict[int, np.ndarray]:
    res = _analysis(s)
    return {l: res.similarity(l, name).numpy() for l in res.layers}


# the words the pages show for option values (the Similarity page and the Plan page use the same),
# by the parameter they belong to
FRIENDLY = {
    "representation": {"outputs": "Data-centric: expert outputs",
                       "weights": "Model-centric: weights concat(W_gate, W_up, W_down)",
                       "surrogate": "Model-centric: surrogate W_down·(W_gate ⊙ W_up)",
                       "mean_output": "HC-SMoE: mean output over all tokens"},
    "similarity": {"cka_linear": "CKA (linear)", "cka_rbf": "CKA (RBF)",
                   "cka_rbf_minibatch": "CKA (RBF, mini-batch mean)", "cosine": "cosine", "mse": "MSE",
                   "euclidean": "Euclidean distance", "mean_output_euclidean": "mean outputs: Euclidean",
                   "weight_cosine": "weights: cosine", "weight_mse": "weights: MSE",
                   "surrogate_cosine": "surrogate: cosine", "surrogate_mse": "surrogate: MSE"},
    "grouping": {"spectral": "spectral clustering", "spectral_discretize": "spectral clustering (discretize labels)",
                 "greedy": "greedy (most alike first)",
                 "agglomerative": "agglomerative (average linkage)"},
    "mode": {"layer-wise": "layer-wise (original inputs)", "progressive": "progressive (through the pruned layers)",
             "one-shot": "one-shot", "iterative": "iterative (re-estimated each round)"},
    "method": {"auto": "auto (exact when small)", "exact": "exact (every subset)", "greedy": "greedy",
               "beam": "beam search"},
    "order": {"min": "drop the smallest", "max": "drop the largest"},
    "merge": {"max": "max (the most-used member)", "uniform": "uniform average", "usage": "usage-weighted",
              "frequency": "frequency-weighted (= usage)", "learned": "learned (fitted to the layer output)",
              "ties": "TIES (sign consensus)"},
    "align": {"none": "none", "weights": "weight matching", "activations": "activation matching",
              "routed-activations": "activation matching on routed tokens (MC-SMoE)"},
    "allocation": {"distinctness": "same count per layer (budget: by distinctness)",
                   "usage-threshold": "global usage threshold (MC-SMoE's Mixtral script)"},
    "objective": {"eq3": "one norm over all tokens (eq. 3)", "per-batch": "sum of per-batch norms (authors' code)"},
    "augment": {"none": "none", "embeddings": "mixup of token embeddings (Algorithm 1)",
                "hidden_states": "mix each layer's inputs"},
    "router_similarity": {"cosine": "cosine of raw router logits (MC-SMoE)",
                          "correlation": "correlation of router logits"},
}


def friendly(value, param: str | None = None) -> str:
    """The label a page shows for ``value`` of ``param`` (the value itself where none is declared)."""
    return FRIENDLY.get(param or "", {}).get(value, str(value)) if isinstance(value, str) else str(value)


def similarity_bounds(name: str) -> tuple[float, float] | None:
    return explore_similarity_bounds(name)


@st.cache_data(show_spinner=False, max_entries=256)
def pairs_beyond(s: Settings, name: str, layer: int, threshold: float) -> list[tuple[int, int]]:
    return explore_pairs_beyond(_analysis(s).similarity(layer, name), threshold, higher_is_similar=not is_distance(name))


@st.cache_data(show_spinner=False, max_entries=64)
def similarity_order(s: Settings, name: str, layer: int) -> list[int]:
    """Experts of ``layer`` ordered so that alike ones sit together (hierarchical clustering)."""
    return cluster_order(_analysis(s).similarity(layer, name), higher_is_similar=not is_distance(name))


@st.cache_data(show_spinner=False, max_entries=64)
def similar_pairs(s: Settings, name: str, layer: int, n: int = 5) -> pd.DataFrame:
    S = _analysis(s).similarity(layer, name)
    pairs = top_pairs(S, n, higher_is_similar=not is_distance(name))
    return pd.DataFrame([{"experts": f"{p['experts'][0]}–{p['experts'][1]}", name: p["value"]} for p in pairs])


@st.cache_data(show_spinner=False, max_entries=64)
def layer_map(s: Settings, name: str, group: str = "crit") -> np.ndarray:
    """``[layers, max E]`` criterion (``group="crit"``) or routing vector (``"routing"``)."""
    return _analysis(s).layer_map(name, group).numpy()


@st.cache_data(show_spinner=False, max_entries=64)
def routing_matrix(s: Settings, layer: int, name: str) -> np.ndarray:
    return _analysis(s).routing(layer, name).numpy()


@st.cache_data(show_spinner=False, max_entries=64)
def layer_scalars(s: Settings) -> pd.DataFrame:
    res = _analysis(s)
    return pd.DataFrame([{"layer": l, **res.scalars(l)} for l in res.layers])


@st.cache_data(show_spinner=False, max_entries=64)
def criterion_drop_ranks(s: Settings, name: str, order: str) -> np.ndarray:
    return drop_ranks(_analysis(s), name, order).numpy()


def _trace(s: Settings):
    trace = find_trace(s)
    if trace is None:
        raise MoescopeError("no routing trace for these settings yet")
    return trace


@st.cache_data(show_spinner=False, max_entries=128)
def expert_tokens(s: Settings, layer: int, expert: int, n: int = 12) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(examples routed to the expert, most frequent tokens routed to it)."""
    tok = load_model(s.model).tokenizer
    trace = _trace(s)
    ex = pd.DataFrame(token_examples(trace, tok, layer, expert, n=n),
                      columns=["sequence", "position", "before", "token", "after", "weight", "choice"])
    top = pd.DataFrame(top_tokens(trace, tok, layer, expert, n=15), columns=["token", "count", "share"])
    ex["before"], ex["after"] = ex["before"].map(_one_line), ex["after"].map(_one_line)
    ex["token"], top["token"] = ex["token"].map(_visible_token), top["token"].map(_visible_token)
    return ex, top


def _one_line(text: str) -> str:
    return text.replace("\n", "⏎").replace("\t", "⇥")


def _visible_token(token: str) -> str:
    """A token with its leading / trailing spaces shown as ``·`` (a table cell would hide them)."""
    core = token.strip(" ")
    lead, trail = len(token) - len(token.lstrip(" ")), len(token) - len(token.rstrip(" "))
    return _one_line("·" * lead + core + ("·" * trail if core else ""))


@st.cache_data(show_spinner=False, max_entries=64)
def skip_table(s: Settings, beta: float | None = None) -> pd.DataFrame:
    """Per layer: β (calibrated, or ``beta`` for every layer) and the fractions that would skip."""
    betas = calibrate(_analysis(s))
    if beta is not None:
        betas = {l: float(beta) for l in betas}
    rows = skip_ratios(_trace(s), betas)
    return pd.DataFrame([{"layer": l, "β": r["beta"], "tokens skipping an expert": r["tokens"],
                          "expert calls skipped": r["calls"]} for l, r in rows.items()])


def grid_delta(s: Settings) -> dict | None:
    """The stored drop grid as arrays (Δ and perplexity per layer × expert), or None."""
    return None if find_grid(s) is None else _grid_delta(s)


@st.cache_data(show_spinner=False, max_entries=64)
def _grid_delta(s: Settings) -> dict:
    grid = _stored("grid", s)
    return {"baseline": grid.baseline, "layers": grid.layers, "delta": np.array(grid.delta()),
            "ppl": np.array(grid.ppl), "data": describe_batch(s, "eval")}


def grid_correlation(s: Settings, criterion: str) -> dict[int, float] | None:
    """Spearman ρ per layer between ``criterion`` and the drop grid, or None without a stored grid."""
    return None if find_grid(s) is None else _grid_correlation(s, criterion)


@st.cache_data(show_spinner=False, max_entries=64)
def _grid_correlation(s: Settings, criterion: str) -> dict[int, float]:
    return criterion_grid_correlation(_analysis(s), _stored("grid", s), criterion)


# ---------------------------------------------------------------- plans


def model_layers(s: Settings) -> dict[int, tuple[int, int]]:
    """MoE layer → (experts, top-k) of the model (from its config)."""
    info = model_info(s.model)
    return {int(l): (int(n), int(info["top_k"])) for l, n in info["num_experts"].items()}


def validate_plan(s: Settings, plan: PruningPlan) -> PruningPlan:
    """``plan`` checked against the model (raises :class:`MoescopeError` with the one-line reason)."""
    checked = PruningPlan.from_json(plan.to_json())
    checked.validate_for(load_model(s.model))
    return checked


def parse_plan(s: Settings, text: str | bytes, where: str = "uploaded plan") -> PruningPlan:
    import json

    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoescopeError(f"{where} is not valid JSON ({err})") from None
    return PruningPlan.from_json(data, where=where)


def edit_plan_layer(plan: PruningPlan, layer: int, num_experts: int, drop, merge) -> PruningPlan:
    return edit_layer(plan, layer, num_experts, drop, merge)


def empty_plan(s: Settings) -> PruningPlan:
    return PruningPlan(s.model, {}, provenance={"strategy": "manual"})


def run_strategy(s: Settings, name: str, params: dict, progress=None, preset: str | None = None) -> PruningPlan:
    """``moescope plan --strategy NAME`` on the calibration batch of these settings (reusing the
    stored analyses). A strategy that edits the model while it runs gets its own copy of the
    shared model. ``preset``: the preset the parameters started from (recorded in the provenance)."""
    strategy = get_strategy(name)
    model = load_model(s.model)
    if strategy.edits(params):
        model = copy.deepcopy(model)
    batch = calib_batch(s) if strategy.needs_data else None
    plan = make_plan(name, StrategyContext(model, batch, s.cache(), progress=progress), params)
    if preset is not None and get_preset(preset).strategy == name:
        plan.provenance["preset"] = preset
    return plan


def preset_widgets(name: str) -> tuple[str, dict]:
    """(the strategy, its parameter values) of preset ``name``: what choosing it on the Plan page
    puts in the strategy's widgets (the page keeps every value editable)."""
    p = get_preset(name)
    return p.strategy, dict(p.params)


def set_drops(plan: PruningPlan, cells, layers: dict[int, tuple[int, int]], drop: bool = True) -> PruningPlan:
    """``plan`` with the (layer, expert) ``cells`` dropped (``drop``) or kept again, layer by layer
    through :func:`analysis.plan.edit_layer` (merged groups stay as they are)."""
    by_layer: dict[int, set[int]] = {}
    for l, e in cells:
        by_layer.setdefault(int(l), set()).add(int(e))
    for l, experts in sorted(by_layer.items()):
        if l not in layers:
            raise MoescopeError(f"layer {l} is not an MoE layer (MoE layers: {sorted(layers)})")
        E = layers[l][0]
        groups = plan.layers[l].groups if l in plan.layers else [[e] for e in range(E)]
        kept = {e for g in groups for e in g}
        dropped = {e for e in range(E) if e not in kept}
        dropped = dropped | experts if drop else dropped - experts
        plan = edit_layer(plan, l, E, sorted(dropped), [g for g in groups if len(g) > 1])
    return plan


def plan_table(plan: PruningPlan, layers: dict[int, tuple[int, int]]) -> pd.DataFrame:
    """One row per MoE layer the plan changes: experts before / after, dropped, merged groups."""
    rows = []
    for l, lp in sorted(plan.layers.items()):
        E = layers.get(l, (None, None))[0]
        kept = {e for g in lp.groups for e in g}
        coeffs = lp.resolved_coefficients()
        merged = [f"{'+'.join(map(str, g))}" + ("" if lp.coefficients is None else
                                              f" ({'/'.join(f'{w:.2f}' for w in c)})")
                  for g, c in zip(lp.groups, coeffs) if len(g) > 1]
        rows.append({"layer": l, "experts": E, "after": lp.num_out,
                     "dropped": ", ".join(str(e) for e in range(E or 0) if e not in kept),
                     "merged": "; ".join(merged)})
    return pd.DataFrame(rows, columns=["layer", "experts", "after", "dropped", "merged"])


def plan_counts(s: Settings, plan: PruningPlan) -> dict[int, int]:
    """Output experts per MoE layer once ``plan`` is applied (every layer, changed or not)."""
    return plan.experts_after(load_model(s.model))


def export_form(s: Settings, counts: dict[int, int]) -> str:
    """How a plan with these counts exports: the family's plain class, or per-layer counts."""
    arch = (model_info(s.model).get("architectures") or ["the family's"])[0]
    if len(set(counts.values())) <= 1:
        return f"Exports to the plain {arch} class ({next(iter(counts.values()), 0)} experts in every layer)."
    return (f"Different counts per layer: the export carries them in its config with a small modelling module "
            f"(a {arch} built layer by layer), so loading it needs trust_remote_code=True; moescope loads it "
            "without. Even it out for a plain-class folder.")


GRID_SCORES = "drop grid"


def even_out_sources(s: Settings) -> list[str]:
    """What can say which experts matter: the stored drop grid (if any), then the criteria (with a
    stored analysis)."""
    return ([GRID_SCORES] if find_grid(s) is not None else []) + (list(CRITERIA) if find_analysis(s) else [])


def default_even_count(s: Settings, counts: dict[int, int]) -> int:
    return uniform_count(load_model(s.model), counts)


def even_out_plan(s: Settings, plan: PruningPlan, by: str, count: int | None = None) -> PruningPlan:
    """``plan`` made uniform (:func:`analysis.strategies.selection.even_out`), the experts that
    matter least by ``by`` (the stored drop grid: its perplexity when dropped; or a criterion at
    its own drop end) dropped first and those that matter most added back first."""
    if by == GRID_SCORES:
        grid = find_grid(s)
        if grid is None:
            raise MoescopeError("no drop grid for these settings yet; compute it on the Drop grid page")
        scores = grid_scores(grid)
    else:
        c = CRITERIA.get(canonical_name(by))
        if c is None:
            raise MoescopeError(f"unknown criterion '{by}'; accepted: {GRID_SCORES}, {', '.join(CRITERIA)}")
        scores = criterion_scores(_analysis(s), c.name, c.drop)
        by = f"{c.drop}-{c.name}"
    return even_out(plan, load_model(s.model), scores, count, by=by)
