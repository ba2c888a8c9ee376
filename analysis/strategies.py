"""Every way of choosing what to drop or merge, each producing a :class:`PruningPlan`.

A strategy is ``fn(ctx, params) -> PruningPlan`` in :data:`STRATEGIES`. ``ctx`` carries the model,
the calibration batch and the cache (so analyses are reused); ``params`` is a plain dict validated
up front. The target is ``keep`` experts in every MoE layer, or a global ``budget`` of kept
experts split over the layers (criterion-based strategies rank experts across layers; every
layer keeps at least top-k). The model itself is never left edited: strategies that must look at
a pruned model (iterative, progressive) edit it temporarily and restore it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moescope.analysis.analyze import AnalysisParams, run_analysis
from moescope.analysis.capture import LayerStream
from moescope.analysis.errors import MoescopeError, unknown_name
from moescope.analysis.metrics import CRITERIA
from moescope.analysis.plan import LayerPlan, PruningPlan
from moescope.analysis.sensitivity import enumerate_layer

Progress = Callable[[str, int, int], None]


@dataclass
class StrategyContext:
    model: object  # MoEModel
    calib: object  # TokenBatch
    cache: object = None  # Cache
    analysis_params: AnalysisParams | None = None
    progress: Progress | None = None

    def analysis(self, metrics=("routing", "activations", "weights", "similarity")):
        params = self.analysis_params or AnalysisParams()
        params = AnalysisParams(**{**params.key(), "metrics": tuple(metrics)})
        return run_analysis(self.model, self.calib, params, cache=self.cache)

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(stage, done, total)


# ---------------------------------------------------------------- targets


def keep_counts(model, params: dict, scores: dict[int, torch.Tensor] | None = None,
                higher_is_better: bool = True) -> dict[int, int]:
    """Experts to keep per MoE layer: ``keep`` (uniform) or ``budget`` (total, split by ranking
    ``scores`` across layers when given, else proportionally to each layer's size)."""
    keep, budget = params.get("keep"), params.get("budget")
    if (keep is None) == (budget is None):
        raise MoescopeError("give exactly one target: keep (experts per layer) or budget (experts in all)")
    layers = model.layers
    if budget is not None and any(v.spec.routing == "sigmoid_group_topk" for v in layers.values()):
        raise MoescopeError("a global budget is not supported for group-limited routers (routing groups must stay "
                            "equal); give keep (experts per layer)")
    if keep is not None:
        keep = int(keep)
        for l, v in layers.items():
            if not v.top_k <= keep <= v.num_experts:
                raise MoescopeError(f"keep={keep} is not possible in layer {l}: it must be between top-k "
                                    f"({v.top_k}) and the layer's {v.num_experts} experts")
        return {l: keep for l in layers}
    budget = int(budget)
    lo = sum(v.top_k for v in layers.values())
    hi = sum(v.num_experts for v in layers.values())
    if not lo <= budget <= hi:
        raise MoescopeError(f"budget={budget} is not possible: it must be between {lo} (top-k in every layer) and {hi}")
    counts = {l: v.top_k for l, v in layers.items()}
    if scores is None:
        extra = budget - lo
        spare = {l: v.num_experts - v.top_k for l, v in layers.items()}
        total_spare = sum(spare.values()) or 1
        for l in layers:
            counts[l] += math.floor(extra * spare[l] / total_spare)
        left = budget - sum(counts.values())
        for l in sorted(layers, key=lambda l: -spare[l]):
            if left == 0:
                break
            if counts[l] < layers[l].num_experts:
                counts[l] += 1
                left -= 1
        return counts
    # rank the experts beyond each layer's top-k guaranteed best by score, across layers
    pool = []
    for l, s in scores.items():
        order = torch.argsort(s, descending=higher_is_better)
        for rank, e in enumerate(order.tolist()):
            if rank >= layers[l].top_k:
                pool.append((float(s[e]) if higher_is_better else -float(s[e]), l))
    pool.sort(key=lambda t: -t[0])
    for _, l in pool[: budget - lo]:
        counts[l] += 1
    return counts


def _nan_to(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, value), x)


def _plan(ctx, keep: dict[int, list[int]], name: str, params: dict) -> PruningPlan:
    return PruningPlan.from_keep(ctx.model.source, keep, provenance=_provenance(ctx, name, params))


def _provenance(ctx, name: str, params: dict) -> dict:
    calib = ctx.calib
    return {"strategy": name, "params": dict(params), "data": calib.fingerprint if calib is not None else None,
            "data_description": calib.describe() if calib is not None else None,
            "model_fingerprint": ctx.model.fingerprint()}


# ---------------------------------------------------------------- simple strategies


def strategy_random(ctx, params):
    g = torch.Generator().manual_seed(int(params.get("seed", 0)))
    counts = keep_counts(ctx.model, params)
    scores = {l: torch.rand(v.num_experts, generator=g) for l, v in ctx.model.layers.items()}
    return _plan(ctx, _top(ctx.model, scores, counts), "random", params)


def strategy_frequency(ctx, params):
    res = ctx.analysis(metrics=("routing",))
    scores = {l: res.routing(l, "usage") for l in res.layers}
    return _plan(ctx, _top(ctx.model, scores, keep_counts(ctx.model, params, scores)), "frequency", params)


def _routing_groups(view) -> list[list[int]]:
    """The router's expert groups: one per routing group for group-limited routers (DeepSeek-V3),
    else the whole layer. Selection happens within each, the same number from each."""
    if view.spec.routing != "sigmoid_group_topk":
        return [list(range(view.num_experts))]
    n_group = view.router_params.n_group
    per = view.num_experts // n_group
    return [list(range(k * per, (k + 1) * per)) for k in range(n_group)]


def _per_group_count(view, count: int) -> int:
    groups = _routing_groups(view)
    if count % len(groups) or count // len(groups) < (2 if len(groups) > 1 else 1):
        raise MoescopeError(f"layer {view.index}: keeping {count} experts cannot leave the router's {len(groups)} "
                            f"routing groups the same size with at least 2 each; keep a multiple of {len(groups)}")
    return count // len(groups)


def _top_layer(view, s: torch.Tensor, count: int) -> list[int]:
    """The ``count`` highest-scoring experts of a layer (ties: lower index first), the same number
    from each routing group where the router is group-limited."""
    per = _per_group_count(view, count)
    out = []
    for members in _routing_groups(view):
        order = sorted(members, key=lambda e: (-float(s[e]), e))
        out += order[: per if len(_routing_groups(view)) > 1 else count]
    return sorted(out)


def _top(model, scores: dict[int, torch.Tensor], counts: dict[int, int]) -> dict[int, list[int]]:
    return {l: _top_layer(model.layers[l], s, counts[l]) for l, s in scores.items()}


def _criterion_scores(res, name: str, order: str) -> dict[int, torch.Tensor]:
    """Keep-scores (higher = keep) for dropping by ``order`` of criterion ``name``: ``min`` drops
    the experts with the smallest values, ``max`` the largest. An expert with no value (never
    routed) is dropped first."""
    out = {}
    for l in res.layers:
        v = res.criterion(l, name).double()
        s = v if order == "min" else -v
        out[l] = _nan_to(s, float("-inf"))
    return out


def _check_criterion(params) -> tuple[str, str, str]:
    name = str(params.get("criterion", "")).upper()
    if name not in CRITERIA:
        raise unknown_name("criterion", name or "(none)", CRITERIA)
    order = str(params.get("order", "min")).lower()
    if order not in ("min", "max"):
        raise MoescopeError(f"order must be min or max (drop the experts with the smallest / largest {name}), got {order!r}")
    mode = str(params.get("mode", "one-shot"))
    if mode not in ("one-shot", "iterative"):
        raise MoescopeError(f"mode must be one-shot or iterative, got {mode!r}")
    return name, order, mode


def _metrics_for(name: str) -> tuple[str, ...]:
    if name in ("EGS", "EGE", "EGO", "EGN"):
        return ("routing", "gradients")
    if name in ("EWS", "WSR", "EWN"):
        return ("routing", "weights")
    if name in ("EAS", "EAE", "EAO", "EAN", "ETS", "REAP"):
        return ("routing", "activations")
    return ("routing",)


def strategy_criterion(ctx, params):
    """MC-Suite: drop by a criterion with min or max, one-shot or iteratively (one expert per layer
    per round, the criterion re-estimated on the pruned model each round)."""
    name, order, mode = _check_criterion(params)
    metrics = _metrics_for(name)
    res = ctx.analysis(metrics=metrics)
    scores = _criterion_scores(res, name, order)
    counts = keep_counts(ctx.model, params, scores)
    if mode == "one-shot":
        return _plan(ctx, _top(ctx.model, scores, counts), f"criterion:{order}-{name}", params)
    return _plan(ctx, _iterative(ctx, counts, lambda r: _criterion_scores(r, name, order), metrics),
                 f"criterion:{order}-{name}", params)


def _iterative(ctx, counts: dict[int, int], score_fn, metrics, after_round=None,
               restore: bool = True) -> dict[int, list[int]]:
    """Drop one expert per layer (one per routing group) per round, the lowest keep-score,
    re-analysing the pruned model each round; returns the surviving original indices.
    ``after_round(r, rounds)`` runs after each round's drops (the lottery finetunes there);
    ``restore=False`` leaves the model edited instead of restoring it afterwards."""
    model = ctx.model
    alive = {l: list(range(v.num_experts)) for l, v in model.layers.items()}
    rounds = max((len(alive[l]) - counts[l]) // len(_routing_groups(model.layers[l])) for l in alive)
    with contextlib.ExitStack() as stack:
        if restore:
            for l in model.layers:
                stack.enter_context(model.temporary_edit(l))
        for r in range(rounds):
            scores = score_fn(ctx.analysis(metrics=metrics))
            for l in model.layers:
                if len(alive[l]) <= counts[l]:
                    continue
                s = scores[l]
                view = model.layers[l]
                n_groups = len(_routing_groups(view))
                keep_local = _top_layer(view, s, len(s) - n_groups)  # one fewer in every routing group
                model.keep(l, keep_local)
                alive[l] = [alive[l][e] for e in keep_local]
            if after_round is not None:
                after_round(r, rounds)
            ctx.report("rounds", r + 1, rounds)
    return {l: sorted(a) for l, a in alive.items()}


# ---------------------------------------------------------------- enumeration


def strategy_enumerate(ctx, params):
    """Lu et al.: per layer the kept subset with the smallest reconstruction loss on calibration
    inputs; ``mode`` layer-wise (inputs of the original model) or progressive (inputs that already
    went through the pruned earlier layers)."""
    mode = str(params.get("mode", "layer-wise"))
    if mode not in ("layer-wise", "progressive"):
        raise MoescopeError(f"mode must be layer-wise or progressive, got {mode!r}")
    method = str(params.get("method", "auto"))
    max_subsets = int(params.get("max_subsets", 5000))
    if params.get("budget") is not None:
        raise MoescopeError("enumerate needs a uniform target: give keep (experts per layer), not budget")
    counts = keep_counts(ctx.model, params)
    model = ctx.model
    keep: dict[int, list[int]] = {}
    stream = LayerStream(model, ctx.calib.input_ids)
    n = model.num_hidden_layers
    with contextlib.ExitStack() as stack:
        while stream.layer < n:
            l = stream.layer
            before = [h.clone() for h in stream.hidden] if mode == "progressive" and l in model.layers else None
            x = stream.step(capture_moe_input=True)
            if x is not None:
                keep[l] = enumerate_layer(model.layers[l], x, counts[l], method=method, max_subsets=max_subsets).keep
                if before is not None:
                    # later layers see this layer pruned: edit it (restored on exit) and redo its output
                    stack.enter_context(model.temporary_edit(l))
                    model.keep(l, keep[l])
                    stream.hidden, stream.layer = before, l
                    stream.step(capture_moe_input=False)
            ctx.report("layers", l + 1, n)
    return _plan(ctx, keep, f"enumerate:{mode}", params)


# ---------------------------------------------------------------- group-and-merge

REPRESENTATIONS = {
    "outputs": ("cka_linear", "cka_rbf", "cosine", "mse"),
    "weights": ("cosine", "mse"),
    "surrogate": ("cosine", "mse"),
}


def similarity_name(representation: str, similarity: str) -> str:
    """The stored similarity matrix of a representation (outputs | weights | surrogate) and a
    similarity (cka_linear | cka_rbf | cosine | mse), e.g. ``weights`` + ``cosine`` → ``weight_cosine``."""
    if representation not in REPRESENTATIONS:
        raise unknown_name("representation", representation, REPRESENTATIONS)
    allowed = REPRESENTATIONS[representation]
    if similarity not in allowed:
        raise MoescopeError(f"similarity '{similarity}' is not available for the {representation} representation; "
                            f"accepted: {', '.join(allowed)}")
    return similarity if representation == "outputs" else f"{'weight' if representation == 'weights' else 'surrogate'}_{similarity}"


def _merge_options(ctx, params) -> tuple[str, str, float]:
    """``merge`` (coefficients / operator), ``align`` (default: activations with calibration data,
    else weights) and the TIES ``density``, validated before any compute."""
    from moescope.analysis.alignment import ALIGNMENTS
    from moescope.analysis.merging import MERGES

    merge = str(params.get("merge", "uniform"))
    if merge not in MERGES:
        raise unknown_name("merge", merge, MERGES)
    align = str(params.get("align", "activations" if ctx.calib is not None else "weights"))
    if align not in ALIGNMENTS:
        raise unknown_name("align", align, ALIGNMENTS)
    if align == "activations" and ctx.calib is None:
        raise MoescopeError("align=activations needs calibration data; use align=weights or align=none")
    density = float(params.get("density", 0.2))
    if not 0 < density <= 1:
        raise MoescopeError(f"density (ties: fraction of each member's difference kept) must be in (0, 1], got {density}")
    return merge, align, density


def _merge_plan(ctx, params, name, groups_by_layer: dict[int, list[list[int]]], res) -> PruningPlan:
    from moescope.analysis.alignment import align_group, aligned_tensors
    from moescope.analysis.merging import group_coefficients, learn_coefficients

    merge, align, density = _merge_options(ctx, params)
    merge_router = bool(params.get("merge_router", True))
    layers, learned = {}, {}
    xs = _layer_inputs(ctx) if merge == "learned" or align == "activations" else {}
    for l, groups in groups_by_layer.items():
        view = ctx.model.layers[l]
        coeffs = group_coefficients(groups, "uniform" if merge == "learned" else merge, res.routing(l, "usage"))
        perms = None
        if align != "none":
            # members with coefficient 0 (merge=max) are not needed: no permutation for them
            perms = [[p if c[i] != 0 else None for i, p in enumerate(align_group(view, g, c, align, xs.get(l)))]
                     if sum(ci != 0 for ci in c) > 1 else [None] * len(g) for g, c in zip(groups, coeffs)]
        if merge == "learned":
            coeffs, learned[str(l)] = learn_coefficients(
                view, xs[l], groups, coeffs, merge_router=merge_router,
                steps=int(params.get("steps", 100)), lr=float(params.get("lr", 0.02)), seed=int(params.get("seed", 0)),
                tensors=aligned_tensors(view, groups, perms) if perms is not None else None)
        layers[l] = LayerPlan(groups, coeffs, merge_router, perms, "ties" if merge == "ties" else "linear",
                              density if merge == "ties" else None)
        ctx.report("merge layers", len(layers), len(groups_by_layer))
    prov = _provenance(ctx, name, params)
    prov["align"] = align
    if learned:
        prov["learned"] = learned
    return PruningPlan(ctx.model.source, layers, provenance=prov)


def _layer_inputs(ctx) -> dict[int, torch.Tensor]:
    """Every MoE layer's calibration inputs (original model), for fitting merge coefficients."""
    out = {}
    for l, x in LayerStream(ctx.model, ctx.calib.input_ids).layers():
        if x is not None:
            out[l] = x
    return out


def _per_routing_group(view, A, r, fn) -> list[list[int]]:
    """Group within each routing group of a group-limited router (so no output expert mixes
    routing groups), r / n_group groups each; elsewhere over the whole layer."""
    if view.spec.routing != "sigmoid_group_topk":
        return fn(A, r, list(range(A.shape[0])))
    n_group = view.router_params.n_group
    if r % n_group:
        raise MoescopeError(f"layer {view.index}: {r} groups cannot be split over {n_group} routing groups evenly")
    per = view.num_experts // n_group
    out = []
    for k in range(n_group):
        members = list(range(k * per, (k + 1) * per))
        out += fn(A[members][:, members], r // n_group, members)
    return out


def strategy_merge(ctx, params):
    """Group-and-merge: representation × similarity × grouping × alignment × merge × router merging.

    ``align`` (none | weights | activations) permutes every member onto its group's reference
    expert before combining; ``merge`` is max | uniform | usage | frequency | learned | ties
    (``density``: fraction of each member's difference TIES keeps)."""
    from moescope.analysis.merging import GROUPINGS, affinity, group_experts

    representation = str(params.get("representation", "outputs"))
    similarity = str(params.get("similarity", "cka_linear"))
    sim_name = similarity_name(representation, similarity)
    grouping = str(params.get("grouping", "spectral"))
    if grouping not in GROUPINGS:
        raise unknown_name("grouping", grouping, GROUPINGS)
    _merge_options(ctx, params)
    if params.get("budget") is not None:
        raise MoescopeError("merge needs a uniform target: give keep (output experts per layer), not budget")
    counts = keep_counts(ctx.model, params)
    metrics = ("routing", "similarity") if representation == "outputs" else ("routing", "weights")
    res = ctx.analysis(metrics=metrics)
    seed = int(params.get("seed", 0))
    groups = {}
    for l in res.layers:
        A = affinity(res.similarity(l, sim_name), sim_name)

        def cluster(A_sub, r, members, method=grouping):
            return [[members[i] for i in g] for g in group_experts(A_sub, r, method, seed)]

        groups[l] = _per_routing_group(ctx.model.layers[l], A, counts[l], cluster)
    return _merge_plan(ctx, params, f"merge:{representation}-{similarity}-{grouping}", groups, res)


def strategy_router_guided(ctx, params):
    """Merge-then-compress style: the most-used experts lead their groups and every other expert
    joins the leader with the most similar router logits; usage-weighted merge by default."""
    from moescope.analysis.merging import router_guided_groups

    if params.get("budget") is not None:
        raise MoescopeError("router-guided merging needs a uniform target: give keep, not budget")
    params = {"merge": "usage", **params}
    _merge_options(ctx, params)
    counts = keep_counts(ctx.model, params)
    res = ctx.analysis(metrics=("routing",))
    groups = {}
    for l in res.layers:
        usage, sim = res.routing(l, "usage"), res.routing(l, "logit_similarity")

        def cluster(A_sub, r, members, usage=usage, sim=sim):
            sub = router_guided_groups(usage[members], sim[members][:, members], r)
            return [[members[i] for i in g] for g in sub]

        groups[l] = _per_routing_group(ctx.model.layers[l], sim, counts[l], cluster)
    return _merge_plan(ctx, params, "router-guided", groups, res)


def strategy_manual(ctx, params):
    """A drop set (``drop``: {layer: [experts]}) or explicit groups (``groups``: {layer: [[...]]}
    with optional ``coefficients``), as given by a person."""
    if "groups" in params:
        layers = {}
        coeffs = params.get("coefficients") or {}
        for key, groups in params["groups"].items():
            l = int(key)
            layers[l] = LayerPlan([[int(e) for e in g] for g in groups], coeffs.get(key) or coeffs.get(l),
                                  bool(params.get("merge_router", True)))
        return PruningPlan(ctx.model.source, layers, provenance=_provenance(ctx, "manual", params))
    if "drop" in params:
        drop = {int(k): [int(e) for e in v] for k, v in params["drop"].items()}
        return PruningPlan.from_drop(ctx.model, drop, provenance=_provenance(ctx, "manual", params))
    raise MoescopeError("manual needs drop ({layer: [experts]}) or groups ({layer: [[experts], ...]})")


# ---------------------------------------------------------------- dynamic skipping


def strategy_skip(ctx, params):
    """Dynamic skipping only: β per layer calibrated as the median w₂/w₁ (no expert removed)."""
    from moescope.analysis.skipping import calibrate

    plan = PruningPlan(ctx.model.source, {}, provenance=_provenance(ctx, "skip", params))
    plan.skip_beta = calibrate(ctx.analysis(metrics=("routing",)))
    return plan


# ---------------------------------------------------------------- registry


STRATEGIES: dict[str, Callable] = {
    "random": strategy_random,
    "frequency": strategy_frequency,
    "criterion": strategy_criterion,
    "enumerate": strategy_enumerate,
    "merge": strategy_merge,
    "router-guided": strategy_router_guided,
    "manual": strategy_manual,
    "skip": strategy_skip,
}


def make_plan(name: str, ctx: StrategyContext, params: dict) -> PruningPlan:
    """Run strategy ``name`` and validate its plan against the model before returning it."""
    try:
        fn = STRATEGIES[name]
    except KeyError:
        raise unknown_name("strategy", name, STRATEGIES) from None
    params = dict(params)
    with_skip = bool(params.pop("with_skip", False))
    plan = fn(ctx, params)
    if with_skip and not plan.skip_beta:  # prune and also skip dynamically (β from the original routing)
        from moescope.analysis.skipping import calibrate

        plan.skip_beta = calibrate(ctx.analysis(metrics=("routing",)))
        plan.provenance["with_skip"] = True
    plan.validate_for(ctx.model)
    return plan

