"""Group-and-merge (Zhang et al.), HC-SMoE and router-guided (MC-SMoE) merging: experts grouped,
each group's members optionally aligned onto its reference expert (``align``: none | weights |
activations, :mod:`analysis.alignment`; MC-SMoE's addition, off in group-and-merge as published)
and merged into one output expert (``merge``: max | uniform | usage | frequency | learned | ties,
TIES keeping a ``density`` fraction of each member's difference | fix-dom-same, HC-SMoE's fold of
every member's neurons onto the group's dominant expert, :mod:`analysis.model.folding`).

The dominant expert of a ``fix-dom-same`` group: with HC-SMoE's representation (``mean_output``,
Euclidean) the member nearest the group's centroid (the authors' clustering path,
``clustering.py``); otherwise, and in ``router-guided``, the most-used member (its leader)."""

from __future__ import annotations

import torch
from moescope.analysis.core.errors import MoescopeError, unknown_name
from moescope.analysis.measure.capture import LayerStream
from moescope.analysis.model.alignment import (
    ALIGNMENTS,
    align_group,
    aligned_tensors,
    check_alignable,
    reference_position,
)
from moescope.analysis.model.folding import centroid_member, fix_dom_same
from moescope.analysis.model.merging import (
    GROUPINGS,
    MERGES,
    affinity,
    group_coefficients,
    group_experts,
    is_distance,
    learn_coefficients,
    router_guided_groups,
)
from moescope.analysis.pruning.plan import LayerPlan, PruningPlan
from moescope.analysis.strategies.base import Param, register
from moescope.analysis.strategies.selection import keep_counts, usage_threshold_counts

REPRESENTATIONS = {
    "outputs": ("cka_linear", "cka_rbf", "cka_rbf_minibatch", "cosine", "mse"),
    "weights": ("cosine", "mse"),
    "surrogate": ("cosine", "mse"),
    "mean_output": ("euclidean",),
}
AUGMENT_CHOICES = ("none", "embeddings", "hidden_states")


def similarity_name(representation: str, similarity: str) -> str:
    """The stored similarity matrix of a representation (outputs | weights | surrogate |
    mean_output) and a similarity (cka_linear | cka_rbf | cka_rbf_minibatch | cosine | mse |
    euclidean), e.g. ``weights`` + ``cosine`` → ``weight_cosine``, ``mean_output`` + ``euclidean`` →
    ``mean_output_euclidean`` (HC-SMoE's representation and distance)."""
    if representation not in REPRESENTATIONS:
        raise unknown_name("representation", representation, REPRESENTATIONS)
    allowed = REPRESENTATIONS[representation]
    if similarity not in allowed:
        raise MoescopeError(f"similarity '{similarity}' is not available for the {representation} representation; "
                            f"accepted: {', '.join(allowed)}")
    if representation == "outputs":
        return similarity
    prefix = {"weights": "weight", "surrogate": "surrogate", "mean_output": "mean_output"}[representation]
    return f"{prefix}_{similarity}"


def _learned(params: dict) -> bool:
    return params.get("merge") == "learned"


def _merge_params(default_merge: str, default_align: str) -> list[Param]:
    return [
        Param("merge", str, default_merge, choices=MERGES,
              help="merge coefficients / operator: max | uniform | usage | frequency (= usage) | learned "
                   "(group-and-merge eq. 6) | ties (usage-weighted, sign consensus) | fix-dom-same (HC-SMoE's "
                   "script: every member's neurons folded onto the dominant expert's most correlated ones, "
                   "weighted by routed tokens; needs align=none)", affects_key=False),
        Param("align", str, default_align, choices=ALIGNMENTS, label="align experts first",
              help="permute every member's intermediate neurons onto the group's reference expert before "
                   "combining (MC-SMoE's addition): none | weights (weight matching) | activations (activation "
                   "matching on the calibration tokens; weights where there are none) | routed-activations "
                   "(activation matching on the tokens routed to the member or the reference, MC-SMoE's)",
              affects_key=False),
        Param("density", float, 0.2, help="ties: fraction of each member's difference from the mean kept, in (0, 1]",
              label="TIES density", minimum=0, maximum=1, affects_key=False,
              when=lambda p: p.get("merge") == "ties"),
        Param("merge_router", bool, True, help="merge router rows with the same coefficients (else the dominant "
                                                 "expert's row)", label="merge router rows too",
              affects_key=False),
        Param("epochs", int, 50, help="learned merge: passes over the training 3/4 of the calibration sequences "
                                        "(50 in group-and-merge App. A)", minimum=1,
              affects_key=False, when=_learned),
        Param("lr", float, 1e-3, help="learned merge: SGD learning rate (1e-3 in group-and-merge App. A)", minimum=0,
              maximum=10, affects_key=False, when=_learned),
        Param("batch_sequences", int, 1, help="learned merge: calibration sequences per SGD step", minimum=1,
              affects_key=False, when=_learned),
        Param("seed", int, 0, help="seed (grouping, learned merge, fix-dom-same's subset of a group's rows beyond "
                                   "50,000)", minimum=0, affects_key=False),
    ]


def _layer_inputs(ctx) -> dict[int, torch.Tensor]:
    """Every MoE layer's calibration inputs (original model), for fitting merge coefficients."""
    return {l: x for l, x in LayerStream(ctx.model, ctx.calib.input_ids).layers() if x is not None}


def _alignment(ctx, params) -> str:
    """``align`` as given; the default (activations) falls back to weights without calibration data."""
    align = params["align"]
    if align in ("activations", "routed-activations") and ctx.calib is None:
        if "align" in ctx.given:
            raise MoescopeError(f"align={align} needs calibration data; use align=weights or align=none")
        return "weights"
    return align


def merge_plan(ctx, params, name, groups_by_layer: dict[int, list[list[int]]], res,
               dominants: dict[int, list[int]] | None = None, **extra) -> PruningPlan:
    """The plan merging each layer's groups with the coefficients ``params["merge"]`` asks for, its
    members first aligned onto the group's reference expert as ``params["align"]`` says, or, with
    ``fix-dom-same``, folded onto the group's dominant member (``dominants``: per layer, per group,
    its position in the group; default the most-used member)."""
    merge, merge_router = params["merge"], params["merge_router"]
    align = _alignment(ctx, params)
    layers, learned = {}, {}
    needs_x = merge in ("learned", "fix-dom-same") or align in ("activations", "routed-activations")
    xs = _layer_inputs(ctx) if needs_x else {}
    seq_len = ctx.calib.input_ids.shape[1] if ctx.calib is not None else None
    for l, groups in groups_by_layer.items():
        view = ctx.model.layers[l]
        coeffs = group_coefficients(groups, "uniform" if merge == "learned" else merge, res.routing(l, "usage"))
        perms, router_coeffs, folds = None, None, None
        if merge == "fix-dom-same":
            folds = [None] * len(groups)
            for j, g in enumerate(groups):
                if len(g) > 1:
                    dom = dominants[l][j] if dominants is not None else reference_position(coeffs[j])
                    folds[j], coeffs[j] = fix_dom_same(view, g, dom, xs[l], seed=params["seed"])
        if align != "none":
            # members with coefficient 0 (merge=max) take no part: no permutation for them
            perms = [[p if c[i] != 0 else None for i, p in enumerate(align_group(view, g, c, align, xs.get(l)))]
                     if sum(ci != 0 for ci in c) > 1 else [None] * len(g) for g, c in zip(groups, coeffs)]
        if merge == "learned":
            coeffs, router_coeffs, learned[str(l)] = learn_coefficients(
                view, xs[l], groups, seq_len, merge_router=merge_router, epochs=params["epochs"], lr=params["lr"],
                batch_sequences=params["batch_sequences"], seed=params["seed"],
                tensors=aligned_tensors(view, groups, perms) if perms is not None else None)
        layers[l] = LayerPlan(groups, coeffs, merge_router, perms, "ties" if merge == "ties" else "linear",
                              params["density"] if merge == "ties" else None, router_coeffs, folds)
        ctx.report("merge layers", len(layers), len(groups_by_layer))
    prov = ctx.provenance(name, **extra)
    prov["align"] = align
    if learned:
        prov["learned"] = learned
    return PruningPlan(ctx.model.source, layers, provenance=prov)


def per_routing_group(view, A, r, fn) -> list[list[int]]:
    """Group within each routing group of a group-limited router (so no output expert mixes
    routing groups), r / n_group groups each; elsewhere over the whole layer."""
    if not view.spec.group_limited:
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


def distinctness(A: torch.Tensor) -> torch.Tensor:
    """Per expert ``1 − max_{j≠e} A[e, j]`` for an affinity ``A`` in [0, 1]: how far the expert is
    from its closest sibling. With a global budget the experts that have no near twin are the
    ones kept as their own group, ranked across layers (a layer of near-duplicates gets fewer
    output experts)."""
    off = A.double().clone()
    off.fill_diagonal_(float("-inf"))
    return 1 - off.max(1).values


def merge_counts(ctx, params, affinities: dict[int, torch.Tensor]) -> dict[int, int]:
    """Output experts per layer: ``keep``, or a ``budget`` ranked by :func:`distinctness`."""
    if params.get("budget") is None:
        return keep_counts(ctx.model, params)
    return keep_counts(ctx.model, params, {l: distinctness(A) for l, A in affinities.items()})


def _check_merge(params, model) -> None:
    """TIES density in (0, 1]; an alignment or a fold only where every MoE layer's experts can be
    permuted; a fold without an alignment."""
    if not 0 < params["density"] <= 1:
        raise MoescopeError(f"density (ties: fraction of each member's difference kept) must be in (0, 1], "
                            f"got {params['density']:g}")
    if params["merge"] == "fix-dom-same" and params["align"] != "none":
        raise MoescopeError(f"merge=fix-dom-same folds each member's neurons onto the dominant expert itself, with no "
                            f"permutation first (HC-SMoE's script); give align=none, not align={params['align']}")
    if params["align"] != "none" or params["merge"] == "fix-dom-same":
        for view in model.layers.values():
            check_alignable(view)


def _check_similarity(params, model) -> None:
    similarity_name(params["representation"], params["similarity"])
    if params["augment"] != "none" and params["representation"] != "outputs":
        raise MoescopeError(f"augment={params['augment']} mixes calibration data for the outputs representation; "
                            f"the {params['representation']} representation reads no outputs (use augment=none)")
    if params["augment"] != "none" and not 0 < params["augment_ratio"] <= 4:
        raise MoescopeError(f"augment_ratio must be in (0, 4] when augmenting, got {params['augment_ratio']:g}")
    _check_merge(params, model)


def _analysis_overrides(params) -> dict:
    """The analysis parameters the strategy's augmentation asks for (none: no mixed rows)."""
    if params["augment"] == "none":
        return {"augment_ratio": 0.0}
    return {"augment_ratio": float(params["augment_ratio"]), "augment": params["augment"]}


@register("merge", "Group-and-merge: representation × similarity × grouping × merge × router merging.",
          [Param("representation", str, "outputs", choices=tuple(REPRESENTATIONS),
                 help="expert representation: outputs (data-centric) | weights | surrogate (model-centric) | "
                      "mean_output (HC-SMoE: mean output over all calibration tokens)"),
           Param("similarity", str, "cka_linear", choices=lambda p: REPRESENTATIONS.get(p.get("representation"), ()),
                 help="outputs: cka_linear | cka_rbf | cka_rbf_minibatch | cosine | mse; weights/surrogate: "
                      "cosine | mse; mean_output: euclidean", affects_key=False),
           Param("grouping", str, "spectral", choices=GROUPINGS,
                 help="spectral (k-means labels, MC-SMoE's call) | spectral_discretize | greedy | agglomerative "
                      "(average linkage on the representation's distance, HC-SMoE)", affects_key=False),
           Param("augment", str, "none", choices=AUGMENT_CHOICES, label="augmentation",
                 help="outputs: mix calibration data into the similarity: none | embeddings (Algorithm 1's mixup of "
                      "two sequences' token embeddings) | hidden_states (each layer's input rows; moescope's)"),
           Param("augment_ratio", float, 1.0, help="mixed rows per calibration token when augmenting", minimum=0,
                 label="augmentation ratio",
                 when=lambda p: p.get("augment") not in (None, "none")),
           *_merge_params("uniform", "none")],
          merges=True, budget=True, check=_check_similarity)
def group_and_merge(ctx, params):
    _alignment(ctx, params)  # refuse align=activations without data before any work
    representation, similarity, grouping = params["representation"], params["similarity"], params["grouping"]
    sim_name = similarity_name(representation, similarity)
    metrics = ("routing", "weights") if representation in ("weights", "surrogate") else ("routing", "similarity")
    res = ctx.analysis(metrics=metrics, **_analysis_overrides(params))
    seed = params["seed"]
    affinities = {l: affinity(res.similarity(l, sim_name), sim_name) for l in res.layers}
    counts = merge_counts(ctx, params, affinities)
    groups = {}
    for l in res.layers:
        A = affinities[l]
        D = res.similarity(l, sim_name) if is_distance(sim_name) else None

        def cluster(A_sub, r, members, method=grouping, D=D):
            sub_d = D[members][:, members] if D is not None else None
            return [[members[i] for i in g] for g in group_experts(A_sub, r, method, seed, sub_d)]

        groups[l] = per_routing_group(ctx.model.layers[l], A, counts[l], cluster)
    dominants = None
    if params["merge"] == "fix-dom-same" and sim_name == "mean_output_euclidean":  # HC-SMoE's: nearest the centroid
        dominants = {l: [centroid_member(res.similarity(l, sim_name), g) for g in gs] for l, gs in groups.items()}
    return merge_plan(ctx, params, f"merge:{representation}-{similarity}-{grouping}", groups, res, dominants)


ROUTER_SIMILARITIES = {"cosine": "logit_similarity", "correlation": "logit_correlation"}


ALLOCATIONS = ("distinctness", "usage-threshold")


def _check_router_guided(params, model) -> None:
    _check_merge(params, model)
    if params["allocation"] == "usage-threshold" and any(v.spec.group_limited for v in model.layers.values()):
        raise MoescopeError("allocation=usage-threshold gives layers different group counts, which a group-limited "
                            "router cannot split evenly; use allocation=distinctness with keep")


@register("router-guided", "MC-SMoE: the most-used experts lead their groups and every other expert joins the "
          "leader with the most similar router logits (cosine over calibration tokens); frequency-weighted merge.",
          [Param("router_similarity", str, "cosine", choices=tuple(ROUTER_SIMILARITIES),
                 help="cosine of the raw router-logit columns (MC-SMoE) | correlation (each column centred first: "
                      "a Pearson correlation; moescope's)", affects_key=False),
           Param("allocation", str, "distinctness", choices=ALLOCATIONS, label="groups per layer",
                 help="distinctness: keep gives every layer the same count, a budget is ranked by router-logit "
                      "distinctness (moescope's) | usage-threshold: keep × layers (or the budget) groups spread by one "
                      "global usage threshold (MC-SMoE's Mixtral script; layers get different counts)",
                 affects_key=False),
           *_merge_params("frequency", "activations")],
          merges=True, budget=True, check=_check_router_guided)
def router_guided(ctx, params):
    _alignment(ctx, params)
    res = ctx.analysis(metrics=("routing",))
    stat = ROUTER_SIMILARITIES[params["router_similarity"]]
    if params["allocation"] == "usage-threshold":
        total = params["budget"] if params.get("budget") is not None else params["keep"] * len(res.layers)
        counts = usage_threshold_counts(ctx.model, {l: res.routing(l, "usage_count") for l in res.layers}, total)
    else:
        counts = merge_counts(ctx, params, {l: affinity(res.routing(l, stat), "router_logits") for l in res.layers})
    groups = {}
    for l in res.layers:
        usage, sim = res.routing(l, "usage"), res.routing(l, stat)

        def cluster(A_sub, r, members, usage=usage, sim=sim):
            sub = router_guided_groups(usage[members], sim[members][:, members], r)
            return [[members[i] for i in g] for g in sub]

        groups[l] = per_routing_group(ctx.model.layers[l], sim, counts[l], cluster)
    plan = merge_plan(ctx, params, "router-guided", groups, res, merge=params["merge"])
    if params["allocation"] == "usage-threshold":
        plan.provenance["groups_per_layer"] = {str(l): c for l, c in counts.items()}
    return plan
