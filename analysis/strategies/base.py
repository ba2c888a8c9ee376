"""The strategy registry: each strategy declares its parameters once, and everything else — the CLI
flags and ``--param`` validation, the dashboard's Plan page widgets, ``moescope strategies`` —
is generated from that declaration.

A strategy is a function ``run(ctx, params) -> PruningPlan`` registered with :func:`register`.
``params`` arrive validated (:meth:`Strategy.validate`): known names only, coerced types, allowed
values, defaults filled in, and the target (``keep`` experts per layer or a global ``budget``)
checked against the model's structure — which a config alone gives, so a command refuses a bad
request before any weights are read. ``ctx`` carries the model, the calibration batch and the
cache (so analyses are reused). The model itself is never left edited: strategies that must look
at a pruned model edit it temporarily and restore it (they declare ``edits_model`` so that a
caller sharing the model between threads can hand them a copy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from moescope.analysis.core.errors import MoescopeError, unknown_name
from moescope.analysis.measure.analyze import AnalysisParams, run_analysis
from moescope.analysis.pruning.plan import UNUSED_KEY, PruningPlan, unused_kept
from moescope.analysis.strategies.selection import keep_counts

Progress = Callable[[str, int, int], None]
TYPES = {int: "int", float: "float", str: "str", bool: "bool", dict: "json"}


@dataclass(frozen=True)
class Param:
    """One strategy parameter: its name, type (int, float, str, bool or dict), default, allowed
    values (a tuple, or a function of the other parameters giving one), help, and how the CLI
    parses it from text (``parse``; default: the type).

    ``affects_key``: whether the parameter is an input of what the strategy stores in the cache (a
    drop grid's windows, a lottery's finetuned weights), so that changing it must change the keys
    of the entries the strategy reads. ``False`` declares that it acts only on measurements already
    read (an order, a seed, a keep count). ``tests/test_strategy_keys.py`` checks every registered
    strategy both ways: a parameter declared as affecting the key changes the keys read, and for
    every parameter a plan made with a cache warmed by another value equals one made cold."""

    name: str
    type: type = str
    default: object = None
    choices: tuple | Callable[[dict], tuple] | None = None
    help: str = ""
    parse: Callable[[str], object] | None = None
    normalize: Callable[[object], object] | None = None  # e.g. str.upper for criterion names
    minimum: float | None = None
    label: str | None = None  # the dashboard's label (default: the name)
    maximum: float | None = None
    affects_key: bool = True
    # where the parameter acts at all, given the others (e.g. TIES density only for merge=ties): the
    # Plan page shows its widget only then; the CLI and validation take it always
    when: Callable[[dict], bool] | None = None

    def allowed(self, params: dict) -> tuple | None:
        return self.choices(params) if callable(self.choices) else self.choices

    def coerce(self, value, strategy: str):
        """``value`` as this parameter's type, or a one-line error quoting it. Validated by type, here
        for every strategy: a float must be finite (no NaN or infinity), any number within the
        declared ``minimum``/``maximum``, an int within what a float can hold."""
        t = self.type
        ok = (isinstance(value, bool) if t is bool else
              isinstance(value, int) and not isinstance(value, bool) if t is int else
              isinstance(value, int | float) and not isinstance(value, bool) if t is float else
              isinstance(value, t))
        if not ok:
            raise MoescopeError(f"{strategy}: parameter {self.name} must be {TYPES.get(t, t.__name__)}, got {value!r}")
        if t in (int, float):
            try:
                finite = math.isfinite(value)  # an int too large for a float overflows here
            except OverflowError:
                finite = False
            if not finite:
                shown = value if t is float else f"an integer of {len(str(abs(value)))} digits"
                raise MoescopeError(f"{strategy}: parameter {self.name} must be a finite number, got {shown}")
        value = float(value) if t is float else value
        if self.normalize is not None:
            value = self.normalize(value)
        if self.minimum is not None and value < self.minimum:
            raise MoescopeError(f"{strategy}: parameter {self.name} must be at least {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise MoescopeError(f"{strategy}: parameter {self.name} must be at most {self.maximum:g}, got {value!r}")
        return value

    def to_json(self, params: dict | None = None) -> dict:
        choices = self.allowed(params or {}) if not callable(self.choices) or params is not None else None
        return {"name": self.name, "type": TYPES.get(self.type, self.type.__name__), "default": self.default,
                "choices": list(choices) if choices is not None else None, "help": self.help}


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its function and its declaration."""

    name: str
    run: Callable
    help: str
    params: tuple[Param, ...] = ()
    target: bool = True  # takes keep (experts per layer) or budget
    budget: bool = False  # supports a global budget (else keep only)
    needs_data: bool = True  # reads calibration data
    merges: bool = False  # may merge experts (else only drops)
    manual: bool = False  # parameters a person gives by hand (no dashboard widgets)
    with_skip: bool = True  # accepts with_skip (prune, and also skip dynamically)
    check: Callable[[dict, object], None] | None = None  # cross-parameter checks against the model
    edits_model: Callable[[dict], bool] = field(default=lambda params: False)

    def edits(self, params: dict) -> bool:
        """Whether making a plan edits the model for a while (restored after): the strategy's own
        edits, or dynamic skipping's β measured on the pruned model (:func:`pruned_beta`)."""
        return bool(self.edits_model(params) or params.get("with_skip"))

    def all_params(self) -> tuple[Param, ...]:
        """The declared parameters plus the common ones (target and ``with_skip``)."""
        common = []
        if self.target:
            common.append(Param("keep", int, None, help="experts to keep in every MoE layer", minimum=1,
                                affects_key=False))
            if self.budget:
                common.append(Param("budget", int, None, help="experts to keep in all MoE layers together",
                                    minimum=1, affects_key=False))
        if self.with_skip:
            common.append(Param("with_skip", bool, False, help="also skip dynamically (β calibrated per layer; needs top-k ≥ 2)",
                                 affects_key=False))
        return tuple(common) + self.params

    def validate(self, params: dict, model) -> tuple[dict, dict]:
        """Check ``params`` against the declaration and ``model`` (a loaded model or one built from
        its config alone). Returns (the given parameters, coerced; every parameter with defaults)."""
        declared = {p.name: p for p in self.all_params()}
        given = {}
        for key, value in params.items():
            if key not in declared:
                if key == "budget" and self.target:
                    raise MoescopeError(f"{self.name} needs a uniform target: give keep (experts per layer), "
                                        "not budget")
                raise unknown_name(f"parameter of strategy '{self.name}'", key, declared)
            given[key] = declared[key].coerce(value, self.name) if value is not None else None
        full = {p.name: p.default for p in declared.values()} | {k: v for k, v in given.items() if v is not None}
        if self.check is not None:  # cross-parameter checks first: their messages say more
            self.check(full, model)
        if full.get("with_skip"):
            from moescope.analysis.model.skipping import refuse_top1

            for l, view in model.layers.items():
                refuse_top1(view.top_k, f"{self.name} with_skip: layer {l}")
        for p in declared.values():
            allowed = p.allowed(full)
            if allowed is not None and full.get(p.name) is not None and full[p.name] not in allowed:
                raise _bad_choice(self.name, p, full[p.name], allowed)
        if self.target:
            keep_counts(model, full)
        return {k: v for k, v in given.items() if v is not None}, full

    def describe(self) -> dict:
        """The declaration as JSON (``moescope strategies --json``)."""
        return {"name": self.name, "help": self.help, "needs_data": self.needs_data, "merges": self.merges,
                "budget": self.budget, "target": self.target, "params": [p.to_json() for p in self.all_params()]}


def _bad_choice(strategy: str, p: Param, value, allowed) -> MoescopeError:
    if len(allowed) == 2:
        return MoescopeError(f"{strategy}: {p.name} must be {allowed[0]} or {allowed[1]}, got {value!r}")
    return unknown_name(p.name, str(value), [str(a) for a in allowed])


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, help: str, params: tuple[Param, ...] | list[Param] = (), **flags):
    """Register the decorated ``run(ctx, params) -> PruningPlan`` as strategy ``name``; ``flags``
    are the other :class:`Strategy` fields (target, budget, needs_data, merges, check, edits_model)."""

    def deco(fn):
        STRATEGIES[name] = Strategy(name, fn, help, tuple(params), **flags)
        return fn

    return deco


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise unknown_name("strategy", name, STRATEGIES) from None


@dataclass
class StrategyContext:
    model: object  # MoEModel
    calib: object  # TokenBatch
    cache: object = None  # Cache
    analysis_params: AnalysisParams | None = None
    progress: Progress | None = None
    given: dict = field(default_factory=dict)  # the parameters as the caller gave them (for provenance)

    def analysis(self, metrics=("routing", "activations", "weights", "similarity"), **overrides):
        """The cached analysis of the context's model and data for ``metrics`` (``overrides``: other
        :class:`AnalysisParams` fields a strategy's own parameters set, e.g. augmentation)."""
        params = self.analysis_params or AnalysisParams()
        params = AnalysisParams(**{**params.key(), **overrides, "metrics": tuple(metrics)})
        return run_analysis(self.model, self.calib, params, cache=self.cache, progress=self.progress)

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(stage, done, total)

    def provenance(self, name: str, **extra_params) -> dict:
        """Where a plan came from: the strategy label, the parameters given, the data and model."""
        calib = self.calib
        return {"strategy": name, "params": {**extra_params, **self.given},
                "data": calib.fingerprint if calib is not None else None,
                "data_description": calib.describe() if calib is not None else None,
                "model_fingerprint": self.model.fingerprint()}

    def plan_from_keep(self, keep: dict[int, list[int]], name: str) -> PruningPlan:
        return PruningPlan.from_keep(self.model.source, keep, provenance=self.provenance(name))


def validate_request(name: str, params: dict, model) -> dict:
    """The one check of a strategy request before any work: the strategy exists, its parameters
    are known, typed and allowed, and its target fits ``model`` (which may be built from the config
    alone). Returns the given parameters, coerced."""
    return get_strategy(name).validate(params, model)[0]


def pruned_beta(ctx: StrategyContext, plan: PruningPlan) -> dict[int, float]:
    """Dynamic skipping's β per layer (the median of the ratio the rule compares) measured on the
    model ``plan`` makes, so that about half the pruned model's tokens skip (Lu et al. App. A.3). The
    authors' ``method/dynamic_skipping.py`` takes β from whatever model it is run on, and their
    pipeline runs it on the pruned checkpoint; the original router's β is not the pruned router's
    (its softmax spans experts that are gone). The plan is applied inside temporary edits, which
    restore the model exactly; a finetuned plan (its weights live in the cache) takes β from the
    original routing."""
    import contextlib

    from moescope.analysis.model.skipping import calibrate
    from moescope.analysis.pruning.prune import is_finetuned

    if is_finetuned(plan) or not plan.layers:
        return calibrate(ctx.analysis(metrics=("routing",)))
    model = ctx.model
    with contextlib.ExitStack() as stack:
        for l in sorted(plan.layers):
            stack.enter_context(model.temporary_edit(l))
        for l, lp in sorted(plan.layers.items()):
            model.merge(l, lp.groups, lp.coefficients, merge_router=lp.merge_router, permutations=lp.permutations,
                        operator=lp.operator, density=lp.density, router_coeffs=lp.router_coefficients, folds=lp.folds)
        return calibrate(ctx.analysis(metrics=("routing",)))


def make_plan(name: str, ctx: StrategyContext, params: dict) -> PruningPlan:
    """Run strategy ``name`` (parameters validated first) and validate its plan against the model."""
    strategy = get_strategy(name)
    given, full = strategy.validate(dict(params), ctx.model)
    if strategy.needs_data and ctx.calib is None:
        raise MoescopeError(f"strategy {name} needs calibration tokens (a TokenBatch); the context has none")
    with_skip = bool(full.pop("with_skip", False))
    given.pop("with_skip", None)
    plan = strategy.run(dataclasses.replace(ctx, given=given), full)
    if with_skip and not plan.skip_beta:  # prune and also skip dynamically
        plan.skip_beta = pruned_beta(ctx, plan)
        plan.provenance["with_skip"] = True
    plan.validate_for(ctx.model)
    if ctx.calib is not None:  # say so where the plan keeps experts no calibration token reached
        res = ctx.analysis(metrics=("routing",))
        plan.provenance[UNUSED_KEY] = unused_kept(plan, {l: res.routing(l, "usage_count").tolist()
                                                         for l in res.layers})
    return plan
